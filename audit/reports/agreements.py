"""The agreement versions a ledger has published, and which one a job is bound to, read in
ledger order by every report (the contribution report, :mod:`audit.reports.build`; the
compliance report, :mod:`audit.reports.compliance`).

A version is known by its content digest (``agreement.version_published``'s ``content_digest``)
and by its (agreement id, number). A job is bound to a version when proposed
(``job.proposed``'s ``agreement_digest``); ``job.agreement_rebound`` moves it to the version in
force, which may belong to another agreement (the newest agreement in force). Entries written
since that event names the agreements (``new_agreement_id``) are followed exactly; older ones
name only the version number, and are read as they always were: the same agreement as before.
Reading this in one place keeps the reports agreeing on what job ran under what.
"""

from __future__ import annotations

from typing import Any


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


class PublishedVersions:
    """The versions published so far, by content digest (``{agreement_id, version, terms,
    seq}`` plus what the reader adds) and by (agreement id, number)."""

    def __init__(self) -> None:
        self.by_digest: dict[str, dict] = {}
        self.by_number: dict[tuple, str] = {}
        self.latest: str | None = None  # the digest of the version published last

    def publish(self, payload: dict, seq: int, **extra: Any) -> str | None:
        """Read an ``agreement.version_published`` payload; return its digest (None when the
        entry names none)."""
        digest = payload.get("content_digest")
        if not isinstance(digest, str):
            return None
        key = (payload.get("agreement_id"), payload.get("version"))
        terms = payload.get("terms") if isinstance(payload.get("terms"), dict) else {}
        self.by_digest[digest] = {
            "agreement_id": key[0],
            "version": key[1],
            "terms": terms,
            "seq": seq,
            **extra,
        }
        self.by_number[key] = digest
        self.latest = digest
        return digest

    def get(self, digest: str | None) -> dict:
        return self.by_digest.get(digest or "") or {}

    def digest_of(self, agreement_id: Any, number: Any) -> str | None:
        return self.by_number.get((agreement_id, number))

    def agreement_of(self, digest: str | None) -> int | None:
        """The agreement (id) of the version with content digest ``digest``, if published."""
        return _int(self.get(digest).get("agreement_id"))

    def rebound(self, current: str | None, payload: dict) -> str | None:
        """The digest a job bound to ``current`` is bound to after a ``job.agreement_rebound``
        entry with ``payload`` (``current`` itself when the new version is unknown): the
        agreement the entry names, or for an entry that names none, the job's agreement."""
        agreement = _int(payload.get("new_agreement_id"))
        if agreement is None:
            agreement = self.get(current).get("agreement_id")
        return self.digest_of(agreement, payload.get("new_version")) or current

    def checked_against(self, payload: dict) -> str | None:
        """The version a ``job.proposal_refused`` entry was checked against: the one it names
        (``agreement_digest``), or for an older entry that names none, the version published
        most recently before it (the agreement then in force, as far as the ledger tells)."""
        named = payload.get("agreement_digest")
        return named if isinstance(named, str) else self.latest
