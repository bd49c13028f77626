"""A site's privacy audit report: what the audit's attacks rebuilt from the site's own update
under a proposed job's pipeline, in figures only, signed by the site (no torch, no Django).

The audit (:mod:`training.fl.inversion`) runs at the site on a few of its own records; what
leaves the site is this report: canonical JSON (sorted keys, no spaces, UTF-8) whose bytes the
site signs with its Ed25519 key (:mod:`training.fl.signing`), so the ledger can keep the text
and its signature and anyone can check both later::

    {"job_id": 7, "kind": "privacy_audit", "outcome": "measured", "reason": "",
     "result": {...AuditResult.to_json()...}, "site": "barts", "spec_digest": "<sha256>"}

``outcome`` is ``measured`` (``result`` holds the figures) or ``out_of_reach`` (``result`` is
null and ``reason`` says, in words, why the audit cannot attack this model). ``kind`` keeps
an audit report's bytes from ever being those of an update message or an evaluation report,
so one signature cannot pass for another.

Only figures: the parser refuses a result with fields it does not know, any list longer than
the audit can produce, and any number that is not finite, so a report cannot carry a record or
a reconstruction to the centre. :func:`summary_of` is the compact summary the centre keeps
(the pages and the agreement's risk terms read it), :func:`summary_words` says it in words.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "OUTCOMES",
    "REPORT_KIND",
    "AuditReport",
    "AuditReportError",
    "parse_report",
    "report_text",
    "summary_of",
    "summary_words",
]

REPORT_KIND = "privacy_audit"
MEASURED = "measured"
OUT_OF_REACH = "out_of_reach"
OUTCOMES = (MEASURED, OUT_OF_REACH)
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_TEXT = 200_000
#: The most records an audit attacks (the spec's ``privacy_audit.records`` bound).
MAX_RECORDS = 32

_RESULT_KEYS = frozenset(
    {
        "modality",
        "summary",
        "records",
        "settings",
        "seed",
        "shared_fraction",
        "label_inference",
        "seconds_per_record",
        "calibration",
        "conclusive",
    }
)
_RECORD_KEYS = frozenset(
    {
        "record",
        "attack",
        "success",
        "label_inferred",
        "ssim",
        "psnr",
        "dice",
        "relative_error",
        "features_within",
        "by_attack",
    }
)
_FIGURE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class AuditReportError(ValueError):
    """A privacy audit report that is malformed; the message says what is wrong."""


@dataclass(frozen=True)
class AuditReport:
    """A parsed audit report."""

    job_id: int
    site: str
    spec_digest: str
    outcome: str
    result: dict[str, Any] | None
    reason: str
    text: str


def _finite(value: Any, where: str) -> None:
    """Every number under ``value`` is finite, every list short, every key a plain name."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        if isinstance(value, str) and len(value) > 2_000:
            raise AuditReportError(f"{where}: a text of {len(value)} characters is too long")
        return
    if isinstance(value, int | float):
        if not math.isfinite(float(value)):
            raise AuditReportError(f"{where}: {value!r} is not a finite number")
        return
    if isinstance(value, list):
        if len(value) > 64:
            raise AuditReportError(f"{where}: a list of {len(value)} items is longer than an audit")
        for i, item in enumerate(value):
            _finite(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _finite(item, f"{where}.{key}")
        return
    raise AuditReportError(f"{where}: {type(value).__name__} is not a JSON value")


def _check_result(result: Any) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise AuditReportError("a measured audit's result must be a JSON object")
    unknown = sorted(set(result) - _RESULT_KEYS)
    if unknown:
        raise AuditReportError(f"the result holds fields an audit does not: {', '.join(unknown)}")
    for key in ("summary", "records", "modality", "shared_fraction"):
        if key not in result:
            raise AuditReportError(f"the result has no {key!r}")
    summary, records = result["summary"], result["records"]
    if not isinstance(summary, dict) or not all(
        isinstance(k, str) and _FIGURE_RE.fullmatch(k) for k in summary
    ):
        raise AuditReportError("the result's summary must be an object of named figures")
    if not all(
        v is None or (isinstance(v, int | float) and not isinstance(v, bool))
        for v in summary.values()
    ):
        raise AuditReportError("the result's summary must hold numbers only")
    if "success_rate" not in summary:
        raise AuditReportError("the result's summary has no success_rate")
    if not isinstance(records, list) or not 1 <= len(records) <= MAX_RECORDS:
        raise AuditReportError(f"the result must list 1 to {MAX_RECORDS} audited records")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or set(record) - _RECORD_KEYS:
            raise AuditReportError(
                f"record {i}: an audited record holds only its figures "
                f"({', '.join(sorted(_RECORD_KEYS))})"
            )
    _finite(result, "result")
    return result


def report_text(
    *,
    job_id: int,
    site: str,
    spec_digest: str,
    outcome: str,
    result: Mapping[str, Any] | None = None,
    reason: str = "",
) -> str:
    """The canonical text a site signs for its privacy audit of a job."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 1:
        raise AuditReportError(f"job_id must be a positive integer, got {job_id!r}")
    if not isinstance(site, str) or not site:
        raise AuditReportError(f"site must be a non-empty string, got {site!r}")
    if not isinstance(spec_digest, str) or not _DIGEST_RE.fullmatch(spec_digest):
        raise AuditReportError("spec_digest must be a lower-case SHA-256 hex digest")
    if outcome not in OUTCOMES:
        raise AuditReportError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    if not isinstance(reason, str) or len(reason) > 2_000:
        raise AuditReportError("reason must be a text of at most 2,000 characters")
    if outcome == MEASURED:
        checked: dict[str, Any] | None = _check_result(json.loads(json.dumps(result)))
        if reason:
            raise AuditReportError("a measured audit gives no reason")
    else:
        if result is not None:
            raise AuditReportError("an audit out of reach carries no result")
        if not reason.strip():
            raise AuditReportError("an audit out of reach says why in its reason")
        checked = None
    payload = {
        "job_id": job_id,
        "kind": REPORT_KIND,
        "outcome": outcome,
        "reason": reason,
        "result": checked,
        "site": site,
        "spec_digest": spec_digest,
    }
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def parse_report(text: str) -> AuditReport:
    """Parse and check a report's text; it must be exactly its own canonical form (so the
    signed bytes and the recorded text are one and the same)."""
    if not isinstance(text, str) or not text:
        raise AuditReportError("the report is empty")
    if len(text) > _MAX_TEXT:
        raise AuditReportError(f"the report is larger than {_MAX_TEXT:,} characters")
    try:
        raw: Any = json.loads(text)
    except ValueError as exc:
        raise AuditReportError(f"the report is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise AuditReportError("the report must be a JSON object")
    allowed = {"job_id", "kind", "outcome", "reason", "result", "site", "spec_digest"}
    unknown, missing = sorted(set(raw) - allowed), sorted(allowed - set(raw))
    if unknown or missing:
        raise AuditReportError(
            "the report's fields are wrong"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    if raw["kind"] != REPORT_KIND:
        raise AuditReportError(f"the report's kind must be {REPORT_KIND!r}, got {raw['kind']!r}")
    canonical = report_text(
        job_id=raw["job_id"],
        site=raw["site"],
        spec_digest=raw["spec_digest"],
        outcome=raw["outcome"],
        result=raw["result"],
        reason=raw["reason"],
    )
    if canonical != text:
        raise AuditReportError("the report is not in canonical form (sorted keys, no spaces)")
    return AuditReport(
        job_id=raw["job_id"],
        site=raw["site"],
        spec_digest=raw["spec_digest"],
        outcome=raw["outcome"],
        result=raw["result"],
        reason=raw["reason"],
        text=text,
    )


def summary_of(result: Mapping[str, Any]) -> dict[str, Any]:
    """The compact summary the centre keeps of a measured audit (``AuditResult.to_json()``):
    the summary's figures, plus ``modality``, ``shared_fraction``, ``best_ssim`` (images),
    ``label_inference`` (``"ran"`` or why not), ``conclusive`` (True, False or None) and
    ``calibration_records``."""
    out = dict(result.get("summary") or {})
    out["modality"] = result.get("modality")
    out["shared_fraction"] = result.get("shared_fraction")
    ssims = [r["ssim"] for r in result.get("records") or [] if r.get("ssim") is not None]
    if ssims:
        out["best_ssim"] = max(ssims)
    out["label_inference"] = result.get("label_inference")
    out["conclusive"] = result.get("conclusive")
    calibration = result.get("calibration") or {}
    out["calibration_records"] = calibration.get("records")
    return out


def summary_words(summary: Mapping[str, Any], *, whose: str = "a record") -> str:
    """A measured audit's summary (:func:`summary_of`) in plain words. ``whose`` names the
    records for the reader ("a record of yours" on an approver's page)."""
    s = summary
    shared = f"{float(s.get('shared_fraction') or 0.0):.0%} of the update shared"
    if s.get("median_ssim") is not None:
        text = (
            f"With this pipeline ({shared}) an attacker rebuilt {whose} with similarity "
            f"{s['median_ssim']:.2f} out of 1 (median SSIM"
        )
        text += f"; best {s['best_ssim']:.2f})" if s.get("best_ssim") is not None else ")"
        if s.get("median_dice") is not None:
            text += f", and its lesion mask with a Dice of {s['median_dice']:.2f}"
    elif s.get("median_relative_error") is not None:
        within = s.get("median_features_within")
        text = (
            f"With this pipeline ({shared}) an attacker rebuilt the features of {whose} with "
            f"a median relative error of {s['median_relative_error']:.2f}"
            + (f" ({within:.0%} of its features close to the truth)" if within is not None else "")
        )
    else:
        text = f"With this pipeline ({shared}) the audit measured no reconstruction figure"
    text += f". {float(s.get('success_rate') or 0.0):.0%} of the records audited count as rebuilt."
    if s.get("label_inference_rate") is not None:
        text += f" The label was inferred right for {s['label_inference_rate']:.0%} of them."
    elif s.get("label_inference"):
        text += f" Label inference {s['label_inference']}."
    if s.get("conclusive") is False:
        text += (
            " Inconclusive: these bounded attacks rebuilt none of "
            f"{s.get('calibration_records') or 0} records even from an unfiltered update of "
            "this model, so a low figure here does not show that the pipeline protects the "
            "records; this model is beyond the audit's reach."
        )
    return text
