"""Member pages: the member list, inviting, changing or removing a role, revoking an
invitation, and the invitation link's page (open to anyone holding it)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import login
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.views.generic import TemplateView

from consortium.core.errors import ServiceError
from consortium.core.pages import (
    ANYONE,
    PermissionRequiredMixin,
    apply_service_errors,
    error_message,
    first_or_404,
)
from consortium.governance import selectors
from consortium.governance.forms import InvitationForm, MembershipRoleForm, NewAccountForm
from consortium.governance.models import CONSORTIUM_ROLES, INSTITUTION_ROLES, Role
from consortium.governance.pages import GovernanceAction, GovernanceForm, GovernancePage
from consortium.governance.services.members import (
    invitation_accept,
    invitation_accept_with_new_account,
    invitation_create,
    invitation_for_acceptance,
    invitation_revoke,
    membership_change_role,
    membership_remove,
)

# The model backend logs a new invitee in; axes' backend needs a request to
# authenticate and has nothing to check for an account created a moment ago.
_LOGIN_BACKEND = "django.contrib.auth.backends.ModelBackend"


class MemberListView(GovernancePage):
    permission_required = "consortium.view_members"
    template_name = "consortium/member_list.html"

    def get_permission_object(self):
        return self.consortium

    def get_context_data(self, **kwargs):
        user = self.request.user
        rows = []
        for membership in selectors.memberships_visible_to(user).filter(consortium=self.consortium):
            manage = self.can("consortium.manage_membership", membership)
            rows.append(
                {
                    "membership": membership,
                    "can_manage": manage,
                    "role_form": MembershipRoleForm(
                        membership=membership,
                        initial={"role": membership.role},
                        auto_id=f"id_m{membership.pk}_%s",
                    )
                    if manage
                    else None,
                }
            )
        invitations = [
            {"invitation": inv, "can_revoke": inv.is_pending}
            for inv in selectors.invitations_visible_to(user).filter(consortium=self.consortium)
            if self.can("consortium.revoke_invitation", inv)
        ]
        return super().get_context_data(
            rows=rows,
            invitations=invitations,
            can_invite=self.can("consortium.send_invitations", self.consortium),
            **kwargs,
        )


class MemberInviteView(GovernanceForm):
    """A consortium admin may invite to any role; an institution admin only to
    institution roles in the institutions they administer."""

    permission_required = "consortium.send_invitations"
    template_name = "consortium/member_invite.html"
    form_class = InvitationForm

    def get_permission_object(self):
        return self.consortium

    @cached_property
    def may_invite_consortium_wide(self) -> bool:
        return self.can("consortium.invite_to_consortium", self.consortium)

    def get_form_kwargs(self):
        kwargs = super().get_form_kwargs()
        roles = set(INSTITUTION_ROLES)
        if self.may_invite_consortium_wide:
            roles |= CONSORTIUM_ROLES
        institutions = [
            i.pk
            for i in selectors.institutions_visible_to(self.request.user).filter(
                consortium=self.consortium
            )
            if self.can("consortium.invite_to_institution", i)
        ]
        kwargs["roles"] = roles
        kwargs["institutions"] = self.consortium.institutions.filter(pk__in=institutions)
        return kwargs

    def perform(self, form):
        institution = form.cleaned_data["institution"]
        if institution is None and not self.may_invite_consortium_wide:
            form.add_error(
                "institution", "Choose the institution you administer to invite someone to."
            )
            return self.form_invalid(form)
        invitation, _token = invitation_create(
            acting_user=self.request.user,
            consortium=self.consortium,
            email=form.cleaned_data["email"],
            role=form.cleaned_data["role"],
            institution=institution,
        )
        messages.success(
            self.request,
            f"An invitation was emailed to {invitation.email}; it expires "
            f"{timezone.localtime(invitation.expires_at):%Y-%m-%d %H:%M %Z}.",
        )
        return redirect("consortium:member-list", slug=self.consortium.slug)


class MembershipMixin:
    @cached_property
    def membership(self):
        return first_or_404(
            selectors.memberships_visible_to(self.request.user),
            consortium=self.consortium,
            pk=self.kwargs["pk"],
        )

    def get_permission_object(self):
        return self.membership


class MembershipRoleView(MembershipMixin, GovernanceAction):
    permission_required = "consortium.manage_membership"

    def post(self, request, *args, **kwargs):
        form = MembershipRoleForm(request.POST, membership=self.membership)
        if not form.is_valid():
            messages.error(request, "Choose one of the roles offered.")
        else:
            try:
                membership_change_role(
                    acting_user=request.user,
                    membership=self.membership,
                    role=form.cleaned_data["role"],
                )
            except (ValidationError, ServiceError) as exc:
                messages.error(request, error_message(exc))
            else:
                messages.success(
                    request,
                    f"{self.membership.user} is now {Role(form.cleaned_data['role']).label}.",
                )
        return redirect("consortium:member-list", slug=self.consortium.slug)


class MembershipRemoveView(MembershipMixin, GovernancePage):
    """GET asks for confirmation; POST removes."""

    permission_required = "consortium.manage_membership"
    template_name = "consortium/membership_remove.html"

    def get_context_data(self, **kwargs):
        return super().get_context_data(membership=self.membership, **kwargs)

    def post(self, request, *args, **kwargs):
        try:
            membership_remove(acting_user=request.user, membership=self.membership)
        except ServiceError as exc:
            return self.render_to_response(self.get_context_data(error=str(exc)))
        messages.success(
            request, f"{self.membership.user} no longer holds {self.membership.get_role_display()}."
        )
        return redirect("consortium:member-list", slug=self.consortium.slug)


class InvitationRevokeView(GovernanceAction):
    permission_required = "consortium.revoke_invitation"

    @cached_property
    def invitation(self):
        return first_or_404(
            selectors.invitations_visible_to(self.request.user),
            consortium=self.consortium,
            pk=self.kwargs["pk"],
        )

    def get_permission_object(self):
        return self.invitation

    def post(self, request, *args, **kwargs):
        try:
            invitation_revoke(acting_user=request.user, invitation=self.invitation)
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, f"The invitation of {self.invitation.email} was revoked.")
        return redirect("consortium:member-list", slug=self.consortium.slug)


class InvitationAcceptView(PermissionRequiredMixin, TemplateView):
    """Open to anyone holding the link: a signed-in user accepts with a button;
    someone without an account creates one here and is signed in."""

    permission_required = ANYONE
    template_name = "consortium/invitation_accept.html"

    def _load(self):
        try:
            return invitation_for_acceptance(self.kwargs["token"]), None
        except ServiceError as exc:
            # An unknown token is a 404; a used, revoked or expired one is gone (410).
            status = 404 if exc.code == "invitation_invalid" else 410
            response = render(
                self.request,
                "consortium/invitation_invalid.html",
                {"message": str(exc)},
                status=status,
            )
            return None, response

    def _page(self, invitation, *, form=None, error="", status=200):
        return self.render_to_response(
            {
                "invitation": invitation,
                "form": form or NewAccountForm(),
                "accept_error": error,
                "login_url": reverse("login") + "?next=" + self.request.path,
            },
            status=status,
        )

    def get(self, request, *args, **kwargs):
        invitation, refused = self._load()
        if refused:
            return refused
        return self._page(invitation)

    def post(self, request, *args, **kwargs):
        invitation, refused = self._load()
        if refused:
            return refused
        token = self.kwargs["token"]
        if request.user.is_authenticated:
            try:
                membership = invitation_accept(token=token, user=request.user)
            except ServiceError as exc:
                return self._page(invitation, error=str(exc), status=400)
            return self._joined(membership)
        form = NewAccountForm(request.POST)
        if form.is_valid():
            try:
                membership = invitation_accept_with_new_account(
                    token=token,
                    username=form.cleaned_data["username"],
                    password=form.cleaned_data["password"],
                    full_name=form.cleaned_data["full_name"],
                )
            except (ValidationError, ServiceError) as exc:
                apply_service_errors(form, exc)
            else:
                login(request, membership.user, backend=_LOGIN_BACKEND)
                return self._joined(membership)
        return self._page(invitation, form=form)

    def _joined(self, membership):
        where = membership.institution or membership.consortium
        messages.success(
            self.request, f"Welcome: you are now {membership.get_role_display()} at {where}."
        )
        return redirect("consortium:consortium-detail", slug=membership.consortium.slug)
