"""The centre's checkpoint key and the log's name (settings ``LEDGER_SIGNING_KEY``,
``LEDGER_ORIGIN``).

The centre signs every checkpoint of the ledger's Merkle tree (:mod:`audit.ledger.checkpoints`)
with an Ed25519 key of its own, kept like a site's ``SITE_SIGNING_KEY``: a PKCS#8 PEM file,
0600, on the server. Production refuses to start without one (``consortium/settings.py``); in
development, the demo and the tests a key is made once under ``var/ledger/`` so that nothing
needs setting, and it stays the same across restarts (a new key every start would make every
site's pinned key wrong).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "development_key_path",
    "ledger_origin",
    "public_key_env_value",
    "public_key_pem",
    "signing_key_pem",
]


def development_key_path() -> Path:
    """Where the key made for development lives (under the project's ``var/``)."""
    return Path(settings.BASE_DIR) / "var" / "ledger" / "signing-key.pem"


def _make_development_key(path: Path) -> None:
    """Write a new key to ``path`` (0600) unless one is there; safe against a racing writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    try:
        os.link(tmp, path)  # fails if another process made it first: theirs is kept
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _key_path() -> Path:
    configured = settings.LEDGER_SIGNING_KEY
    if configured:
        return Path(configured).expanduser()
    path = development_key_path()
    if not path.exists():
        _make_development_key(path)
    return path


@functools.cache
def _read_key(path: Path, mtime_ns: int) -> tuple[bytes, str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImproperlyConfigured(
            f"LEDGER_SIGNING_KEY {path} cannot be read ({exc.strerror}): it must name the "
            "centre's Ed25519 private key (PEM)"
        ) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(
            f"LEDGER_SIGNING_KEY {path} is not a PEM private key without a password: {exc}"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ImproperlyConfigured(
            f"LEDGER_SIGNING_KEY {path} is a {type(key).__name__}; the ledger's key is Ed25519"
        )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data, public.decode("ascii")


def _key() -> tuple[bytes, str]:
    path = _key_path()
    try:
        mtime_ns = path.stat().st_mtime_ns
    except OSError:
        mtime_ns = -1  # _read_key says why it cannot be read
    return _read_key(path, mtime_ns)


def signing_key_pem() -> bytes:
    """The centre's private key (PEM), read from ``LEDGER_SIGNING_KEY`` (or made, outside
    production); ``ImproperlyConfigured`` saying what is wrong with the file."""
    return _key()[0]


def public_key_pem() -> str:
    """The centre's public key (SubjectPublicKeyInfo PEM): what sites and auditors verify
    checkpoints with (``CENTRAL_LEDGER_PUBLIC_KEY``, ``verify_ledger --public-key``)."""
    return _key()[1]


def public_key_env_value() -> str:
    """The public key on one line, its newlines written ``\\n``: the value of a site's
    ``CENTRAL_LEDGER_PUBLIC_KEY`` (the credentials page and ``create_site_credentials`` print
    it; ``training.site.ledger_witness`` reads it back)."""
    return public_key_pem().strip().replace("\n", "\\n")


def ledger_origin() -> str:
    """The log's name in its checkpoints: ``LEDGER_ORIGIN``, or ``<SITE_URL's host>/ledger``.

    The C2SP convention names a log by where it is served, so the default is the centre's own
    public host: unique to this consortium, stable across restarts and key changes, and what a
    site already knows (its ``CENTRAL_URL``). Changing it makes every saved checkpoint one of
    another log, so set it once.
    """
    configured: str = settings.LEDGER_ORIGIN
    if configured:
        return configured
    host = urlsplit(settings.SITE_URL).netloc
    return f"{host}/ledger"
