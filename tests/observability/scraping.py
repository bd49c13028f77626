"""Reading ``/metrics`` back: the exposition parsed by prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from consortium.observability.queues import BrokerDepths


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by its name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def series(samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def broker_answering(depths: dict[str, int] | None = None):
    """A stand-in for the broker that answers with ``depths`` (0 for any queue not named)."""

    def queue_depths(queues):
        return BrokerDepths(up=True, depths={q: (depths or {}).get(q, 0) for q in queues})

    return queue_depths
