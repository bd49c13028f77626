"""What a contribution report covers (:class:`Scope`: one job, or one institution across its
jobs) and the ledger head it is made up to (:class:`Head`).

The head is part of the report: its seq, its entry hash, the number of entries up to it and its
time (which is also the report's "as of" date: a report carries no wall-clock time, so the same
head gives the same bytes). Scopes and heads are found from the ledger alone, through
:mod:`audit.ledger.selectors`, so a report can be made again from the ledger later.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from audit.ledger.chain import GENESIS_HASH, format_timestamp
from audit.ledger.selectors import (
    current_head_seq,
    entry_count_up_to,
    entry_stamp,
    institution_consortia,
    subject_first_consortium,
)
from audit.reports.errors import ReportError

#: The ledger's subject type of a training job (``append_entry`` records ``_meta.label_lower``).
JOB_SUBJECT_TYPE = "training.trainingjob"


@dataclass(frozen=True)
class Scope:
    """What a report covers: one job, or one institution (across its jobs) of a consortium."""

    kind: str  # "job" or "institution"
    consortium: str
    job_id: int | None = None
    institution: str | None = None

    def __post_init__(self):
        if self.kind == "job" and not isinstance(self.job_id, int):
            raise ReportError("a job report needs a job id")
        if self.kind == "institution" and not self.institution:
            raise ReportError("an institution report needs an institution slug")
        if self.kind not in ("job", "institution"):
            raise ReportError(f"unknown report scope {self.kind!r}")

    def to_json(self) -> dict:
        data: dict[str, Any] = {"kind": self.kind, "consortium": self.consortium}
        if self.kind == "job":
            data["job_id"] = self.job_id
        else:
            data["institution"] = self.institution
        return data

    @classmethod
    def from_json(cls, data: Any) -> Scope:
        if not isinstance(data, dict):
            raise ReportError("the report's scope is not an object")
        kind = data.get("kind")
        consortium = data.get("consortium")
        if not isinstance(consortium, str) or not consortium:
            raise ReportError("the report's scope names no consortium")
        if kind == "job":
            job_id = data.get("job_id")
            if not isinstance(job_id, int) or isinstance(job_id, bool):
                raise ReportError("the report's scope names no job id")
            return cls("job", consortium, job_id=job_id)
        if kind == "institution":
            institution = data.get("institution")
            if not isinstance(institution, str) or not institution:
                raise ReportError("the report's scope names no institution")
            return cls("institution", consortium, institution=institution)
        raise ReportError(f"unknown report scope {kind!r}")

    @property
    def label(self) -> str:
        """``job:5`` or ``institution:hospital-a`` (the CSV's scope column)."""
        return f"job:{self.job_id}" if self.kind == "job" else f"institution:{self.institution}"

    @classmethod
    def from_label(cls, label: str, consortium: str) -> Scope:
        kind, _, value = (label or "").partition(":")
        if kind == "job" and value.isdigit():
            return cls("job", consortium, job_id=int(value))
        if kind == "institution" and value:
            return cls("institution", consortium, institution=value)
        raise ReportError(f"unreadable report scope {label!r}")

    def filename(self, head: Head, fmt: str) -> str:
        what = f"job-{self.job_id}" if self.kind == "job" else f"institution-{self.institution}"
        return f"contribution-report-{self.consortium}-{what}-ledger-{head.seq}.{fmt}"


@dataclass(frozen=True)
class Head:
    """The ledger entry a report was made up to."""

    seq: int
    entry_hash: str
    entry_count: int
    at: str  # the entry's time (format_timestamp); "" for an empty ledger

    def to_json(self) -> dict:
        return {
            "seq": self.seq,
            "entry_hash": self.entry_hash,
            "entry_count": self.entry_count,
            "at": self.at,
        }


def ledger_head(seq: int | None = None) -> Head:
    """The head to report up to: the ledger's current head, or the entry ``seq``."""
    if seq is None:
        seq = current_head_seq()
    if seq == 0:
        return Head(0, GENESIS_HASH, 0, "")
    stamp = entry_stamp(seq)
    if stamp is None:
        raise ReportError(f"the ledger has no entry #{seq}")
    count = entry_count_up_to(seq)
    return Head(seq, stamp.entry_hash, count, format_timestamp(stamp.created_at))


def job_scope(job_id: int) -> Scope:
    """A job's report scope; its consortium is read from the job's own ledger entries."""
    slug = subject_first_consortium(JOB_SUBJECT_TYPE, str(job_id))
    if not slug:
        raise ReportError(f"no ledger entry records job #{job_id}")
    return Scope("job", slug, job_id=job_id)


def institution_scope(institution_slug: str, consortium_slug: str | None = None) -> Scope:
    """An institution's report scope (its ``institution.created`` entry names its consortium)."""
    slugs = institution_consortia(institution_slug, consortium_slug)
    if not slugs:
        raise ReportError(f"no ledger entry records the institution '{institution_slug}'")
    if len(slugs) > 1:
        raise ReportError(
            f"the institution '{institution_slug}' exists in several consortia "
            f"({', '.join(slugs)}): name the consortium"
        )
    return Scope("institution", slugs[0], institution=institution_slug)


def as_of(head: Head) -> dt.datetime | None:
    """The head's time as a datetime (for display)."""
    if not head.at:
        return None
    return dt.datetime.fromisoformat(head.at.replace("Z", "+00:00"))
