"""Every user journey in a real browser, against the real stack.

``manage.py demo --no-job`` starts what a deployment runs, each as its own process: Daphne (HTTP
and the websockets), the coordinator (a Celery worker with beat) and one site worker per hospital
on the configured broker, over a fresh database (a SQLite file on the embedded default; a
dedicated PostgreSQL database when the suite runs against PostgreSQL). Playwright drives Debian's
chromium (``/usr/bin/chromium``, or ``CHROMIUM_PATH``) through it as the administrator, each
hospital's approver, the auditor and a stranger.

The journeys run in order (one module, one stack): the job proposed in the first is approved in
the second, run while its page is watched, and reported on in the fourth. Each saves a screenshot
of its last page under ``BROWSER_ARTIFACTS`` (default ``var/test-artifacts/browser``).

Run them alone with ``pytest -m browser``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings

from tests.support.browser import wait_for_expression, watch_errors
from tests.support.child_processes import demo_env, fresh_database_url, redis_url_on_db
from training.demo.processes import free_port

pytestmark = [pytest.mark.browser, pytest.mark.worker]

BASE_DIR = Path(settings.BASE_DIR)
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = Path(
    os.environ.get("BROWSER_ARTIFACTS", BASE_DIR / "var" / "test-artifacts" / "browser")
)
PASSWORD = "demo-consortium-2026"
SLUG = "demo"
SITES = ["st-thomas", "kings-regional", "maudsley", "barts"]
#: The channel layer's Redis database for the stack when the suite runs with Redis (the
#: suite's own use the configured one; keep the stack's wake-ups apart).
BROWSER_REDIS_DB = int(os.environ.get("BROWSER_TEST_REDIS_DB", "12"))

ROUNDS = 3
PIPELINE = [
    {"filter": "dp_sgd", "noise_multiplier": 2.5, "max_grad_norm": 1.0},
    {"filter": "partial_sharing", "fraction": 0.4, "strategy": "topk"},
    {"filter": "percentile_clipping", "percentile": 95.0},
]


@dataclass
class Stack:
    url: str
    process: subprocess.Popen
    output: Path
    var: Path
    notes: dict = field(default_factory=dict)

    def log(self) -> str:
        text = self.output.read_text(errors="replace")[-4000:]
        for log in sorted((self.var / "logs").glob("*.log")):
            text += f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-2000:]}"
        return text


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"the browser tests need Debian's chromium at {CHROMIUM} "
            "(apt-get install -y chromium), or CHROMIUM_PATH"
        )
    tmp = tmp_path_factory.mktemp("browser")
    var = tmp / "demo"
    env = demo_env(
        tmp, database_url=fresh_database_url(tmp, "browser"), var=var, LIVE_POLL_SECONDS="0.5"
    )
    if settings.CHANNEL_LAYER_URL:
        env["CHANNEL_LAYER_URL"] = redis_url_on_db(settings.CHANNEL_LAYER_URL, BROWSER_REDIS_DB)
    manage = [sys.executable, str(BASE_DIR / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], env=env, cwd=BASE_DIR, check=True, timeout=180)
    port = free_port()
    output = tmp / "demo.out"
    with output.open("w") as out:
        process = subprocess.Popen(
            [*manage, "demo", "--no-job", "--port", str(port), "--timeout", "1800"],
            env=env,
            cwd=BASE_DIR,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Stack(url=f"http://127.0.0.1:{port}", process=process, output=output, var=var)
    deadline = time.monotonic() + 240
    while "Dashboard:" not in output.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the stack did not start:\n{running.log()}")
        time.sleep(0.5)
    yield running
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:  # pragma: no cover - the demo stops its children itself
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(stack):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


#: Script errors and CSP violations of the pages every journey opens (``_context``).
_PAGE_ERRORS: list[str] = []


@pytest.fixture(autouse=True)
def _no_script_errors_or_policy_violations():
    """Each journey ends with no script error and no CSP or Permissions-Policy complaint on
    any page it opened (an inline script or style would be refused by the browser silently)."""
    _PAGE_ERRORS.clear()
    yield
    assert _PAGE_ERRORS == [], _PAGE_ERRORS


def _context(browser, stack, username: str | None):
    """A fresh browser context (its own cookies), signed in as ``username`` through the form."""
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, base_url=stack.url, accept_downloads=True
    )
    page = context.new_page()
    page.set_default_timeout(30_000)
    watch_errors(page, _PAGE_ERRORS)
    if username:
        page.goto("/accounts/login/")
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name=re.compile("sign in|log in", re.I)).click()
        page.wait_for_load_state()
        assert "/accounts/login/" not in page.url, page.content()[:2000]
    return context, page


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _fill_job(
    page, *, title: str, pipeline: list, rounds: int = ROUNDS, audit_records: int | None = None
) -> None:
    page.goto(f"/consortia/{SLUG}/jobs/new/")
    page.get_by_label("Title").fill(title)
    for box in page.locator("input[name=participants]").all():
        box.check()
    page.locator("#id_dataset_key").fill("breast-cancer")
    page.locator("#id_purpose").select_option("classification")
    page.locator("#id_model").select_option("logistic_regression")
    page.locator("#id_rounds").fill(str(rounds))
    page.locator("#id_batch_size").fill("16")
    page.locator("#id_lr").fill("0.05")
    page.locator("#id_privacy_pipeline").fill(json.dumps(pipeline))
    page.locator("#id_min_participants").fill(str(len(SITES)))
    if audit_records is not None:
        page.get_by_label(re.compile("Ask each site for a privacy audit")).check()
        page.locator("#id_privacy_audit_records").fill(str(audit_records))
    page.get_by_role("button", name="Propose for approval").click()
    page.wait_for_load_state()


def _job_id(page) -> int:
    found = re.search(rf"/consortia/{SLUG}/jobs/(\d+)/", page.url)
    assert found, page.url
    return int(found.group(1))


# --- 1. The administrator proposes ---------------------------------------------------------------


def test_1_the_administrator_proposes_a_job_and_a_breaking_one_is_refused(stack, browser):
    context, page = _context(browser, stack, "admin")
    try:
        # The dashboard: the institutions table (django-tables2) sorts and filters on the
        # server, swapped in by htmx; the live panel lists the jobs by state.
        page.goto(f"/consortia/{SLUG}/")
        rows = page.locator("#institutions tbody tr")
        assert rows.count() == len(SITES)
        page.get_by_label("Find an institution").fill("barts")
        page.get_by_role("button", name="Find").click()
        wait_for_expression(
            page, "document.querySelectorAll('#institutions tbody tr').length === 1"
        )
        assert "Barts" in rows.first.inner_text()
        page.get_by_role("link", name="Show all").click()
        wait_for_expression(
            page, f"document.querySelectorAll('#institutions tbody tr').length === {len(SITES)}"
        )
        # Ascending by name is the default: the header's link asks for descending.
        page.locator("#institutions thead th").first.get_by_role("link").click()
        wait_for_expression(page, "location.search.includes('sort=-name')")
        page.wait_for_load_state()
        names = rows.evaluate_all("rs => rs.map(r => r.cells[0].innerText)")
        assert names == sorted(names, key=str.lower, reverse=True), names
        page.wait_for_selector("#consortium-live-status:has-text('updates live')")

        # Sharing the whole model breaks the agreement's 40% ceiling; no DP-SGD breaks its
        # required mechanism. Refused, with the terms named, and nothing created.
        breaking = [{"filter": "partial_sharing", "fraction": 1.0, "strategy": "topk"}]
        _fill_job(page, title="Whole-model job", pipeline=breaking)
        problems = page.locator("#compliance-problems")
        assert problems.is_visible()
        text = problems.inner_text()
        assert "This job breaks the agreement" in text
        assert "Term: max_shared_fraction" in text or "shared" in text.lower(), text
        assert "dp" in text.lower(), text
        assert page.locator("#id_title").input_value() == "Whole-model job"  # input kept

        # The journey's job asks each site for a privacy audit before approval (two records
        # each): the site workers attack their own updates while the approvers read.
        _fill_job(page, title="Browser journey job", pipeline=PIPELINE, audit_records=2)
        stack.notes["job"] = _job_id(page)
        assert "Awaiting approval" in page.locator("#job-heading").inner_text()
        _shot(page, "1-admin-proposed")
    finally:
        context.close()


# --- 2 and 3. The hospitals approve, and the job page moves live ---------------------------------


def test_2_3_each_approver_reviews_and_approves_and_the_job_page_updates_live(stack, browser):
    job = stack.notes.get("job")
    assert job, "journey 1 did not create the job"
    watcher, watched = _context(browser, stack, "admin")
    try:
        watched.goto(f"/consortia/{SLUG}/jobs/{job}/")
        watched.wait_for_selector("#live[data-live=open]")
        watched.evaluate("window.__notReloaded = true")

        for slug in SITES:
            context, page = _context(browser, stack, f"approver-{slug}")
            try:
                page.goto(f"/consortia/{SLUG}/approvals/")
                page.get_by_role("link", name=re.compile("Browser journey job")).click()
                # The hospital's own site worker audits its update; the page shows the figures
                # in words once they are in (reloaded until then: the review page is static).
                audit = page.locator(f"#audit-{slug}")
                deadline = time.monotonic() + 120
                while audit.get_attribute("data-audit-state") not in ("measured", "inconclusive"):
                    assert time.monotonic() < deadline, audit.inner_text()
                    page.wait_for_timeout(1000)
                    page.reload()
                words = audit.inner_text()
                assert re.search(
                    r"an attacker rebuilt the features of a record of yours with a median "
                    r"relative error of \d+\.\d\d",
                    words,
                ), words
                assert "privacy_audit.reported" in words, words
                # The picture: drawn on the coordinator from the bundled public set of the
                # same shape (breast cancer's 30 features as a strip), served as a PNG.
                picture = page.locator("#audit-picture img")
                picture.scroll_into_view_if_needed()
                wait_for_expression(
                    page, "document.querySelector('#audit-picture img').naturalWidth > 0"
                )
                assert "never your records" in page.locator("#audit-picture").inner_text()
                review = page.locator("main").inner_text()
                for fact in ("breast-cancer", "logistic_regression", "DP-SGD", "40%"):
                    assert fact in review, (fact, review[:3000])
                assert re.search(r"ε\s*[\d.]+", review), review[:3000]
                page.get_by_label(re.compile("Approve: my institution")).check()
                page.get_by_role("button", name="Record my decision").click()
                page.wait_for_load_state()
                assert "approved" in page.locator("main").inner_text().lower()
            finally:
                context.close()

        # The job starts and runs to completion; the open page follows without a reload.
        watched.wait_for_selector("#live[data-job-state=running]", timeout=120_000)
        watched.wait_for_selector("#live[data-job-state=completed]", timeout=300_000)
        assert watched.evaluate("window.__notReloaded") is True
        assert watched.get_attribute("#live", "data-rounds-closed") == str(ROUNDS)
        assert watched.locator("#job-progress-text").inner_text() == f"{ROUNDS} of {ROUNDS}"
        statuses = watched.locator("#round-sites tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.status)"
        )
        assert statuses == ["accepted"] * len(SITES)
        for chart in ("validation", "loss", "privacy", "contribution"):
            assert watched.locator(f"#chart-{chart} .main-svg").count() >= 1, chart
        # The server-rendered sections were swapped in too: the heading says Completed (its
        # refresh is one page request, which a busy two-core machine may take a while to serve).
        wait_for_expression(
            watched,
            "document.querySelector('#job-heading').innerText.includes('Completed')",
            timeout_s=60,
        )
        assert watched.locator("#live-activity li").count() > 0
        # ... and so were the contributions (scored after the last round) and the history.
        wait_for_expression(
            watched, "!document.querySelector('#contributions').innerText.includes('not scored')"
        )
        # The rounds' scores come before the job's (its own entry, written last): the history
        # may be swapped in between them, so it is waited for too.
        wait_for_expression(
            watched,
            "document.querySelector('#history').innerText.includes('contribution.job_scored')",
            timeout_s=60,
        )
        _shot(watched, "3-job-completed-live")
    finally:
        watcher.close()


def test_2b_an_approver_rejects_with_a_reason(stack, browser):
    context, page = _context(browser, stack, "admin")
    try:
        _fill_job(page, title="Job to reject", pipeline=PIPELINE, rounds=1)
        job = _job_id(page)
    finally:
        context.close()
    context, page = _context(browser, stack, "approver-barts")
    try:
        page.goto(f"/consortia/{SLUG}/jobs/{job}/review/")
        page.get_by_label(re.compile("Reject: my institution")).check()
        page.get_by_role("button", name="Record my decision").click()
        page.wait_for_load_state()
        assert page.locator("main").get_by_text(re.compile("reason", re.I)).count() > 0
        page.get_by_label(re.compile("Reject: my institution")).check()
        page.get_by_label("Reason").fill("Our ethics board has not cleared this cohort.")
        page.get_by_role("button", name="Record my decision").click()
        page.wait_for_load_state()
        page.goto(f"/consortia/{SLUG}/jobs/{job}/")
        heading = page.locator("#job-heading").inner_text()
        assert "Rejected" in heading, heading
        assert "Our ethics board has not cleared this cohort." in page.locator("main").inner_text()
        _shot(page, "2b-approver-rejected")
    finally:
        context.close()


# --- 4. The auditor -------------------------------------------------------------------------------


def test_4_the_auditor_verifies_the_ledger_and_downloads_reports(stack, browser):
    job = stack.notes.get("job")
    assert job, "journey 1 did not create the job"
    context, page = _context(browser, stack, "auditor")
    try:
        page.goto(f"/consortia/{SLUG}/ledger/")
        page.get_by_role("button", name="Verify the ledger").click()
        page.wait_for_load_state()
        verdict = page.locator("main").inner_text()
        assert re.search(r"intact", verdict, re.I), verdict[:2000]

        page.goto(f"/consortia/{SLUG}/jobs/{job}/report/")
        head = page.locator("#report-head").inner_text()
        head_hash = re.search(r"[0-9a-f]{64}", head).group(0)
        with page.expect_download() as info:
            page.get_by_role("button", name="Export CSV").click()
        csv_text = Path(info.value.path()).read_text(encoding="utf-8")
        rows = list(csv.DictReader(io.StringIO(csv_text)))
        assert rows, csv_text[:1000]
        assert head_hash in csv_text
        sites_in_csv = {value for row in rows for value in row.values()}
        assert any(slug in sites_in_csv for slug in SITES), csv_text[:1000]
        with page.expect_download() as info:
            page.get_by_role("button", name="Export JSON").click()
        document = json.loads(Path(info.value.path()).read_text(encoding="utf-8"))
        assert head_hash in json.dumps(document)
        scores = {row["institution"]: row["score"] for row in document["summary"]}
        assert set(scores) == set(SITES) and all(v is not None for v in scores.values())
        with page.expect_download() as info:
            page.get_by_role("button", name="Export PDF").click()
        pdf = Path(info.value.path()).read_bytes()
        assert pdf.startswith(b"%PDF-")
        from pypdf import PdfReader

        text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages)
        assert head_hash[:16] in text.replace("\n", ""), text[:2000]
        # Each export is itself a ledger entry: the ledger page lists them.
        page.goto(f"/consortia/{SLUG}/ledger/?event=report.exported")
        assert page.locator("main").inner_text().count("report.exported") >= 3
        _shot(page, "4-auditor-report")
    finally:
        context.close()


# --- 5. A stranger -------------------------------------------------------------------------------


def test_5_an_outsider_reaches_none_of_it(stack, browser):
    job = stack.notes.get("job") or 1
    context, page = _context(browser, stack, "visitor")
    try:
        for path in (
            f"/consortia/{SLUG}/",
            f"/consortia/{SLUG}/jobs/",
            f"/consortia/{SLUG}/jobs/{job}/",
            f"/consortia/{SLUG}/jobs/{job}/review/",
            f"/consortia/{SLUG}/jobs/{job}/report/",
            f"/consortia/{SLUG}/ledger/",
            f"/consortia/{SLUG}/approvals/",
        ):
            response = page.goto(path)
            assert response.status == 404, (path, response.status)
        page.goto("/")
        assert "London Federated Oncology Consortium" not in page.locator("body").inner_text()
        outcome = page.evaluate(
            """url => new Promise(resolve => {
                const ws = new WebSocket(url);
                ws.onopen = () => resolve("open");
                ws.onclose = (e) => resolve("closed " + e.code);
                ws.onerror = () => resolve("refused");
                setTimeout(() => resolve("timeout"), 10000);
            })""",
            stack.url.replace("http", "ws") + f"/ws/consortia/{SLUG}/jobs/{job}/",
        )
        assert outcome in ("refused", "closed 1006"), outcome
        _shot(page, "5-outsider")
    finally:
        context.close()


# --- 6. A first proposal with the form's defaults, and the approvers who are waited on ----------


def test_6_a_proposal_with_the_forms_defaults_is_accepted_and_waits_on_the_approvers(
    stack, browser
):
    """Issue 14: the form opens on a job the agreement in force accepts (its pipeline, its
    sites, a budget that fits), so a new administrator's first proposal goes through; each
    approver's dashboard then lists it under "Waiting on you"."""
    context, page = _context(browser, stack, "admin")
    try:
        page.goto(f"/consortia/{SLUG}/jobs/new/")
        assert page.locator("#id_title").input_value(), "the form opens without a title"
        budget = page.locator("main").inner_text()
        assert "exceeds" not in budget.lower(), budget[:3000]
        page.get_by_label("Title").fill("Defaults job")
        page.get_by_role("button", name="Propose for approval").click()
        page.wait_for_load_state()
        assert "Awaiting approval" in page.locator("#job-heading").inner_text(), page.url
        job = _job_id(page)
        stack.notes["awaiting"] = job
    finally:
        context.close()
    context, page = _context(browser, stack, "approver-barts")
    try:
        page.goto(f"/consortia/{SLUG}/")
        waiting = page.locator("#pending-h").locator("xpath=..").inner_text()
        assert "Nothing waits on you" not in waiting, waiting
        link = page.locator(f"a[href$='/jobs/{job}/review/']")
        assert link.count() >= 1, waiting
        link.first.click()
        page.wait_for_load_state()
        assert page.url.endswith(f"/jobs/{job}/review/")
        _shot(page, "6-approver-waited-on")
    finally:
        context.close()


# --- 7. The auditor's compliance report -------------------------------------------------------


def test_7_the_auditor_reads_and_exports_the_compliance_report(stack, browser):
    job = stack.notes.get("job")
    assert job, "journey 1 did not create the job"
    context, page = _context(browser, stack, "auditor")
    try:
        page.goto(f"/consortia/{SLUG}/ledger/")
        page.locator("#compliance-reports a").first.click()
        page.wait_for_load_state()
        assert "Compliance report" in page.locator("h1").inner_text()
        stack.notes["compliance"] = page.url.removeprefix(stack.url)
        jobs = page.locator("#compliance-jobs").inner_text()
        assert "Browser journey job" in jobs, jobs
        approvals = page.locator("#compliance-approvals").inner_text()
        assert "Barts" in approvals, approvals  # hospitals by name, not slug
        head_hash = re.search(r"[0-9a-f]{64}", page.locator("#report-head").inner_text()).group(0)
        for fmt in ("CSV", "JSON", "PDF"):
            with page.expect_download() as info:
                page.get_by_role("button", name=f"Export {fmt}").click()
            data = Path(info.value.path()).read_bytes()
            if fmt == "PDF":
                assert data.startswith(b"%PDF-")
            else:
                assert head_hash.encode() in data, (fmt, data[:500])
        page.goto(f"/consortia/{SLUG}/ledger/?event=report.compliance_exported")
        assert page.locator("main").inner_text().count("report.compliance_exported") >= 3
        _shot(page, "7-auditor-compliance")
    finally:
        context.close()


# --- 8. Every page at a laptop's and a phone's width ----------------------------------------------


def _verify_the_ledger(page) -> None:
    page.get_by_role("button", name="Verify the ledger").click()
    page.wait_for_load_state()


def _create_worker_credentials(page) -> None:
    """The token page is shown once, after the form: it holds the token and the settings."""
    from training.fl.signing import generate_keypair

    page.locator("#id_label").fill("phone-width-check")
    page.locator("#id_public_key").fill(generate_keypair()[1])
    page.get_by_role("button", name="Create credentials").click()
    page.wait_for_load_state()
    assert "This token will not be shown again" in page.locator("main").inner_text()


#: Every page each role reaches, after the journeys above, by GET (or, for a page shown only
#: after a form, by the step that opens it): ``(name, path)`` or ``(name, path, step)``. The
#: placeholders: ``job`` is the completed job, ``awaiting`` the one proposed with the form's
#: defaults (still awaiting approval), ``agreement``/``version`` the agreement in force.
#: A page a role cannot see is visited as a role that can (the data steward's pages).
PAGES_BY_ROLE = {
    "admin": [
        ("overview", "/"),
        ("dashboard", "/consortia/{slug}/"),
        ("agreements", "/consortia/{slug}/agreements/"),
        ("agreement", "/consortia/{slug}/agreements/{agreement}/"),
        ("agreement-new", "/consortia/{slug}/agreements/new/"),
        ("version", "/consortia/{slug}/agreements/{agreement}/versions/{version}/"),
        ("members", "/consortia/{slug}/members/"),
        ("member-invite", "/consortia/{slug}/members/invite/"),
        *(
            entry
            for site in SITES
            for entry in (
                (f"institution-{site}", f"/consortia/{{slug}}/institutions/{site}/"),
                (f"institution-{site}-edit", f"/consortia/{{slug}}/institutions/{site}/edit/"),
            )
        ),
        ("institution-new", "/consortia/{slug}/institutions/new/"),
        ("jobs", "/consortia/{slug}/jobs/"),
        ("jobs-filtered", "/consortia/{slug}/jobs/?participant=barts&state=completed"),
        ("job", "/consortia/{slug}/jobs/{job}/"),
        ("job-awaiting", "/consortia/{slug}/jobs/{awaiting}/"),
        ("job-edit", "/consortia/{slug}/jobs/{awaiting}/edit/"),
        ("job-cancel", "/consortia/{slug}/jobs/{awaiting}/cancel/"),
        ("compare-pick", "/consortia/{slug}/jobs/compare/"),
        ("compare", "/consortia/{slug}/jobs/compare/?a={job}&b={awaiting}"),
        ("propose", "/consortia/{slug}/jobs/new/"),
        ("ledger", "/consortia/{slug}/ledger/"),
        ("notifications", "/notifications/"),
        ("password-change", "/accounts/password/change/"),
    ],
    "approver-barts": [
        ("dashboard", "/consortia/{slug}/"),
        ("approvals", "/consortia/{slug}/approvals/"),
        ("job", "/consortia/{slug}/jobs/{job}/"),
        ("review", "/consortia/{slug}/jobs/{awaiting}/review/"),
        ("review-decided", "/consortia/{slug}/jobs/{job}/review/"),
        ("withdraw", "/consortia/{slug}/agreements/{agreement}/withdraw/"),
        ("institution", "/consortia/{slug}/institutions/barts/"),
        ("agreement", "/consortia/{slug}/agreements/{agreement}/"),
        ("sign", "/consortia/{slug}/agreements/{agreement}/versions/{version}/sign/"),
        ("notifications", "/notifications/"),
        ("password-change", "/accounts/password/change/"),
    ],
    "steward-barts": [
        ("datasets", "/consortia/{slug}/institutions/barts/datasets/"),
        ("dataset-new", "/consortia/{slug}/institutions/barts/datasets/new/"),
        ("dataset-edit", "/consortia/{slug}/institutions/barts/datasets/breast-cancer/edit/"),
        ("validation-sets", "/consortia/{slug}/institutions/barts/validation-sets/"),
        ("credentials", "/consortia/{slug}/institutions/barts/worker-credentials/"),
        (
            "credentials-token",
            "/consortia/{slug}/institutions/barts/worker-credentials/",
            _create_worker_credentials,
        ),
    ],
    "auditor": [
        ("ledger", "/consortia/{slug}/ledger/"),
        ("ledger-verified", "/consortia/{slug}/ledger/", _verify_the_ledger),
        ("ledger-exports", "/consortia/{slug}/ledger/?event=report.exported"),
        ("job", "/consortia/{slug}/jobs/{job}/"),
        ("report", "/consortia/{slug}/jobs/{job}/report/"),
        ("compliance", "{compliance}"),
        ("institution-report", "/consortia/{slug}/institutions/barts/report/"),
        ("password-change", "/accounts/password/change/"),
    ],
    # The installation's operator, a superuser member of nothing: starts consortia, and finds
    # the demo consortium's pages "not found" like any stranger.
    "operator": [
        ("overview", "/"),
        ("consortium-new", "/consortia/new/"),
        ("missing", "/consortia/{slug}/"),
    ],
    # Signed in, a member of nothing: the consortium's pages are "not found" to them.
    "visitor": [("missing", "/consortia/{slug}/jobs/{job}/")],
    # Not signed in: no "Sign out" to look for.
    None: [
        ("login", "/accounts/login/"),
        ("password-reset", "/accounts/password/reset/"),
        ("password-reset-sent", "/accounts/password/reset/sent/"),
        ("missing", "/no-such-page/"),
    ],
}

#: The pages that answer "not found" on purpose.
NOT_FOUND_PAGES = {("visitor", "missing"), ("operator", "missing"), (None, "missing")}


def _fits(page, width: int, *, signed_in: bool = True) -> list[str]:
    """What does not fit a window ``width`` px wide: the page scrolling sideways (naming the
    elements that stick out, to say where to look), or the top bar's "Sign out" off-screen."""
    problems = []
    scroll = page.evaluate("document.documentElement.scrollWidth")
    if scroll > width + 1:
        # Where to look: the outermost elements past the right edge (their children would
        # only repeat them), and the innermost whose text (a long digest) runs out of them.
        culprits = page.evaluate(
            """width => {
                const all = [...document.querySelectorAll('body *')];
                const past = all.filter(e => e.getBoundingClientRect().right > width + 1);
                const spill = all.filter(e => e.scrollWidth > e.clientWidth + 1 &&
                    e.clientWidth > 0 && getComputedStyle(e).overflowX === 'visible');
                const name = e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
                    (typeof e.className === 'string' && e.className.trim()
                        ? '.' + e.className.trim().split(/\\s+/).join('.') : '');
                return [
                    ...past.filter(e => !past.includes(e.parentElement)).slice(0, 3).map(
                        e => name(e) + ' ends at ' + Math.round(e.getBoundingClientRect().right)),
                    ...spill.filter(e => !spill.some(d => d !== e && e.contains(d))).slice(0, 3)
                        .map(e => name(e) + ' overflows'),
                ];
            }""",
            width,
        )
        problems.append(f"the page is {scroll} px wide ({', '.join(culprits)})")
    if signed_in:
        box = page.get_by_role("button", name="Sign out").bounding_box()
        if box is None or box["x"] < 0 or box["x"] + box["width"] > width + 1:
            problems.append(f"'Sign out' is off-screen: {box}")
    return problems


def test_8_every_page_fits_a_laptop_and_a_phone(stack, browser):
    """Issue 14: every page each role works in, the forms included, fits a laptop and a phone
    (390 px): no sideways scroll of the page (a wide table scrolls in its own box), and the
    top bar's "Sign out" on-screen."""
    job = stack.notes.get("job") or 1
    compliance = stack.notes.get("compliance", f"/consortia/{SLUG}/ledger/")
    found = re.search(r"/agreements/(\d+)/versions/(\d+)/", compliance)
    agreement, version = found.groups() if found else (1, 1)
    values = {
        "slug": SLUG,
        "job": job,
        "awaiting": stack.notes.get("awaiting") or job,
        "agreement": agreement,
        "version": version,
        "compliance": compliance,
    }
    problems = []
    for role, pages in PAGES_BY_ROLE.items():
        context, page = _context(browser, stack, role)
        try:
            for width, height in ((1280, 900), (390, 844)):
                page.set_viewport_size({"width": width, "height": height})
                for name, path, *step in pages:
                    where = f"{role or 'anonymous'} {name} at {width} px"
                    response = page.goto(path.format(**values))
                    page.wait_for_load_state()
                    expected = 404 if (role, name) in NOT_FOUND_PAGES else 200
                    if response.status != expected:
                        problems.append(f"{where}: answered {response.status} ({page.url})")
                        continue
                    for action in step:
                        action(page)
                    problems += [
                        f"{where}: {p}" for p in _fits(page, width, signed_in=role is not None)
                    ]
                    _shot(page, f"8-{width}-{role or 'anonymous'}-{name}")
        finally:
            context.close()
    assert problems == [], "\n".join(problems)


# --- 9. A withdrawal under a second agreement leaves the first one's jobs and reports alone ------


def test_9_a_withdrawal_under_a_second_agreement_leaves_the_first_agreements_jobs_alone(
    stack, browser
):
    """Issue 14: Barts signs a second, unrelated agreement and withdraws from it. The jobs under
    the agreement in force keep Barts (the one awaiting approval too), and the completed job's
    report lists no withdrawal and no model derived from a withdrawn hospital."""
    job = stack.notes.get("job")
    assert job, "journey 1 did not create the job"
    context, page = _context(browser, stack, "admin")
    try:
        page.goto(f"/consortia/{SLUG}/agreements/new/")
        page.locator("#id_title").fill("Imaging data-sharing agreement")
        page.locator("#id_purpose").fill("Imaging research, unrelated to the oncology jobs.")
        page.locator("input[name=permitted_model_families][value=cnn]").check()
        page.locator("#id_max_shared_fraction").fill("0.5")
        page.locator("#id_required_dp_mechanism").select_option("gaussian")
        page.locator("#id_epsilon_cap").fill("10")
        page.locator("#id_delta").fill("0.00001")
        page.locator("#id_valid_from").fill("2026-01-01")
        page.locator("#id_valid_until").fill("2030-12-31")
        page.locator("#id_text").fill("The imaging sites share CNN updates under Gaussian noise.")
        page.get_by_role("button", name="Save draft").click()
        page.wait_for_load_state()
        found = re.search(rf"/consortia/{SLUG}/agreements/(\d+)/", page.url)
        assert found, (page.url, page.locator("main").inner_text()[:2000])
        agreement = int(found.group(1))
        page.goto(f"/consortia/{SLUG}/agreements/{agreement}/versions/1/publish/")
        page.get_by_role("button", name="Publish version 1").click()
        page.wait_for_load_state()
    finally:
        context.close()

    context, page = _context(browser, stack, "approver-barts")
    try:
        account = page.locator(".topbar .account a[title='Change your password']")
        full_name = account.inner_text().strip()
        page.goto(f"/consortia/{SLUG}/agreements/{agreement}/versions/1/sign/")
        page.locator("#id_typed_name").fill(full_name)
        page.locator("#id_confirmed").check()
        page.get_by_role("button", name="Sign", exact=True).click()
        page.wait_for_load_state()
        page.goto(f"/consortia/{SLUG}/agreements/{agreement}/")
        page.get_by_role("link", name=re.compile("Withdraw consent")).click()
        page.get_by_label("Reason").fill("Our imaging programme has been stopped by the board.")
        page.get_by_role("button", name="Withdraw consent").click()
        page.wait_for_load_state()
        _shot(page, "9-approver-withdrew-second-agreement")
    finally:
        context.close()

    context, page = _context(browser, stack, "auditor")
    try:
        for unfinished_or_done in (stack.notes.get("awaiting"), job):
            if unfinished_or_done is None:
                continue
            page.goto(f"/consortia/{SLUG}/jobs/{unfinished_or_done}/")
            participants = page.locator("#participants").inner_text()
            assert "Barts" in participants, participants
            assert "removed" not in participants.lower(), participants
        page.goto(f"/consortia/{SLUG}/jobs/{job}/report/")
        with page.expect_download() as info:
            page.get_by_role("button", name="Export JSON").click()
        document = json.loads(Path(info.value.path()).read_text(encoding="utf-8"))
        text = json.dumps(document)
        assert "Our imaging programme" not in text, (
            "the report lists the other agreement's withdrawal"
        )
        derived = [k for k in document if "withdraw" in k.lower()]
        for key in derived:
            assert not document[key], (key, document[key])
        _shot(page, "9-auditor-report-untouched")
    finally:
        context.close()
