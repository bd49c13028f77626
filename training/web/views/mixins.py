"""What the training pages share: the job in the URL, loaded through a selector scoped to the
user (a forbidden object is the same 404 as a missing one), and the job page's address. The
institution in the URL is loaded by ``consortium.governance.pages.InstitutionScopedMixin``.
"""

from __future__ import annotations

from django.db.models import Prefetch
from django.urls import reverse
from django.utils.functional import cached_property

from consortium.core.pages import first_or_404
from training.jobs import selectors
from training.models import Approval, JobParticipant


class JobMixin:
    """Loads ``self.job`` inside the URL's consortium, with what its pages show."""

    @cached_property
    def job(self):
        return first_or_404(
            selectors.jobs_visible_to(self.request.user).prefetch_related(
                Prefetch(
                    "participants",
                    queryset=JobParticipant.objects.select_related("institution"),
                ),
                Prefetch("approvals", queryset=Approval.objects.select_related("institution")),
            ),
            consortium=self.consortium,
            pk=self.kwargs["pk"],
        )

    def get_permission_object(self):
        return self.job

    def get_context_data(self, **kwargs):
        kwargs.setdefault("job", self.job)
        return super().get_context_data(**kwargs)

    def reload_job(self):
        self.__dict__.pop("job", None)
        return self.job


def job_detail_url(job) -> str:
    """Where a job's forms and actions send the user back to."""
    return reverse("training:job-detail", args=[job.consortium.slug, job.pk])
