"""The job page's summary, round tables and model block, and the model's download.

Why here and not in ``jobs.py``: the job page gathers these from
:mod:`training.rounds.job_page`; the download is its own page with its own permission
(``training.download_model``, :mod:`training.jobs.permissions`), which applies the term
``final_model_access`` of the agreement version the job runs under: a member who may see a job
may not, for that, take its model away. A refused download is the same 404 as a missing one;
the page says why the user may not download (:func:`model_download_refusal`), in the term's words.

Each download is a ledger entry (``model.downloaded``, written by
:func:`training.rounds.model_downloads.global_model_download` before the bytes leave).
"""

from __future__ import annotations

from django.http import Http404, HttpResponse

from consortium.core.access import may
from consortium.core.palette import chart_palette
from consortium.governance.models import FinalModelAccess
from consortium.governance.pages import GovernancePage
from training.jobs.permissions import final_model_access
from training.rounds.artifacts import ArtifactError
from training.rounds.job_page import job_model, job_round_tables, job_summary
from training.rounds.model_downloads import global_model_download
from training.web.views.mixins import JobMixin


def model_download_refusal(job) -> str:
    """Why the job's models are not offered to a user the rule refuses: the agreement's term
    ``final_model_access`` in words, so the page never promises a download to someone it
    refuses (an administrator under "participants") nor to anyone under "nobody"."""
    access = final_model_access(job)
    version = job.agreement_version if job.agreement_version_id else None
    agreement = (
        f"The agreement this job runs under (version {version.number} of "
        f"\u201c{version.agreement.title}\u201d)"
        if version is not None
        else "The agreement"
    )
    if access == FinalModelAccess.NOBODY:
        return (
            f"{agreement} keeps the final model, and every model of the job, on the "
            "consortium's server: nobody downloads them through this site. The digest and "
            "lineage above say which model it is."
        )
    if access == FinalModelAccess.PARTICIPANTS:
        return (
            f"{agreement} lets only members of the institutions still taking part in the job "
            "download the model; not the consortium's administrators as such."
        )
    return (
        "Only the consortium's administrators and the members of the institutions still "
        "taking part in the job may download the model (the agreement's term)."
    )


def job_page_sections(job, *, user, state: dict, account) -> dict:
    """The context the job page adds to its facts: ``summary``, ``round_tables``,
    ``model``, ``can_download_model`` (with ``model_download_refusal``, the reason when it is
    false) and ``chart_palette`` (for the page's charts)."""
    can_download = may(user, "training.download_model", job)
    return {
        "summary": job_summary(job, state=state, account=account),
        "round_tables": job_round_tables(job),
        "model": job_model(job),
        "can_download_model": can_download,
        "model_download_refusal": "" if can_download else model_download_refusal(job),
        "chart_palette": chart_palette(p.institution for p in job.participants.all()),
    }


class JobModelDownloadView(JobMixin, GovernancePage):
    """One global model of the job, as its stored packed-tensor file, with its digest in
    ``X-Content-SHA256`` so the receiver can check what it got."""

    permission_required = "training.download_model"

    def get(self, request, *args, **kwargs):
        try:
            found = global_model_download(
                job=self.job, round_index=kwargs["round_index"], acting_user=request.user
            )
        except ArtifactError:
            # Missing or damaged in the store: nothing to hand out; the page says so too.
            raise Http404("The model file is not in the artifact store.") from None
        if found is None:
            raise Http404("No such model.")
        model, data = found
        response = HttpResponse(data, content_type="application/octet-stream")
        response["X-Content-SHA256"] = model.digest
        response["Content-Length"] = str(len(data))
        response["Content-Disposition"] = (
            f'attachment; filename="job-{self.job.pk}-round-{model.round_index}-'
            f'{model.digest[:12]}.flt"'
        )
        return response
