"""The site API's ledger endpoints (under the site API's prefix, ``training.api_urls``): each
site's worker witnesses the ledger's signed checkpoints (``audit.ledger.checkpoints``).

* ``GET  ledger/checkpoint/?since=<m>`` -- ``{"checkpoint", "consistency_proof", "since"}``:
  the newest checkpoint the centre signed (``audit.ledger.checkpoint.checkpoint_to_json``) and
  the RFC 9162 proof, hex hashes, that its tree extends the tree of ``m`` entries (the size of
  the last checkpoint the worker saw; empty for 0 or the same size), and the centre's
  ``public_key`` (PEM), for a worker that pins it on first use. 400 ``bad_since`` for a
  ``since`` that is not a whole number; 400 ``since_ahead`` for one beyond today's ledger (the
  worker saw a longer ledger than the centre now has: itself evidence of a rollback); 409
  ``ledger_rewritten`` when the centre's own rows contradict a checkpoint it signed.
* ``POST ledger/checkpoint/witness/`` -- ``{"tree_size", "root_hash", "cosignature"}``: the
  site's cosignature (``NoteSignature.to_json``, under its institution's slug) of a checkpoint
  the centre signed, verified against the key registered with the posting credential. 201
  stored; 200 this site had witnessed it already; 400 ``bad_cosignature`` or ``bad_request``;
  404 ``unknown_checkpoint`` (the centre never signed a checkpoint of that size); 409
  ``root_mismatch`` (it signed another root at that size).

A training task needs neither request: the round's model request answers the checkpoint's
question alongside the model (:func:`checkpoint_answer`, ``?ledger_since=`` and the
``X-Ledger-Checkpoint`` header) and the upload takes the cosignature
(:func:`witness_from_header`, ``X-Ledger-Witness``), so that a site's round costs the centre
two requests, not four: the same answers, the same checks, the same rows.
"""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from audit.ledger.checkpoint import (
    CheckpointError,
    MalformedCheckpoint,
    NoteSignature,
    checkpoint_to_json,
)
from audit.ledger.checkpoints import (
    CheckpointNotPublished,
    CheckpointRootMismatch,
    LedgerRewritten,
    checkpoint_with_proof,
    signed_checkpoint_of,
    witness_record,
)
from audit.ledger.keys import public_key_pem
from audit.ledger.merkle import proof_to_hex
from training.models import SiteCredential
from training.rounds.site_api_auth import SiteAPIView
from training.rounds.site_api_serializers import bad_request, site_error
from training.site.protocol import LEDGER_WITNESS_HEADER, decode_ledger_header

__all__ = [
    "LedgerAnswerRefused",
    "checkpoint_answer",
    "urlpatterns",
    "witness_answer",
    "witness_from_header",
]

_MAX_SIZE = 2**63 - 1  # the column's range (PositiveBigIntegerField on PostgreSQL)


class NoteSignatureSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="The signer's key name (the log's origin, a slug).")
    key_id = serializers.CharField(help_text="The key's id: 8 hex digits (signed-note spec).")
    signature = serializers.CharField(help_text="Base64 of the Ed25519 signature.")


class CheckpointSerializer(serializers.Serializer):
    origin = serializers.CharField(help_text="The log's name (LEDGER_ORIGIN).")
    tree_size = serializers.IntegerField(help_text="How many ledger entries the tree holds.")
    root_hash = serializers.CharField(help_text="The Merkle tree's root, 64 hex digits.")
    note = serializers.CharField(
        help_text="The signed checkpoint as a C2SP signed note: what is verified and cosigned."
    )
    signatures = NoteSignatureSerializer(many=True)


class CheckpointWithProofSerializer(serializers.Serializer):
    checkpoint = CheckpointSerializer()
    consistency_proof = serializers.ListField(
        child=serializers.CharField(),
        help_text="RFC 9162 consistency proof from size `since` to the checkpoint's size, "
        "as hex hashes.",
    )
    since = serializers.IntegerField()
    public_key = serializers.CharField(
        help_text="The centre's Ed25519 public key (PEM) the checkpoint is signed with: what a "
        "worker without CENTRAL_LEDGER_PUBLIC_KEY pins on first use."
    )


class WitnessSerializer(serializers.Serializer):
    tree_size = serializers.IntegerField(min_value=0, max_value=_MAX_SIZE)
    root_hash = serializers.RegexField(r"^[0-9a-f]{64}$", help_text="64 lower-case hex digits.")
    cosignature = serializers.JSONField(
        help_text="The site's signature of the checkpoint's text: {\"name\": <institution "
        'slug>, "key_id", "signature"} (NoteSignature.to_json).'
    )


class WitnessResultSerializer(serializers.Serializer):
    tree_size = serializers.IntegerField()
    root_hash = serializers.CharField()
    site = serializers.SlugField()
    witnessed_at = serializers.DateTimeField()
    duplicate = serializers.BooleanField()


def _error(detail: str, code: str, status_code: int) -> Response:
    return Response({"detail": detail, "code": code}, status=status_code)


def _since(raw: str | None) -> int | str:
    """The ``since`` parameter as a size, or the message saying what is wrong with it."""
    if raw is None:
        return 0
    if not raw.isdigit() or not raw.isascii() or len(raw) > 19 or int(raw) > _MAX_SIZE:
        return (
            f"since must be a whole number from 0 up (the size of the last checkpoint this "
            f"site saw), got {raw!r}"
        )
    return int(raw)


class LedgerAnswerRefused(Exception):
    """The centre cannot give a site the checkpoint it asks for: why, with the answer's
    ``code`` and HTTP status."""

    def __init__(self, detail: str, code: str, status_code: int):
        super().__init__(detail)
        self.code = code
        self.status_code = status_code

    def response(self) -> Response:
        return _error(str(self), self.code, self.status_code)


def checkpoint_answer(raw_since: str | None) -> dict:
    """What ``GET ledger/checkpoint/?since=<raw_since>`` answers (and the round model's
    ``X-Ledger-Checkpoint`` header carries): the newest signed checkpoint, the consistency
    proof from ``since``, ``since`` and the centre's public key; :class:`LedgerAnswerRefused`
    for a bad ``since``, one beyond today's ledger, or a ledger that contradicts a checkpoint
    the centre signed."""
    since = _since(raw_since)
    if isinstance(since, str):
        raise LedgerAnswerRefused(since, "bad_since", status.HTTP_400_BAD_REQUEST)
    try:
        row, proof = checkpoint_with_proof(since)
    except LedgerRewritten as exc:
        raise LedgerAnswerRefused(str(exc), "ledger_rewritten", status.HTTP_409_CONFLICT) from None
    if proof is None:
        raise LedgerAnswerRefused(
            f"this site saw a checkpoint of {since} entries but the centre's ledger now "
            f"has {row.tree_size}: the ledger was rolled back or replaced since this site "
            "last looked",
            "since_ahead",
            status.HTTP_400_BAD_REQUEST,
        )
    return {
        "checkpoint": checkpoint_to_json(signed_checkpoint_of(row)),
        "consistency_proof": proof_to_hex(proof),
        "since": since,
        "public_key": public_key_pem(),
    }


def witness_answer(data: object, credential: SiteCredential) -> tuple[int, dict]:
    """What ``POST ledger/checkpoint/witness/`` answers for the body ``data`` (and the upload's
    ``ledger_witness`` holds for its ``X-Ledger-Witness`` header): the HTTP status and body,
    the cosignature stored (201), already held (200) or refused, saying why."""
    body = WitnessSerializer(data=data)
    if not body.is_valid():
        refusal = bad_request(body.errors)
        return refusal.status_code, refusal.data
    fields = body.validated_data
    try:
        cosignature = NoteSignature.from_json(fields["cosignature"])
    except MalformedCheckpoint as exc:
        return 400, {"detail": f"bad request: cosignature: {exc}", "code": "bad_request"}
    institution = credential.institution
    try:
        result = witness_record(
            tree_size=fields["tree_size"],
            root_hash=fields["root_hash"],
            cosignature=cosignature,
            institution_id=institution.pk,
            institution_slug=institution.slug,
            credential_id=credential.pk,
            public_key=credential.public_key,
        )
    except CheckpointNotPublished as exc:
        return status.HTTP_404_NOT_FOUND, {"detail": str(exc), "code": "unknown_checkpoint"}
    except CheckpointRootMismatch as exc:
        return status.HTTP_409_CONFLICT, {"detail": str(exc), "code": "root_mismatch"}
    except CheckpointError as exc:
        return status.HTTP_400_BAD_REQUEST, {
            "detail": f"the cosignature does not verify with this credential's registered "
            f"key: {exc}",
            "code": "bad_cosignature",
        }
    answer = WitnessResultSerializer(
        {
            "tree_size": fields["tree_size"],
            "root_hash": fields["root_hash"],
            "site": institution.slug,
            "witnessed_at": result.witness.created_at,
            "duplicate": not result.created,
        }
    ).data
    return (status.HTTP_201_CREATED if result.created else status.HTTP_200_OK), answer


def witness_from_header(request, credential: SiteCredential) -> dict | None:
    """The site's cosignature that came with another request (the upload's
    ``X-Ledger-Witness``), recorded: ``{"status": <what the witness endpoint would answer>,
    ...its body}``; None without the header. A malformed one is answered, never raised: the
    request it came with (an update) is not lost over it."""
    raw = request.headers.get(LEDGER_WITNESS_HEADER)
    if raw is None:
        return None
    try:
        data = decode_ledger_header(raw)
    except ValueError as exc:
        status_code, body = (
            400,
            {
                "detail": f"bad request: {LEDGER_WITNESS_HEADER} is {exc}",
                "code": "bad_request",
            },
        )
    else:
        status_code, body = witness_answer(data, credential)
    return {"status": status_code, **body}


class SiteCheckpointView(SiteAPIView):
    """The ledger's newest signed checkpoint, proven to extend the one the site last saw."""

    @extend_schema(
        tags=["site"],
        summary="The newest signed ledger checkpoint, with a consistency proof from `since`",
        parameters=[
            OpenApiParameter(
                "since",
                {"type": "integer", "minimum": 0, "maximum": _MAX_SIZE},
                description="The size of the last checkpoint this site saw (0 or absent: none).",
            )
        ],
        responses={
            200: CheckpointWithProofSerializer,
            400: site_error(
                "`since` is not a whole number (bad_since), or is beyond today's ledger "
                "(since_ahead: the site saw a longer ledger than the centre now has)."
            ),
            401: site_error("No site token, or an invalid or revoked one."),
            409: site_error(
                "The centre's ledger contradicts a checkpoint it signed (ledger_rewritten): "
                "it signs no new one."
            ),
            426: site_error("The request states no site protocol, or another one."),
        },
    )
    def get(self, request):
        try:
            return Response(checkpoint_answer(request.query_params.get("since")))
        except LedgerAnswerRefused as exc:
            return exc.response()


class SiteWitnessView(SiteAPIView):
    """A site's cosignature of a checkpoint its worker checked."""

    @extend_schema(
        tags=["site"],
        summary="Post this site's cosignature of a ledger checkpoint it checked",
        request=WitnessSerializer,
        responses={
            201: OpenApiResponse(WitnessResultSerializer, description="Stored."),
            200: OpenApiResponse(
                WitnessResultSerializer, description="This site had witnessed it already."
            ),
            400: site_error(
                "Malformed (bad_request), or the cosignature does not verify with this "
                "credential's registered key (bad_cosignature)."
            ),
            401: site_error("No site token, or an invalid or revoked one."),
            404: site_error("The centre never signed a checkpoint of this size."),
            409: site_error("The centre signed another root at this size (root_mismatch)."),
            426: site_error("The request states no site protocol, or another one."),
        },
    )
    def post(self, request):
        status_code, body = witness_answer(request.data, self.credential)
        return Response(body, status=status_code)


# Under the site API's prefix (``/api/site/v1/``), which ``training.api_urls`` adds.
urlpatterns = [
    path("ledger/checkpoint/", SiteCheckpointView.as_view(), name="site-ledger-checkpoint"),
    path("ledger/checkpoint/witness/", SiteWitnessView.as_view(), name="site-ledger-witness"),
]
