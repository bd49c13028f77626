"""Compliance reports, for auditors: one agreement version and everything done under it (issue 14).

A contribution report answers "who contributed what"; a compliance report answers "was the
agreement kept". For one published agreement version it lists, up to a stated ledger head:

* the version's terms: its privacy floor (required DP mechanism, the largest fraction of the model
  a site may share, ε cap at δ), purposes and model families (``agreement.version_published``);
* the jobs run under it: the jobs whose binding (``job.proposed``'s ``agreement_digest``, moved by
  ``job.agreement_rebound``, possibly to another agreement's version: see
  :mod:`audit.reports.agreements`) is this version at the head, with their spec digest and last
  state;
* every approval and rejection of those jobs (``job.decision``): who decided (the entry's actor),
  when, for which institution, bound to which spec digest and agreement version, and whether that
  digest is still the job's (a spec change voids earlier approvals);
* each job's privacy pipeline (its filters, in order) and the floor checked against it. The
  pipeline is the job's spec as stored with the job (read by
  :func:`training.jobs.selectors.job_spec_texts`); the report states whether that text hashes to
  the spec digest the ledger recorded, so the filters shown are bound to the ledger;
* ε per institution: spent by the jobs under this version (replayed from the privacy events of
  their accepted updates, at this version's δ) and in total in the consortium, against the cap;
* withdrawals of consent from this version's agreement and what each changed (the jobs the
  institution was taken out of, the jobs that failed for it), and any removal from a job under
  this version that another agreement's withdrawal caused (so a wrong removal is visible);
* proposals refused for breaking the agreement (``job.proposal_refused``, attributed to the
  version the entry names it was checked against; an entry written before refusals named it is
  attributed to the version published most recently before it)
  and jobs rejected by an approver, with their reasons;
* the ledger head it was built from (like every report: no wall-clock time, same head, same bytes).

Like the contribution report it is a sequence of flat records (one type per list in its JSON
document), written as CSV, JSON or PDF by :mod:`audit.reports.compliance_files` and recomputed by
``manage.py verify_report`` (:mod:`audit.reports.compliance_verify`). Institutions are named by
their ledger name (``institution.created``, renamed by ``institution.updated``) beside their slug.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from audit.ledger import events as ledger_events
from audit.ledger.chain import format_timestamp
from audit.ledger.selectors import consortium_entries
from audit.reports.agreements import PublishedVersions
from audit.reports.compliance_contents import (
    ComplianceScope,
    document_from_records,
)
from audit.reports.errors import ReportError
from audit.reports.institutions import InstitutionDirectory
from audit.reports.scope import Head
from audit.reports.spend import PrivacySpend
from training.jobs.selectors import job_spec_texts
from training.jobs.spec import FILTER_MECHANISM, shared_fraction

CHUNK_SIZE = 2000

_EVENTS = (
    ledger_events.INSTITUTION_CREATED,
    ledger_events.INSTITUTION_UPDATED,
    ledger_events.AGREEMENT_DRAFTED,
    ledger_events.AGREEMENT_PUBLISHED,
    ledger_events.AGREEMENT_SIGNED,
    ledger_events.CONSENT_WITHDRAWN,
    ledger_events.JOB_PROPOSED,
    ledger_events.JOB_SPEC_CHANGED,
    ledger_events.JOB_AGREEMENT_REBOUND,
    ledger_events.JOB_PROPOSAL_REFUSED,
    ledger_events.JOB_DECISION,
    ledger_events.JOB_STATE_CHANGED,
    ledger_events.JOB_PARTICIPANT_REMOVED,
    ledger_events.UPDATE_ACCEPTED,
)


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _within(total: float | None, cap: float | None) -> bool | None:
    if total is None or cap is None:
        return None
    return total <= cap or math.isclose(total, cap, rel_tol=1e-9)


@dataclass
class _Job:
    job_id: int
    title: str = ""
    digest: str = ""  # the agreement version's content digest it is bound to
    spec_digest: str = ""
    state: str = "awaiting_approval"
    participants: list = field(default_factory=list)
    proposed_by: str = ""
    at: str = ""
    seq: int = 0


class ComplianceReport:
    """The compliance report for ``scope`` from the ledger up to ``head``."""

    def __init__(self, scope: ComplianceScope, head: Head, *, chunk_size: int = CHUNK_SIZE):
        self.scope = scope
        self.head = head
        self.chunk_size = chunk_size

    def _entries(self) -> Iterator[tuple]:
        """(seq, event, institution, actor, time, payload) of the events the report reads."""
        rows = (
            consortium_entries(self.scope.consortium)
            .filter(seq__lte=self.head.seq, event__in=list(_EVENTS))
            .order_by("seq")
            .values_list(
                "seq", "event", "institution_slug", "actor_repr", "created_at", "payload_text"
            )
        )
        for seq, event, institution, actor, created_at, text in rows.iterator(self.chunk_size):
            try:
                payload = json.loads(text)
            except ValueError:
                raise ReportError(f"ledger entry #{seq} holds a payload that is not JSON") from None
            yield (
                seq,
                event,
                institution,
                actor,
                format_timestamp(created_at),
                payload if isinstance(payload, dict) else {},
            )

    def records(self) -> Iterator[dict]:  # noqa: C901 - one ordered pass, branch per event
        """Every record, in report order (header, jobs, approvals, filters, floor checks,
        privacy, withdrawals, their effects, refusals)."""
        scope = self.scope
        names = InstitutionDirectory()
        versions = PublishedVersions()
        titles: dict[int, str] = {}
        jobs: dict[int, _Job] = {}
        decisions: list[tuple] = []
        signers: set[str] = set()
        withdrawals: list[dict] = []
        last_withdrawal: dict[str, dict] = {}  # institution -> its latest withdrawal
        effects: list[dict] = []
        last_removal: dict[int, dict] = {}  # job -> the removal just recorded
        refusals: list[tuple] = []
        spends: dict[tuple, PrivacySpend] = {}  # (job_id, institution) -> spend
        totals: dict[str, PrivacySpend] = {}

        for seq, event, institution, actor, at, p in self._entries():
            if event in (
                ledger_events.INSTITUTION_CREATED,
                ledger_events.INSTITUTION_UPDATED,
            ):
                names.observe(event, institution, p)
            elif event == ledger_events.AGREEMENT_DRAFTED:
                if isinstance(p.get("title"), str):
                    titles[_int(p.get("agreement_id")) or 0] = p["title"]
            elif event == ledger_events.AGREEMENT_PUBLISHED:
                versions.publish(p, seq)
            elif event == ledger_events.AGREEMENT_SIGNED:
                if (p.get("agreement_id"), p.get("version")) == (scope.agreement_id, scope.version):
                    signers.add(institution)
            elif event == ledger_events.CONSENT_WITHDRAWN:
                record = {
                    "institution": institution,
                    "agreement_id": _int(p.get("agreement_id")),
                    "decided_by": actor or None,
                    "at": at,
                    "ledger_seq": seq,
                    "detail": _text(p.get("reason")),
                }
                withdrawals.append(record)
                last_withdrawal[institution] = record
            elif event == ledger_events.JOB_PROPOSAL_REFUSED:
                checked_against = versions.checked_against(p)
                refusals.append(("refused", seq, actor, at, institution, p, checked_against))
            elif event == ledger_events.UPDATE_ACCEPTED:
                job_id, slug = _int(p.get("job_id")), p.get("site") or institution
                key = (job_id, slug)
                spends.setdefault(key, PrivacySpend()).add(p.get("privacy_events"), seq)
                totals.setdefault(slug, PrivacySpend()).add(p.get("privacy_events"), seq)
            else:
                job_id = _int(p.get("job_id"))
                if job_id is None:
                    continue
                job = jobs.setdefault(job_id, _Job(job_id))
                if event == ledger_events.JOB_PROPOSED:
                    job.title = _text(p.get("title")) or job.title
                    job.digest = _text(p.get("agreement_digest")) or job.digest
                    job.spec_digest = _text(p.get("spec_digest")) or job.spec_digest
                    job.participants = [
                        s for s in p.get("participants") or [] if isinstance(s, str)
                    ]
                    job.proposed_by, job.at, job.seq = actor, at, seq
                elif event == ledger_events.JOB_SPEC_CHANGED:
                    job.title = _text(p.get("title")) or job.title
                    job.spec_digest = _text(p.get("spec_digest")) or job.spec_digest
                elif event == ledger_events.JOB_AGREEMENT_REBOUND:
                    job.digest = versions.rebound(job.digest, p) or ""
                elif event == ledger_events.JOB_DECISION:
                    decisions.append((job_id, seq, institution, actor, at, p))
                elif event == ledger_events.JOB_STATE_CHANGED:
                    job.state = _text(p.get("to_state")) or job.state
                    removal = last_removal.get(job_id)
                    if removal and job.state == "failed":
                        effects.append(
                            {
                                **removal,
                                "effect": "job failed",
                                "ledger_seq": seq,
                                "at": at,
                                "detail": _text(p.get("reason")),
                            }
                        )
                    last_removal.pop(job_id, None)
                elif event == ledger_events.JOB_PARTICIPANT_REMOVED:
                    cause = last_withdrawal.get(institution) or {}
                    removal = {
                        "institution": institution,
                        "job_id": job_id,
                        "cause_seq": cause.get("ledger_seq"),
                        "cause_agreement_id": cause.get("agreement_id"),
                    }
                    effects.append(
                        {
                            **removal,
                            "effect": "taken out of the job",
                            "at": at,
                            "ledger_seq": seq,
                            "detail": _text(p.get("reason")),
                        }
                    )
                    last_removal[job_id] = removal

        digest = versions.digest_of(scope.agreement_id, scope.version)
        if digest is None:
            raise ReportError(
                f"the ledger up to entry #{self.head.seq} has no published version "
                f"{scope.version} of agreement #{scope.agreement_id} in {scope.consortium}"
            )
        terms = versions.get(digest)["terms"]
        cap, delta = _number(terms.get("epsilon_cap")), _number(terms.get("delta"))
        under = {j.job_id: j for j in jobs.values() if j.digest == digest and j.seq}
        specs = job_spec_texts(list(under))

        name = names.known_name

        yield {
            "record": "report",
            "consortium": scope.consortium,
            "agreement_title": titles.get(scope.agreement_id),
            "version_digest": digest,
            "terms": json.dumps(terms, sort_keys=True, ensure_ascii=False),
            "at": self.head.at or None,
        }
        parsed: dict[int, dict | None] = {}
        for job_id in sorted(under):
            job = under[job_id]
            text = specs.get(job_id)
            matches = None
            parsed[job_id] = None
            if text is not None:
                matches = hashlib.sha256(text.encode("utf-8")).hexdigest() == job.spec_digest
                try:
                    parsed[job_id] = json.loads(text)
                except ValueError:
                    matches = False
            yield {
                "record": "job",
                "job_id": job_id,
                "title": job.title or None,
                "state": job.state,
                "spec_digest": job.spec_digest or None,
                "spec_matches_ledger": matches,
                "participants": " ".join(job.participants) or None,
                "proposed_by": job.proposed_by or None,
                "at": job.at or None,
                "ledger_seq": job.seq,
            }
        for job_id, seq, institution, actor, at, p in decisions:
            if job_id not in under:
                continue
            yield {
                "record": "approval",
                "job_id": job_id,
                "institution": institution or None,
                "institution_name": name(institution),
                "decision": _text(p.get("decision")),
                "decided_by": actor or None,
                "at": at,
                "spec_digest": _text(p.get("spec_digest")),
                "agreement_version": _int(p.get("agreement_version")),
                "bound_to_current_spec": p.get("spec_digest") == under[job_id].spec_digest,
                "ledger_seq": seq,
                "detail": _text(p.get("reason")),
            }
        for job_id in sorted(under):
            spec = parsed[job_id] if isinstance(parsed[job_id], dict) else {}
            for step, item in enumerate(spec.get("privacy_pipeline") or [], start=1):
                item = item if isinstance(item, dict) else {}
                params = {k: v for k, v in item.items() if k != "filter"}
                yield {
                    "record": "filter",
                    "job_id": job_id,
                    "step": step,
                    "filter": _text(item.get("filter")),
                    "params": json.dumps(params, sort_keys=True) if params else None,
                }
        for job_id in sorted(under):
            yield from _floor_checks(job_id, parsed[job_id], terms)
        institutions = set(signers)
        for job in under.values():
            institutions.update(job.participants)
        institutions.update(slug for (job_id, slug) in spends if job_id in under)
        for slug in sorted(s for s in institutions if s):
            spend = PrivacySpend()
            for (job_id, site), job_spend in spends.items():
                if site == slug and job_id in under:
                    spend = spend.merged(job_spend)
            total = totals.get(slug, PrivacySpend()).epsilon(delta)
            yield {
                "record": "privacy",
                "institution": slug,
                "institution_name": name(slug),
                "epsilon_spent": spend.epsilon(delta),
                "epsilon_total": total,
                "epsilon_cap": cap,
                "delta": delta,
                "within_cap": _within(total, cap),
            }
        ours = [w for w in withdrawals if w["agreement_id"] == scope.agreement_id]
        for w in ours:
            yield {
                "record": "withdrawal",
                "institution": w["institution"],
                "institution_name": name(w["institution"]),
                "decided_by": w["decided_by"],
                "at": w["at"],
                "ledger_seq": w["ledger_seq"],
                "detail": w["detail"],
            }
        for effect in effects:
            if effect["cause_agreement_id"] == scope.agreement_id or effect["job_id"] in under:
                yield {
                    "record": "withdrawal_effect",
                    **effect,
                    "institution_name": name(effect["institution"]),
                }
        for _, seq, actor, at, _institution, p, checked_against in refusals:
            if checked_against != digest:
                continue
            problems = [x for x in p.get("problems") or [] if isinstance(x, dict)]
            yield {
                "record": "refusal",
                "kind": "refused",
                "job_id": _int(p.get("job_id")),
                "title": _text(p.get("title")),
                "spec_digest": _text(p.get("spec_digest")),
                "institution": None,
                "institution_name": None,
                "decided_by": actor or None,
                "at": at,
                "ledger_seq": seq,
                "detail": "; ".join(_problem_text(x, name) for x in problems) or None,
            }
        for job_id, seq, institution, actor, at, p in decisions:
            if job_id in under and p.get("decision") == "rejected":
                yield {
                    "record": "refusal",
                    "kind": "rejected",
                    "job_id": job_id,
                    "title": under[job_id].title or None,
                    "spec_digest": _text(p.get("spec_digest")),
                    "institution": institution or None,
                    "institution_name": name(institution),
                    "decided_by": actor or None,
                    "at": at,
                    "ledger_seq": seq,
                    "detail": _text(p.get("reason")),
                }

    def document(self) -> dict:
        """The report as its JSON document."""
        return document_from_records(self.scope, self.head, self.records())


def _problem_text(problem: dict, name) -> str:
    where = problem.get("institution")
    who = f" ({name(where) or where})" if where else ""
    return f"{problem.get('term') or 'term'}{who}: {problem.get('message') or ''}".strip()


def _floor_checks(job_id: int, spec: Any, terms: dict) -> Iterator[dict]:
    """The agreement's privacy floor against the job's pipeline: the required DP mechanism, and
    the largest fraction of the model a site may share per round (the checks the proposal
    passed, made again from the spec bound to the ledger's digest)."""
    spec = spec if isinstance(spec, dict) else None
    required = _text(terms.get("required_dp_mechanism"))
    if required:
        present = None
        if spec is not None:
            present = sorted(
                {
                    FILTER_MECHANISM[f.get("filter")]
                    for f in spec.get("privacy_pipeline") or []
                    if isinstance(f, dict) and f.get("filter") in FILTER_MECHANISM
                }
            )
        yield {
            "record": "floor_check",
            "job_id": job_id,
            "term": "required_dp_mechanism",
            "required": required,
            "job_value": " ".join(present) if present else ("none" if spec is not None else None),
            "ok": None if present is None else (required == "none" or required in present),
        }
    limit = _number(terms.get("max_shared_fraction"))
    if limit is not None:
        fraction = None
        if spec is not None:
            try:
                fraction = shared_fraction(spec)
            except (KeyError, TypeError, ValueError):
                fraction = None
        yield {
            "record": "floor_check",
            "job_id": job_id,
            "term": "max_shared_fraction",
            "required": f"at most {terms.get('max_shared_fraction')}",
            "job_value": None if fraction is None else repr(fraction),
            "ok": None if fraction is None else fraction <= limit + 1e-12,
        }


def build_compliance_report(scope: ComplianceScope, head: Head) -> ComplianceReport:
    return ComplianceReport(scope, head)
