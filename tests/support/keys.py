"""Fresh public keys in PEM, for the checks on the keys institutions and sites register."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key


def _pem(public_key) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def ed25519_pem() -> str:
    """A new Ed25519 public key (the kind a worker signs its updates with)."""
    return _pem(Ed25519PrivateKey.generate().public_key())


def rsa_pem(key_size: int = 2048) -> str:
    """A new RSA public key: a valid PEM of a kind the platform refuses."""
    return _pem(generate_private_key(public_exponent=65537, key_size=key_size).public_key())
