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
from training.rounds.site_api_auth import SiteAPIView
from training.rounds.site_api_serializers import bad_request, site_error

__all__ = ["urlpatterns"]

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
        since = _since(request.query_params.get("since"))
        if isinstance(since, str):
            return _error(since, "bad_since", status.HTTP_400_BAD_REQUEST)
        try:
            row, proof = checkpoint_with_proof(since)
        except LedgerRewritten as exc:
            return _error(str(exc), "ledger_rewritten", status.HTTP_409_CONFLICT)
        if proof is None:
            return _error(
                f"this site saw a checkpoint of {since} entries but the centre's ledger now "
                f"has {row.tree_size}: the ledger was rolled back or replaced since this site "
                "last looked",
                "since_ahead",
                status.HTTP_400_BAD_REQUEST,
            )
        return Response(
            CheckpointWithProofSerializer(
                {
                    "checkpoint": checkpoint_to_json(signed_checkpoint_of(row)),
                    "consistency_proof": proof_to_hex(proof),
                    "since": since,
                    "public_key": public_key_pem(),
                }
            ).data
        )


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
        body = WitnessSerializer(data=request.data)
        if not body.is_valid():
            return bad_request(body.errors)
        data = body.validated_data
        try:
            cosignature = NoteSignature.from_json(data["cosignature"])
        except MalformedCheckpoint as exc:
            return _error(f"bad request: cosignature: {exc}", "bad_request", 400)
        credential = self.credential
        institution = credential.institution
        try:
            result = witness_record(
                tree_size=data["tree_size"],
                root_hash=data["root_hash"],
                cosignature=cosignature,
                institution_id=institution.pk,
                institution_slug=institution.slug,
                credential_id=credential.pk,
                public_key=credential.public_key,
            )
        except CheckpointNotPublished as exc:
            return _error(str(exc), "unknown_checkpoint", status.HTTP_404_NOT_FOUND)
        except CheckpointRootMismatch as exc:
            return _error(str(exc), "root_mismatch", status.HTTP_409_CONFLICT)
        except CheckpointError as exc:
            return _error(
                f"the cosignature does not verify with this credential's registered key: {exc}",
                "bad_cosignature",
                status.HTTP_400_BAD_REQUEST,
            )
        witness = result.witness
        answer = WitnessResultSerializer(
            {
                "tree_size": data["tree_size"],
                "root_hash": data["root_hash"],
                "site": institution.slug,
                "witnessed_at": witness.created_at,
                "duplicate": not result.created,
            }
        ).data
        return Response(answer, status=status.HTTP_201_CREATED if result.created else 200)


# Under the site API's prefix (``/api/site/v1/``), which ``training.api_urls`` adds.
urlpatterns = [
    path("ledger/checkpoint/", SiteCheckpointView.as_view(), name="site-ledger-checkpoint"),
    path("ledger/checkpoint/witness/", SiteWitnessView.as_view(), name="site-ledger-witness"),
]
