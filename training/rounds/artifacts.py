"""A content-addressed store for model files (docs/architecture.md, section 2: artifacts are
content-addressed by SHA-256).

An artifact's name is its own SHA-256, so a stored file can always be checked
against its name: :meth:`ArtifactStore.get` hashes what it read and refuses
bytes that do not match (:class:`ArtifactCorrupt`). Writing the same bytes twice
stores them once.

The store sits over a Django storage backend, the ``"artifacts"`` alias of
``settings.STORAGES``: a local folder by default (``ARTIFACT_ROOT``, else
``var/artifacts`` in the project), or any other backend (S3 through
django-storages, for instance) configured there. Files live at
``<aa>/<bb>/<digest>`` so no folder grows too large.
"""

from __future__ import annotations

import hashlib
import re

from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages

STORAGE_ALIAS = "artifacts"

_DIGEST = re.compile(r"[0-9a-f]{64}")


class ArtifactError(Exception):
    """Base of the store's errors."""


class ArtifactMissing(ArtifactError):
    """No artifact with that digest is stored."""


class ArtifactCorrupt(ArtifactError):
    """The stored bytes do not hash to their name: the file was altered or truncated."""


def is_digest(value: object) -> bool:
    """A lower-case hex SHA-256 (64 characters)."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Content-addressed bytes over a Django :class:`~django.core.files.storage.Storage`."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def path_of(digest: str) -> str:
        """Where the artifact ``digest`` is stored (``<aa>/<bb>/<digest>``)."""
        if not is_digest(digest):
            raise ArtifactMissing(f"{digest!r} is not a SHA-256 digest (64 lower-case hex)")
        return f"{digest[:2]}/{digest[2:4]}/{digest}"

    def put(self, data: bytes) -> str:
        """Store ``data`` (if it is not stored already) and return its digest."""
        data = bytes(data)
        digest = sha256_hex(data)
        name = self.path_of(digest)
        if self.storage.exists(name):
            if self.storage.size(name) == len(data):
                return digest
            # A stored file of the wrong size cannot be these bytes (an interrupted
            # write): replace it with the right ones.
            self.storage.delete(name)
        saved = self.storage.save(name, ContentFile(data))
        if saved != name:
            # A concurrent writer stored the same name first and the backend picked
            # another name for ours: the content is the same, keep one copy.
            self.storage.delete(saved)
        return digest

    def get(self, digest: str) -> bytes:
        """The bytes stored under ``digest``, checked against it."""
        name = self.path_of(digest)
        try:
            with self.storage.open(name, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            raise ArtifactMissing(f"no artifact {digest} in the store") from None
        actual = sha256_hex(data)
        if actual != digest:
            raise ArtifactCorrupt(
                f"artifact {digest} is corrupt: its {len(data)} stored bytes hash to {actual}"
            )
        return data

    def exists(self, digest: str) -> bool:
        if not is_digest(digest):
            return False
        return self.storage.exists(self.path_of(digest))

    def size(self, digest: str) -> int:
        """The stored size in bytes (not verified: use :meth:`get` for the bytes)."""
        name = self.path_of(digest)
        try:
            return self.storage.size(name)
        except FileNotFoundError:
            raise ArtifactMissing(f"no artifact {digest} in the store") from None


def artifact_store() -> ArtifactStore:
    """The store over the configured ``"artifacts"`` storage."""
    return ArtifactStore(storages[STORAGE_ALIAS])
