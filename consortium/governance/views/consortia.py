"""The operator's page that starts a consortium with its first administrator (the browser's
``manage.py create_consortium``). Only a superuser reaches it; anyone else gets the same 404 as
for a page that does not exist. The invitation's link is shown once, on the response to the POST
that created it (it is also emailed): only its hash is kept, so no reload can show it again."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.views.generic.edit import FormView

from consortium.core.errors import ServiceError
from consortium.core.pages import PermissionRequiredMixin, apply_service_errors
from consortium.governance.forms import ConsortiumStartForm
from consortium.governance.permissions import PLATFORM
from consortium.governance.services.bootstrap import consortium_start


class ConsortiumStartView(PermissionRequiredMixin, FormView):
    permission_required = "consortium.start_consortium"
    template_name = "consortium/consortium_start.html"
    form_class = ConsortiumStartForm

    def get_permission_object(self):
        return PLATFORM

    def form_valid(self, form):
        try:
            start = consortium_start(acting_user=self.request.user, **form.cleaned_data)
        except (ValidationError, ServiceError) as exc:
            apply_service_errors(form, exc)
            return self.form_invalid(form)
        response = self.response_class(
            request=self.request,
            template=["consortium/consortium_started.html"],
            context=self.get_context_data(start=start, consortium=start.consortium),
        )
        response["Cache-Control"] = "no-store"
        return response
