"""The privacy an institution spent, replayed from the ``privacy_events`` its accepted updates
recorded in the ledger.

Identical events are merged by adding their counts before the replay (composition of the same
mechanism is what ``count`` means), so the memory a replay needs is bounded by the number of
*distinct* events, not the ledger's length. The replay is
:func:`training.jobs.accounting.epsilon_spent`, at the δ of the job's agreement version.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from audit.reports.errors import ReportError
from training.jobs.accounting import PrivacyEvent, epsilon_spent


@functools.lru_cache(maxsize=4096)
def _parsed_event(raw: tuple) -> tuple[tuple, int]:
    keys, mechanism, params, (_, count), source = raw
    data = {
        "mechanism": mechanism,
        "params": {name: value for name, _, value in params},
        "count": count,
        "source": source,
    }
    event = PrivacyEvent.from_json({k: v for k, v in data.items() if k in keys})
    return (event.mechanism, tuple(sorted(event.params.items())), event.source), event.count


def _event_key(data: Any) -> tuple[tuple, int]:
    """(mechanism, params, source) and count of one recorded event, validated by
    :class:`PrivacyEvent`. The same few events recur in every round, so their validation is
    cached by their content."""
    try:
        raw = (
            tuple(sorted(data)),
            data["mechanism"],
            # Types are part of the key: True == 1 and 1 == 1.0, but only some are valid.
            tuple(sorted((k, type(v).__name__, v) for k, v in data["params"].items())),
            (type(data.get("count", 1)).__name__, data.get("count", 1)),
            data.get("source", ""),
        )
        hash(raw)
    except (TypeError, KeyError, AttributeError):
        event = PrivacyEvent.from_json(data)  # not cacheable: validate it as it is
        return (event.mechanism, tuple(sorted(event.params.items())), event.source), event.count
    return _parsed_event(raw)


@dataclass
class PrivacySpend:
    """Distinct privacy events and how often each happened."""

    counts: dict = field(default_factory=dict)

    def add(self, events: Any, seq: int) -> None:
        if not isinstance(events, list):
            return
        for data in events:
            try:
                key, count = _event_key(data)
            except ValueError as exc:
                raise ReportError(
                    f"ledger entry #{seq} holds an invalid privacy event: {exc}"
                ) from None
            self.counts[key] = self.counts.get(key, 0) + count

    def merged(self, other: PrivacySpend) -> PrivacySpend:
        out = PrivacySpend(dict(self.counts))
        for key, count in other.counts.items():
            out.counts[key] = out.counts.get(key, 0) + count
        return out

    def epsilon(self, delta: float | None) -> float | None:
        if delta is None:
            return None
        events = [
            PrivacyEvent(mechanism, dict(params), count, source)
            for (mechanism, params, source), count in sorted(self.counts.items())
        ]
        try:
            return epsilon_spent(events, delta=delta)
        except ValueError as exc:
            raise ReportError(f"the recorded privacy events cannot be replayed: {exc}") from None
