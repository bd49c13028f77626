"""Institution pages: adding one and editing its details or worker key. Its own page, which
also shows its jobs, is :class:`consortium.dashboard.views.InstitutionDetailView`."""

from __future__ import annotations

from django.contrib import messages
from django.shortcuts import redirect

from consortium.governance.forms import InstitutionCreateForm, InstitutionUpdateForm
from consortium.governance.pages import GovernanceForm, InstitutionScopedMixin
from consortium.governance.services.institutions import institution_create, institution_update


class InstitutionCreateView(GovernanceForm):
    permission_required = "consortium.add_institution"
    template_name = "consortium/institution_form.html"
    form_class = InstitutionCreateForm

    def get_permission_object(self):
        return self.consortium

    def perform(self, form):
        institution = institution_create(
            acting_user=self.request.user, consortium=self.consortium, **form.cleaned_data
        )
        messages.success(self.request, f"{institution} was added to {self.consortium}.")
        return redirect(
            "consortium:institution-detail", slug=self.consortium.slug, inst_slug=institution.slug
        )


class InstitutionEditView(InstitutionScopedMixin, GovernanceForm):
    permission_required = "consortium.change_institution"
    template_name = "consortium/institution_form.html"
    form_class = InstitutionUpdateForm

    def get_initial(self):
        i = self.institution
        return {"name": i.name, "country": i.country, "worker_public_key": i.worker_public_key}

    def perform(self, form):
        institution_update(
            acting_user=self.request.user, institution=self.institution, **form.cleaned_data
        )
        messages.success(self.request, f"{self.institution} was updated.")
        return redirect(
            "consortium:institution-detail",
            slug=self.consortium.slug,
            inst_slug=self.institution.slug,
        )
