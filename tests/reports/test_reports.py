"""Contribution reports: figures from the ledger, the three formats, the export entry, and
``verify_report`` against tampered files and a tampered ledger."""

from __future__ import annotations

import csv
import hashlib
import io
import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from pypdf import PdfReader
from reportlab.graphics.charts.barcharts import VerticalBarChart
from reportlab.graphics.shapes import Drawing
from reportlab.lib import colors

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry
from audit.models import LedgerEntry
from audit.reports import pdf as report_pdf
from audit.reports.build import ContributionReport, build_report
from audit.reports.embedded import pdf_document
from audit.reports.errors import MalformedReport
from audit.reports.files import read_document, report_bytes
from audit.reports.formats import COLUMNS, csv_document, escape_cell, json_document, unescape_cell
from audit.reports.institutions import institution_directory
from audit.reports.scope import Scope, institution_scope, job_scope, ledger_head
from audit.reports.services import report_export
from consortium.core import palette
from consortium.core.palette import institution_colour
from consortium.governance.models import Institution
from consortium.governance.services.institutions import institution_update
from tests.support.agreements import agreement_in_force
from tests.support.ledger_checks import with_ledger_guard_off
from tests.support.report_fixtures import FORMULA_REASON, ROUND_SCORES, plant
from tests.support.training_pages import (
    AGREEMENT_TITLE,
    default_pipeline_spec,
    steward_registers_datasets,
)
from training.jobs.accounting import PrivacyEvent, epsilon_spent
from training.jobs.proposals import job_propose

pytestmark = pytest.mark.django_db


@pytest.fixture
def planted(cast):
    return plant(cast)


def gaussian_epsilon(rounds: int) -> float:
    event = PrivacyEvent("gaussian", {"noise_multiplier": 1.1}, rounds, "gaussian_noise")
    return epsilon_spent([event], delta=1e-5)


def summary_of(doc, institution, job_id="any"):
    rows = [r for r in doc["summary"] if r["institution"] == institution]
    if job_id != "any":
        rows = [r for r in rows if r["job_id"] == job_id]
    assert len(rows) == 1, rows
    return rows[0]


# --- figures ----------------------------------------------------------------------------------


def test_a_job_report_gives_each_institutions_figures_from_the_ledger(planted):
    report = build_report(job_scope(planted.job.pk))
    doc = report.document()
    head = LedgerEntry.objects.order_by("-seq").first()
    assert doc["ledger_head"]["seq"] == head.seq
    assert doc["ledger_head"]["entry_hash"] == head.entry_hash
    assert doc["ledger_head"]["entry_count"] == LedgerEntry.objects.count()
    assert doc["title"] == "Tumours"

    a = summary_of(doc, "hospital-a")
    assert a["score"] == sum(r.get("hospital-a", 0.0) for r in ROUND_SCORES.values())
    assert a["score_method"] == "leave_one_out" and a["score_metric"] == "accuracy"
    assert (a["samples"], a["rounds_participated"], a["updates_accepted"]) == (900, 3, 3)
    assert a["updates_rejected"] == 0
    assert a["epsilon_spent"] == a["epsilon_total"] == gaussian_epsilon(3)
    assert (a["epsilon_cap"], a["delta"]) == (8.0, 1e-5)
    assert a["within_cap"] is (gaussian_epsilon(3) <= 8.0)

    b = summary_of(doc, "hospital-b")
    assert (b["samples"], b["rounds_participated"], b["updates_rejected"]) == (400, 2, 1)
    assert b["score_rounds_sum"] == ROUND_SCORES[2]["hospital-b"] + ROUND_SCORES[3]["hospital-b"]
    assert b["epsilon_spent"] == gaussian_epsilon(2)
    assert b["within_cap"] is True

    rounds = [(s["round"], s["institution"], s["score"]) for s in doc["round_scores"]]
    assert rounds == [
        (r, slug, score)
        for r, scores in ROUND_SCORES.items()
        for slug, score in sorted(scores.items())
    ]
    rejected = [u for u in doc["updates"] if u["status"] == "rejected"]
    assert [(u["round"], u["institution"]) for u in rejected] == [(1, "hospital-b")]
    assert rejected[0]["detail"] == f"not_finite: {FORMULA_REASON}"
    assert [m["round"] for m in doc["models"]] == [1, 2, 3]


def test_a_withdrawal_lists_the_models_derived_from_the_institutions_contributions(planted):
    doc = build_report(job_scope(planted.job.pk)).document()
    [withdrawal] = doc["withdrawals"]
    assert withdrawal["institution"] == "hospital-b"
    assert withdrawal["detail"].startswith("@SUM(1+1)")
    assert LedgerEntry.objects.get(seq=withdrawal["ledger_seq"]).event == "consent.withdrawn"
    derived = [
        (d["institution"], d["round"], d["model_digest"], d["lineage_hash"])
        for d in doc["derived_models"]
    ]
    # B's first update that counted was round 2's: round 1's model does not descend from it.
    assert derived == [("hospital-b", r, *planted.models[r]) for r in (2, 3)]


def test_an_institution_report_covers_its_own_figures_across_its_jobs(planted):
    doc = build_report(institution_scope("hospital-b")).document()
    assert doc["scope"] == {
        "kind": "institution",
        "consortium": planted.cast.consortium.slug,
        "institution": "hospital-b",
    }
    job_row = summary_of(doc, "hospital-b", planted.job.pk)
    total = summary_of(doc, "hospital-b", None)
    assert job_row["samples"] == total["samples"] == 400
    assert total["epsilon_total"] == gaussian_epsilon(2)
    assert {u["institution"] for u in doc["updates"]} == {"hospital-b"}
    assert {s["institution"] for s in doc["round_scores"]} == {"hospital-b"}
    assert [m["round"] for m in doc["models"]] == [2, 3]  # the rounds its updates went into
    assert [d["round"] for d in doc["derived_models"]] == [2, 3]


def test_a_report_at_a_stated_head_ignores_what_came_after(planted):
    head = ledger_head()
    before = build_report(job_scope(planted.job.pk), head).document()
    append_entry(
        event="round.update_rejected",
        consortium_slug=planted.cast.consortium.slug,
        institution_slug="hospital-a",
        payload={"job_id": planted.job.pk, "round": 4, "site": "hospital-a", "reason": "late"},
    )
    assert build_report(job_scope(planted.job.pk), head).document() == before
    later = build_report(job_scope(planted.job.pk)).document()
    assert summary_of(later, "hospital-a")["updates_rejected"] == 1
    assert later["ledger_head"]["seq"] == head.seq + 1


# --- formats --------------------------------------------------------------------------------


def test_csv_round_trips_with_fixed_columns_and_escaped_formulas(planted):
    report = build_report(job_scope(planted.job.pk))
    data = report_bytes(report, "csv")
    rows = list(csv.reader(io.StringIO(data.decode())))
    assert tuple(rows[0]) == COLUMNS
    assert all(len(row) == len(COLUMNS) for row in rows)
    head = report.head
    for row in rows[1:]:
        cells = dict(zip(COLUMNS, row, strict=True))
        assert cells["schema_version"] == "1"
        assert cells["ledger_head_hash"] == head.entry_hash
        assert cells["ledger_head_seq"] == str(head.seq)
    details = [dict(zip(COLUMNS, row, strict=True))["detail"] for row in rows[1:]]
    assert f"'not_finite: {FORMULA_REASON}" not in details  # starts with a letter: left alone
    assert "'@SUM(1+1) the board revoked the data-use approval" in details
    scores = [dict(zip(COLUMNS, row, strict=True))["score"] for row in rows[1:]]
    assert "-0.0625" in scores  # a number we wrote is never escaped
    assert csv_document(data.decode()) == report.document()


@pytest.mark.parametrize("text", ["=1+1", "+1", "-cmd", "@SUM(A1)", "\tx", "\rx", "'quoted", "a=b"])
def test_formula_escaping_is_reversible(text):
    escaped = escape_cell(text)
    if text[0] in "=+-@\t\r'":
        assert escaped == "'" + text
    else:
        assert escaped == text
    assert unescape_cell(escaped) == text


def test_a_formula_in_a_reason_is_escaped_in_the_csv(cast):
    planted = plant(cast, withdraw=False)
    append_entry(
        event="round.update_rejected",
        consortium_slug=cast.consortium.slug,
        institution_slug="hospital-a",
        payload={
            "job_id": planted.job.pk,
            "round": 4,
            "site": "hospital-a",
            "reason": "=cmd|' /C calc'!A0",
        },
    )
    report = build_report(job_scope(planted.job.pk))
    text = report_bytes(report, "csv").decode()
    details = [r[COLUMNS.index("detail")] for r in csv.reader(io.StringIO(text))]
    assert "'=cmd|' /C calc'!A0" in details
    assert csv_document(text)["updates"][-1]["detail"] == "=cmd|' /C calc'!A0"


def test_json_round_trips(planted):
    report = build_report(job_scope(planted.job.pk))
    data = report_bytes(report, "json")
    assert json_document(json.loads(data)) == report.document()
    assert read_document(data) == ("json", report.document())


def test_the_pdf_opens_with_its_pages_charts_and_embedded_report(planted):
    report = build_report(job_scope(planted.job.pk))
    data = report_bytes(report, "pdf")
    reader = PdfReader(io.BytesIO(data))
    assert len(reader.pages) == 2
    first, second = (page.extract_text() for page in reader.pages)
    assert report.head.entry_hash in first
    assert "Contribution score" in first and "Privacy spent (ε) against the cap" in first
    # Institutions by their names (issue 14), with the key to the CSV's slugs on page 1.
    assert "Hospital A" in first and "Hospital B" in first
    assert "Hospital A = hospital-a" in first and "Hospital B = hospital-b" in first
    assert "hospital-b" not in second and "Hospital B" in second
    # What ε rests on, from the accepted updates' events in the ledger (issue 15).
    flat = " ".join(first.split())
    assert f"rest on: job {planted.job.pk}: Gaussian noise on the update." in flat
    assert "weak" not in flat  # ε 8.04 and 6.33 for this job: under 10
    # ε and δ written as such (the Symbol font), never "epsilon" or "Eps." (issue 14).
    assert "ε this job" in first and "ε cap" in first and "δ" in first
    assert "epsilon" not in first.lower() and "Eps." not in first
    # The cap is a dashed line across each institution's bars (a dash pattern in the page's
    # drawing), not a third bar: the legend names the line.
    assert "cap (line)" in first
    assert b"[3 2] 0 d" in reader.pages[0].get_contents().get_data()
    assert "Withdrawals of consent" in second and planted.models[2][0][:16] in second
    assert report.head.entry_hash in reader.metadata.subject
    assert pdf_document(data) == report.document()
    # The embedded report is also what any PDF library reads from the metadata.
    assert reader.metadata["/Keywords"].startswith("flc-contribution-report:")


def test_the_pdf_charts_use_the_job_pages_palette(planted):
    doc = build_report(job_scope(planted.job.pk)).document()
    names = institution_directory(doc["scope"]["consortium"], doc["ledger_head"]["seq"])
    charts = [
        item.contents[0]
        for item in report_pdf._story(doc, names)
        if isinstance(item, Drawing) and isinstance(item.contents[0], VerticalBarChart)
    ]
    score, privacy = charts
    # Each institution's bar in its series colour, the same as on the job page.
    for j, row in enumerate(doc["summary"]):
        institution = Institution.objects.get(slug=row["institution"])
        assert score.bars[(0, j)].fillColor == colors.HexColor(institution_colour(institution.pk))
    assert colors.HexColor(palette.SERIES[0]) != colors.HexColor(palette.SERIES[1])
    assert privacy.bars[0].fillColor == colors.HexColor(palette.SPENT_THIS_JOB)
    assert privacy.bars[1].fillColor == colors.HexColor(palette.SPENT_ALL_JOBS)


def test_a_pdf_keeps_the_names_of_its_head_after_a_rename(planted, tmp_path):
    path, _ = export(tmp_path, "--job", str(planted.job.pk), "--format", "pdf")
    institution_update(
        acting_user=planted.cast.admin, institution=planted.cast.hospital_a, name="Royal Free"
    )
    # The old report still verifies byte for byte: its pages name the hospital as the ledger
    # did at its head, not as the database does now.
    code, said = verify(path)
    assert code == 0, said
    assert "byte for byte" in said
    again, _ = export(tmp_path, "--job", str(planted.job.pk), "--format", "pdf", name="again")
    first_page = PdfReader(io.BytesIO(again.read_bytes())).pages[0].extract_text()
    assert "Royal Free = hospital-a" in first_page
    code, said = verify(again)
    assert code == 0, said


def test_the_pdf_says_where_the_formal_guarantee_is_weak(planted):
    doc = build_report(job_scope(planted.job.pk)).document()
    doc["summary"][0]["epsilon_spent"] = 12.5
    names = institution_directory(doc["scope"]["consortium"], doc["ledger_head"]["seq"])
    data = report_pdf.render_pdf(doc, names, {})
    text = " ".join(PdfReader(io.BytesIO(data)).pages[0].extract_text().split())
    assert "weak where a job costs more than ε 10: Hospital A (ε 12.5)" in text
    assert "privacy audit" in text
    assert f"job {planted.job.pk}: no DP mechanism yet" in text


def test_the_same_report_gives_the_same_bytes(planted):
    head = ledger_head()
    scope = job_scope(planted.job.pk)
    first = {fmt: report_bytes(build_report(scope, head), fmt) for fmt in ("csv", "json", "pdf")}
    append_entry(event="unrelated.thing", consortium_slug=planted.cast.consortium.slug)
    for fmt, data in first.items():
        assert report_bytes(build_report(scope, head), fmt) == data, fmt


def test_an_institution_report_renders_in_every_format(planted):
    report = build_report(institution_scope("hospital-a"))
    doc = report.document()
    assert csv_document(report_bytes(report, "csv").decode()) == doc
    assert pdf_document(report_bytes(report, "pdf")) == doc


def test_a_job_without_rounds_still_reports_its_participants(cast):
    agreement_in_force(cast, title=AGREEMENT_TITLE)
    steward_registers_datasets(cast)
    job = job_propose(
        acting_user=cast.researcher,
        consortium=cast.consortium,
        title="New",
        spec=default_pipeline_spec(cast),
    )
    doc = build_report(job_scope(job.pk)).document()
    assert [r["institution"] for r in doc["summary"]] == ["hospital-a", "hospital-b"]
    assert all(r["samples"] == 0 and r["score"] is None for r in doc["summary"])
    assert all(r["epsilon_spent"] == 0.0 for r in doc["summary"])
    PdfReader(io.BytesIO(report_bytes(build_report(job_scope(job.pk)), "pdf")))


# --- the export entry -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "json", "pdf"])
def test_an_export_is_a_ledger_entry_with_the_files_digest(planted, fmt):
    out = io.BytesIO()
    head = ledger_head()
    result = report_export(
        acting_user=planted.cast.auditor,
        scope=job_scope(planted.job.pk),
        fmt=fmt,
        out=out,
        subject=planted.job,
    )
    data = out.getvalue()
    entry = result.entry
    assert entry.seq == head.seq + 1 and entry.event == ledger_events.REPORT_EXPORTED
    assert entry.actor == planted.cast.auditor
    assert entry.subject_type == "training.trainingjob" and entry.subject_id == str(planted.job.pk)
    payload = json.loads(entry.payload_text)
    assert payload["sha256"] == hashlib.sha256(data).hexdigest() == result.sha256
    assert payload["size_bytes"] == len(data)
    assert payload["format"] == fmt
    assert payload["ledger_head"] == head.to_json()
    assert payload["scope"] == {
        "kind": "job",
        "consortium": planted.cast.consortium.slug,
        "job_id": planted.job.pk,
    }


# --- the commands -------------------------------------------------------------------------------


def export(tmp_path, *args, name="report"):
    path = tmp_path / name
    err = io.StringIO()
    call_command("export_contributions", *args, "--output", str(path), stderr=err)
    return path, err.getvalue()


def verify(path) -> tuple[int, str]:
    out = io.StringIO()
    try:
        call_command("verify_report", str(path), stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


@pytest.mark.parametrize("fmt", ["csv", "json", "pdf"])
def test_export_then_verify_in_every_format(planted, tmp_path, fmt):
    path, said = export(tmp_path, "--job", str(planted.job.pk), "--format", fmt)
    assert "export recorded as ledger entry" in said
    entry = LedgerEntry.objects.filter(event=ledger_events.REPORT_EXPORTED).get()
    assert json.loads(entry.payload_text)["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry.actor_repr.startswith("command line")
    code, text = verify(path)
    assert code == 0, text
    assert "every figure matches the ledger" in text
    assert f"byte for byte the {fmt.upper()}" in text
    assert f"ledger entry #{entry.seq}" in text  # the export entry of this very file
    assert "matches the ledger." in text


def test_institution_export_with_a_stated_head(planted, tmp_path):
    head = ledger_head()
    append_entry(event="unrelated.thing", consortium_slug=planted.cast.consortium.slug)
    path, _ = export(
        tmp_path,
        "--institution",
        "hospital-b",
        "--format",
        "csv",
        "--head",
        str(head.seq),
        "--user",
        "auditor",
    )
    doc = csv_document(path.read_text())
    assert doc["ledger_head"]["seq"] == head.seq
    assert (
        LedgerEntry.objects.filter(event=ledger_events.REPORT_EXPORTED).get().actor
        == planted.cast.auditor
    )
    assert verify(path)[0] == 0


def test_export_of_an_unknown_job_says_so(db, tmp_path):
    with pytest.raises(CommandError, match="no ledger entry records job #999"):
        export(tmp_path, "--job", "999", "--format", "json")
    assert not (tmp_path / "report").exists()
    assert not (tmp_path / "report.partial").exists()


def _tamper_csv(text: str, column: str, match, value: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    index = COLUMNS.index(column)
    for row in rows[1:]:
        if match(dict(zip(COLUMNS, row, strict=True))):
            row[index] = value
            break
    else:
        raise AssertionError("no row to tamper with")
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


def test_a_changed_figure_in_a_csv_fails_and_is_named(planted, tmp_path):
    path, _ = export(tmp_path, "--job", str(planted.job.pk), "--format", "csv")
    text = path.read_text()
    path.write_text(
        _tamper_csv(
            text,
            "samples",
            lambda r: r["record"] == "summary" and r["institution"] == "hospital-a",
            "1200",
        )
    )
    code, said = verify(path)
    assert code == 1
    assert "summary of hospital-a (job" in said and "samples is 1200 in the report, 900" in said
    assert "does NOT match the ledger" in said


def test_a_changed_head_in_a_csv_fails(planted, tmp_path):
    path, _ = export(tmp_path, "--job", str(planted.job.pk), "--format", "csv")
    text = path.read_text()
    real = ledger_head(ledger_head().seq - 1).entry_hash  # the head the report was made from
    path.write_text(text.replace(real, "f" * 64))
    code, said = verify(path)
    assert code == 1
    assert "head hash is 'ffff" in said


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["summary"][1].update(epsilon_total=1.0), "epsilon_total is 1.0 in the report"),
        (lambda d: d["derived_models"].pop(), "missing from the report"),
        (lambda d: d["ledger_head"].update(seq=10_000), "the ledger has no entry #10000"),
        (lambda d: d["ledger_head"].update(entry_count=3), "entry count is 3"),
        (lambda d: d["round_scores"][0].update(score=0.3), "score is 0.3 in the report, 0.25"),
    ],
    ids=["epsilon", "dropped-model", "head-seq", "entry-count", "round-score"],
)
def test_a_tampered_json_report_fails(planted, tmp_path, change, expected):
    path, _ = export(tmp_path, "--job", str(planted.job.pk), "--format", "json")
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    code, said = verify(path)
    assert code == 1, said
    assert expected in said


def test_a_tiny_difference_in_a_replayed_epsilon_is_tolerated(planted, tmp_path):
    path, _ = export(tmp_path, "--job", str(planted.job.pk), "--format", "json")
    doc = json.loads(path.read_text())
    doc["summary"][0]["epsilon_spent"] *= 1 + 1e-13  # another scipy build's last bits
    path.write_text(json.dumps(doc, indent=2))
    code, said = verify(path)
    assert code == 0, said
    assert "the file's bytes differ" in said  # noted, not failed: the figures match


def test_a_pdf_with_a_changed_embedded_figure_fails(planted, tmp_path):
    path, _ = export(tmp_path, "--job", str(planted.job.pk), "--format", "pdf")
    doc = pdf_document(path.read_bytes())
    doc["summary"][0]["samples"] += 1
    path.write_bytes(report_pdf.render_pdf(doc))
    code, said = verify(path)
    assert code == 1 and "samples is 901 in the report, 900" in said


def test_a_pdf_whose_pages_were_changed_fails(planted, tmp_path, monkeypatch):
    path, _ = export(tmp_path, "--job", str(planted.job.pk), "--format", "pdf")
    honest = pdf_document(path.read_bytes())
    forged = json.loads(json.dumps(honest))
    forged["summary"][0]["samples"] = 5000
    # Visible figures forged, honest figures embedded.
    keywords = report_pdf.pdf_keywords(honest)
    monkeypatch.setattr(report_pdf, "pdf_keywords", lambda doc: keywords)
    path.write_bytes(report_pdf.render_pdf(forged))
    monkeypatch.undo()
    code, said = verify(path)
    assert code == 1
    assert "its pages differ from the PDF the ledger gives" in said


def test_a_report_over_a_tampered_ledger_fails(planted, tmp_path):
    path, _ = export(tmp_path, "--job", str(planted.job.pk), "--format", "json")
    seq = LedgerEntry.objects.get(event="round.closed", payload_text__contains='"round":2').seq
    with with_ledger_guard_off(), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE audit_ledgerentry SET payload_text = %s WHERE seq = %s", ['{"x":1}', seq]
        )
    code, said = verify(path)
    assert code == 1
    assert f"broken at entry #{seq}" in said


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe", "neither a PDF nor UTF-8"),
        (b"a,b,c\r\n1,2,3\r\n", "not the header of a contribution report CSV"),
        (b'{"schema": "something else"}', "not a contribution report"),
        (b"{not json", "the JSON is unreadable"),
        (b"%PDF-1.4\n%%EOF\n", "carries no embedded contribution report"),
    ],
    ids=["empty", "binary", "other-csv", "other-json", "bad-json", "other-pdf"],
)
def test_an_unreadable_file_is_a_clear_error(db, tmp_path, content, expected):
    path = tmp_path / "file"
    path.write_bytes(content)
    code, said = verify(path)
    assert code == 2
    assert expected in said


def test_a_csv_with_a_broken_row_is_malformed(planted):
    text = report_bytes(build_report(job_scope(planted.job.pk)), "csv").decode()
    lines = text.split("\r\n")
    lines[3] = lines[3].rsplit(",", 2)[0]  # two cells short
    with pytest.raises(MalformedReport, match="line 4 has"):
        csv_document("\r\n".join(lines))
    with pytest.raises(MalformedReport, match="not a number"):
        csv_document(_tamper_csv(text, "samples", lambda r: r["record"] == "summary", "many"))


def test_a_missing_file_is_a_clear_error(db, tmp_path):
    code, said = verify(tmp_path / "nope.csv")
    assert code == 2 and "cannot read" in said


def test_a_scope_that_names_an_unknown_job_fails(planted, tmp_path):
    head = ledger_head()
    report = ContributionReport(
        Scope("job", planted.cast.consortium.slug, job_id=planted.job.pk), head
    )
    doc = report.document()
    doc["scope"]["job_id"] = 424242
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    code, said = verify(path)
    assert code == 1 and "cannot be recomputed" in said and "#424242" in said


def test_a_privacy_event_that_cannot_be_replayed_is_a_clear_report_error(planted):
    from audit.reports.errors import ReportError

    append_entry(
        event="round.update_accepted",
        consortium_slug=planted.cast.consortium.slug,
        institution_slug="hospital-a",
        payload={
            "job_id": planted.job.pk,
            "round": 4,
            "site": "hospital-a",
            "samples": 1,
            "privacy_events": [{"mechanism": "gaussian", "params": {"noise_multiplier": True}}],
        },
    )
    with pytest.raises(ReportError, match="invalid privacy event"):
        build_report(job_scope(planted.job.pk)).document()


#: DP-SGD at a large sampling rate with little noise: the accountant's version 1 (dp-accounting's
#: bound at fractional orders) and version 2 (the exact signed series) replay different ε.
DP_SGD_LOW_NOISE = {
    "mechanism": "sampled_gaussian",
    "params": {"noise_multiplier": 0.7, "sample_rate": 0.2, "steps": 50},
    "count": 1,
    "source": "dp_sgd",
}


@pytest.mark.parametrize("fmt", ["json", "pdf"])
def test_a_report_made_by_the_earlier_accountant_still_verifies(cast, tmp_path, fmt, monkeypatch):
    """A report exported before the accountant computed fractional orders exactly carries the
    larger ε of version 1: it still verifies, saying which version its figures are; a figure
    changed in it still fails."""
    from tests.support import report_fixtures
    from training.jobs.accounting import accountant_version

    monkeypatch.setattr(report_fixtures, "GAUSSIAN", DP_SGD_LOW_NOISE)
    planted = plant(cast)
    with accountant_version(1):
        old_path, _ = export(tmp_path, "--job", str(planted.job.pk), "--format", fmt)
    new_path, _ = export(tmp_path, "--job", str(planted.job.pk), "--format", fmt, name="new")
    old = read_document(old_path.read_bytes())[1]["summary"]
    new = read_document(new_path.read_bytes())[1]["summary"]
    spent = [(a["epsilon_spent"], b["epsilon_spent"]) for a, b in zip(old, new, strict=True)]
    assert all(b < a * (1 - 1e-4) for a, b in spent if a), spent  # version 2 charges less

    code, said = verify(old_path)
    assert code == 0, said
    assert "every figure matches the ledger" in said
    assert "privacy accountant's version 1" in said
    assert f"byte for byte the {fmt.upper()}" in said
    code, said = verify(new_path)
    assert code == 0, said
    assert "accountant's version" not in said

    if fmt == "json":
        doc = json.loads(old_path.read_text())
        doc["summary"][0]["epsilon_spent"] *= 0.9
        old_path.write_text(json.dumps(doc, indent=2))
        code, said = verify(old_path)
        assert code != 0
        assert "differ from the ledger" in said
