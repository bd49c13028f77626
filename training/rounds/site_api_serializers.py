"""The site API's request and answer bodies (``training.rounds.site_api``), as the OpenAPI
schema documents them."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers, status
from rest_framework.response import Response

from consortium.core.api.schema import ErrorSerializer
from training.models import JobState, SiteUpdate

__all__ = [
    "HeartbeatResultSerializer",
    "HeartbeatSerializer",
    "OpenRoundSerializer",
    "SiteDatasetSerializer",
    "SiteErrorSerializer",
    "SiteJobSerializer",
    "UpdateResultSerializer",
    "WhoAmISerializer",
    "bad_request",
    "refusal",
    "site_error",
]


class SiteErrorSerializer(ErrorSerializer):
    recorded = serializers.BooleanField(
        required=False,
        help_text="For an upload: true when the refusal was recorded on the site's update "
        "for the round (rejected, with the reason) and in the ledger.",
    )


def site_error(description: str) -> OpenApiResponse:
    """An error answer in the OpenAPI schema: ``{"detail", "code"}``, described."""
    return OpenApiResponse(SiteErrorSerializer, description=description)


def refusal(exc) -> Response:
    """A service's refusal (a ``ServiceError`` carrying the HTTP ``status`` to answer) as the
    site API answers it: ``{"detail", "code"}``."""
    return Response({"detail": str(exc), "code": exc.code}, status=exc.status)


def bad_request(errors: dict) -> Response:
    """A body that does not validate, as a 400 ``bad_request`` naming each field's fault."""
    detail = "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in errors.items())
    return Response(
        {"detail": f"bad request: {detail}", "code": "bad_request"},
        status=status.HTTP_400_BAD_REQUEST,
    )


class WhoAmISerializer(serializers.Serializer):
    institution = serializers.SlugField(help_text="The site's slug (its queue is site.<slug>).")
    institution_name = serializers.CharField()
    consortium = serializers.SlugField()
    credential = serializers.CharField(help_text="The credential's label.")
    token_prefix = serializers.CharField()
    key_fingerprint = serializers.CharField(
        help_text="The first 16 hex digits of the SHA-256 of the registered public key (PEM)."
    )
    public_key = serializers.CharField(
        help_text="The registered Ed25519 public key (PEM) against which this credential's "
        "updates are verified: the worker's SITE_SIGNING_KEY must be its private key."
    )


class OpenRoundSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    global_model = serializers.CharField(help_text="The digest of the round's global model.")
    start_model = serializers.CharField(
        allow_null=True,
        help_text="The digest of the model this site was sent for the round (its update is "
        "the delta from it): the global model, or in a cyclic round the previous site's "
        "result. Null if the round has not reached this site (or asked nothing of it).",
    )
    deadline = serializers.DateTimeField()
    update_status = serializers.ChoiceField(
        choices=SiteUpdate.Status.choices,
        allow_null=True,
        help_text="This site's update for the round, or null if none was asked of it.",
    )


class SiteDatasetSerializer(serializers.Serializer):
    key = serializers.CharField()
    modality = serializers.CharField()
    num_records = serializers.IntegerField()
    input_shape = serializers.ListField(child=serializers.IntegerField())
    n_classes = serializers.IntegerField()


class SiteJobSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    title = serializers.CharField()
    state = serializers.ChoiceField(choices=JobState.choices)
    spec = serializers.JSONField(help_text="The job's spec (parsed from spec_text).")
    spec_text = serializers.CharField(
        help_text="The canonical JSON of the spec: its SHA-256 is spec_digest."
    )
    spec_digest = serializers.CharField()
    open_round = OpenRoundSerializer(allow_null=True)
    dataset = SiteDatasetSerializer(
        allow_null=True,
        help_text="This site's description of the job's data set (its key maps to local files), "
        "or null if the site no longer offers it.",
    )


class UpdateResultSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    job = serializers.IntegerField()
    round = serializers.IntegerField(help_text="The round's index.")
    site = serializers.SlugField()
    status = serializers.ChoiceField(choices=SiteUpdate.Status.choices)
    samples = serializers.IntegerField()
    update_digest = serializers.CharField()
    size_bytes = serializers.IntegerField()
    received_at = serializers.DateTimeField()
    duplicate = serializers.BooleanField(
        help_text="True when this update had already been accepted (nothing changed)."
    )
    ledger_witness = serializers.JSONField(
        required=False,
        help_text="Only when the upload carried X-Ledger-Witness: what the witness endpoint "
        "answered it, its HTTP `status` beside its body (201 stored, 200 already held, or a "
        "refusal with `detail` and `code`).",
    )


#: What a heartbeat's ``device`` may say: the CPU, or a CUDA device with its name.
DEVICE_PATTERN = r"^(cpu|cuda:[^\x00-\x1f]{1,190})$"


class HeartbeatSerializer(serializers.Serializer):
    """A worker's heartbeat (``training.site.heartbeat``); its protocol is the request's
    ``X-Site-Protocol``."""

    version = serializers.RegexField(
        r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$",
        help_text="The worker's software release (e.g. 0.1.0).",
        error_messages={"invalid": "Send the release as letters, digits and . + _ - only."},
    )
    device = serializers.RegexField(
        DEVICE_PATTERN,
        help_text='What the worker trains on: "cpu", or "cuda:<device name>".',
        error_messages={"invalid": 'Send "cpu" or "cuda:<device name>".'},
    )
    hostname = serializers.CharField(max_length=255, allow_blank=True, required=False, default="")
    interval_seconds = serializers.IntegerField(
        min_value=5,
        max_value=3600,
        help_text="Seconds until the next heartbeat (SITE_HEARTBEAT_SECONDS): the worker is "
        "shown offline after three intervals without one.",
    )
    uptime_seconds = serializers.FloatField(
        min_value=0,
        required=False,
        default=0,
        help_text="Seconds since the worker process started.",
    )


class HeartbeatResultSerializer(serializers.Serializer):
    last_seen_at = serializers.DateTimeField()
    online_until = serializers.DateTimeField(
        help_text="When the worker is shown offline unless it reports again."
    )
