"""Governance pages. Each view is thin: it loads its object through a selector
scoped to the user (``viewmixins`` checks the declared permission and answers a
forbidden object with the same 404 as a missing one), validates a form, calls
one service with ``acting_user=request.user``, shows a message and redirects."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

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
    SIGNED_IN,
    PermissionRequiredMixin,
    apply_service_errors,
    first_or_404,
)
from consortium.governance import selectors, services
from consortium.governance.forms import (
    AgreementCreateForm,
    AgreementTermsForm,
    InstitutionCreateForm,
    InstitutionUpdateForm,
    InvitationForm,
    MembershipRoleForm,
    NewAccountForm,
    SignForm,
    WithdrawForm,
)
from consortium.governance.models import CONSORTIUM_ROLES, INSTITUTION_ROLES, Role
from consortium.governance.pages import GovernanceAction, GovernanceForm, GovernancePage
from consortium.governance.tables import InstitutionTable

# The model backend logs a new invitee in; axes' backend needs a request to
# authenticate and has nothing to check for an account created a moment ago.
_LOGIN_BACKEND = "django.contrib.auth.backends.ModelBackend"

#: Ledger entries the consortium dashboard lists (to those who may read the ledger).
RECENT_ENTRIES = 10


# --- Overview and dashboard --------------------------------------------------------


class OverviewView(PermissionRequiredMixin, TemplateView):
    """The user's consortia; with exactly one, its dashboard directly."""

    permission_required = SIGNED_IN
    template_name = "consortium/overview.html"

    def get(self, request, *args, **kwargs):
        consortia = list(selectors.consortia_visible_to(request.user))
        if len(consortia) == 1:
            return redirect("consortium:consortium-detail", slug=consortia[0].slug)
        return self.render_to_response({"consortia": consortia})


class ConsortiumDetailView(GovernancePage):
    permission_required = "consortium.view_consortium"
    template_name = "consortium/consortium_detail.html"

    def get_permission_object(self):
        return self.consortium

    def get_context_data(self, **kwargs):
        # Lazy imports: the governance app does not depend on the others at import time.
        from audit.models import LedgerEntry
        from training.rounds.live import consortium_live_state

        dashboard = selectors.consortium_dashboard(self.request.user, self.consortium)
        can_view_ledger = self.can("audit.view_ledger", self.consortium)
        # Per institution, its standing under each agreement's current version; the table sorts
        # and pages by query string, and ?q= keeps the institutions whose name or slug has it.
        query = self.request.GET.get("q", "").strip()
        rows = []
        for institution in dashboard.institutions:
            if query and query.lower() not in f"{institution.name} {institution.slug}".lower():
                continue
            row = {
                "institution": institution,
                "name": institution.name,
                "country": institution.country,
                "worker_key": bool(institution.worker_public_key),
            }
            for i, status in enumerate(dashboard.statuses):
                standing = _standing(status, institution)
                row[f"standing_{i}"] = standing
                row[f"standing_{i}_key"] = standing["label"]
            rows.append(row)
        table = InstitutionTable.for_dashboard(
            rows, [s.agreement.title for s in dashboard.statuses], self.request
        )
        return super().get_context_data(
            dashboard=dashboard,
            institutions_table=table,
            institution_query=query,
            can_view_ledger=can_view_ledger,
            consortium_live=consortium_live_state(self.consortium),
            recent_entries=(
                LedgerEntry.objects.filter(consortium_slug=self.consortium.slug).order_by("-seq")[
                    :RECENT_ENTRIES
                ]
                if can_view_ledger
                else []
            ),
            can_add_institution=self.can("consortium.add_institution", self.consortium),
            can_manage_agreements=self.can("consortium.manage_agreements", self.consortium),
            **kwargs,
        )


def _standing(status: selectors.AgreementStatus, institution) -> dict:
    """One institution's signature state under an agreement, for a badge."""
    if any(w.institution_id == institution.pk for w in status.withdrawn):
        return {"label": "withdrawn", "tone": "bad", "status": status}
    if status.version is None:
        return {"label": "no published version", "tone": "", "status": status}
    signature = next((s for s in status.signed if s.institution_id == institution.pk), None)
    if signature:
        return {
            "label": f"signed v{status.version.number}",
            "tone": "ok",
            "status": status,
            "signature": signature,
        }
    return {"label": f"v{status.version.number} unsigned", "tone": "warn", "status": status}


# --- Institutions ---------------------------------------------------------------------


class InstitutionMixin:
    @cached_property
    def institution(self):
        return first_or_404(
            selectors.institutions_visible_to(self.request.user),
            consortium=self.consortium,
            slug=self.kwargs["inst_slug"],
        )

    def get_permission_object(self):
        return self.institution

    def get_context_data(self, **kwargs):
        kwargs.setdefault("institution", self.institution)
        return super().get_context_data(**kwargs)


class InstitutionCreateView(GovernanceForm):
    permission_required = "consortium.add_institution"
    template_name = "consortium/institution_form.html"
    form_class = InstitutionCreateForm

    def get_permission_object(self):
        return self.consortium

    def perform(self, form):
        institution = services.institution_create(
            acting_user=self.request.user, consortium=self.consortium, **form.cleaned_data
        )
        messages.success(self.request, f"{institution} was added to {self.consortium}.")
        return redirect(
            "consortium:institution-detail", slug=self.consortium.slug, inst_slug=institution.slug
        )


def _institution_accountability(user, institution):
    """The institution's contributions and privacy spent, job by job (issue 5). Imported here:
    the governance app does not depend on the training app at import time."""
    from training.jobs.selectors import institution_accountability

    return institution_accountability(user, institution)


class InstitutionDetailView(InstitutionMixin, GovernancePage):
    permission_required = "consortium.view_institution"
    template_name = "consortium/institution_detail.html"

    def get_context_data(self, **kwargs):
        institution = self.institution
        return super().get_context_data(
            memberships=selectors.memberships_visible_to(self.request.user).filter(
                institution=institution
            ),
            signatures=institution.signatures.select_related("version__agreement").order_by(
                "-signed_at"
            ),
            withdrawals=institution.withdrawals.select_related("agreement"),
            fingerprint=services.key_fingerprint(institution.worker_public_key),
            can_edit=self.can("consortium.change_institution", institution),
            accountability=_institution_accountability(self.request.user, institution),
            **kwargs,
        )


class InstitutionEditView(InstitutionMixin, GovernanceForm):
    permission_required = "consortium.change_institution"
    template_name = "consortium/institution_form.html"
    form_class = InstitutionUpdateForm

    def get_initial(self):
        i = self.institution
        return {"name": i.name, "country": i.country, "worker_public_key": i.worker_public_key}

    def perform(self, form):
        services.institution_update(
            acting_user=self.request.user, institution=self.institution, **form.cleaned_data
        )
        messages.success(self.request, f"{self.institution} was updated.")
        return redirect(
            "consortium:institution-detail",
            slug=self.consortium.slug,
            inst_slug=self.institution.slug,
        )


# --- Members and invitations --------------------------------------------------------------


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
        invitation, _token = services.invitation_create(
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
                services.membership_change_role(
                    acting_user=request.user,
                    membership=self.membership,
                    role=form.cleaned_data["role"],
                )
            except (ValidationError, ServiceError) as exc:
                messages.error(request, _message_of(exc))
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
            services.membership_remove(acting_user=request.user, membership=self.membership)
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
            services.invitation_revoke(acting_user=request.user, invitation=self.invitation)
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
            return services.invitation_for_acceptance(self.kwargs["token"]), None
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
                membership = services.invitation_accept(token=token, user=request.user)
            except ServiceError as exc:
                return self._page(invitation, error=str(exc), status=400)
            return self._joined(membership)
        form = NewAccountForm(request.POST)
        if form.is_valid():
            try:
                membership = services.invitation_accept_with_new_account(
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


# --- Agreements --------------------------------------------------------------------------


class AgreementMixin:
    @cached_property
    def agreement(self):
        return first_or_404(
            selectors.agreements_visible_to(self.request.user),
            consortium=self.consortium,
            pk=self.kwargs["pk"],
        )

    def get_permission_object(self):
        return self.agreement

    def get_context_data(self, **kwargs):
        kwargs.setdefault("agreement", self.agreement)
        return super().get_context_data(**kwargs)


class VersionMixin(AgreementMixin):
    @cached_property
    def version(self):
        return first_or_404(
            selectors.versions_visible_to(self.request.user),
            agreement=self.agreement,
            number=self.kwargs["number"],
        )

    @cached_property
    def current(self):
        return selectors.current_version(self.agreement)

    def get_permission_object(self):
        return self.version

    def get_context_data(self, **kwargs):
        kwargs.setdefault("version", self.version)
        kwargs.setdefault("current", self.current)
        kwargs.setdefault("is_current", self.current is not None and self.current == self.version)
        return super().get_context_data(**kwargs)


class AgreementListView(GovernancePage):
    permission_required = "consortium.view_agreement"
    template_name = "consortium/agreement_list.html"

    def get_permission_object(self):
        return self.consortium

    def get_context_data(self, **kwargs):
        agreements = selectors.agreements_with_versions(self.request.user).filter(
            consortium=self.consortium
        )
        return super().get_context_data(
            statuses=[selectors.agreement_status(a) for a in agreements],
            can_create=self.can("consortium.manage_agreements", self.consortium),
            **kwargs,
        )


class AgreementCreateView(GovernanceForm):
    permission_required = "consortium.manage_agreements"
    template_name = "consortium/agreement_form.html"
    form_class = AgreementCreateForm

    def get_permission_object(self):
        return self.consortium

    def get_initial(self):
        today = timezone.localdate()
        return {
            "valid_from": today,
            "valid_until": today + dt.timedelta(days=365),
            "delta": Decimal("0.00001"),
        }

    def perform(self, form):
        version = services.agreement_create(
            acting_user=self.request.user,
            consortium=self.consortium,
            title=form.cleaned_data["title"],
            **form.terms(),
        )
        messages.success(
            self.request, f"Draft version 1 of “{version.agreement}” was saved; publish it to sign."
        )
        return redirect(_version_url("version-detail", version))


def _version_url(name: str, version) -> str:
    agreement = version.agreement
    return reverse(
        f"consortium:{name}",
        kwargs={
            "slug": agreement.consortium.slug,
            "pk": agreement.pk,
            "number": version.number,
        },
    )


class AgreementDetailView(AgreementMixin, GovernancePage):
    permission_required = "consortium.view_agreement"
    template_name = "consortium/agreement_detail.html"

    def get_context_data(self, **kwargs):
        agreement = self.agreement
        status = selectors.agreement_status(agreement)
        versions = agreement.versions.order_by("-number").prefetch_related(
            "signatures__institution"
        )
        return super().get_context_data(
            status=status,
            versions=versions,
            draft=selectors.draft_version(agreement),
            can_manage=self.can("consortium.manage_agreements", agreement),
            can_sign=self.can("consortium.sign_for_an_institution", agreement),
            can_withdraw=self.can("consortium.withdraw_for_an_institution", agreement),
            **kwargs,
        )


class VersionDetailView(VersionMixin, GovernancePage):
    permission_required = "consortium.view_agreement"
    template_name = "consortium/version_detail.html"

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            signatures=self.version.signatures.select_related("institution"),
            can_manage=self.can("consortium.manage_agreements", self.version),
            can_sign=self.can("consortium.sign_for_an_institution", self.version),
            **kwargs,
        )


class VersionEditView(VersionMixin, GovernanceForm):
    """Edit a draft. A published version is shown as immutable; a POST to it
    still goes to the service, which refuses it."""

    permission_required = "consortium.manage_agreements"
    template_name = "consortium/version_form.html"
    form_class = AgreementTermsForm

    def get_initial(self):
        return AgreementTermsForm.initial_from(self.version)

    def perform(self, form):
        version = services.agreement_version_update(
            acting_user=self.request.user, version=self.version, **form.terms()
        )
        messages.success(self.request, f"Draft version {version.number} was saved.")
        return redirect(_version_url("version-detail", version))


class VersionPublishView(VersionMixin, GovernancePage):
    """GET asks for confirmation; POST publishes (freezes) the draft."""

    permission_required = "consortium.manage_agreements"
    template_name = "consortium/version_publish.html"

    def post(self, request, *args, **kwargs):
        try:
            version = services.agreement_version_publish(
                acting_user=request.user, version=self.version
            )
        except (ValidationError, ServiceError) as exc:
            messages.error(request, _message_of(exc))
            return redirect(_version_url("version-detail", self.version))
        messages.success(
            request,
            f"Version {version.number} is published (digest {version.content_digest[:12]}…); "
            "every institution must now sign it.",
        )
        return redirect(_version_url("version-detail", version))


class AgreementAmendView(AgreementMixin, GovernanceAction):
    permission_required = "consortium.manage_agreements"

    def post(self, request, *args, **kwargs):
        try:
            version = services.agreement_amend(acting_user=request.user, agreement=self.agreement)
        except ServiceError as exc:
            messages.error(request, str(exc))
            return redirect(
                "consortium:agreement-detail", slug=self.consortium.slug, pk=self.agreement.pk
            )
        messages.success(
            request, f"Draft version {version.number} opened from the current terms: edit it."
        )
        return redirect(_version_url("version-edit", version))


class VersionSignView(VersionMixin, GovernanceForm):
    permission_required = "consortium.sign_for_an_institution"
    template_name = "consortium/version_sign.html"
    form_class = SignForm

    @cached_property
    def institutions(self):
        return selectors.user_institutions_with_role(
            self.request.user, self.consortium, Role.APPROVER
        )

    def get_initial(self):
        return {"expected_digest": self.version.content_digest}

    def get_form_kwargs(self):
        kwargs = super().get_form_kwargs()
        names = [i.name for i in self.institutions]
        on_behalf = names[0] if len(names) == 1 else "the institution selected above"
        kwargs["institutions"] = self.institutions
        kwargs["confirm_label"] = (
            f"I have read version {self.version.number} of “{self.agreement}” and sign it "
            f"on behalf of {on_behalf}."
        )
        return kwargs

    def get_context_data(self, **kwargs):
        signed = set(self.version.signatures.values_list("institution_id", flat=True))
        return super().get_context_data(
            already_signed=[i for i in self.institutions if i.pk in signed], **kwargs
        )

    def perform(self, form):
        signature = services.agreement_sign(
            acting_user=self.request.user,
            version=self.version,
            institution=form.cleaned_data["institution"],
            typed_name=form.cleaned_data["typed_name"],
            confirmed=form.cleaned_data["confirmed"],
            expected_digest=form.cleaned_data["expected_digest"],
        )
        messages.success(
            self.request,
            f"{signature.institution} signed version {self.version.number} "
            f"(digest {signature.content_digest[:12]}…).",
        )
        return redirect(
            "consortium:agreement-detail", slug=self.consortium.slug, pk=self.agreement.pk
        )


class AgreementWithdrawView(AgreementMixin, GovernanceForm):
    permission_required = "consortium.withdraw_for_an_institution"
    template_name = "consortium/agreement_withdraw.html"
    form_class = WithdrawForm

    def get_form_kwargs(self):
        kwargs = super().get_form_kwargs()
        candidates = selectors.user_institutions_with_role(
            self.request.user, self.consortium, Role.APPROVER, Role.INSTITUTION_ADMIN
        )
        allowed = [i.pk for i in candidates if self.can("consortium.withdraw_consent", i)]
        kwargs["institutions"] = candidates.filter(pk__in=allowed)
        return kwargs

    def perform(self, form):
        withdrawal = services.consent_withdraw(
            acting_user=self.request.user,
            agreement=self.agreement,
            institution=form.cleaned_data["institution"],
            reason=form.cleaned_data["reason"],
        )
        messages.success(
            self.request,
            f"{withdrawal.institution} has withdrawn its consent under “{self.agreement}”; "
            "it will take part in no future job.",
        )
        return redirect(
            "consortium:agreement-detail", slug=self.consortium.slug, pk=self.agreement.pk
        )


def _message_of(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    return str(exc)
