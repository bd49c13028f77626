"""Withdrawal of consent: an institution's approver or admin withdraws it under an
agreement, with the reason the ledger records."""

from __future__ import annotations

from django.contrib import messages
from django.shortcuts import redirect
from django.urls import reverse

from consortium.governance import selectors
from consortium.governance.forms import WithdrawForm
from consortium.governance.pages import ActsForOneOfMyInstitutions, GovernanceForm
from consortium.governance.services.withdrawals import consent_withdraw
from consortium.governance.views.agreements import AgreementMixin


class AgreementWithdrawView(ActsForOneOfMyInstitutions, AgreementMixin, GovernanceForm):
    permission_required = "consortium.withdraw_for_an_institution"
    template_name = "consortium/agreement_withdraw.html"
    form_class = WithdrawForm

    def institution_choices(self):
        return selectors.institutions_user_withdraws_for(self.request.user, self.consortium)

    def nothing_to_choose_message(self) -> str:
        return (
            f"You approve for or administer no institution in {self.consortium}: there is no "
            "consent for you to withdraw. An institution's approver or administrator does."
        )

    def nothing_to_choose_url(self) -> str:
        return reverse(
            "consortium:agreement-detail",
            kwargs={"slug": self.consortium.slug, "pk": self.agreement.pk},
        )

    def get_form_kwargs(self):
        kwargs = super().get_form_kwargs()
        kwargs["institutions"] = self.institution_choices()
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
            "it will take part in no future job under this agreement, and has left the "
            "unfinished ones. Jobs under other agreements keep it.",
        )
        return redirect(
            "consortium:agreement-detail", slug=self.consortium.slug, pk=self.agreement.pk
        )
