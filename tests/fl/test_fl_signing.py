"""Ed25519 signing of site updates (training.fl.signing)."""

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from training.fl.signing import (
    BadSignature,
    generate_keypair,
    sign_update,
    update_message,
    verify_update,
)

DIGEST = hashlib.sha256(b"update").hexdigest()


def _message(**overrides):
    fields = dict(job_id=7, round_index=2, site="north-hospital", update_digest=DIGEST, samples=120)
    fields.update(overrides)
    return update_message(**fields)


def test_round_trip():
    private_pem, public_pem = generate_keypair()
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_pem.startswith("-----BEGIN PUBLIC KEY-----")
    message = _message()
    signature = sign_update(private_pem, message)
    assert verify_update(public_pem, message, signature) is None


def test_message_is_canonical():
    message = _message()
    assert message == (
        b'{"job_id":7,"round_index":2,"samples":120,"site":"north-hospital",'
        b'"update_digest":"' + DIGEST.encode() + b'"}'
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"job_id": 0},
        {"round_index": -1},
        {"samples": True},
        {"site": ""},
        {"update_digest": "ABC"},
        {"update_digest": DIGEST.upper()},
    ],
)
def test_message_fields_are_checked(overrides):
    with pytest.raises(ValueError):
        _message(**overrides)


@pytest.mark.parametrize(
    "tampered",
    [
        {"samples": 121},
        {"round_index": 3},
        {"site": "south-hospital"},
        {"update_digest": hashlib.sha256(b"other").hexdigest()},
    ],
)
def test_tampered_message_fails(tampered):
    private_pem, public_pem = generate_keypair()
    signature = sign_update(private_pem, _message())
    with pytest.raises(BadSignature, match="does not match"):
        verify_update(public_pem, _message(**tampered), signature)


def test_wrong_key_fails():
    private_pem, _ = generate_keypair()
    _, other_public = generate_keypair()
    signature = sign_update(private_pem, _message())
    with pytest.raises(BadSignature, match="does not match"):
        verify_update(other_public, _message(), signature)


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        ("not base64!!", "not valid base64"),
        (base64.b64encode(b"short").decode(), "5 bytes"),
        (base64.b64encode(bytes(64)).decode(), "does not match"),
    ],
)
def test_garbage_signature_fails_with_a_reason(signature, reason):
    _, public_pem = generate_keypair()
    with pytest.raises(BadSignature, match=reason):
        verify_update(public_pem, _message(), signature)


def test_non_ed25519_keys_are_refused():
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_private = ec_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ec_public = (
        ec_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ValueError, match="Ed25519"):
        sign_update(ec_private, _message())
    private_pem, _ = generate_keypair()
    signature = sign_update(private_pem, _message())
    with pytest.raises(BadSignature, match="not Ed25519"):
        verify_update(ec_public, _message(), signature)


def test_malformed_public_key_is_a_bad_signature():
    private_pem, _ = generate_keypair()
    signature = sign_update(private_pem, _message())
    with pytest.raises(BadSignature, match="not a valid PEM"):
        verify_update(
            "-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n", _message(), signature
        )
