"""Which site workers can sign their updates: the signing keys the central side verifies
uploads against, as the dashboard and the institution's page show them.

Why here: an update is verified against the public key of the *worker credential* that uploads
it (:class:`training.models.SiteCredential`, created with the worker's token by
``training.rounds.credentials.site_credential_create``), not against the institution's
``worker_public_key``. That field is only the key a new credential takes when none is pasted. So
a site whose workers run and upload signed updates may have an empty ``worker_public_key``, and
one with a key on file may have no worker able to upload. The truth for "has a worker key" is an
active (unrevoked) credential. The rows are read by governance's
:func:`~consortium.governance.selectors.active_credentials_of` (through ``Institution``'s
``site_credentials`` relation, importing nothing of training), the one read that the
governance API's ``signing_keys`` also uses, so the pages and the API tell the same truth.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from consortium.governance.selectors import active_credentials_of
from consortium.governance.services.institutions import key_fingerprint

__all__ = ["SigningKey", "WorkerKeys", "worker_keys"]


@dataclass(frozen=True)
class SigningKey:
    """One active worker credential's public key."""

    label: str
    token_prefix: str
    fingerprint: str


@dataclass(frozen=True)
class WorkerKeys:
    """An institution's signing keys: one per active worker credential, newest first, and
    the fingerprint of the key on file for new credentials (``""`` when none)."""

    institution_id: int
    signing_keys: tuple[SigningKey, ...]
    key_on_file: str = ""

    @property
    def registered(self) -> bool:
        """A worker of this site can sign an update the central side will verify."""
        return bool(self.signing_keys)


def worker_keys(institutions: Iterable) -> dict[int, WorkerKeys]:
    """Per institution id (every one given, with or without credentials), its workers'
    signing keys. One query."""
    institutions = list(institutions)
    active = active_credentials_of([i.pk for i in institutions])
    found = {
        pk: [
            SigningKey(
                label=c.label,
                token_prefix=c.token_prefix,
                fingerprint=key_fingerprint(c.public_key),
            )
            for c in credentials
        ]
        for pk, credentials in active.items()
    }
    return {
        i.pk: WorkerKeys(
            institution_id=i.pk,
            signing_keys=tuple(found[i.pk]),
            key_on_file=key_fingerprint(i.worker_public_key),
        )
        for i in institutions
    }
