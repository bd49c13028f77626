"""Ledger entries in words, for the pages that show what happened ("Latest activity", a job's
history, the consortium's live panel): "Update accepted from Barts for round 2" rather than
``round.update_accepted · barts``.

One sentence per event, from the entry's payload and the institution's name (the caller
resolves slugs to names: this module imports nothing of the project, as the rest of
``audit.ledger``). An event without a sentence of its own, or an old payload that lacks a
field, falls back to the event's declaration in words (:mod:`audit.ledger.events`), never to
an error: these lines are a view of the record, and the record itself is the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from audit.ledger import events as ev

__all__ = ["entry_sentence", "event_words"]

_Sentence = Callable[[Mapping[str, Any], Callable[[str | None], str]], str]


def event_words(name: str) -> str:
    """The event's declaration in words: the first clause of its ``doc``, or its code."""
    event = ev.registered(str(name))
    if event is None or not event.doc:
        return str(name)
    first = event.doc.split(". ", 1)[0].split("; ", 1)[0].strip()
    if first.count("(") > first.count(")"):  # cut inside a parenthesis: drop it whole
        first = first[: first.rfind(" (")]
    return first.rstrip(".:,") + "."


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _state(value: Any) -> str:
    return str(value or "").replace("_", " ")


def _audit_words(outcome: str, summary: Mapping[str, Any] | None) -> str:
    if outcome != "measured" or not summary:
        return "the model is out of the audit's reach"
    rate = summary.get("success_rate")
    text = "measured" if rate is None else f"{float(rate):.0%} of the records audited rebuilt"
    return text + (" (inconclusive)" if summary.get("conclusive") is False else "")


_SENTENCES: dict[str, _Sentence] = {
    ev.CONSORTIUM_CREATED: lambda p, n: f"Consortium “{p['name']}” created",
    ev.INSTITUTION_CREATED: lambda p, n: f"{p['name']} joined the consortium",
    ev.INSTITUTION_UPDATED: lambda p, n: f"{n(None)}’s details changed",
    ev.MEMBER_INVITED: lambda p, n: f"{p['email']} invited as {_state(p['role'])}",
    ev.MEMBER_JOINED: lambda p, n: f"{p['username']} joined as {_state(p['role'])}",
    ev.MEMBER_ROLE_CHANGED: lambda p, n: (
        f"{p['username']}’s role changed from {_state(p['old_role'])} to {_state(p['new_role'])}"
    ),
    ev.MEMBER_REMOVED: lambda p, n: f"{p['username']} is no longer {_state(p['role'])}",
    ev.AGREEMENT_DRAFTED: lambda p, n: f"Draft version {p['version']} of “{p['title']}” started",
    ev.AGREEMENT_PUBLISHED: lambda p, n: f"Agreement version {p['version']} published",
    ev.AGREEMENT_SIGNED: lambda p, n: f"{n(None)} signed agreement version {p['version']}",
    ev.CONSENT_WITHDRAWN: lambda p, n: f"{n(None)} withdrew its consent",
    ev.DATASET_REGISTERED: lambda p, n: f"{n(None)} registered data set {p['key']}",
    ev.DATASET_REMOVED: lambda p, n: f"{n(None)} withdrew data set {p['key']}",
    ev.JOB_PROPOSED: lambda p, n: f"Job #{p['job_id']} “{p['title']}” proposed",
    ev.JOB_PROPOSAL_REFUSED: lambda p, n: (
        f"Proposal “{p['title']}” refused: {_count(len(p['problems']), 'term')} broken"
    ),
    ev.JOB_DECISION: lambda p, n: f"{n(None)} {p['decision']} job #{p['job_id']}",
    ev.JOB_STATE_CHANGED: lambda p, n: f"Job #{p['job_id']} is now {_state(p['to_state'])}",
    ev.JOB_PARTICIPANT_REMOVED: lambda p, n: f"{n(None)} taken out of job #{p['job_id']}",
    ev.ROUND_OPENED: lambda p, n: (
        f"Round {p['round']} opened for {_count(len(p['sites']), 'site')}"
    ),
    ev.ROUND_SITE_SKIPPED: lambda p, n: f"{n(p['site'])} left out of round {p['round']}",
    ev.UPDATE_ACCEPTED: lambda p, n: f"Update accepted from {n(p['site'])} for round {p['round']}",
    ev.UPDATE_REJECTED: lambda p, n: (
        f"Update from {n(p['site'])} refused in round {p['round']}: {p['reason']}"
    ),
    ev.ROUND_CLOSED: lambda p, n: (
        f"Round {p['round']} closed with {_count(len(p['sites']), 'update')}"
        + (f", {len(p['stragglers'])} site(s) late" if p.get("stragglers") else "")
    ),
    ev.ROUND_FAILED: lambda p, n: f"Round {p['round']} failed: {p['reason']}",
    ev.SITE_ABSENT: lambda p, n: f"{n(p['site'])} missed {p['rounds_missed']} rounds in a row",
    ev.EVALUATION_REPORTED: lambda p, n: (
        f"{n(p['site'])} reported its evaluation of round {p['round']}"
    ),
    ev.PRIVACY_AUDIT_REQUESTED: lambda p, n: (
        f"Privacy audit of job #{p['job_id']} asked of {_count(len(p['sites']), 'site')}"
    ),
    ev.PRIVACY_AUDIT_REPORTED: lambda p, n: (
        f"{n(p['site'])} reported its privacy audit of job #{p['job_id']}: "
        + _audit_words(p["outcome"], p["summary"])
    ),
    ev.CONTRIBUTION_SCORED: lambda p, n: f"Contributions to round {p['round']} scored",
    ev.CONTRIBUTION_UNAVAILABLE: lambda p, n: (
        f"Contributions to round {p['round']} not scored: {p['reason']}"
    ),
    ev.CONTRIBUTION_JOB_SCORED: lambda p, n: f"Job #{p['job_id']}’s contributions totalled",
    ev.REPORT_EXPORTED: lambda p, n: f"Contribution report exported ({p['format'].upper()})",
    ev.COMPLIANCE_EXPORTED: lambda p, n: f"Compliance report exported ({p['format'].upper()})",
}


def entry_sentence(
    event: str,
    payload: Mapping[str, Any],
    *,
    institution: str | None = None,
    name_of: Callable[[str], str] | None = None,
) -> str:
    """What the entry says happened, in one sentence without a final stop. ``institution``:
    the name of the entry's institution (its ``institution_slug``'s); ``name_of``: a site
    slug of the payload to its institution's name (the slug itself by default)."""
    lookup = name_of or (lambda slug: slug)

    def name(slug: str | None) -> str:
        if slug is None:
            return institution or "An institution"
        return lookup(slug) or slug

    sentence = _SENTENCES.get(str(event))
    if sentence is not None:
        try:
            return sentence(payload, name)
        except (KeyError, TypeError, AttributeError, ValueError):
            pass  # an older payload: the event's words below
    return event_words(event).rstrip(".")
