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
  round's ``X-Spec-Digest`` against its task;
* ``POST jobs/<job_id>/rounds/<round_index>/update/`` -- the site's update.

The upload format: the request body is the update file in its wire format
(``training.fl.update``: ``delta/<name>`` float32 tensors and optional
``mask/<name>`` bool tensors in a safetensors file, ``training.fl.serialization``), ``Content-Type:
application/octet-stream``; the metadata travels in headers:

* ``X-Update-Digest`` (required): SHA-256 hex of the body;
* ``X-Update-Signature`` (required): base64 Ed25519 signature over
  ``training.fl.signing.update_message(job_id, round_index, site, digest, samples)``;
* ``X-Update-Samples`` (required): the number of local training samples;
* ``X-Update-Metrics``: a JSON object of local metrics (default ``{}``);
* ``X-Update-Privacy-Events``: a JSON list of privacy events (default ``[]``);
* ``X-Update-Pipeline``: a JSON list of the privacy filters applied, with their
  parameters (default ``[]``).

Answers: 201 accepted; 200 the same update (same digest) was already accepted,
nothing changed (also once the round has closed); otherwise
``{"detail", "code", "recorded"}`` with 400 (a failed check: digest, signature,
tensors, values, samples, metadata), 401 (token), 403 (the site no longer
takes part), 404, 409 (the round is closed, the site's update for it was
already received, or ``replayed_update``: the update was signed for another
job or round of this site, or its bytes were already received as another
update; never recorded, so the site's own update for the round is still
taken), 413 (over ``settings.FL_MAX_UPDATE_BYTES``, refused while the body is
read) or 415.
``recorded`` is true when the refusal was written on the site's update for the
round (rejected, with the reason) and in the ledger: that update then never
counts. 503 means the central side could not read the global model or store
the update; nothing was recorded and the upload may be repeated.

The size limit is checked against ``Content-Length`` before the body is read,
and again while it is read. Under Daphne (ASGI) Django spools the whole body
to a temporary file before the view runs, so a deployment also sets the limit
in its reverse proxy (e.g. nginx ``client_max_body_size``).
"""

from __future__ import annotations

import json

from django.conf import settings
from django.http import HttpResponse
from django.urls import path
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.response import Response

import consortium.core.converters  # noqa: F401 - registers the <id:...> path converter
from consortium.governance.services.institutions import key_fingerprint
from training.models import Round, SiteCredential, SiteDataset, SiteUpdate
from training.rounds.artifacts import ArtifactError, artifact_store, is_digest
from training.rounds.intake import UpdateRefused, update_receive, update_refuse_oversize
from training.rounds.site_api_auth import SiteAPIView
from training.rounds.site_api_serializers import (
    SiteErrorSerializer,
    SiteJobSerializer,
    UpdateResultSerializer,
    WhoAmISerializer,
)
from training.rounds.site_api_status import HeartbeatView, SiteDatasetsView
from training.rounds.site_selectors import (
    NotAsked,
    site_job,
    site_may_read_model,
    site_round_start,
)

_READ_CHUNK = 1024 * 1024


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
            409: _error("The round does not ask this site for an update now (see `code`)."),
        },
    )
    def get(self, request, job_id: int, round_index: int):
        try:
            update = site_round_start(self.credential, job_id, round_index)
        except NotAsked as exc:
            raise _NotAsked(str(exc), code=exc.code) from None
        if update is None:
            raise _not_found()
        response = _model_response(update.start_digest)
        response["X-Spec-Digest"] = update.round.job.spec_digest
        return response


_UPDATE_HEADERS = [
    OpenApiParameter(
        "X-Update-Digest",
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        required=True,
        description="SHA-256 hex of the request body.",
    ),
    OpenApiParameter(
        "X-Update-Signature",
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        required=True,
        description="Base64 Ed25519 signature over training.fl.signing.update_message("
        "job_id, round_index, site, digest, samples), by the credential's key.",
    ),
    OpenApiParameter(
        "X-Update-Samples",
        OpenApiTypes.INT,
        OpenApiParameter.HEADER,
        required=True,
        description="The number of local training samples.",
    ),
    OpenApiParameter(
        "X-Update-Metrics",
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        description='Local metrics, a JSON object (e.g. {"loss": 0.41}). Default {}.',
    ),
    OpenApiParameter(
        "X-Update-Privacy-Events",
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        description="The privacy events of this update, a JSON list of "
        '{"mechanism", "params", "count", "source"}. Default [].',
    ),
    OpenApiParameter(
        "X-Update-Pipeline",
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        description="The privacy filters applied on site with their parameters, a JSON "
        "list of objects. Default [].",
    ),
]


def _bad_request(detail: str) -> Response:
    return Response(
        {"detail": detail, "code": "bad_request", "recorded": False},
        status=status.HTTP_400_BAD_REQUEST,
    )


def _refused(exc: UpdateRefused) -> Response:
    return Response(
        {"detail": str(exc), "code": exc.code, "recorded": exc.recorded}, status=exc.status
    )


class _BadHeader(Exception):
    pass


def _json_header(request, name: str, default, kind: type):
    raw = request.headers.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise _BadHeader(f"{name} is not valid JSON ({exc}).") from None
    if not isinstance(value, kind):
        what = "an object" if kind is dict else "a list"
        raise _BadHeader(f"{name} must be a JSON {what}.")
    return value


class SiteUpdateView(SiteAPIView):
    """A site's signed update for a round (see the module docstring for the format)."""

    @extend_schema(
        tags=["site"],
        summary="Upload this site's signed update for a round",
        description="The body is the packed tensor file (`Content-Type: "
        "application/octet-stream`): `delta/<name>` float32 tensors shaped like the "
        "round's global model and optional `mask/<name>` bool tensors. Metadata travel in "
        "the `X-Update-*` headers. The update is verified (digest, Ed25519 signature, "
        "tensor names, shapes and dtypes, finite values, samples, privacy events) before "
        "it counts; a failed check is recorded on the site's update as rejected, with the "
        "reason, and answered with it. A replay (an update signed for another job or round "
        "of this site, or a copy of an update already received) is refused with 409 "
        "`replayed_update` and not recorded.",
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=_UPDATE_HEADERS,
        responses={
            201: OpenApiResponse(UpdateResultSerializer, description="Accepted."),
            200: OpenApiResponse(
                UpdateResultSerializer,
                description="The same update (same digest) was already accepted, "
                "even if the round has closed since; nothing changed.",
            ),
            400: _error("A check failed (recorded), or a header is missing or malformed."),
            401: _401,
            403: _error("The site no longer takes part in the job (recorded)."),
            404: _404,
            409: _error(
                "Not recorded: the round is closed (`round_closed`), this site's update for it "
                "was already received (`already_received`), or the upload is a replay "
                "(`replayed_update`: signed for another job or round of this site, or a copy "
                "of an update already received; the site's own update is still taken)."
            ),
            413: _error("Over the size limit (recorded)."),
            415: _error("The body is not application/octet-stream."),
            503: _error("The central side cannot read the global model or store the update now."),
        },
    )
    def post(self, request, job_id: int, round_index: int):
        credential = self.credential
        if request.content_type.split(";")[0].strip().lower() != "application/octet-stream":
            raise exceptions.UnsupportedMediaType(
                request.content_type,
                detail="Send the packed tensor file as the body, with "
                "Content-Type: application/octet-stream.",
            )
        # Who may upload here is checked before a byte of the body is read.
        if site_job(credential, job_id) is None and not _is_former_participant(credential, job_id):
            raise _not_found()
        digest = request.headers.get("X-Update-Digest", "").strip().lower()
        signature = request.headers.get("X-Update-Signature", "").strip()
        samples_raw = request.headers.get("X-Update-Samples", "").strip()
        if not digest or not signature or not samples_raw:
            return _bad_request(
                "X-Update-Digest, X-Update-Signature and X-Update-Samples are required."
            )
        try:
            samples = int(samples_raw)
        except ValueError:
            return _bad_request("X-Update-Samples must be a whole number.")
        try:
            metrics = _json_header(request, "X-Update-Metrics", {}, dict)
            privacy_events = _json_header(request, "X-Update-Privacy-Events", [], list)
            pipeline = _json_header(request, "X-Update-Pipeline", [], list)
        except _BadHeader as exc:
            return _bad_request(str(exc))
        try:
            data = _read_body(
                request, credential=credential, job_id=job_id, round_index=round_index
            )
            update = update_receive(
                credential=credential,
                job_id=job_id,
                round_index=round_index,
                data=data,
                samples=samples,
                update_digest=digest,
                signature=signature,
                metrics=metrics,
                privacy_events=privacy_events,
                pipeline=pipeline,
            )
        except UpdateRefused as exc:
            return _refused(exc)
        body = UpdateResultSerializer(
            {
                "id": update.pk,
                "job": job_id,
                "round": round_index,
                "site": credential.institution.slug,
                "status": update.status,
                "samples": update.samples,
                "update_digest": update.update_digest,
                "size_bytes": update.size_bytes,
                "received_at": update.received_at,
                "duplicate": update.duplicate,
            }
        ).data
        code = status.HTTP_200_OK if update.duplicate else status.HTTP_201_CREATED
        return Response(body, status=code)


def _is_former_participant(credential: SiteCredential, job_id: int) -> bool:
    """A site removed from a job may still have an update dispatched to it: its
    upload is taken only to be recorded as rejected."""
    return SiteUpdate.objects.filter(
        round__job_id=job_id, institution_id=credential.institution_id
    ).exists()


def _read_body(request, *, credential, job_id: int, round_index: int) -> bytes:
    """The request body, refused (and recorded) as soon as it passes the limit:
    by its declared length before reading, else while reading."""
    limit = settings.FL_MAX_UPDATE_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        update_refuse_oversize(
            credential=credential, job_id=job_id, round_index=round_index, size=declared
        )
    stream = request.stream
    if stream is None:
        return b""
    chunks, total = [], 0
    while True:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            update_refuse_oversize(
                credential=credential, job_id=job_id, round_index=round_index, size=total
            )
    return b"".join(chunks)


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
    path(
        "jobs/<id:job_id>/rounds/<id:round_index>/update/",
        SiteUpdateView.as_view(),
        name="site-update",
    ),
]
