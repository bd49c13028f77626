"""Contribution reports, built from the ledger alone, up to a stated head (issue 5).

A report covers one training job, or one institution across its jobs, and says per institution:
the contribution score (the job's total and each round's), the samples it trained on, the rounds
its update went into, its rejected updates, the privacy it spent (ε at the agreement's δ, against
the agreement's cap), and any withdrawal of consent with the global models derived from the
withdrawn institution's contributions.

Every figure is computed from ledger entries with ``seq <= head.seq`` and nothing else (no
training row is read), so anyone holding the ledger can recompute a report later:
``manage.py verify_report`` does exactly that (:mod:`audit.reports.verify`). The head a report
was made from is part of the report: its seq, its entry hash, the number of entries up to it and
its time (which is also the report's "as of" date: a report carries no wall-clock time, so the
same head gives the same bytes).

Where each figure comes from:

* score: ``contribution.job_scored`` (the job's total per site, at completion; null before), and
  per round ``contribution.scored``; ``score_rounds_sum`` adds the round scores in ledger order;
* samples and updates accepted: ``round.update_accepted``; rejected: ``round.update_rejected``;
* rounds participated: the ``round.closed`` entries whose ``sites`` name the institution (its
  update went into that round's global model);
* privacy: the ``privacy_events`` of the institution's accepted updates, replayed by
  :func:`training.jobs.accounting.epsilon_spent` at the δ of the job's agreement version (found from
  ``job.proposed``'s ``agreement_digest`` and ``job.agreement_rebound``, which may move it to
  another agreement, in the ``agreement.version_published`` entries, which carry the terms: see
  :mod:`audit.reports.agreements`). ``epsilon_spent`` replays the
  job's events, ``epsilon_total`` everything the institution spent in the consortium up to the
  head, and ``within_cap`` compares the total with the cap. Identical events are merged by adding
  their counts before the replay (composition of the same mechanism is what ``count`` means), so
  the memory a replay needs is bounded by the number of *distinct* events, not the ledger's length;
* withdrawals: ``consent.withdrawn``; a global model (``round.closed``: digest, round, lineage
  hash) is derived from a withdrawn institution's contributions when its round, or an earlier
  round of the same job, used that institution's update (each round's model is built from the
  previous one) and the withdrawal was under the agreement the job ran under (the entry's
  ``agreement_id`` against the agreement of the job's version, any version of it): consent is
  given and withdrawn per agreement, so a withdrawal from another agreement flags nothing. A job's
  report lists only the withdrawals that concern it; an institution's report lists all of its own.

Streaming: :meth:`ContributionReport.records` reads the ledger twice, each time as one ordered,
chunked pass (``iterator()``): the first pass builds the summaries (state bounded by the number
of jobs and institutions), the second yields the per-update, per-round and per-model records as
it meets their entries. Memory does not grow with the ledger's length, however long it is
(``benchmarks/export.py`` measures it). The entries are read through
:func:`audit.ledger.selectors.consortium_entry_rows`, never by querying the ledger here.

The rooms of :mod:`audit.reports`: :mod:`~audit.reports.scope` (what a report covers, the head
it is made up to), :mod:`~audit.reports.contents` (the record types, their fields, the JSON
document), :mod:`~audit.reports.spend` (the privacy replay), this module (the ledger read into
records), :mod:`~audit.reports.formats` (CSV, JSON), :mod:`~audit.reports.pdf` and
:mod:`~audit.reports.embedded` (the PDF and its embedded document), :mod:`~audit.reports.files`
(the one place that picks a format), :mod:`~audit.reports.verify` and
:mod:`~audit.reports.services` (the export and its ledger entry).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from audit.ledger import events as ledger_events
from audit.ledger.chain import format_timestamp
from audit.ledger.selectors import consortium_entry_rows
from audit.reports.agreements import PublishedVersions
from audit.reports.contents import document_from_records
from audit.reports.errors import ReportError
from audit.reports.scope import Head, Scope, ledger_head
from audit.reports.spend import PrivacySpend

CHUNK_SIZE = 2000

_EVENTS = (
    ledger_events.AGREEMENT_PUBLISHED,
    ledger_events.JOB_DRAFTED,
    ledger_events.JOB_PROPOSED,
    ledger_events.JOB_SPEC_CHANGED,
    ledger_events.JOB_AGREEMENT_REBOUND,
    ledger_events.JOB_DECISION,
    ledger_events.ROUND_OPENED,
    ledger_events.UPDATE_ACCEPTED,
    ledger_events.UPDATE_REJECTED,
    ledger_events.ROUND_CLOSED,
    ledger_events.CONTRIBUTION_SCORED,
    ledger_events.CONTRIBUTION_JOB_SCORED,
    ledger_events.CONSENT_WITHDRAWN,
)
_DETAIL_EVENTS = (
    ledger_events.UPDATE_ACCEPTED,
    ledger_events.UPDATE_REJECTED,
    ledger_events.ROUND_CLOSED,
    ledger_events.CONTRIBUTION_SCORED,
)


@dataclass
class _Site:
    """One institution in one job."""

    samples: int = 0
    accepted: int = 0
    rejected: int = 0
    rounds: int = 0
    first_round: int | None = None
    round_score_sum: float | None = None
    spend: PrivacySpend = field(default_factory=PrivacySpend)


@dataclass
class _Job:
    job_id: int
    title: str = ""
    agreement: str = ""  # the content digest of its agreement version
    institutions: set = field(default_factory=set)
    sites: dict = field(default_factory=dict)  # slug -> _Site
    score: dict | None = None  # the last contribution.job_scored payload
    method: str | None = None
    metric: str | None = None
    last_seq: int = 0

    def site(self, slug: str) -> _Site:
        if slug not in self.sites:
            self.sites[slug] = _Site()
        self.institutions.add(slug)
        return self.sites[slug]


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class ContributionReport:
    """A report for ``scope`` from the ledger up to ``head``.

    :meth:`records` yields plain dicts (``{"record": type, field: value, ...}``) in report order;
    :meth:`document` gathers them into the JSON document. Both read the ledger afresh.
    """

    def __init__(self, scope: Scope, head: Head, *, chunk_size: int = CHUNK_SIZE):
        self.scope = scope
        self.head = head
        self.chunk_size = chunk_size

    # The ledger, up to the head, in order, with each payload parsed.
    def _entries(self, events: Iterable[str]) -> Iterator[tuple]:
        rows = consortium_entry_rows(
            self.scope.consortium, up_to=self.head.seq, events=events, chunk_size=self.chunk_size
        )
        # closing(): a ReportError raised here ends the selector's pass (and its transaction)
        # at once, not when the generator is collected.
        with closing(rows):
            for seq, event, institution, created_at, text in rows:
                try:
                    payload = json.loads(text)
                except ValueError:
                    raise ReportError(
                        f"ledger entry #{seq} holds a payload that is not JSON"
                    ) from None
                if not isinstance(payload, dict):
                    payload = {}
                yield seq, event, institution, created_at, payload

    # -- pass 1 --
    def _summarise(self) -> None:
        versions = PublishedVersions()  # each with its cap and delta
        jobs: dict[int, _Job] = {}
        totals: dict[str, PrivacySpend] = {}
        withdrawals: list[dict] = []
        title = None

        def job_of(job_id: Any) -> _Job | None:
            job_id = _int(job_id)
            if job_id is None:
                return None
            if job_id not in jobs:
                jobs[job_id] = _Job(job_id)
            return jobs[job_id]

        for seq, event, institution, created_at, p in self._entries(_EVENTS):
            if event == ledger_events.AGREEMENT_PUBLISHED:
                terms = p.get("terms") if isinstance(p.get("terms"), dict) else {}
                try:
                    cap, delta = float(terms["epsilon_cap"]), float(terms["delta"])
                except (KeyError, TypeError, ValueError):
                    cap = delta = None
                versions.publish(p, seq, cap=cap, delta=delta)
                continue
            if event == ledger_events.CONSENT_WITHDRAWN:
                slug = institution
                if self.scope.kind == "institution" and slug != self.scope.institution:
                    continue
                withdrawals.append(
                    {
                        "institution": slug,
                        "ledger_seq": seq,
                        "at": format_timestamp(created_at),
                        "detail": _text(p.get("reason")),
                        # Not a field of the record: which jobs the withdrawal concerns.
                        "_agreement_id": _int(p.get("agreement_id")),
                    }
                )
                continue
            job = job_of(p.get("job_id"))
            if job is None:
                continue
            job.last_seq = seq
            if event in (
                ledger_events.JOB_DRAFTED,
                ledger_events.JOB_PROPOSED,
                ledger_events.JOB_SPEC_CHANGED,
            ):
                if isinstance(p.get("title"), str):
                    job.title = p["title"]
                if event == ledger_events.JOB_PROPOSED:
                    if isinstance(p.get("agreement_digest"), str):
                        job.agreement = p["agreement_digest"]
                    for slug in p.get("participants") or []:
                        if isinstance(slug, str):
                            job.institutions.add(slug)
            elif event == ledger_events.JOB_AGREEMENT_REBOUND:
                job.agreement = versions.rebound(job.agreement, p)
            elif event == ledger_events.JOB_DECISION:
                if institution:
                    job.institutions.add(institution)
            elif event == ledger_events.ROUND_OPENED:
                for slug in [*(p.get("sites") or []), *(p.get("skipped") or [])]:
                    if isinstance(slug, str):
                        job.institutions.add(slug)
            elif event == ledger_events.UPDATE_ACCEPTED:
                slug = p.get("site") or institution
                site = job.site(slug)
                site.accepted += 1
                site.samples += _int(p.get("samples")) or 0
                site.spend.add(p.get("privacy_events"), seq)
                totals.setdefault(slug, PrivacySpend()).add(p.get("privacy_events"), seq)
            elif event == ledger_events.UPDATE_REJECTED:
                job.site(p.get("site") or institution).rejected += 1
            elif event == ledger_events.ROUND_CLOSED:
                index = _int(p.get("round"))
                for slug in sorted(p.get("sites") or {}):
                    site = job.site(slug)
                    site.rounds += 1
                    if index is not None and (site.first_round is None or index < site.first_round):
                        site.first_round = index
            elif event == ledger_events.CONTRIBUTION_SCORED:
                scores = p.get("scores") if isinstance(p.get("scores"), dict) else {}
                job.method = _text(p.get("method")) or job.method
                job.metric = _text(p.get("metric")) or job.metric
                for slug in sorted(scores):
                    value = _float(scores[slug])
                    site = job.site(slug)
                    if value is not None:
                        site.round_score_sum = (site.round_score_sum or 0.0) + value
            elif event == ledger_events.CONTRIBUTION_JOB_SCORED:
                job.score = p.get("scores") if isinstance(p.get("scores"), dict) else {}
                job.method = _text(p.get("method")) or job.method
                job.metric = _text(p.get("metric")) or job.metric
                for slug in job.score:
                    job.institutions.add(slug)

        if self.scope.kind == "job":
            job = jobs.get(self.scope.job_id)
            if job is None:
                raise ReportError(
                    f"the ledger up to entry #{self.head.seq} has no entry for job "
                    f"#{self.scope.job_id} in {self.scope.consortium}"
                )
            in_scope = [job]
            title = job.title or None
        else:
            slug = self.scope.institution
            in_scope = [
                jobs[j]
                for j in sorted(jobs)
                if slug in jobs[j].institutions or slug in jobs[j].sites
            ]
        self._versions = versions
        self._jobs = {job.job_id: job for job in in_scope}
        self._totals = totals
        # Which withdrawn institutions each job's models are flagged for: consent is withdrawn
        # under one agreement, so only a withdrawal under the job's own agreement counts.
        self._withdrawn = {
            job.job_id: {w["institution"] for w in withdrawals if self._concerns(w, job)}
            for job in in_scope
        }
        # A job's report lists the withdrawals that concern it; an institution's report lists
        # all of its own (they are its acts, whatever job they reach).
        self._withdrawals = [
            {k: v for k, v in w.items() if not k.startswith("_")}
            for w in withdrawals
            if self.scope.kind == "institution" or self._concerns(w, in_scope[0])
        ]
        self._title = title

    def _agreement_of(self, job: _Job) -> int | None:
        """The agreement (id) the job ran under, from its version's published terms."""
        return self._versions.agreement_of(job.agreement)

    def _concerns(self, withdrawal: dict, job: _Job) -> bool:
        """Whether a withdrawal is one of the job's: by one of its institutions, under the
        agreement the job ran under (any version of it).

        Where the ledger does not say (an entry without the agreement, a job whose version was
        never published in this ledger), the withdrawal is taken to concern the job: a report
        that cannot tell must not hide a withdrawal from an auditor."""
        if withdrawal["institution"] not in job.institutions | set(job.sites):
            return False
        withdrawn_from = withdrawal["_agreement_id"]
        ran_under = self._agreement_of(job)
        return withdrawn_from is None or ran_under is None or withdrawn_from == ran_under

    def _terms(self, job: _Job) -> tuple[float | None, float | None]:
        version = self._versions.get(job.agreement)
        return version.get("cap"), version.get("delta")

    def _summary(self, job: _Job, slug: str) -> dict:
        site = job.sites.get(slug) or _Site()
        cap, delta = self._terms(job)
        total = self._totals.get(slug, PrivacySpend()).epsilon(delta)
        score = None
        if job.score is not None:
            score = _float(job.score.get(slug))
        return {
            "record": "summary",
            "job_id": job.job_id,
            "institution": slug,
            "score": score,
            "score_rounds_sum": site.round_score_sum,
            "score_method": job.method,
            "score_metric": job.metric,
            "samples": site.samples,
            "rounds_participated": site.rounds,
            "updates_accepted": site.accepted,
            "updates_rejected": site.rejected,
            "epsilon_spent": site.spend.epsilon(delta),
            "epsilon_total": total,
            "epsilon_cap": cap,
            "delta": delta,
            "within_cap": _within(total, cap),
        }

    def _institution_total(self) -> dict:
        slug = self.scope.institution
        sites = [job.sites[slug] for job in self._jobs.values() if slug in job.sites]
        spend = PrivacySpend()
        for site in sites:
            spend = spend.merged(site.spend)
        # The δ and cap of the institution's latest job's agreement (its most recent terms).
        cap = delta = None
        for job_id in sorted(self._jobs, reverse=True):
            cap, delta = self._terms(self._jobs[job_id])
            if delta is not None:
                break
        total = self._totals.get(slug, PrivacySpend()).epsilon(delta)
        return {
            "record": "summary",
            "job_id": None,
            "institution": slug,
            "score": None,
            "score_rounds_sum": None,
            "score_method": None,
            "score_metric": None,
            "samples": sum(s.samples for s in sites),
            "rounds_participated": sum(s.rounds for s in sites),
            "updates_accepted": sum(s.accepted for s in sites),
            "updates_rejected": sum(s.rejected for s in sites),
            "epsilon_spent": spend.epsilon(delta),
            "epsilon_total": total,
            "epsilon_cap": cap,
            "delta": delta,
            "within_cap": _within(total, cap),
        }

    # -- pass 2 --
    def _details(self) -> Iterator[dict]:
        jobs = self._jobs
        only = self.scope.institution if self.scope.kind == "institution" else None
        for seq, event, institution, _created_at, p in self._entries(_DETAIL_EVENTS):
            job_id = _int(p.get("job_id"))
            if job_id not in jobs:
                continue
            job = jobs[job_id]
            index = _int(p.get("round"))
            if event in (ledger_events.UPDATE_ACCEPTED, ledger_events.UPDATE_REJECTED):
                slug = p.get("site") or institution
                if only and slug != only:
                    continue
                accepted = event == ledger_events.UPDATE_ACCEPTED
                detail = None
                if not accepted:
                    code, reason = _text(p.get("code")), _text(p.get("reason"))
                    detail = f"{code}: {reason}" if code and reason else (reason or code)
                yield {
                    "record": "update",
                    "job_id": job_id,
                    "round": index,
                    "institution": slug,
                    "status": "accepted" if accepted else "rejected",
                    "samples": _int(p.get("samples")) if accepted else None,
                    "update_digest": _text(p.get("update_digest")),
                    "ledger_seq": seq,
                    "detail": detail,
                }
            elif event == ledger_events.CONTRIBUTION_SCORED:
                scores = p.get("scores") if isinstance(p.get("scores"), dict) else {}
                for slug in sorted(scores):
                    if only and slug != only:
                        continue
                    yield {
                        "record": "round_score",
                        "job_id": job_id,
                        "round": index,
                        "institution": slug,
                        "score": _float(scores[slug]),
                        "score_method": _text(p.get("method")),
                        "score_metric": _text(p.get("metric")),
                        "ledger_seq": seq,
                    }
            elif event == ledger_events.ROUND_CLOSED:
                sites = sorted(p.get("sites") or {})
                model = {
                    "job_id": job_id,
                    "round": index,
                    "model_digest": _text(p.get("global_digest")),
                    "lineage_hash": _text(p.get("lineage_hash")),
                    "ledger_seq": seq,
                }
                # An institution's report lists the models its updates went into.
                if not only or only in sites:
                    yield {"record": "model", **model, "detail": " ".join(sites) or None}
                for slug in sorted(self._withdrawn[job_id]):
                    first = job.sites[slug].first_round if slug in job.sites else None
                    if first is not None and index is not None and index >= first:
                        yield {"record": "derived_model", "institution": slug, **model}

    def summary_records(self) -> Iterator[dict]:
        """The header, the summaries and the withdrawals: one pass over the ledger."""
        self._summarise()
        yield {
            "record": "report",
            "consortium": self.scope.consortium,
            "title": self._title,
            "at": self.head.at or None,
        }
        if self.scope.kind == "job":
            job = self._jobs[self.scope.job_id]
            for slug in sorted(job.institutions | set(job.sites)):
                yield self._summary(job, slug)
        else:
            for job_id in sorted(self._jobs):
                yield self._summary(self._jobs[job_id], self.scope.institution)
            yield self._institution_total()
        for withdrawal in self._withdrawals:
            yield {"record": "withdrawal", **withdrawal}

    def records(self) -> Iterator[dict]:
        """Every record of the report, in order: the header, the summaries, the withdrawals,
        then the updates, round scores and models (with the models derived from a withdrawn
        institution's contributions) in ledger order."""
        yield from self.summary_records()
        yield from self._details()

    def document(self) -> dict:
        """The report as its JSON document."""
        return document_from_records(self.scope, self.head, self.records())


def _within(total: float | None, cap: float | None) -> bool | None:
    if total is None or cap is None:
        return None
    return total <= cap or math.isclose(total, cap, rel_tol=1e-9)


def build_report(scope: Scope, head: Head | None = None) -> ContributionReport:
    """A report for ``scope`` up to ``head`` (default: the ledger's current head)."""
    return ContributionReport(scope, head or ledger_head())
