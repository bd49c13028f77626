"""Withdrawal of consent: an institution's approver or admin withdraws it under an
agreement, with the reason the ledger records."""

from __future__ import annotations

from django.contrib import messages
from django.shortcuts import redirect

from consortium.governance import selectors
from consortium.governance.forms import WithdrawForm
from consortium.governance.models import Role
from consortium.governance.pages import GovernanceForm
from consortium.governance.services.withdrawals import consent_withdraw
from consortium.governance.views.agreements import AgreementMixin


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
        withdrawal = consent_withdraw(
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
