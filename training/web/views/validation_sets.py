"""The data steward's page for central validation sets: what the agreement in force allows, the
sets the consortium holds for the keys the sites registered, and the upload form (records sent
to the consortium's server; ``training.rounds.validation_sets``)."""

from __future__ import annotations

from django.contrib import messages
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.functional import cached_property

from consortium.governance.pages import GovernanceForm, InstitutionScopedMixin
from training.fl.holdout import BUNDLED_DATASETS
from training.jobs.central_validation import allowing_version, validation_set_current
from training.models import CentralValidationSet, SiteDataset
from training.rounds.validation_sets import MAX_UPLOAD_BYTES, validation_set_upload
from training.web.forms import ValidationSetForm


class ValidationSetView(InstitutionScopedMixin, GovernanceForm):
    """The institution's data steward uploads a central validation set here (404 to anyone
    else). The form is shown only while the agreement in force allows it; the page says why
    not otherwise."""

    permission_required = "training.upload_validation_set"
    template_name = "training/validation_sets.html"
    form_class = ValidationSetForm

    @cached_property
    def keys(self) -> list[str]:
        """The data set keys registered by the consortium's institutions."""
        return sorted(
            set(
                SiteDataset.objects.filter(institution__consortium=self.consortium).values_list(
                    "key", flat=True
                )
            )
        )

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "keys": self.keys, "max_bytes": MAX_UPLOAD_BYTES}

    def get_context_data(self, **kwargs):
        version, why_not = allowing_version(self.consortium)
        held = {key: validation_set_current(self.consortium.pk, key) for key in self.keys}
        return super().get_context_data(
            allowed_by=version,
            why_not=why_not,
            held=[(key, held[key]) for key in self.keys],
            uploads=CentralValidationSet.objects.filter(institution=self.institution)
            .select_related("agreement_version__agreement")
            .order_by("-created_at", "-pk"),
            max_megabytes=MAX_UPLOAD_BYTES // 2**20,
            bundled=BUNDLED_DATASETS,
            **kwargs,
        )

    def perform(self, form):
        uploaded = form.cleaned_data["file"]
        held = validation_set_upload(
            acting_user=self.request.user,
            institution=self.institution,
            key=form.cleaned_data["key"],
            file_name=uploaded.name,
            data=uploaded.read(),
        )
        messages.success(
            self.request,
            f"The consortium now holds {held.num_records} records from {self.institution} as "
            f"the central validation set for '{held.key}' (digest {held.digest[:12]}…). "
            "The upload is recorded in the ledger.",
        )
        return redirect(
            reverse("training:validation-sets", args=[self.consortium.slug, self.institution.slug])
        )
