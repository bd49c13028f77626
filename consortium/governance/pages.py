"""Pages inside a consortium: the fail-closed page base (``consortium.core.pages``) plus the
consortium scope every governance, training and audit page sits in.

``GovernancePage``, ``GovernanceForm`` and ``GovernanceAction`` load ``self.consortium``
from the URL's ``slug`` through the user-scoped selector, so a consortium the user cannot see
is the same 404 as one that does not exist, and nested objects are looked up inside it.
"""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import redirect
from django.utils.functional import cached_property
from django.views.generic import TemplateView, View
from django.views.generic.edit import FormView

from consortium.core.access import may
from consortium.core.errors import ServiceError
from consortium.core.pages import PermissionRequiredMixin, apply_service_errors, first_or_404
from consortium.governance import selectors


class ConsortiumScopedMixin:
    """Loads ``self.consortium`` from the ``slug`` URL argument, scoped to the user.
    Nested objects are looked up inside that consortium, so a valid id under the
    wrong consortium is a 404 too."""

    @cached_property
    def consortium(self):
        return first_or_404(
            selectors.consortia_visible_to(self.request.user), slug=self.kwargs["slug"]
        )

    def get_context_data(self, **kwargs):
        kwargs.setdefault("consortium", self.consortium)
        return super().get_context_data(**kwargs)

    def can(self, perm: str, obj) -> bool:
        return may(self.request.user, perm, obj)


class GovernancePage(PermissionRequiredMixin, ConsortiumScopedMixin, TemplateView):
    """A read-only page inside a consortium."""


class GovernanceForm(PermissionRequiredMixin, ConsortiumScopedMixin, FormView):
    """A form inside a consortium whose ``perform(form)`` calls one service.

    ``perform`` returns the redirect; a ValidationError or ServiceError from the
    service is put on the form and the page re-rendered with what was typed.
    """

    def perform(self, form):
        raise NotImplementedError

    def form_valid(self, form):
        try:
            return self.perform(form)
        except (ValidationError, ServiceError) as exc:
            apply_service_errors(form, exc)
            return self.form_invalid(form)


class GovernanceAction(PermissionRequiredMixin, ConsortiumScopedMixin, View):
    """A POST-only action (no fields): ``perform()`` calls one service and
    returns the redirect; its errors become a message on the page it returns to."""

    http_method_names = ["post"]


class InstitutionScopedMixin:
    """Loads ``self.institution`` (the URL's ``inst_slug``) inside the URL's consortium, scoped
    to the user: the object the institution's own pages (its page, its edit form, its data
    sets and worker credentials) check their permission on."""

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


class ActsForOneOfMyInstitutions:
    """A form that acts on behalf of one of the user's institutions (signing, withdrawing
    consent, deciding on a job). With none to choose from (an approver whose institution no
    longer takes part in the job: the rule ``training.decide_job`` admits the approvers of
    every participant, the form offers only those still taking part), the page does not show a
    form that cannot be sent: it says why and sends the user back to ``nothing_to_choose_url()``.

    Mixed in before the page base, it runs after the permission check (on GET and POST), so
    an outsider still gets the 404."""

    def institution_choices(self):
        raise NotImplementedError

    def nothing_to_choose_message(self) -> str:
        raise NotImplementedError

    def nothing_to_choose_url(self) -> str:
        raise NotImplementedError

    def _refusal(self):
        if self.institution_choices().exists():
            return None
        messages.error(self.request, self.nothing_to_choose_message())
        return redirect(self.nothing_to_choose_url())

    def get(self, request, *args, **kwargs):
        return self._refusal() or super().get(request, *args, **kwargs)

    def post(self, request, *args, **kwargs):
        return self._refusal() or super().post(request, *args, **kwargs)
