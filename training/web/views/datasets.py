"""Pages for the data sets a site offers: list, register, edit, remove."""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.functional import cached_property

from consortium.core.errors import ConflictError, ServiceError
from consortium.core.pages import apply_service_errors, first_or_404
from consortium.governance.pages import GovernanceForm, GovernancePage, InstitutionScopedMixin
from training.jobs import selectors
from training.jobs.datasets import dataset_register, dataset_remove, dataset_update
from training.web.forms import DatasetForm


class DatasetMixin(InstitutionScopedMixin):
    @cached_property
    def dataset(self):
        return first_or_404(
            selectors.datasets_visible_to(self.request.user),
            institution=self.institution,
            key=self.kwargs["key"],
        )

    def get_permission_object(self):
        # A missing key is the same 404 as a forbidden institution.
        self.dataset  # noqa: B018
        return self.institution

    def get_context_data(self, **kwargs):
        kwargs.setdefault("dataset", self.dataset)
        return super().get_context_data(**kwargs)


def _dataset_list_url(view) -> str:
    return reverse("training:dataset-list", args=[view.consortium.slug, view.institution.slug])


class DatasetListView(InstitutionScopedMixin, GovernancePage):
    permission_required = "training.view_datasets"
    template_name = "training/dataset_list.html"

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            datasets=selectors.datasets_visible_to(self.request.user).filter(
                institution=self.institution
            ),
            can_manage=self.can("training.manage_datasets", self.institution),
            can_upload_validation_set=self.can("training.upload_validation_set", self.institution),
            **kwargs,
        )


class DatasetCreateView(InstitutionScopedMixin, GovernanceForm):
    permission_required = "training.manage_datasets"
    template_name = "training/dataset_form.html"
    form_class = DatasetForm

    def form_valid(self, form):
        try:
            dataset = dataset_register(
                acting_user=self.request.user,
                institution=self.institution,
                **form.service_fields(),
            )
        except ConflictError as exc:  # the key is taken at this institution
            form.add_error("key", str(exc))
            return self.form_invalid(form)
        except (ValidationError, ServiceError) as exc:
            apply_service_errors(form, exc)
            return self.form_invalid(form)
        messages.success(
            self.request,
            f"{self.institution} now offers the data set '{dataset.key}' "
            f"({dataset.num_records} records). Only its description is stored here.",
        )
        return redirect(_dataset_list_url(self))


class DatasetEditView(DatasetMixin, GovernanceForm):
    permission_required = "training.manage_datasets"
    template_name = "training/dataset_form.html"
    form_class = DatasetForm

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "editing": True}

    def get_initial(self):
        return DatasetForm.initial_from(self.dataset)

    def perform(self, form):
        dataset_update(acting_user=self.request.user, dataset=self.dataset, **form.service_fields())
        messages.success(self.request, f"The data set '{self.dataset.key}' was updated.")
        return redirect(_dataset_list_url(self))


class DatasetRemoveView(DatasetMixin, GovernancePage):
    """GET asks for confirmation; POST removes the offer."""

    permission_required = "training.manage_datasets"
    template_name = "training/dataset_remove.html"

    def post(self, request, *args, **kwargs):
        try:
            dataset_remove(acting_user=request.user, dataset=self.dataset)
        except ServiceError as exc:
            return self.render_to_response(self.get_context_data(error=str(exc)))
        messages.success(
            request, f"{self.institution} no longer offers the data set '{self.dataset.key}'."
        )
        return redirect(_dataset_list_url(self))
