"""A compliance report as PDF (reportlab, landscape A4), the same bytes for the same report.

Tables, in the report's order: the agreement's privacy floor, the jobs run under the version,
the approvals, each job's pipeline against the floor, ε per hospital against its cap, the
withdrawals and what they changed, the refused and rejected proposals. Every page's footer names
the ledger head. Hospitals are named by name; ε and δ are written as such, in the Symbol font
that the PDF standard fonts include (Helvetica covers Latin-1 only). The table style and cell
helpers are the contribution report's (:mod:`audit.reports.pdf`), so both reports look alike.

Reproducible bytes as for the contribution report: ``invariant`` mode, metadata taken from the
report itself, and the whole document embedded in ``/Keywords`` under :data:`PDF_MARKER`.
"""

from __future__ import annotations

import json
from typing import Any
from xml.sax.saxutils import escape

from reportlab.lib.pagesizes import A4, landscape
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, Spacer

from audit.reports.embedded import pdf_keywords
from audit.reports.pdf import (
    _BODY,
    _MONO,
    _SMALL,
    _STYLES,
    DELTA,
    EPS,
    PageSetup,
    _fmt,
    _table,
    build_pdf,
)
from consortium.governance.models import FinalModelAccess
from consortium.governance.services.agreements import LATER_TERMS

PDF_MARKER = b"flc-compliance-report:"
CREATOR = "fl-consortium compliance report (schema v1)"
PAGES = PageSetup(
    pagesize=landscape(A4),
    margin=12 * mm,
    bottom_margin=14 * mm,
    footer_y=7 * mm,
    footer_label="Compliance report · ledger head",
    creator=CREATOR,
)
# Digests have no spaces: let them break anywhere rather than run into the next cell.
_DIGEST = _MONO.clone("digest", wordWrap="CJK")

_EPS, _DELTA = EPS, DELTA


def _esc(text: Any) -> str:
    return escape("-" if text is None else str(text))


def _cellp(text: Any, style=_SMALL) -> Paragraph:
    return Paragraph(_esc(text), style)


def _when(at: str | None) -> str:
    """A ledger time (ISO 8601, UTC) as the page shows it: to the second, with its zone."""
    return f"{at[:19].replace('T', ' ')} UTC" if at else "-"


def _who(slug: str | None, name: str | None) -> str:
    """A hospital by its name (its slug only when the ledger records no name)."""
    return name or slug or "-"


def _later_terms_text(terms: dict) -> str:
    """The terms added after the first versions were signed, in words. The published terms
    name such a term only where it differs from its default (its absence means the default:
    ``consortium.governance.services.agreements.LATER_TERMS``)."""
    later = {**LATER_TERMS, **{k: v for k, v in terms.items() if k in LATER_TERMS}}
    central = "allowed" if later["allows_central_validation_set"] is True else "not allowed"
    access = later["final_model_access"]
    words = dict(FinalModelAccess.choices).get(access, str(access))
    text = f"Central validation set: {central}. Who may download the final model: {words}."
    # Said only where the version requires the audit, so that the report of a version without
    # the term (every version before it) renders as it always did.
    if later["privacy_audit_required"] is True:
        text += (
            " Privacy audit before approval: required (each site's worker attacks its own "
            "update under the job's pipeline and reports the figures before its institution "
            "approves)."
        )
        ssim, rate = later["audit_max_median_ssim"], later["audit_max_success_rate"]
        if ssim is not None:
            text += f" Highest median SSIM an institution may approve: {ssim} (1 is an exact copy)."
        if rate is not None:
            text += f" Highest share of audited records rebuilt an institution may approve: {rate}."
    return text


def _story(doc: dict) -> list:
    head = doc["ledger_head"]
    scope = doc["scope"]
    terms = json.loads(doc.get("terms") or "{}")
    h2 = _STYLES["Heading2"]
    title = doc.get("agreement_title") or f"agreement #{scope['agreement_id']}"
    story: list = [
        Paragraph("Compliance report", _STYLES["Title"]),
        Paragraph(_esc(f"“{title}”, version {scope['version']}, in {scope['consortium']}"), _BODY),
        Paragraph(
            _esc(
                f"Made from the ledger up to entry #{head['seq']} ({head['entry_count']} "
                f"entries), as of {head['at'] or 'the empty ledger'} (UTC). Ledger head hash:"
            ),
            _BODY,
        ),
        Paragraph(_esc(head["entry_hash"]), _MONO),
        Paragraph(
            "Every figure is recomputed from the ledger up to that entry by "
            f"'manage.py verify_report FILE'. {_EPS} is replayed from the privacy events of the "
            f"accepted updates at the agreement's {_DELTA}.",
            _SMALL,
        ),
        Spacer(1, 3 * mm),
        Paragraph("The agreement's privacy floor", h2),
        _table(
            [
                "Required DP mechanism",
                "Max. fraction shared",
                Paragraph(f"{_EPS} cap", _SMALL),
                Paragraph(_DELTA, _SMALL),
                "Purposes",
                "Model families",
            ],
            [
                [
                    _esc(terms.get("required_dp_mechanism")),
                    _esc(terms.get("max_shared_fraction")),
                    _esc(terms.get("epsilon_cap")),
                    _esc(terms.get("delta")),
                    _cellp(", ".join(terms.get("permitted_purposes") or [])),
                    _cellp(", ".join(terms.get("permitted_model_families") or [])),
                ]
            ],
        ),
        Paragraph(_esc(_later_terms_text(terms)), _SMALL),
        Paragraph(_esc(f"Version digest: {doc.get('version_digest')}"), _MONO),
    ]
    names = {}
    for group in ("approvals", "privacy", "withdrawals", "withdrawal_effects", "refusals"):
        for r in doc[group]:
            if r.get("institution") and r.get("institution_name"):
                names[r["institution"]] = r["institution_name"]

    def participants(text):
        return ", ".join(names.get(s, s) for s in (text or "").split()) or "-"

    story += [Paragraph("Jobs run under this version", h2)]
    story.append(
        _table(
            ["Job", "Title", "State", "Participants", "Proposed by", "At", "Spec digest", "Spec"],
            [
                [
                    f"#{j['job_id']}",
                    _cellp(j["title"]),
                    _esc(j["state"]),
                    _cellp(participants(j["participants"])),
                    _cellp(j["proposed_by"]),
                    _cellp(_when(j["at"])),
                    _cellp(j["spec_digest"], _DIGEST),
                    "bound"
                    if j["spec_matches_ledger"]
                    else "NOT bound"
                    if j["spec_matches_ledger"] is False
                    else "-",
                ]
                for j in doc["jobs"]
            ]
            or [["(none)", "", "", "", "", "", "", ""]],
            [12 * mm, 40 * mm, 24 * mm, 50 * mm, 30 * mm, 34 * mm, 60 * mm, 16 * mm],
        )
    )
    story += [Paragraph("Approvals", h2)]
    story.append(
        _table(
            ["Job", "Hospital", "Decision", "By", "At", "Spec digest", "Version", "Current", "Why"],
            [
                [
                    f"#{a['job_id']}",
                    _cellp(_who(a["institution"], a["institution_name"])),
                    _esc(a["decision"]),
                    _cellp(a["decided_by"]),
                    _cellp(_when(a["at"])),
                    _cellp(a["spec_digest"], _DIGEST),
                    _fmt(a["agreement_version"]),
                    _fmt(a["bound_to_current_spec"]),
                    _cellp(a["detail"]),
                ]
                for a in doc["approvals"]
            ]
            or [["(none)", "", "", "", "", "", "", "", ""]],
            [12 * mm, 34 * mm, 18 * mm, 30 * mm, 32 * mm, 60 * mm, 14 * mm, 14 * mm, 50 * mm],
        )
    )
    story += [Paragraph("Each job's privacy pipeline against the floor", h2)]
    story.append(
        _table(
            ["Job", "Step", "Filter", "Parameters"],
            [
                [f"#{f['job_id']}", _fmt(f["step"]), _esc(f["filter"]), _cellp(f["params"])]
                for f in doc["filters"]
            ]
            or [["(none)", "", "", ""]],
            [14 * mm, 14 * mm, 40 * mm, 120 * mm],
        )
    )
    story.append(Spacer(1, 2 * mm))
    story.append(
        _table(
            ["Job", "Term", "The agreement requires", "The job has", "Met"],
            [
                [
                    f"#{c['job_id']}",
                    _esc(c["term"]),
                    _cellp(c["required"]),
                    _cellp(c["job_value"]),
                    _fmt(c["ok"]),
                ]
                for c in doc["floor_checks"]
            ]
            or [["(none)", "", "", "", ""]],
            [14 * mm, 44 * mm, 50 * mm, 50 * mm, 14 * mm],
        )
    )
    story += [Paragraph(f"Privacy spent ({_EPS}) per hospital against its cap", h2)]
    story.append(
        _table(
            [
                "Hospital",
                Paragraph(f"{_EPS} under this version", _SMALL),
                Paragraph(f"{_EPS} in total", _SMALL),
                Paragraph(f"{_EPS} cap", _SMALL),
                Paragraph(_DELTA, _SMALL),
                "Within the cap",
            ],
            [
                [
                    _cellp(_who(p["institution"], p["institution_name"])),
                    _fmt(p["epsilon_spent"]),
                    _fmt(p["epsilon_total"]),
                    _fmt(p["epsilon_cap"]),
                    _fmt(p["delta"]),
                    _fmt(p["within_cap"]),
                ]
                for p in doc["privacy"]
            ]
            or [["(none)", "", "", "", "", ""]],
        )
    )
    story += [Paragraph("Withdrawals of consent and what they changed", h2)]
    story.append(
        _table(
            ["Hospital", "By", "At", "Entry", "Reason"],
            [
                [
                    _cellp(_who(w["institution"], w["institution_name"])),
                    _cellp(w["decided_by"]),
                    _cellp(_when(w["at"])),
                    f"#{w['ledger_seq']}",
                    _cellp(w["detail"]),
                ]
                for w in doc["withdrawals"]
            ]
            or [["(none)", "", "", "", ""]],
            [40 * mm, 34 * mm, 36 * mm, 16 * mm, 100 * mm],
        )
    )
    story.append(Spacer(1, 2 * mm))
    story.append(
        _table(
            ["Hospital", "Job", "Change", "Caused by", "At", "Entry", "Detail"],
            [
                [
                    _cellp(_who(e["institution"], e["institution_name"])),
                    f"#{e['job_id']}",
                    _esc(e["effect"]),
                    _cellp(
                        f"withdrawal #{e['cause_seq']} (agreement #{e['cause_agreement_id']})"
                        if e["cause_seq"]
                        else "no withdrawal recorded"
                    ),
                    _cellp(_when(e["at"])),
                    f"#{e['ledger_seq']}",
                    _cellp(e["detail"]),
                ]
                for e in doc["withdrawal_effects"]
            ]
            or [["(none)", "", "", "", "", "", ""]],
            [36 * mm, 12 * mm, 30 * mm, 44 * mm, 34 * mm, 14 * mm, 80 * mm],
        )
    )
    story += [Paragraph("Refused and rejected proposals", h2)]
    story.append(
        _table(
            ["Kind", "Job", "Title", "Hospital", "By", "At", "Entry", "Reason"],
            [
                [
                    _esc(r["kind"]),
                    _fmt(r["job_id"]),
                    _cellp(r["title"]),
                    _cellp(_who(r["institution"], r["institution_name"])),
                    _cellp(r["decided_by"]),
                    _cellp(_when(r["at"])),
                    f"#{r['ledger_seq']}",
                    _cellp(r["detail"]),
                ]
                for r in doc["refusals"]
            ]
            or [["(none)", "", "", "", "", "", "", ""]],
            [16 * mm, 12 * mm, 36 * mm, 32 * mm, 30 * mm, 32 * mm, 14 * mm, 90 * mm],
        )
    )
    return story


def render_pdf(doc: dict) -> bytes:
    """The report's PDF (landscape A4); the same document gives the same bytes."""
    scope = doc["scope"]
    title = f"Compliance report: agreement #{scope['agreement_id']} version {scope['version']}"
    return build_pdf(_story(doc), doc, title, pdf_keywords(doc, PDF_MARKER), PAGES)
