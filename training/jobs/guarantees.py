"""What a job's formal privacy guarantee rests on, mechanism by mechanism, in plain words.

The budget pages show one figure: the ε at δ that the accountant (:mod:`training.jobs.accounting`)
replays for a job at an institution. One figure hides two things an approver needs (issue 15,
"Honest guarantees"): *which* mechanisms it rests on, and whether it says anything at all. The
sparse vector technique at per-parameter settings, for example, is charged ε per pass per round
(ε 1.0 × 5 passes × 100 rounds = 500), and a guarantee at ε = 500 bounds nothing that matters.
So for each DP step of the pipeline this module gives its name in words, the ε it *alone* would
cost over the whole job at the agreement's δ (:func:`~training.jobs.accounting.epsilon_spent` on
that step's events), a verdict, and the *composed* total (the figure the pages already show).

The parts are not added up: Gaussian mechanisms compose in Rényi DP, sub-additively, so the
composed ε is at most the sum of the parts and usually less. The pages say "composed", never
"sum".

Why ε > 10 is "weak" (:data:`WEAK_EPSILON`): an ε-DP release bounds how much any one record can
shift an attacker's odds about it by a factor of e^ε. At ε = 1 that is 2.7; at ε = 10 it is over
22,000, and at ε = 500 it is a number with 218 digits: the bound still holds, but it no longer
stops anything an attacker would try, such as rebuilding a record from the update (the
gradient-inversion attacks of issue 15 succeed against pipelines with large ε). Deployed DP
systems and the literature treat single-digit ε as meaningful and ε well above 10 as a figure to
be backed by an empirical audit; 10 is the round number between the two. It is a threshold on
the *whole job*, per institution, since that is what the approver's budget pays. The verdict
points at the privacy audit (``manage.py privacy_audit``, documented in the section "Privacy
audit"), which measures what an attacker actually recovers; this module does not run it.

Pure functions over events or a normalised spec and a number of records: no Django, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from training.jobs.accounting import (
    PrivacyEvent,
    epsilon_or_unbounded,
    events_for_pipeline,
)

__all__ = [
    "AUDIT_POINTER",
    "NO_MECHANISM",
    "WEAK_EPSILON",
    "WEAK_SENTENCE",
    "Guarantee",
    "MechanismGuarantee",
    "guarantee_for_events",
    "guarantee_for_spec",
    "mechanism_name",
    "mechanism_names",
    "weak_guarantee_advice",
]

#: Above this ε per job and institution the formal guarantee is called weak (module docstring).
WEAK_EPSILON = 10.0

#: Where to look when ε says little: the audit measures what an attacker recovers.
AUDIT_POINTER = (
    "see the privacy audit (manage.py privacy_audit, described in the documentation's "
    "section \u201cPrivacy audit\u201d), which measures what an attacker actually rebuilds"
)
WEAK_SENTENCE = (
    "the formal guarantee is weak at this ε: it does not by itself stop an attacker from "
    f"rebuilding a record; {AUDIT_POINTER}"
)
#: Why ε above the threshold says little, in numbers.
_ODDS = (
    f"Above ε {WEAK_EPSILON:g} it promises only that one record shifts an attacker's odds "
    f"about it by a factor of at most e^ε, more than {math.floor(math.exp(WEAK_EPSILON)):,}."
)
NO_MECHANISM = (
    "no DP mechanism: no formal guarantee. Sharing part of the update, excluding layers or "
    "clipping change what leaves the site, but none bounds what it reveals about a record; "
    + AUDIT_POINTER
)

#: Each DP filter of the job spec, in words.
_FILTER_NAMES = {
    "dp_sgd": "DP-SGD (per-example clipping, Gaussian noise, sampled)",
    "gaussian_noise": "Gaussian noise on the update",
    "laplace_noise": "Laplace noise on the update",
    "svt": "Sparse vector technique selection and release",
}
#: For an event whose source is not a known filter (an old ledger entry): by its mechanism.
_MECHANISM_NAMES = {
    "sampled_gaussian": _FILTER_NAMES["dp_sgd"],
    "gaussian": _FILTER_NAMES["gaussian_noise"],
    "laplace": _FILTER_NAMES["laplace_noise"],
    "pure_epsilon": "A pure ε-DP release",
}


def mechanism_name(event: PrivacyEvent) -> str:
    """The mechanism behind ``event`` in words, from the filter that produced it."""
    return _FILTER_NAMES.get(event.source) or _MECHANISM_NAMES[event.mechanism]


def mechanism_names(spec: Mapping) -> list[str]:
    """The DP steps of a spec's pipeline in words, in order (before any ε can be figured: a
    draft has no agreement, so no δ)."""
    return [
        _FILTER_NAMES[f["filter"]]
        for f in spec.get("privacy_pipeline") or []
        if isinstance(f, Mapping) and f.get("filter") in _FILTER_NAMES
    ]


def _weak(epsilon: float) -> bool:
    return epsilon > WEAK_EPSILON


@dataclass(frozen=True)
class MechanismGuarantee:
    """One DP step of a pipeline: its name in words, what it alone would cost over the job."""

    name: str
    source: str  # the spec's filter name ("svt"), or "" for an event that names none
    epsilon: float  # ε at δ of this step's events alone (math.inf: unbounded)
    events: tuple[PrivacyEvent, ...]

    @property
    def weak(self) -> bool:
        return _weak(self.epsilon)

    @property
    def verdict(self) -> str:
        """``weak`` or ``meaningful`` (ε at most :data:`WEAK_EPSILON`)."""
        return "weak" if self.weak else "meaningful"

    @property
    def epsilon_text(self) -> str:
        return _figure(self.epsilon)


@dataclass(frozen=True)
class Guarantee:
    """The formal guarantee of one job at one institution: the mechanisms it rests on and
    the composed ε at δ (against the cap, where there is one)."""

    mechanisms: tuple[MechanismGuarantee, ...]
    epsilon: float  # composed over every mechanism by the accountant; 0.0 with none
    delta: float
    cap: float | None = None

    @property
    def has_mechanism(self) -> bool:
        return bool(self.mechanisms)

    @property
    def weak(self) -> bool:
        """The composed ε is above :data:`WEAK_EPSILON` (so is any one mechanism's: composition
        never costs less than one of its parts)."""
        return self.has_mechanism and _weak(self.epsilon)

    @property
    def verdict(self) -> str:
        """``none`` (no DP mechanism), ``weak`` or ``meaningful``."""
        if not self.has_mechanism:
            return "none"
        return "weak" if self.weak else "meaningful"

    @property
    def epsilon_text(self) -> str:
        return _figure(self.epsilon)

    @property
    def note(self) -> str:
        """What the verdict means, for the line under a page's table: the weak-guarantee
        sentence, the no-mechanism sentence, or "" when the guarantee is meaningful."""
        if not self.has_mechanism:
            return _capital(NO_MECHANISM) + "."
        if self.weak:
            return _capital(WEAK_SENTENCE) + ". " + _ODDS
        return ""

    @property
    def rests_on(self) -> str:
        """``"DP-SGD (...) and Gaussian noise on the update"``; "" when there is nothing."""
        names = list(dict.fromkeys(m.name for m in self.mechanisms))
        return _join(names) if names else ""

    def explain(self) -> str:
        """One or two sentences for a page: what the guarantee rests on and what it is worth."""
        if not self.has_mechanism:
            return self.note
        text = (
            f"The formal guarantee is ε {_figure(self.epsilon)} at δ {self.delta:g} over the "
            f"whole job, composed by the accountant from: {self.rests_on}."
        )
        if len(self.mechanisms) > 1:
            text += (
                " The mechanisms' own figures are not added up: the accountant composes them, "
                "and the composed ε is at most their sum."
            )
        if self.weak:
            text += " " + self.note
        return text


def guarantee_for_events(
    events: Iterable[PrivacyEvent], *, delta: float, cap: float | None = None
) -> Guarantee:
    """The guarantee of a job's events at one institution, one row per event.

    ``events`` are what the accountant projected for the whole job (a reservation's events, or
    :func:`~training.jobs.accounting.events_for_pipeline`'s output): one event per DP step of
    the pipeline, in order, so each event is one step. Each row's ε is
    :func:`~training.jobs.accounting.epsilon_spent` on that event alone; the total on all.
    """
    events = list(events)
    mechanisms = tuple(
        MechanismGuarantee(
            name=mechanism_name(event),
            source=event.source,
            epsilon=epsilon_or_unbounded([event], delta),
            events=(event,),
        )
        for event in events
    )
    return Guarantee(
        mechanisms=mechanisms,
        epsilon=epsilon_or_unbounded(events, delta) if events else 0.0,
        delta=float(delta),
        cap=None if cap is None else float(cap),
    )


def guarantee_for_spec(
    spec: Mapping, *, num_records: int, delta: float, cap: float | None = None
) -> Guarantee:
    """The guarantee of a normalised spec at a site that trains on ``num_records`` records
    (DP-SGD's sampling rate and steps depend on it; no other mechanism's ε does)."""
    events = events_for_pipeline(
        list(spec.get("privacy_pipeline") or []),
        rounds=spec["rounds"],
        local_epochs=spec["local_epochs"],
        batch_size=spec["batch_size"],
        num_records=num_records,
    )
    return guarantee_for_events(events, delta=delta, cap=cap)


def weak_guarantee_advice(guarantees: Mapping[str, Guarantee]) -> list[str]:
    """Sentences for a proposer, from each institution's guarantee (by institution name):
    one naming the mechanisms whose ε alone is above :data:`WEAK_EPSILON` and where; one when
    the pipeline has no DP mechanism at all. Empty when every guarantee is meaningful."""
    if not guarantees:
        return []
    if not any(g.has_mechanism for g in guarantees.values()):
        return [_capital(NO_MECHANISM) + "."]
    weak: dict[str, list[str]] = {}
    composed_weak = []
    for institution, guarantee in sorted(guarantees.items()):
        for m in guarantee.mechanisms:
            if m.weak:
                weak.setdefault(m.name, []).append(f"{institution} ε {m.epsilon_text}")
        if guarantee.weak:
            composed_weak.append(f"{institution} ε {guarantee.epsilon_text}")
    if weak:
        parts = [f"{name} ({', '.join(where)})" for name, where in weak.items()]
        costs = "costs" if len(parts) == 1 else "each cost"
        return [
            f"{_join(parts)} {costs} more than ε {WEAK_EPSILON:g} over the whole job: "
            f"{WEAK_SENTENCE}. {_ODDS}"
        ]
    if composed_weak:
        return [
            f"The mechanisms composed cost more than ε {WEAK_EPSILON:g} over the whole job "
            f"({', '.join(composed_weak)}): {WEAK_SENTENCE}. {_ODDS}"
        ]
    return []


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _figure(epsilon: float) -> str:
    return "unbounded" if math.isinf(epsilon) else f"{epsilon:.2f}"
