"""Each demo hospital's site-worker files: an Ed25519 signing key under
``<folder>/signing-key.pem`` and a token under ``<folder>/token`` (both 0600), and the
credential registered for them by the hospital's data steward, as in the browser. They are
reused while the files and an active credential match, so a second run changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from django.contrib.auth import get_user_model

from training.fl.signing import generate_keypair
from training.models import SiteCredential
from training.rounds.credentials import site_credential_create, site_credential_revoke
from training.site.ledger_witness import state_file

CREDENTIAL_LABEL = "demo worker"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (created 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)
    path.chmod(0o600)


def _public_pem(private_pem: bytes) -> str:
    key = serialization.load_pem_private_key(private_pem, password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def _pem_equal(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())


@dataclass
class SiteFiles:
    slug: str
    folder: Path
    key_path: Path
    token: str
    data_root: Path
    created: bool


def ensure_site_credentials(institution, folder: Path) -> SiteFiles:
    """The site's signing key and an active credential for it, reused when both are there.

    Created by the hospital's data steward, as in the browser. A credential of this demo whose
    token file was lost is revoked, so no token that nobody holds stays live."""
    key_path = folder / "signing-key.pem"
    token_path = folder / "token"
    data_root = folder / "data"
    data_root.mkdir(parents=True, exist_ok=True)
    if key_path.is_file():
        private_pem = key_path.read_bytes()
        try:
            public_pem = _public_pem(private_pem)
        except (ValueError, TypeError):
            private_pem = b""
    else:
        private_pem = b""
    if not private_pem:
        private_pem, public_pem = generate_keypair()
        _write_private(key_path, private_pem)

    token = token_path.read_text().strip() if token_path.is_file() else ""
    if token:
        live = SiteCredential.objects.filter(
            institution=institution,
            token_hash=hashlib.sha256(token.encode("utf-8")).hexdigest(),
            revoked_at__isnull=True,
        ).first()
        if live is not None and _pem_equal(live.public_key, public_pem):
            return SiteFiles(institution.slug, folder, key_path, token, data_root, False)

    steward = get_user_model().objects.get(username=f"steward-{institution.slug}")
    for stale in SiteCredential.objects.filter(
        institution=institution, label=CREDENTIAL_LABEL, revoked_at__isnull=True
    ):
        site_credential_revoke(acting_user=steward, credential=stale)
    _credential, token = site_credential_create(
        acting_user=steward, institution=institution, label=CREDENTIAL_LABEL, public_key=public_pem
    )
    _write_private(token_path, token.encode("ascii") + b"\n")
    # New credentials mean a new centre as far as this folder knows (the demo's database was
    # made afresh): the checkpoint its worker saw of the old one would only make it refuse,
    # rightly, to train for this one. A real site enrolled anew starts from the centre's word.
    state_file(data_root).unlink(missing_ok=True)
    return SiteFiles(institution.slug, folder, key_path, token, data_root, True)
