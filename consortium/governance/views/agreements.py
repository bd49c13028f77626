"""Agreement pages: the list, drafting an agreement, a version's page, editing a draft,
publishing it, opening an amendment and signing the version in force."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property

from consortium.core.errors import ServiceError
from consortium.core.pages import error_message, first_or_404
from consortium.governance import selectors
from consortium.governance.forms import AgreementCreateForm, AgreementTermsForm, SignForm
from consortium.governance.pages import (
    ActsForOneOfMyInstitutions,
    GovernanceAction,
    GovernanceForm,
    GovernancePage,
)
from consortium.governance.services.agreements import (
    agreement_amend,
    agreement_create,
    agreement_sign,
    agreement_version_publish,
    agreement_version_update,
)


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
        version = agreement_create(
            acting_user=self.request.user,
            consortium=self.consortium,
            title=form.cleaned_data["title"],
            **form.terms(),
        )
        messages.success(
            self.request, f"Draft version 1 of “{version.agreement}” was saved; publish it to sign."
        )
        return redirect(version_url("version-detail", version))


def version_url(name: str, version) -> str:
    """The URL of the version page ``name`` (``version-detail``, ``version-edit``...)."""
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
            # Offered only when the form would have something to choose (not the rule: an
            # approver whose institutions all signed, or all withdrew, still passes it).
            can_sign=bool(selectors.institutions_left_to_sign(self.request.user, status)),
            can_withdraw=selectors.institutions_still_consenting(
                self.request.user, agreement
            ).exists(),
            **kwargs,
        )


class VersionDetailView(VersionMixin, GovernancePage):
    permission_required = "consortium.view_agreement"
    template_name = "consortium/version_detail.html"

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            signatures=self.version.signatures.select_related("institution"),
            can_manage=self.can("consortium.manage_agreements", self.version),
            can_sign=bool(
                selectors.institutions_left_to_sign(
                    self.request.user, selectors.agreement_status(self.agreement)
                )
            ),
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
        version = agreement_version_update(
            acting_user=self.request.user, version=self.version, **form.terms()
        )
        messages.success(self.request, f"Draft version {version.number} was saved.")
        return redirect(version_url("version-detail", version))


class VersionPublishView(VersionMixin, GovernancePage):
    """GET asks for confirmation; POST publishes (freezes) the draft."""

    permission_required = "consortium.manage_agreements"
    template_name = "consortium/version_publish.html"

    def post(self, request, *args, **kwargs):
        try:
            version = agreement_version_publish(acting_user=request.user, version=self.version)
        except (ValidationError, ServiceError) as exc:
            messages.error(request, error_message(exc))
            return redirect(version_url("version-detail", self.version))
        messages.success(
            request,
            f"Version {version.number} is published (digest {version.content_digest[:12]}…); "
            "every institution must now sign it.",
        )
        return redirect(version_url("version-detail", version))


class AgreementAmendView(AgreementMixin, GovernanceAction):
    permission_required = "consortium.manage_agreements"

    def post(self, request, *args, **kwargs):
        try:
            version = agreement_amend(acting_user=request.user, agreement=self.agreement)
        except ServiceError as exc:
            messages.error(request, str(exc))
            return redirect(
                "consortium:agreement-detail", slug=self.consortium.slug, pk=self.agreement.pk
            )
        messages.success(
            request, f"Draft version {version.number} opened from the current terms: edit it."
        )
        return redirect(version_url("version-edit", version))


class VersionSignView(ActsForOneOfMyInstitutions, VersionMixin, GovernanceForm):
    permission_required = "consortium.sign_for_an_institution"
    template_name = "consortium/version_sign.html"
    form_class = SignForm

    @cached_property
    def institutions(self):
        return selectors.institutions_user_signs_for(self.request.user, self.consortium)

    def institution_choices(self):
        return self.institutions

    def nothing_to_choose_message(self) -> str:
        return (
            f"You approve for no institution in {self.consortium}: there is nothing for you to "
            f"sign. An institution's approver signs for it."
        )

    def nothing_to_choose_url(self) -> str:
        return reverse(
            "consortium:agreement-detail",
            kwargs={"slug": self.consortium.slug, "pk": self.agreement.pk},
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
        signature = agreement_sign(
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
