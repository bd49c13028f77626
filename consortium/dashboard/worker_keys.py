"""Which site workers can sign their updates: the signing keys the central side verifies
uploads against, as the dashboard and the institution's page show them.

Why here: an update is verified against the public key of the *worker credential* that uploads
it (:class:`training.models.SiteCredential`, created with the worker's token by
``training.rounds.credentials.site_credential_create``), not against the institution's
``worker_public_key``. That field is only the key a new credential takes when none is pasted. So
a site whose workers run and upload signed updates may have an empty ``worker_public_key``, and
one with a key on file may have no worker able to upload. The truth for "has a worker key" is an
active (unrevoked) credential. Governance cannot read training's credentials (its layer rule),
so the dashboard, which sits above both, reads them here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from consortium.governance.services.institutions import key_fingerprint
from training.models import SiteCredential

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
    found: dict[int, list[SigningKey]] = {i.pk: [] for i in institutions}
    credentials = (
        SiteCredential.objects.filter(institution_id__in=list(found), revoked_at__isnull=True)
        .order_by("-created_at", "-pk")
        .values_list("institution_id", "label", "token_prefix", "public_key")
    )
    for institution_id, label, prefix, public_key in credentials:
        found[institution_id].append(
            SigningKey(label=label, token_prefix=prefix, fingerprint=key_fingerprint(public_key))
        )
    return {
        i.pk: WorkerKeys(
            institution_id=i.pk,
            signing_keys=tuple(found[i.pk]),
            key_on_file=key_fingerprint(i.worker_public_key),
        )
        for i in institutions
    }
