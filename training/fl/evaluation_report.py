"""A site's evaluation report: the metrics of the models it was sent, measured on its own
validation share, signed by the site (no torch, no Django).

When a job evaluates at the sites (``training.jobs.spec.evaluation_settings``), the centre
cannot measure a model itself: each site evaluates the round's model and the coalition models
its contribution scores need on the records it keeps aside (:mod:`training.fl.holdout`), and
reports only figures. The report is canonical JSON (sorted keys, no spaces, UTF-8), and the
site signs exactly those bytes with its Ed25519 key (:mod:`training.fl.signing`), so the
ledger can keep the text and its signature, and anyone can later check both and recompute
what was made of it:

``{"job_id": 7, "kind": "evaluation", "records": 40, "results": [{"metrics": {"accuracy": 0.9,
"loss": 0.31}, "model": "<sha256>"}, ...], "round": 3, "site": "barts"}``

``kind`` keeps an evaluation report's bytes from ever being those of an update message (which
has no ``kind``), so one signature cannot pass for the other. ``results`` is sorted by model
digest, one entry per model.

Where the centre asks for it (a sampled plan it can correct, see
:mod:`training.rounds.site_evaluation`), the report also carries ``"surrogate"``: the site's
surrogate value of every one of the round's ``2^n`` coalitions on its share
(:mod:`training.fl.coalition_surrogate`, by bit mask over the sorted sites), for contribution
estimator 3. Reports without it keep their bytes as they were.

:func:`combine` is the consortium's value of a model: the mean of the sites' figures weighted
by the records each evaluated on. For accuracy and the mean loss that is exactly the figure on
the sites' shares pooled; for Dice it is the record-weighted mean of the sites' Dice, not the
Dice of the pooled pixels.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "REPORT_KIND",
    "EvaluationReport",
    "ReportError",
    "combine",
    "combine_surrogates",
    "parse_report",
    "report_text",
]

REPORT_KIND = "evaluation"
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_METRIC_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_MAX_MODELS = 4096
#: 2^12 coalitions: training.fl.contribution.SURROGATE_MAX_PLAYERS sites.
_MAX_SURROGATE = 4096


class ReportError(ValueError):
    """An evaluation report that is malformed; the message says what is wrong."""


@dataclass(frozen=True)
class EvaluationReport:
    """A parsed report: the site's figures per model digest."""

    job_id: int
    round_index: int
    site: str
    records: int
    results: dict[str, dict[str, float]]
    text: str
    surrogate: tuple[float, ...] | None = None

    @property
    def models(self) -> list[str]:
        return sorted(self.results)


def _int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ReportError(f"{what} must be an integer of at least {minimum}, got {value!r}")
    return value


def _metrics(value: object, model: str) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise ReportError(f"model {model[:12]}…: metrics must be a non-empty object")
    out: dict[str, float] = {}
    for name, number in value.items():
        if not isinstance(name, str) or not _METRIC_RE.fullmatch(name):
            raise ReportError(f"model {model[:12]}…: bad metric name {name!r}")
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ReportError(f"model {model[:12]}…: metric {name} is not a number: {number!r}")
        if not math.isfinite(float(number)):
            raise ReportError(f"model {model[:12]}…: metric {name} is not finite")
        out[name] = float(number)
    return out


def _surrogate(value: object) -> tuple[float, ...]:
    size = len(value) if isinstance(value, list | tuple) else 0
    if not size or size > _MAX_SURROGATE or size & (size - 1):
        raise ReportError(
            f"surrogate must be a list of 2^n values (at most {_MAX_SURROGATE}), one per coalition"
        )
    assert isinstance(value, list | tuple)  # noqa: S101 - checked by size above
    out = []
    for index, number in enumerate(value):
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ReportError(f"surrogate value {index} is not a number: {number!r}")
        if not math.isfinite(float(number)):
            raise ReportError(f"surrogate value {index} is not finite")
        out.append(float(number))
    return tuple(out)


def report_text(
    *,
    job_id: int,
    round_index: int,
    site: str,
    records: int,
    results: Mapping[str, Mapping[str, float]],
    surrogate: Iterable[float] | None = None,
) -> str:
    """The canonical text a site signs for its evaluation of a round's models."""
    _int(job_id, "job_id", 1)
    _int(round_index, "round", 1)
    _int(records, "records", 1)
    if not isinstance(site, str) or not site:
        raise ReportError(f"site must be a non-empty string, got {site!r}")
    rows = []
    for model in sorted(results):
        if not _DIGEST_RE.fullmatch(model):
            raise ReportError(f"model must be a lower-case SHA-256 hex digest, got {model!r}")
        rows.append({"metrics": _metrics(results[model], model), "model": model})
    if not rows:
        raise ReportError("an evaluation report names at least one model")
    payload: dict[str, Any] = {
        "job_id": job_id,
        "kind": REPORT_KIND,
        "records": records,
        "results": rows,
        "round": round_index,
        "site": site,
    }
    if surrogate is not None:
        payload["surrogate"] = list(_surrogate(list(surrogate)))
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_report(text: str) -> EvaluationReport:
    """Parse and check a report's text; it must be exactly its own canonical form (so the
    signed bytes and the recorded text are one and the same)."""
    if not isinstance(text, str) or not text:
        raise ReportError("the report is empty")
    if len(text) > 2_000_000:
        raise ReportError("the report is too large")
    try:
        raw: Any = json.loads(text)
    except ValueError as exc:
        raise ReportError(f"the report is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ReportError("the report must be a JSON object")
    allowed = {"job_id", "kind", "records", "results", "round", "site"}
    unknown = sorted(set(raw) - allowed - {"surrogate"})
    missing = sorted(allowed - set(raw))
    if unknown or missing:
        raise ReportError(
            "the report's fields are wrong"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    if raw["kind"] != REPORT_KIND:
        raise ReportError(f"the report's kind must be {REPORT_KIND!r}, got {raw['kind']!r}")
    rows = raw["results"]
    if not isinstance(rows, list) or not rows or len(rows) > _MAX_MODELS:
        raise ReportError(f"results must be a list of 1 to {_MAX_MODELS} models")
    results: dict[str, dict[str, float]] = {}
    for row in rows:
        if not isinstance(row, dict) or set(row) != {"metrics", "model"}:
            raise ReportError('each result must be {"model": digest, "metrics": {...}}')
        model = row["model"]
        if not isinstance(model, str) or not _DIGEST_RE.fullmatch(model):
            raise ReportError(f"model must be a lower-case SHA-256 hex digest, got {model!r}")
        if model in results:
            raise ReportError(f"model {model[:12]}… is reported twice")
        results[model] = _metrics(row["metrics"], model)
    surrogate = _surrogate(raw["surrogate"]) if "surrogate" in raw else None
    canonical = report_text(
        job_id=raw["job_id"],
        round_index=raw["round"],
        site=raw["site"],
        records=raw["records"],
        results=results,
        surrogate=surrogate,
    )
    if canonical != text:
        raise ReportError("the report is not in canonical form (sorted keys, no spaces)")
    return EvaluationReport(
        job_id=raw["job_id"],
        round_index=raw["round"],
        site=raw["site"],
        records=raw["records"],
        results=results,
        text=text,
        surrogate=surrogate,
    )


def combine(reports: Iterable[EvaluationReport], metric: str) -> dict[str, float]:
    """Each model's ``metric`` over the sites that reported it, weighted by their records."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for report in reports:
        for model, metrics in report.results.items():
            if metric not in metrics:
                raise ReportError(
                    f"{report.site}'s report has no {metric!r} for model {model[:12]}…"
                )
            sums[model] = sums.get(model, 0.0) + metrics[metric] * report.records
            weights[model] = weights.get(model, 0) + report.records
    return {model: sums[model] / weights[model] for model in sorted(sums)}


def combine_surrogates(reports: Iterable[EvaluationReport]) -> list[float] | None:
    """Every coalition's surrogate value over the reporting sites, weighted by their records
    as :func:`combine` weighs the real values; ``None`` unless every report carries a
    surrogate, all of one length (a value the sites did not all approximate would mix
    surrogates of different games)."""
    reports = list(reports)
    if not reports or any(r.surrogate is None for r in reports):
        return None
    sizes = {len(r.surrogate or ()) for r in reports}
    if len(sizes) != 1:
        return None
    (size,) = sizes
    sums = [0.0] * size
    weight = 0
    for report in sorted(reports, key=lambda r: r.site):
        assert report.surrogate is not None  # noqa: S101 - checked above
        for index, value in enumerate(report.surrogate):
            sums[index] += value * report.records
        weight += report.records
    return [total / weight for total in sums]
