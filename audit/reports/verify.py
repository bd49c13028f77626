"""Checking a contribution report against the ledger it names (``manage.py verify_report``).

1. Read the file (CSV, JSON or PDF, recognised by content) back into the report's document; an
   unreadable or malformed file is a :class:`~audit.reports.errors.MalformedReport`.
2. The head it names: the entry ``seq`` must exist with the named hash, the chain must verify from
   the first entry up to it (every link and every entry's hash recomputed), and the entry count and
   time must be the head's.
3. Recompute the report from the ledger up to that head and compare every figure, naming each one
   that differs (ε, replayed through the accountant, within a relative 1e-9; everything else
   exactly). The sites' signed reports the figures rest on (evaluations at the sites) and those
   in scope that approvals rest on (privacy audits) must verify with keys the sites registered.
4. Render the file again from the recomputed report and compare bytes. For a PDF this is what
   checks the visible pages (the figures compared in step 3 are the embedded ones), so a PDF whose
   bytes differ fails; a CSV or JSON file holds nothing but its figures, so a difference in layout
   alone (a file re-saved by another program) is reported and does not fail.
5. Say which export ledger entry, if any, records this very file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from audit.ledger import events as ledger_events
from audit.ledger.chain import format_timestamp, verify_rows
from audit.ledger.selectors import (
    ExportRecord,
    chain_rows_up_to,
    consortium_entry_rows,
    entry_stamp,
    event_payloads,
    export_recording,
)
from audit.reports.build import ContributionReport
from audit.reports.contents import EPSILON_REL_TOL, GROUPS, RECORD_FIELDS, TOLERANT_FIELDS
from audit.reports.errors import MalformedReport, ReportError
from audit.reports.files import CONTRIBUTION, ReportFormats
from audit.reports.formats import head_of
from audit.reports.scope import Head, Scope

# The engine's contribution module is pure Python (no torch, no numpy at import time: see its
# docstring), so importing it here at the top initialises nothing.
from training.fl.audit_report import AuditReportError
from training.fl.audit_report import parse_report as parse_audit_report
from training.fl.audit_report import summary_of as audit_summary_of
from training.fl.contribution import scores_from_coalitions
from training.fl.evaluation_report import ReportError as EvaluationReportError
from training.fl.evaluation_report import combine, combine_surrogates, parse_report
from training.fl.signing import BadSignature, verify_update
from training.jobs.accounting import ACCOUNTANT_VERSION, ACCOUNTANT_VERSIONS, accountant_version

MAX_LISTED = 25


@dataclass(frozen=True)
class Difference:
    where: str
    name: str
    in_report: Any
    in_ledger: Any

    def __str__(self) -> str:
        if self.name:
            return (
                f"{self.where}: {self.name} is {_show(self.in_report)} in the report, "
                f"{_show(self.in_ledger)} in the ledger"
            )
        return f"{self.where}: {self.in_report}"


@dataclass
class Outcome:
    """What verification found; ``ok`` only when every check passed."""

    fmt: str
    scope: Scope
    head: Head
    ok: bool = True
    matched: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.ok = False
        self.failed.append(message)


def _show(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return repr(value) if isinstance(value, str) else str(value)


def _label(kind: str, record: dict) -> str:
    job = f"job {record.get('job_id')}"
    if kind == "summary":
        where = job if record.get("job_id") is not None else "all jobs"
        return f"summary of {record.get('institution')} ({where})"
    if kind == "withdrawal":
        return f"withdrawal by {record.get('institution')} (entry #{record.get('ledger_seq')})"
    if kind == "update":
        return f"update of {record.get('institution')}, {job} round {record.get('round')}"
    if kind == "round_score":
        return f"round score of {record.get('institution')}, {job} round {record.get('round')}"
    if kind == "model":
        return f"global model of {job} round {record.get('round')}"
    return (
        f"model derived from {record.get('institution')}'s contributions, {job} round "
        f"{record.get('round')}"
    )


def _same(name: str, a: Any, b: Any, tolerant: frozenset[str] = TOLERANT_FIELDS) -> bool:
    if type(a) is bool or type(b) is bool:
        return a is b
    if name in tolerant and isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=EPSILON_REL_TOL)
    return a == b


def compare_groups(
    report: dict,
    ledger: dict,
    groups: dict[str, str],
    record_fields: dict[str, tuple[str, ...]],
    label: Callable[[str, dict], str],
    tolerant: frozenset[str],
) -> list[Difference]:
    """Every record of ``report``'s groups that differs from ``ledger``'s, field by field
    (shared by every kind of report: ``label`` names a record in the message)."""
    out: list[Difference] = []
    for kind, group in groups.items():
        mine, theirs = report.get(group) or [], ledger.get(group) or []
        for i in range(max(len(mine), len(theirs))):
            if i >= len(mine):
                out.append(Difference(label(kind, theirs[i]), "", "missing from the report", None))
                continue
            if i >= len(theirs):
                out.append(Difference(label(kind, mine[i]), "", "not in the ledger's report", None))
                continue
            for name in record_fields[kind]:
                a, b = mine[i].get(name), theirs[i].get(name)
                if not _same(name, a, b, tolerant):
                    out.append(Difference(label(kind, theirs[i]), name, a, b))
    return out


def compare_documents(report: dict, ledger: dict) -> list[Difference]:
    """Every figure of ``report`` that differs from ``ledger`` (the recomputed document)."""
    out: list[Difference] = []
    if report.get("title") != ledger.get("title"):
        out.append(
            Difference("the report's title", "title", report.get("title"), ledger.get("title"))
        )
    return out + compare_groups(report, ledger, GROUPS, RECORD_FIELDS, _label, TOLERANT_FIELDS)


def _check_head(outcome: Outcome) -> Head | None:
    """The head as the ledger has it, or None (with the failure recorded)."""
    head = outcome.head
    if head.seq < 0:
        outcome.fail(f"the report names ledger entry #{head.seq}, which cannot exist")
        return None
    if head.seq == 0:
        actual = Head(0, head.entry_hash, 0, "")
    else:
        found = entry_stamp(head.seq)
        if found is None:
            outcome.fail(f"the ledger has no entry #{head.seq}, the head the report names")
            return None
        result = verify_rows(chain_rows_up_to(head.seq, chunk_size=5000))
        if not result.ok:
            outcome.fail(
                f"the ledger does not verify up to entry #{head.seq}: it is broken at entry "
                f"#{result.first_bad_seq} ({result.reason})"
            )
            return None
        actual = Head(
            head.seq, result.head_hash, result.entry_count, format_timestamp(found.created_at)
        )
        outcome.matched.append(
            f"the chain verifies from entry #1 to entry #{head.seq} ({result.entry_count} entries)"
        )
    problems = [
        (what, mine, theirs)
        for what, mine, theirs in (
            ("head hash", head.entry_hash, actual.entry_hash),
            ("entry count", head.entry_count, actual.entry_count),
            ("head time", head.at, actual.at),
        )
        if mine != theirs
    ]
    for what, mine, theirs in problems:
        outcome.fail(
            f"ledger head #{head.seq}: the report's {what} is {_show(mine)}, the ledger's "
            f"{_show(theirs)}"
        )
    if problems:
        return None
    outcome.matched.append(
        f"entry #{head.seq} is in the ledger with the head hash the report names "
        f"({head.entry_hash})"
    )
    return actual


def _check_round_scores(outcome: Outcome, scope: Scope, head: Head) -> None:
    """Recompute every round's scores in the report's scope from the coalition values its
    ``contribution.scored`` entry records (the same code the coordinator ran): the scores the
    report sums must follow from the values, not merely be what the ledger says."""
    entries = event_payloads(scope.consortium, ledger_events.CONTRIBUTION_SCORED, up_to=head.seq)
    checked = 0
    for seq, text in entries:
        payload = json.loads(text)
        if scope.kind == "job" and payload.get("job_id") != scope.job_id:
            continue
        if scope.kind == "institution" and scope.institution not in payload.get("sites", []):
            continue
        try:
            again = scores_from_coalitions(
                payload["method"], payload.get("params") or {}, payload["coalitions"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            outcome.fail(f"the round scores of ledger entry #{seq} cannot be recomputed: {exc}")
            continue
        if again != payload.get("scores"):
            outcome.fail(
                f"the round scores recorded in ledger entry #{seq} (job {payload.get('job_id')}, "
                f"round {payload.get('round')}) do not follow from its coalition values"
            )
        checked += 1
    if checked:
        outcome.matched.append(
            f"the scores of {checked} scored round(s) recompute from their coalition values"
        )


def _check_site_evaluations(outcome: Outcome, scope: Scope, head: Head) -> None:
    """For every scored round in scope whose coalitions the sites valued (``evaluated_at:
    "sites"``), recompute each coalition value from the sites' evaluation reports in the
    ledger: each report must be canonical, hash to its recorded digest, verify with the public
    key it names, and that key must be one the site registered (the fingerprint of one of its
    ``site.credential_created`` entries); the values are then the reports' figures weighted by
    their records, on the models the ``evaluation.requested`` entry names for each coalition,
    and a recorded surrogate (contribution estimator 3) the reports' surrogates weighted alike."""
    events = (
        ledger_events.CREDENTIAL_CREATED,
        ledger_events.EVALUATION_REQUESTED,
        ledger_events.EVALUATION_REPORTED,
        ledger_events.CONTRIBUTION_SCORED,
    )
    fingerprints: dict[str, set[str]] = {}
    requested: dict[tuple, dict] = {}
    reported: dict[tuple, list] = {}
    scored: list[tuple[int, dict]] = []
    for row in consortium_entry_rows(
        scope.consortium, up_to=head.seq, events=events, chunk_size=2000
    ):
        payload = json.loads(row.payload_text)
        if row.event == ledger_events.CREDENTIAL_CREATED:
            fingerprints.setdefault(row.institution_slug, set()).add(payload.get("key_fingerprint"))
            continue
        key = (payload.get("job_id"), payload.get("round"))
        if row.event == ledger_events.EVALUATION_REQUESTED:
            requested[key] = payload
        elif row.event == ledger_events.EVALUATION_REPORTED:
            reported.setdefault(key, []).append((row.seq, payload))
        elif payload.get("evaluated_at") == "sites":
            if scope.kind == "job" and payload.get("job_id") != scope.job_id:
                continue
            if scope.kind == "institution" and scope.institution not in payload.get("sites", []):
                continue
            scored.append((row.seq, payload))
    rounds = reports_checked = 0
    for seq, payload in scored:
        key = (payload.get("job_id"), payload.get("round"))
        where = f"ledger entry #{seq} (job {key[0]}, round {key[1]})"
        ask = requested.get(key)
        if ask is None:
            outcome.fail(f"{where} was valued at the sites, but no evaluation request is recorded")
            continue
        wanted = set(payload.get("site_records") or {})
        reports = []
        for report_seq, entry in reported.get(key, []):
            if entry.get("site") not in wanted:
                continue
            text = entry.get("report") or ""
            try:
                report = parse_report(text)
                if hashlib.sha256(text.encode("utf-8")).hexdigest() != entry.get("report_digest"):
                    raise EvaluationReportError("its text does not hash to its recorded digest")
                verify_update(
                    entry.get("public_key") or "",
                    text.encode("utf-8"),
                    entry.get("signature") or "",
                )
            except (EvaluationReportError, BadSignature) as exc:
                outcome.fail(
                    f"the evaluation report in ledger entry #{report_seq} does not verify: {exc}"
                )
                continue
            fingerprint = hashlib.sha256(
                (entry.get("public_key") or "").encode("utf-8")
            ).hexdigest()[:16]
            if fingerprint not in fingerprints.get(report.site, set()):
                outcome.fail(
                    f"the evaluation report in ledger entry #{report_seq} is signed with a key "
                    f"{report.site} never registered"
                )
                continue
            reports.append(report)
        if {r.site for r in reports} != wanted:
            outcome.fail(f"{where} rests on reports from {sorted(wanted)}, which the ledger lacks")
            continue
        digest_of = {
            frozenset(m["sites"]): m["digest"]
            for m in ask.get("models", [])
            if m.get("role") == "coalition"
        }
        try:
            values = combine(reports, payload["metric"])
            differs = [
                row["sites"]
                for row in payload["coalitions"]
                if values[digest_of[frozenset(row["sites"])]] != row["value"]
            ]
        except (KeyError, TypeError, EvaluationReportError) as exc:
            outcome.fail(f"the coalition values of {where} cannot be recomputed: {exc}")
            continue
        if differs:
            outcome.fail(
                f"the coalition values of {where} do not follow from the sites' reports "
                f"(first: {differs[0]})"
            )
            continue
        recorded_surrogate = (payload.get("params") or {}).get("surrogate")
        if recorded_surrogate is not None and combine_surrogates(reports) != recorded_surrogate:
            outcome.fail(f"the surrogate of {where} does not follow from the sites' signed reports")
            continue
        rounds += 1
        reports_checked += len(reports)
    if rounds:
        outcome.matched.append(
            f"the coalition values of {rounds} round(s) valued at the sites recompute from "
            f"{reports_checked} signed evaluation report(s) in the ledger"
        )


def _check_privacy_audits(outcome: Outcome, scope: Scope, head: Head) -> None:
    """Every privacy audit report in scope (``privacy_audit.reported``: a job's, or an
    institution's own) must be canonical, hash to its recorded digest, name the job, site and
    spec digest its entry names, verify with the public key it names, and that key must be one
    the site registered (as for the evaluation reports); the entry's outcome and summary (what
    the approval gate and the pages read) must be what the signed text says."""
    events = (ledger_events.CREDENTIAL_CREATED, ledger_events.PRIVACY_AUDIT_REPORTED)
    fingerprints: dict[str, set[str]] = {}
    audits: list[tuple[int, dict]] = []
    for row in consortium_entry_rows(
        scope.consortium, up_to=head.seq, events=events, chunk_size=2000
    ):
        payload = json.loads(row.payload_text)
        if row.event == ledger_events.CREDENTIAL_CREATED:
            fingerprints.setdefault(row.institution_slug, set()).add(payload.get("key_fingerprint"))
            continue
        if scope.kind == "job" and payload.get("job_id") != scope.job_id:
            continue
        if scope.kind == "institution" and payload.get("site") != scope.institution:
            continue
        audits.append((row.seq, payload))
    checked = 0
    for seq, entry in audits:
        where = f"the privacy audit report in ledger entry #{seq}"
        text = entry.get("report") or ""
        try:
            report = parse_audit_report(text)
            if hashlib.sha256(text.encode("utf-8")).hexdigest() != entry.get("report_digest"):
                raise AuditReportError("its text does not hash to its recorded digest")
            verify_update(
                entry.get("public_key") or "", text.encode("utf-8"), entry.get("signature") or ""
            )
        except (AuditReportError, BadSignature) as exc:
            outcome.fail(f"{where} does not verify: {exc}")
            continue
        named = (entry.get("job_id"), entry.get("site"), entry.get("spec_digest"))
        if (report.job_id, report.site, report.spec_digest) != named:
            outcome.fail(f"{where} is signed for another job, site or spec than its entry names")
            continue
        fingerprint = hashlib.sha256((entry.get("public_key") or "").encode("utf-8")).hexdigest()
        if fingerprint[:16] not in fingerprints.get(report.site, set()):
            outcome.fail(f"{where} is signed with a key {report.site} never registered")
            continue
        summary = audit_summary_of(report.result) if report.result is not None else None
        if entry.get("outcome") != report.outcome or entry.get("summary") != summary:
            outcome.fail(f"{where}: its outcome or summary is not what the signed report says")
            continue
        checked += 1
    if checked:
        outcome.matched.append(f"{checked} signed privacy audit report(s) in the ledger verify")


def verify_file(
    data: bytes,
    formats: ReportFormats,
    recompute: Callable[[Any, Head], dict],
    compare: Callable[[dict, dict], list[Difference]],
    groups: dict[str, str],
    find_export: Callable[[str, Any], ExportRecord | None],
    extra_checks: tuple[Callable[[Outcome, Any, Head], None], ...] = (),
) -> Outcome:
    """The steps of the module docstring for any kind of report, given its file formats, its
    recomputation from the ledger, its comparison and where its exports are recorded; raises
    MalformedReport for an unreadable file."""
    fmt, doc = formats.read_document(data)
    scope = formats.scope_from_json(doc["scope"])
    outcome = Outcome(fmt=fmt, scope=scope, head=head_of(doc))
    head = _check_head(outcome)
    if head is None:
        return outcome
    try:
        version, expected, differences = _replay(doc, scope, head, recompute, compare)
    except ReportError as exc:
        outcome.fail(f"the report cannot be recomputed from the ledger: {exc}")
        return outcome
    outcome.differences = differences
    for check in extra_checks:
        check(outcome, scope, head)
    if differences:
        outcome.fail(f"{len(differences)} figure(s) differ from the ledger")
    else:
        counts = ", ".join(f"{len(expected[g])} {g.replace('_', ' ')}" for g in groups.values())
        outcome.matched.append(f"every figure matches the ledger ({counts})")
        if version != ACCOUNTANT_VERSION:
            outcome.notes.append(
                f"its ε figures are those of the privacy accountant's version {version} "
                f"({ACCOUNTANT_VERSIONS[version]}): the report was made before version "
                f"{ACCOUNTANT_VERSION}; a report exported now gives that version's figures"
            )
        with accountant_version(version):
            rendered = formats.document_bytes(fmt, scope, head, expected)
        if rendered == data:
            outcome.matched.append(f"the file is byte for byte the {fmt.upper()} the ledger gives")
        elif fmt == "pdf":
            outcome.fail(
                "the PDF's embedded figures match, but its pages differ from the PDF the ledger "
                "gives: its visible content was altered (or it was made by another version of "
                "the software)"
            )
        else:
            outcome.notes.append(
                f"the figures match, but the file's bytes differ from the {fmt.upper()} the "
                "ledger gives (it was re-saved or re-formatted by another program)"
            )
    digest = hashlib.sha256(data).hexdigest()
    export = find_export(digest, scope)
    if export:
        outcome.notes.append(
            f"this very file (SHA-256 {digest}) was exported by {export.actor_repr} at "
            f"{format_timestamp(export.created_at)} (ledger entry #{export.seq})"
        )
    else:
        outcome.notes.append(f"no export entry in the ledger records this file's SHA-256 {digest}")
    return outcome


def _replay(
    doc: dict,
    scope: Any,
    head: Head,
    recompute: Callable[[Any, Head], dict],
    compare: Callable[[dict, dict], list[Difference]],
) -> tuple[int, dict, list[Difference]]:
    """``(accountant version, the ledger's document, differences)``: the current accountant's
    replay, or, where the report's figures differ from it, the first earlier version whose
    replay matches them all (a report made before the accountant changed; the figures of every
    version are sound bounds of the same events). With none, the current one's differences."""
    expected = recompute(scope, head)
    differences = compare(doc, expected)
    if not differences:
        return ACCOUNTANT_VERSION, expected, differences
    for version in sorted(ACCOUNTANT_VERSIONS, reverse=True):
        if version == ACCOUNTANT_VERSION:
            continue
        with accountant_version(version):
            earlier = recompute(scope, head)
        if not compare(doc, earlier):
            return version, earlier, []
    return ACCOUNTANT_VERSION, expected, differences


def _recompute(scope: Scope, head: Head) -> dict:
    return ContributionReport(scope, head).document()


def verify_report_bytes(data: bytes) -> Outcome:
    """Verify a report file's content; raises MalformedReport for an unreadable file."""
    return verify_file(
        data,
        CONTRIBUTION,
        _recompute,
        compare_documents,
        GROUPS,
        lambda digest, scope: export_recording(digest),
        (_check_round_scores, _check_site_evaluations, _check_privacy_audits),
    )


__all__ = ["Difference", "MalformedReport", "Outcome", "compare_documents", "verify_report_bytes"]
