"""A contribution report as PDF (reportlab), the same bytes for the same report.

Page 1: what the report covers, the ledger head it was made from, the summary table and two charts
(contribution score, and privacy spent against the cap) drawn with ``reportlab.graphics``. Then,
from a new page: withdrawals of consent with the models derived from the withdrawn institution's
contributions, the per-round scores, the global models, and the updates. Every page's footer names
the ledger head.

Reproducible bytes: reportlab's ``invariant`` mode fixes the creation date and the document id,
and every other piece of metadata is fixed or taken from the report itself (its "as of" date is
the head entry's time, never the time of rendering). The report's whole document is embedded in
``/Keywords`` (see :mod:`audit.reports.embedded`), so ``verify_report`` reads the figures back
exactly, and compares the rest of the file by rendering it again.

The standard PDF fonts cover Latin-1 only; ε and δ are written in the Symbol font, which every
PDF reader has (as the compliance report does), and the privacy chart draws each institution's
cap as a dashed line across its bars, not as a third bar.

Institutions are printed by name, as the ledger named them at the report's head
(:mod:`audit.reports.institutions`; the CSV and JSON keep the slug, and page 1 gives the key from
one to the other), and the charts take their colours from :mod:`consortium.core.palette`, like
the job page: an institution's bar is its series colour there, privacy spent in this job and in
all jobs and the cap are the page's colours for them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from xml.sax.saxutils import escape

from reportlab.graphics.charts.barcharts import VerticalBarChart
from reportlab.graphics.charts.legends import Legend
from reportlab.graphics.shapes import Drawing, Line, String
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import (
    LongTable,
    PageBreak,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
)
from reportlab.platypus.tables import TableStyle

from audit.reports.embedded import pdf_keywords
from audit.reports.institutions import InstitutionDirectory
from consortium.core import palette
from training.jobs.guarantees import WEAK_EPSILON

CREATOR = "fl-consortium contribution report (schema v1)"
_STYLES = getSampleStyleSheet()
_BODY = _STYLES["BodyText"]
_SMALL = _STYLES["BodyText"].clone("small", fontSize=7, leading=8.5)
_MONO = _STYLES["BodyText"].clone("mono", fontName="Courier", fontSize=6.5, leading=8)
_HEAD = _SMALL.clone("head", fontName="Helvetica-Bold")
#: ε and δ in the Symbol font (Helvetica has no Greek), as Paragraph markup.
EPS = '<font face="Symbol">ε</font>'
DELTA = '<font face="Symbol">δ</font>'
#: The cap's colour and dash on the privacy chart (the job page draws it the same way).
_CAP_COLOUR = colors.HexColor(palette.CAP)
_AXIS_COLOUR = colors.HexColor(palette.AXIS)
_GRID_COLOUR = colors.HexColor(palette.GRID)
_TABLE = TableStyle(
    [
        ("FONT", (0, 0), (-1, -1), "Helvetica", 7),
        ("FONT", (0, 0), (-1, 0), "Helvetica-Bold", 7),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8ecf2")),
        ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#9aa5b1")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("LEFTPADDING", (0, 0), (-1, -1), 2),
        ("RIGHTPADDING", (0, 0), (-1, -1), 2),
    ]
)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _p(text: str, style=_SMALL) -> Paragraph:
    return Paragraph(escape(text), style)


def _short(digest: str | None) -> str:
    return f"{digest[:16]}..." if digest else "-"


def _table(header: list[str], rows: list[list], widths=None) -> LongTable:
    table = LongTable([header, *rows], colWidths=widths, repeatRows=1)
    table.setStyle(_TABLE)
    return table


def _scope_text(doc: dict, names: InstitutionDirectory) -> str:
    scope = doc["scope"]
    if scope["kind"] == "job":
        title = f" “{doc['title']}”" if doc.get("title") else ""
        return f"Job #{scope['job_id']}{title} in {scope['consortium']}"
    return f"{names.name(scope['institution'])} in {scope['consortium']}"


def _markup(text: str, style=_SMALL) -> Paragraph:
    """A paragraph whose text already holds markup (:data:`EPS`, :data:`DELTA`)."""
    return Paragraph(text, style)


def _bar_chart(
    title: str,
    labels: list[str],
    series: list[list[float]],
    names: list[str],
    fills: list[str],
    caps: list[float | None] | None = None,
    bar_fills: list[str] | None = None,
):
    """Bars per category and series, series ``i`` filled with ``fills[i]`` (or, with one series,
    each category's bar with ``bar_fills``); ``caps`` (one per category) drawn as a dashed line
    across the category's bars, with "cap" in the legend."""
    width, height = 170 * mm, 62 * mm
    drawing = Drawing(width, height)
    chart = VerticalBarChart()
    chart.x, chart.y = 12 * mm, 14 * mm
    chart.width, chart.height = width - 50 * mm, height - 24 * mm
    chart.data = series or [[0.0]]
    chart.categoryAxis.categoryNames = labels or ["-"]
    chart.categoryAxis.labels.fontSize = 6
    chart.categoryAxis.labels.angle = 20 if len(labels) > 6 else 0
    chart.categoryAxis.labels.boxAnchor = "ne" if len(labels) > 6 else "n"
    chart.valueAxis.labels.fontSize = 6
    for axis in (chart.categoryAxis, chart.valueAxis):
        axis.strokeColor = _AXIS_COLOUR
        axis.labels.fillColor = _AXIS_COLOUR
    chart.valueAxis.visibleGrid = True
    chart.valueAxis.gridStrokeColor = _GRID_COLOUR
    chart.valueAxis.gridStrokeWidth = 0.25
    cap_values = [c for c in (caps or []) if c is not None]
    low = min([0.0, *(v for s in series for v in s), *cap_values])
    high = max([0.0, *(v for s in series for v in s), *cap_values])
    chart.valueAxis.valueMin = low
    chart.valueAxis.valueMax = high if high > low else low + 1.0
    series_colours = [colors.HexColor(fill) for fill in fills]
    for i in range(len(series)):
        chart.bars[i].fillColor = series_colours[i % len(series_colours)]
        chart.bars[i].strokeColor = None
    for j, fill in enumerate(bar_fills or []):
        chart.bars[(0, j)].fillColor = colors.HexColor(fill)
    drawing.add(chart)
    pairs = [(series_colours[i], names[i]) for i in range(len(names))]
    if caps:
        span = chart.valueAxis.valueMax - chart.valueAxis.valueMin
        step = chart.width / max(len(caps), 1)
        for i, cap in enumerate(caps):
            if cap is None:
                continue
            y = chart.y + (cap - chart.valueAxis.valueMin) / span * chart.height
            x0, x1 = chart.x + i * step + step * 0.08, chart.x + (i + 1) * step - step * 0.08
            drawing.add(
                Line(x0, y, x1, y, strokeColor=_CAP_COLOUR, strokeWidth=1.2, strokeDashArray=[3, 2])
            )
        pairs.append((_CAP_COLOUR, "cap (line)"))
    drawing.add(String(12 * mm, height - 6 * mm, title, fontName="Helvetica-Bold", fontSize=8))
    if len(pairs) > 1:
        legend = Legend()
        legend.x, legend.y = width - 36 * mm, height - 14 * mm
        legend.fontSize = 6
        legend.colorNamePairs = pairs
        drawing.add(legend)
    return drawing


def _summary_label(row: dict, scope_kind: str, names: InstitutionDirectory) -> str:
    if scope_kind == "job":
        return names.name(row["institution"])
    return f"job {row['job_id']}" if row["job_id"] is not None else "all jobs"


def _chart_label(text: str, limit: int = 22) -> str:
    """A category label short enough for the chart's axis (the table above has it whole)."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _key_to_slugs(doc: dict, names: InstitutionDirectory) -> str | None:
    """ "Name = slug" for every institution the report mentions whose name is not its slug."""
    slugs = {
        record.get("institution")
        for group in ("summary", "withdrawals", "updates", "round_scores", "derived_models")
        for record in doc.get(group) or []
    }
    slugs.add(doc["scope"].get("institution"))
    for model in doc.get("models") or []:
        slugs.update((model.get("detail") or "").split())
    pairs = [
        f"{names.name(slug)} = {slug}"
        for slug in sorted(s for s in slugs if s)
        if names.name(slug) != slug
    ]
    return "; ".join(pairs) or None


def _sites_text(detail: str | None, names: InstitutionDirectory) -> str:
    """A model's sites (the record's space-separated slugs) as names."""
    return ", ".join(names.name(slug) for slug in (detail or "").split()) or "-"


def _privacy_basis(
    doc: dict, names: InstitutionDirectory, mechanisms: dict[int, list[str]] | None
) -> list:
    """What the report's ε rests on (per job, the mechanisms of its accepted updates, from the
    ledger at the head: :mod:`audit.reports.mechanisms`), and where it is weak: above
    :data:`~training.jobs.guarantees.WEAK_EPSILON` for a job, as the review page says."""
    out: list = []
    summary = doc["summary"]
    kind = doc["scope"]["kind"]
    if mechanisms is not None:
        jobs = sorted({r["job_id"] for r in summary if r["job_id"] is not None})
        parts = [
            f"job {job_id}: "
            + escape("; ".join(mechanisms.get(job_id) or []) or "no DP mechanism yet")
            for job_id in jobs
        ]
        if parts:
            out.append(_markup(f"The privacy figures ({EPS}) rest on: " + "; ".join(parts) + "."))
    weak = [
        f"{escape(_summary_label(r, kind, names))} ({EPS} {_fmt(r['epsilon_spent'])})"
        for r in summary
        if r["job_id"] is not None
        and r["epsilon_spent"] is not None
        and r["epsilon_spent"] > WEAK_EPSILON
    ]
    if weak:
        out.append(
            _markup(
                f"The formal guarantee is weak where a job costs more than {EPS} "
                f"{WEAK_EPSILON:g}: " + ", ".join(weak) + f". {EPS} alone does not say what an "
                "attacker could rebuild from the updates: the privacy audit measures it "
                "('manage.py privacy_audit')."
            )
        )
    return out


def _story(
    doc: dict, names: InstitutionDirectory, mechanisms: dict[int, list[str]] | None = None
) -> list:
    head = doc["ledger_head"]
    kind = doc["scope"]["kind"]
    story: list = [
        Paragraph("Contribution report", _STYLES["Title"]),
        _p(_scope_text(doc, names), _BODY),
        _p(
            f"Made from the ledger up to entry #{head['seq']} ({head['entry_count']} entries), "
            f"as of {head['at'] or 'the empty ledger'}. Ledger head hash:",
            _BODY,
        ),
        _p(head["entry_hash"], _MONO),
        _markup(
            "Every figure is recomputed from the ledger up to that entry by "
            f"'manage.py verify_report FILE'. Privacy spent is {EPS} at the agreement's {DELTA}, "
            "replayed from the privacy events of the accepted updates; 'total' is everything the "
            "institution spent in the consortium."
        ),
        Spacer(1, 4 * mm),
    ]
    summary = doc["summary"]
    rows = [
        [
            _p(_summary_label(r, kind, names)),
            _fmt(r["score"]),
            _fmt(r["score_rounds_sum"]),
            _fmt(r["samples"]),
            _fmt(r["rounds_participated"]),
            _fmt(r["updates_accepted"]),
            _fmt(r["updates_rejected"]),
            _fmt(r["epsilon_spent"]),
            _fmt(r["epsilon_total"]),
            _fmt(r["epsilon_cap"]),
            _fmt(r["delta"]),
            _fmt(r["within_cap"]),
        ]
        for r in summary
    ]
    first = "Institution" if kind == "job" else "Job"
    story.append(
        _table(
            [
                first,
                "Score",
                "Sum of rounds",
                "Samples",
                "Rounds",
                "Accepted",
                "Rejected",
                _markup(f"{EPS} this job", _HEAD),
                _markup(f"{EPS} total", _HEAD),
                _markup(f"{EPS} cap", _HEAD),
                _markup(DELTA, _HEAD),
                "Within",
            ],
            rows or [["(none)", *[""] * 11]],
        )
    )
    key = _key_to_slugs(doc, names)
    if key:
        story.append(
            _p(
                "Institutions are named as the ledger named them at this head; the CSV and JSON "
                f"identify them by slug: {key}."
            )
        )
    story += _privacy_basis(doc, names, mechanisms)
    methods = sorted({(r["score_method"], r["score_metric"]) for r in summary if r["score_method"]})
    if methods:
        text = "; ".join(f"{m} on {metric or 'the agreed metric'}" for m, metric in methods)
        story.append(_p(f"Scores: {text}."))
    story.append(Spacer(1, 4 * mm))
    labels = [_chart_label(_summary_label(r, kind, names)) for r in summary]
    # Each institution's bar in its series colour (the job page's); an institution's report
    # draws its jobs in its own colour.
    owner = doc["scope"].get("institution")
    story.append(
        _bar_chart(
            "Contribution score",
            labels,
            [
                [
                    r["score"] if r["score"] is not None else (r["score_rounds_sum"] or 0.0)
                    for r in summary
                ]
            ],
            ["score"],
            [names.colour(owner)],
            bar_fills=[names.colour(r["institution"]) for r in summary] if kind == "job" else None,
        )
    )
    story.append(
        _markup(
            f"Privacy spent ({EPS}) against the cap: bars for "
            + ("this job" if kind == "job" else "each job")
            + " and the institution's total; the dashed line is its cap."
        )
    )
    story.append(
        _bar_chart(
            "Privacy spent against the cap",
            labels,
            [
                [r["epsilon_spent"] or 0.0 for r in summary],
                [r["epsilon_total"] or 0.0 for r in summary],
            ],
            ["this job" if kind == "job" else "jobs", "total"],
            [palette.SPENT_THIS_JOB, palette.SPENT_ALL_JOBS],
            caps=[r["epsilon_cap"] for r in summary],
        )
    )
    story.append(PageBreak())

    story.append(Paragraph("Withdrawals of consent", _STYLES["Heading2"]))
    if doc["withdrawals"]:
        story.append(
            _table(
                ["Institution", "Entry", "At", "Reason"],
                [
                    [
                        _p(names.name(w["institution"])),
                        f"#{w['ledger_seq']}",
                        w["at"],
                        _p(w["detail"] or ""),
                    ]
                    for w in doc["withdrawals"]
                ],
                [30 * mm, 14 * mm, 36 * mm, 80 * mm],
            )
        )
        story.append(Spacer(1, 2 * mm))
        story.append(_p("Global models derived from the withdrawn institutions' contributions:"))
        derived = doc["derived_models"]
        story.append(
            _table(
                ["Withdrawn", "Job", "Round", "Model digest", "Lineage hash", "Entry"],
                [
                    [
                        _p(names.name(d["institution"])),
                        _fmt(d["job_id"]),
                        _fmt(d["round"]),
                        _p(d["model_digest"] or "-", _MONO),
                        _p(d["lineage_hash"] or "-", _MONO),
                        f"#{d['ledger_seq']}",
                    ]
                    for d in derived
                ]
                or [["(none)", "", "", "", "", ""]],
                [22 * mm, 10 * mm, 11 * mm, 52 * mm, 52 * mm, 14 * mm],
            )
        )
    else:
        story.append(_p("None up to this ledger head.", _BODY))

    story.append(Paragraph("Scores per round", _STYLES["Heading2"]))
    story.append(
        _table(
            ["Job", "Round", "Institution", "Score", "Method", "Metric", "Entry"],
            [
                [
                    _fmt(s["job_id"]),
                    _fmt(s["round"]),
                    _p(names.name(s["institution"])),
                    _fmt(s["score"], 6),
                    s["score_method"] or "-",
                    s["score_metric"] or "-",
                    f"#{s['ledger_seq']}",
                ]
                for s in doc["round_scores"]
            ]
            or [["(none)", "", "", "", "", "", ""]],
        )
    )
    story.append(Paragraph("Global models", _STYLES["Heading2"]))
    story.append(
        _table(
            ["Job", "Round", "Model digest", "Lineage hash", "Sites", "Entry"],
            [
                [
                    _fmt(m["job_id"]),
                    _fmt(m["round"]),
                    _short(m["model_digest"]),
                    _short(m["lineage_hash"]),
                    _p(_sites_text(m["detail"], names)),
                    f"#{m['ledger_seq']}",
                ]
                for m in doc["models"]
            ]
            or [["(none)", "", "", "", "", ""]],
        )
    )
    story.append(Paragraph("Updates", _STYLES["Heading2"]))
    story.append(
        _table(
            ["Job", "Round", "Institution", "Status", "Samples", "Update digest", "Entry", "Why"],
            [
                [
                    _fmt(u["job_id"]),
                    _fmt(u["round"]),
                    _p(names.name(u["institution"])),
                    u["status"],
                    _fmt(u["samples"]),
                    _short(u["update_digest"]),
                    f"#{u['ledger_seq']}",
                    _p(u["detail"] or ""),
                ]
                for u in doc["updates"]
            ]
            or [["(none)", "", "", "", "", "", "", ""]],
            [9 * mm, 11 * mm, 24 * mm, 14 * mm, 13 * mm, 30 * mm, 13 * mm, 44 * mm],
        )
    )
    return story


@dataclass(frozen=True)
class PageSetup:
    """How one kind of report lays out its pages: size, margins, the footer's words and height,
    and the PDF's creator."""

    pagesize: tuple[float, float] = A4
    margin: float = 15 * mm
    bottom_margin: float = 15 * mm
    footer_y: float = 8 * mm
    footer_label: str = "Ledger head"
    creator: str = CREATOR


CONTRIBUTION_PAGES = PageSetup()


def build_pdf(story: list, doc: dict, title: str, keywords: str, pages: PageSetup) -> bytes:
    """Lay out ``story`` as the PDF of the report ``doc``: the ledger head in the footer of
    every page (with the page number) and in the subject, ``keywords`` (the embedded document,
    :func:`~audit.reports.embedded.pdf_keywords`) in the keywords. Reproducible (invariant):
    the same document gives the same bytes, which is how ``verify_report`` checks the pages.
    Every kind of report is laid out by this one function, so their PDFs carry the same
    metadata."""
    head = doc["ledger_head"]
    footer = f"{pages.footer_label} #{head['seq']}  {head['entry_hash']}"
    width = pages.pagesize[0]

    def on_page(canvas, template):
        canvas.saveState()
        canvas.setFont("Helvetica", 6.5)
        canvas.drawString(pages.margin, pages.footer_y, footer)
        canvas.drawRightString(
            width - pages.margin, pages.footer_y, f"page {canvas.getPageNumber()}"
        )
        canvas.restoreState()

    buffer = io.BytesIO()
    template = SimpleDocTemplate(
        buffer,
        pagesize=pages.pagesize,
        leftMargin=pages.margin,
        rightMargin=pages.margin,
        topMargin=pages.margin,
        bottomMargin=pages.bottom_margin,
        title=title,
        author="fl-consortium",
        subject=f"ledger head #{head['seq']} {head['entry_hash']} ({head['entry_count']} entries)",
        creator=pages.creator,
        producer=pages.creator,
        keywords=keywords,
        invariant=1,
        pageCompression=1,
    )
    template.build(story, onFirstPage=on_page, onLaterPages=on_page)
    return buffer.getvalue()


def render_pdf(
    doc: dict,
    names: InstitutionDirectory | None = None,
    mechanisms: dict[int, list[str]] | None = None,
) -> bytes:
    """The report's PDF, institutions named by ``names`` (the ledger's names at the report's
    head: :func:`audit.reports.institutions.institution_directory`; slugs without it) and each
    job's privacy mechanisms from ``mechanisms`` (:func:`audit.reports.mechanisms.
    report_mechanisms`; not stated without it); the same inputs give the same bytes."""
    names = names or InstitutionDirectory()
    title = f"Contribution report: {_scope_text(doc, names)}"
    story = _story(doc, names, mechanisms)
    return build_pdf(story, doc, title, pdf_keywords(doc), CONTRIBUTION_PAGES)
