"""Ed25519 signatures on site updates (docs/architecture.md, section 2: each site worker holds a
signing key).

A site signs :func:`update_message` (canonical JSON of the job, round, site, the update's SHA-256
digest and its sample count) with its private key; the coordinator rebuilds the same bytes from the
round's records and checks them against the public key registered for the institution. Only
Ed25519 keys are accepted, in PEM (PKCS#8 private, SubjectPublicKeyInfo public).
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "BadSignature",
    "generate_keypair",
    "sign_update",
    "update_message",
    "verify_update",
]

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
SIGNATURE_BYTES = 64


class BadSignature(ValueError):
    """A signature that does not verify; the message says why."""


def generate_keypair() -> tuple[bytes, str]:
    """A new Ed25519 key pair: (PKCS#8 PEM private key, SubjectPublicKeyInfo PEM public key)."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem.decode("ascii")


def _positive_int(value: object, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer of at least {minimum}, got {value!r}")
    return value


def update_message(
    *, job_id: int, round_index: int, site: str, update_digest: str, samples: int
) -> bytes:
    """The canonical bytes a site signs for one update (sorted keys, no spaces, UTF-8)."""
    _positive_int(job_id, "job_id", minimum=1)
    _positive_int(round_index, "round_index", minimum=0)
    _positive_int(samples, "samples", minimum=0)
    if not isinstance(site, str) or not site:
        raise ValueError(f"site must be a non-empty string, got {site!r}")
    if not isinstance(update_digest, str) or not _DIGEST_RE.fullmatch(update_digest):
        raise ValueError(
            f"update_digest must be a lower-case SHA-256 hex digest, got {update_digest!r}"
        )
    payload = {
        "job_id": job_id,
        "round_index": round_index,
        "samples": samples,
        "site": site,
        "update_digest": update_digest,
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def _private_key(private_pem: bytes | str) -> Ed25519PrivateKey:
    data = private_pem.encode("ascii") if isinstance(private_pem, str) else private_pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a usable PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"site signing keys must be Ed25519, got {type(key).__name__}")
    return key


def _public_key(public_pem: str | bytes) -> Ed25519PublicKey:
    data = public_pem.encode("ascii") if isinstance(public_pem, str) else public_pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise BadSignature(f"the site's public key is not a valid PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BadSignature(f"the site's public key is {type(key).__name__}, not Ed25519: refused")
    return key


def sign_update(private_pem: bytes | str, message: bytes) -> str:
    """Base64 Ed25519 signature of ``message``; ``ValueError`` for a non-Ed25519 key."""
    if not isinstance(message, bytes):
        raise ValueError("message must be bytes (see update_message)")
    return base64.b64encode(_private_key(private_pem).sign(message)).decode("ascii")


def verify_update(public_pem: str | bytes, message: bytes, signature_b64: str) -> None:
    """Check a signature; raise :class:`BadSignature` saying what is wrong, else return None."""
    key = _public_key(public_pem)
    if not isinstance(message, bytes):
        raise BadSignature("message must be bytes (see update_message)")
    if not isinstance(signature_b64, str | bytes):
        raise BadSignature(f"signature must be base64 text, got {type(signature_b64).__name__}")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadSignature(f"signature is not valid base64: {exc}") from exc
    if len(signature) != SIGNATURE_BYTES:
        raise BadSignature(
            f"signature is {len(signature)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}"
        )
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise BadSignature(
            "signature does not match this message and key (tampered update or wrong key)"
        ) from None
