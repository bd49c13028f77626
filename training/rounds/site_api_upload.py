"""The site's update for a round: ``POST jobs/<job_id>/rounds/<round_index>/update/`` (under
the site API's prefix; the other site endpoints are in ``training.rounds.site_api``), and how
its body is read within the size limit. The checks and the recording are the intake's
(``training.rounds.intake``); this module reads the request and answers.

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
  parameters (default ``[]``);
* ``X-Ledger-Witness``: the site's cosignature of the ledger checkpoint it checked before
  training (base64 of the JSON ``POST ledger/checkpoint/witness/`` takes), recorded
  whatever becomes of the update; the answer's ``ledger_witness`` holds the witness
  endpoint's answer (``status`` beside its body). A cosignature the centre cannot take
  never costs the update.

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
from django.urls import path
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.response import Response

import consortium.core.converters  # noqa: F401 - registers the <id:...> path converter
from training.models import SiteCredential, SiteUpdate
from training.rounds.intake import UpdateRefused, update_receive, update_refuse_oversize
from training.rounds.site_api_auth import SiteAPIView
from training.rounds.site_api_ledger import witness_from_header
from training.rounds.site_api_serializers import UpdateResultSerializer, site_error
from training.rounds.site_selectors import site_job
from training.site.protocol import LEDGER_WITNESS_HEADER

__all__ = ["urlpatterns"]

_READ_CHUNK = 1024 * 1024

_error = site_error
_401 = _error("No site token, or an invalid or revoked one (also for a browser session).")
_404 = _error("No such job for this site (or it does not take part).")


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
    OpenApiParameter(
        LEDGER_WITNESS_HEADER,
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        description="The site's cosignature of the ledger checkpoint it checked before "
        "training, as `POST ledger/checkpoint/witness/` takes it (base64 of JSON): it is "
        "recorded whatever becomes of the update, and the answer's `ledger_witness` holds "
        "what the witness endpoint would have answered (its `status` and body).",
    ),
]


def _bad_request(detail: str) -> Response:
    return Response(
        {"detail": detail, "code": "bad_request", "recorded": False},
        status=status.HTTP_400_BAD_REQUEST,
    )


def _refused(exc: UpdateRefused, witness: dict | None) -> Response:
    body = {"detail": str(exc), "code": exc.code, "recorded": exc.recorded}
    if witness is not None:
        body["ledger_witness"] = witness
    return Response(body, status=exc.status)


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
            raise exceptions.NotFound("Not found.")
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
            return _refused(exc, witness_from_header(request, credential))
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
        witness = witness_from_header(request, credential)
        if witness is not None:
            body["ledger_witness"] = witness
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
    path(
        "jobs/<id:job_id>/rounds/<id:round_index>/update/",
        SiteUpdateView.as_view(),
        name="site-update",
    ),
]
