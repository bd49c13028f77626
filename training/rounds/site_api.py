"""The REST endpoints a site worker uses (under ``/api/site/v1/``: the prefix is set once, in
``training.api_urls``), authenticated only by site tokens, for a worker that states the site
protocol this server speaks.

A site worker holds no central database credentials (docs/architecture.md, section 2). Its
data steward creates its credentials in the browser: an API token (shown once)
and the worker's Ed25519 public key. Every request carries the token::

    Authorization: Site fls_...

A browser session, a password or any other scheme is refused here (401): these
endpoints answer sites, and nothing else answers sites. A revoked or unknown
token is 401 too, saying which (``training.rounds.site_api_auth``, which also holds
the base of these views; their bodies are in ``training.rounds.site_api_serializers``).
Every request also states the worker's site protocol (``X-Site-Protocol: 1``,
``training.site.protocol``); a missing or other one is refused with 426 and a message that
says which side to upgrade.

Endpoints (``<job_id>`` is a job the site actively takes part in; any other is
404, the same as a missing one):

* ``GET  whoami/`` -- the site and credential the token belongs to, with the registered
  public key (a worker checks its signing key against it);
* ``GET  datasets/`` -- the data sets this site registered, as the worker must find them
  under its ``DATA_ROOT`` (``run_site_worker --check``);
* ``POST heartbeat/`` -- the worker is online: its release, device and host
  (``training.rounds.heartbeats``);
* ``GET  jobs/<job_id>/`` -- the job's canonical spec (``spec_text``, whose
  SHA-256 is ``spec_digest``), its state, the round now open, if any (with this
  site's update status and the model it was sent in it), and the site's own
  description of the data set;
* ``GET  jobs/<job_id>/models/<digest>/`` -- a global model of that job, or a
  model this site was sent in that job (``SiteUpdate.start_digest``: in a cyclic
  round, the previous site's result), as the packed tensor file
  (``application/octet-stream``) with an ``X-Content-SHA256`` header. Any other
  digest, another site's start model included, is 404;
* ``GET  jobs/<job_id>/rounds/<round_index>/model/`` -- the model this site must
  train from in that round (its ``SiteUpdate.start_digest``), only while the round
  asks the site for an update: the packed tensor file, with ``X-Content-SHA256``
  (the start model's digest) and ``X-Spec-Digest`` (the job's spec digest)
  headers. 409 with a ``code`` when the site must not train now
  (``job_not_running``, ``round_closed``, ``already_received``,
  ``not_dispatched``, ``not_sent``). This is the one request a site worker makes
  before training each round: the job's spec is immutable for its digest, so a
  worker fetches ``jobs/<job_id>/`` once per spec digest and checks every later
  round's ``X-Spec-Digest`` against its task; and with ``?ledger_since=<size>`` the
  answer also carries, in ``X-Ledger-Checkpoint`` (base64 of JSON), what ``GET
  ledger/checkpoint/?since=<size>`` would answer (its refusals too, instead of the
  model), so that the worker's check of the ledger costs no request of its own
  (``training.rounds.site_api_ledger``);
* ``POST jobs/<job_id>/rounds/<round_index>/update/`` -- the site's update.

The upload (``POST .../update/``), its format and its answers are in
``training.rounds.site_api_upload``.
"""

from __future__ import annotations

from django.http import HttpResponse
from django.urls import path
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.response import Response

import consortium.core.converters  # noqa: F401 - registers the <id:...> path converter
from consortium.governance.services.institutions import key_fingerprint
from training.models import Round, SiteDataset
from training.rounds.artifacts import ArtifactError, artifact_store, is_digest
from training.rounds.site_api_auth import SiteAPIView
from training.rounds.site_api_ledger import (
    LedgerAnswerRefused,
    checkpoint_answer,
)
from training.rounds.site_api_serializers import (
    SiteErrorSerializer,
    SiteJobSerializer,
    WhoAmISerializer,
)
from training.rounds.site_api_status import HeartbeatView, SiteDatasetsView
from training.rounds.site_selectors import (
    NotAsked,
    site_job,
    site_may_read_model,
    site_round_start,
)
from training.site.protocol import (
    LEDGER_CHECKPOINT_HEADER,
    LEDGER_SINCE_PARAMETER,
    encode_ledger_header,
)


def _not_found() -> exceptions.NotFound:
    return exceptions.NotFound("Not found.")


class _NotAsked(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "not_asked"


def _model_response(digest: str) -> HttpResponse:
    """A stored model as the packed tensor file, with its digest."""
    try:
        data = artifact_store().get(digest)
    except ArtifactError:
        raise exceptions.APIException(
            "The model file is missing or damaged in the artifact store; the operators "
            "are told by the logs."
        ) from None
    response = HttpResponse(data, content_type="application/octet-stream")
    response["X-Content-SHA256"] = digest
    response["Content-Disposition"] = f'attachment; filename="{digest}.flt"'
    return response


def _error(description: str) -> OpenApiResponse:
    return OpenApiResponse(SiteErrorSerializer, description=description)


_401 = _error("No site token, or an invalid or revoked one (also for a browser session).")
_404 = _error(
    "No such job for this site (or it does not take part), or no such model for this site."
)


# --- Views -------------------------------------------------------------------------------------


class WhoAmIView(SiteAPIView):
    """Which site and credential the token belongs to (a worker's first check)."""

    @extend_schema(
        tags=["site"],
        summary="The site and credential this token belongs to",
        responses={200: WhoAmISerializer, 401: _401},
    )
    def get(self, request):
        credential = self.credential
        institution = credential.institution
        return Response(
            WhoAmISerializer(
                {
                    "institution": institution.slug,
                    "institution_name": institution.name,
                    "consortium": institution.consortium.slug,
                    "credential": credential.label,
                    "token_prefix": credential.token_prefix,
                    "key_fingerprint": key_fingerprint(credential.public_key),
                    "public_key": credential.public_key,
                }
            ).data
        )


class SiteJobView(SiteAPIView):
    """A job as the site worker needs it; only for a job the site actively takes part in."""

    @extend_schema(
        tags=["site"],
        summary="A job this site takes part in: its canonical spec, digest, state and open round",
        responses={200: SiteJobSerializer, 401: _401, 404: _404},
    )
    def get(self, request, job_id: int):
        job = site_job(self.credential, job_id)
        if job is None:
            raise _not_found()
        rnd = (
            Round.objects.select_related("global_model_in")
            .filter(job=job, state=Round.State.OPEN)
            .order_by("-index")
            .first()
        )
        open_round = None
        if rnd is not None:
            mine = rnd.updates.filter(institution_id=self.credential.institution_id).first()
            open_round = {
                "index": rnd.index,
                "global_model": rnd.global_model_in.digest,
                "start_model": (mine.start_digest or None) if mine else None,
                "deadline": rnd.deadline,
                "update_status": mine.status if mine else None,
            }
        return Response(
            SiteJobSerializer(
                {
                    "id": job.pk,
                    "title": job.title,
                    "state": job.state,
                    "spec": job.spec,
                    "spec_text": job.spec_text,
                    "spec_digest": job.spec_digest,
                    "open_round": open_round,
                    "dataset": SiteDataset.objects.filter(
                        institution_id=self.credential.institution_id,
                        key=job.spec.get("dataset_key"),
                    ).first(),
                }
            ).data
        )


class SiteModelView(SiteAPIView):
    """A model of the job this site may read, as the packed tensor file."""

    @extend_schema(
        tags=["site"],
        summary="Download a global model of the job, or a model this site was sent",
        description="The digest must be one of the job's global models, or the start model "
        "of one of this site's updates in the job (in a cyclic round, the previous site's "
        "result). The body is the packed tensor file; its SHA-256 is in the "
        "`X-Content-SHA256` header and equals the digest in the URL.",
        responses={
            (200, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The packed tensor file."
            ),
            401: _401,
            404: _404,
        },
    )
    def get(self, request, job_id: int, digest: str):
        job = site_job(self.credential, job_id)
        if job is None or not is_digest(digest):
            raise _not_found()
        if not site_may_read_model(self.credential, job, digest):
            raise _not_found()
        return _model_response(digest)


class SiteRoundModelView(SiteAPIView):
    """The model this site must train from in a round, while the round asks it for an update."""

    @extend_schema(
        tags=["site"],
        summary="Download the model this site must train from in a round (or why not to train)",
        description="While the round asks this site for an update, the model the site was "
        "sent for it (the round's global model, or in a cyclic round the previous site's "
        "result) as the packed tensor file; its SHA-256 is in the `X-Content-SHA256` header "
        "and the job's spec digest in `X-Spec-Digest`. 409 with a `code` when the site must "
        "not train: `job_not_running`, `round_closed`, `already_received` (e.g. a second "
        "delivery of the task), `not_dispatched` (the round asks nothing of this site), "
        "`not_sent` (a cyclic round has not reached it yet).",
        responses={
            (200, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The packed tensor file."
            ),
            401: _401,
            404: _404,
            400: _error(
                f"`{LEDGER_SINCE_PARAMETER}` is not a whole number (bad_since), or is beyond "
                "today's ledger (since_ahead)."
            ),
            409: _error(
                "The round does not ask this site for an update now (see `code`), or the "
                "centre's ledger contradicts a checkpoint it signed (ledger_rewritten)."
            ),
        },
        parameters=[
            OpenApiParameter(
                LEDGER_SINCE_PARAMETER,
                {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                description="The size of the last ledger checkpoint this site saw: the answer "
                f"then carries, in its `{LEDGER_CHECKPOINT_HEADER}` header (base64 of JSON), "
                "what `GET ledger/checkpoint/?since=` would answer, so that the site checks "
                "the ledger and fetches its model in one request.",
            )
        ],
    )
    def get(self, request, job_id: int, round_index: int):
        try:
            update = site_round_start(self.credential, job_id, round_index)
        except NotAsked as exc:
            raise _NotAsked(str(exc), code=exc.code) from None
        if update is None:
            raise _not_found()
        ledger = None
        since = request.query_params.get(LEDGER_SINCE_PARAMETER)
        if since is not None:
            try:
                ledger = checkpoint_answer(since)
            except LedgerAnswerRefused as exc:
                return exc.response()
        response = _model_response(update.start_digest)
        response["X-Spec-Digest"] = update.round.job.spec_digest
        if ledger is not None:
            response[LEDGER_CHECKPOINT_HEADER] = encode_ledger_header(ledger)
        return response


# Under the site API's prefix (``/api/site/v1/``), which ``training.api_urls`` adds.
urlpatterns = [
    path("whoami/", WhoAmIView.as_view(), name="site-whoami"),
    path("datasets/", SiteDatasetsView.as_view(), name="site-datasets"),
    path("heartbeat/", HeartbeatView.as_view(), name="site-heartbeat"),
    path("jobs/<id:job_id>/", SiteJobView.as_view(), name="site-job"),
    path(
        "jobs/<id:job_id>/models/<str:digest>/",
        SiteModelView.as_view(),
        name="site-model",
    ),
    path(
        "jobs/<id:job_id>/rounds/<id:round_index>/model/",
        SiteRoundModelView.as_view(),
        name="site-round-model",
    ),
]
