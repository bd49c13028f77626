"""The proposal form in chromium: the privacy pipeline edited as ordered steps
(``static/js/proposal_pipeline.js``) and the budget table redrawn as the form changes (htmx).

The script only writes the JSON box the server reads, so what matters is what is posted: the
test edits the steps, watches the projection refuse too little noise, and proposes the job the
steps describe.
"""

from __future__ import annotations

import json

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse

from tests.support.agreements import agreement_in_force
from tests.support.training_pages import steward_registers_datasets
from training.models import JobState, TrainingJob

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser_page(live_server, cast, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    # Playwright's sync API keeps an event loop running in this thread; the test's own
    # queries (arranging, then reading what was proposed) are still plain synchronous ones.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    client = Client()
    client.force_login(cast.admin)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        context = browser.new_context(
            base_url=live_server.url, viewport={"width": 1280, "height": 900}
        )
        context.add_cookies(
            [{"name": settings.SESSION_COOKIE_NAME, "value": cookie, "url": live_server.url}]
        )
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page, errors
        browser.close()


def test_pipeline_edited_as_steps_with_the_budget_redrawn(cast, browser_page):
    agreement_in_force(cast)  # Gaussian noise required, 40% shared, ε cap 8
    steward_registers_datasets(cast)
    page, errors = browser_page
    page.goto(reverse("training:job-create", args=[cast.consortium.slug]))

    # The steps the agreement's floor asks for, above the JSON box they are written to.
    filters = [page.locator(f"#pipeline-step-{i}-filter").input_value() for i in range(3)]
    assert filters == ["partial_sharing", "percentile_clipping", "gaussian_noise"]
    assert "fits" in page.locator("#proposal-budget").inner_text()

    # Too little noise: the projection (htmx, on change) says the caps would be exceeded.
    page.locator("#pipeline-step-2-noise_multiplier").fill("0.3")
    page.locator("#pipeline-step-2-noise_multiplier").dispatch_event("change")
    page.locator("#proposal-budget").get_by_text("exceeds the cap").first.wait_for()

    # Enough noise again, clipping moved first, one step added: the box follows the steps.
    page.locator("#pipeline-step-2-noise_multiplier").fill("6")
    page.locator("#pipeline-step-2-noise_multiplier").dispatch_event("change")
    page.get_by_role("button", name="Move step 2 up").click()
    page.get_by_label("New step:").select_option("exclude_layers")
    page.get_by_role("button", name="Add this step").click()
    page.locator("#pipeline-step-3-layers").fill("head")
    page.locator("#pipeline-step-3-layers").dispatch_event("change")
    posted = json.loads(page.locator("#id_privacy_pipeline").input_value())
    assert [s["filter"] for s in posted] == [
        "percentile_clipping",
        "partial_sharing",
        "gaussian_noise",
        "exclude_layers",
    ]
    page.locator("#proposal-budget").get_by_text("This job keeps the agreement").wait_for()

    page.get_by_role("button", name="Propose for approval").click()
    page.wait_for_load_state()

    job = TrainingJob.objects.get(consortium=cast.consortium)
    assert job.state == JobState.AWAITING_APPROVAL
    pipeline = job.spec["privacy_pipeline"]
    assert [s["filter"] for s in pipeline] == [s["filter"] for s in posted]
    assert pipeline[2]["noise_multiplier"] == 6
    assert pipeline[3]["layers"] == ["head"]
    assert errors == []


def test_a_pipeline_pasted_as_json_redraws_the_steps_and_a_refused_one_is_kept(cast, browser_page):
    agreement_in_force(cast)
    steward_registers_datasets(cast)
    page, errors = browser_page
    page.goto(reverse("training:job-create", args=[cast.consortium.slug]))
    box = page.locator("#id_privacy_pipeline")

    box.fill('[{"filter": "dp_sgd", "noise_multiplier": 3, "max_grad_norm": 1}]')
    assert page.locator("#pipeline-step-0-filter").input_value() == "dp_sgd"
    assert page.locator("#pipeline-step-1-filter").count() == 0

    box.fill('[{"filter": "no_such_filter"}]')
    page.get_by_role("button", name="Propose for approval").click()
    page.wait_for_load_state()

    assert box.is_visible()
    assert "no_such_filter" in box.input_value()
    assert (
        "unknown filter"
        in page.locator("#id_privacy_pipeline_error, .errorlist").first.inner_text()
    )
    assert not TrainingJob.objects.exists()
    assert errors == []


def test_enter_in_the_title_proposes_and_the_budget_check_still_only_checks(cast, browser_page):
    """Enter in a text field presses the form's default button: it proposes the job, as
    "Propose for approval" does, not the "Check privacy budget" button above it."""
    agreement_in_force(cast)
    steward_registers_datasets(cast)
    page, errors = browser_page
    page.goto(reverse("training:job-create", args=[cast.consortium.slug]))

    # The budget check, pressed, re-renders the form with the projection and creates nothing.
    page.get_by_role("button", name="Check privacy budget").click()
    page.wait_for_load_state()
    assert "fits" in page.locator("#proposal-budget").inner_text()
    assert not TrainingJob.objects.exists()

    title = page.get_by_label("Title")
    title.fill("Proposed by pressing Enter")
    with page.expect_navigation():
        title.press("Enter")

    job = TrainingJob.objects.get(consortium=cast.consortium)
    assert job.title == "Proposed by pressing Enter"
    assert job.state == JobState.AWAITING_APPROVAL
    assert page.url.endswith(reverse("training:job-detail", args=[cast.consortium.slug, job.pk]))
    assert errors == []
