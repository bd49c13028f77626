"""The jobs list's filters and the comparison of two jobs, in a real browser (issue 14).

A researcher narrows the list to the running jobs Hospital A takes part in, ticks two of them
and opens the comparison: both jobs side by side, one chart with both jobs' validation metric
(plotly, served from our static files) and each job's ε against the cap; at 1,280 and at
390 px wide, with nothing wider than the phone's screen. The test's own live server over the
``cast`` consortium, Playwright on Debian's chromium (``/usr/bin/chromium`` or
``CHROMIUM_PATH``); screenshots under ``BROWSER_ARTIFACTS`` (default
``var/test-artifacts/browser``).
"""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from tests.support.agreements import agreement_in_force
from tests.support.browser import (
    fits,
    launch,
    require_chromium,
    session_cookie,
    shot,
    signed_in_page,
)
from tests.support.planted_jobs import plant_job
from training.models import JobState

pytestmark = [pytest.mark.browser]


def test_filter_the_list_tick_two_jobs_and_compare_them(cast, live_server):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    version = agreement_in_force(cast)
    a, b = cast.hospital_a, cast.hospital_b
    first = plant_job(
        cast.consortium,
        title="Tumour MLP, noise 5",
        institutions=[a, b],
        version=version,
        metrics=[0.58, 0.69, 0.77, 0.82],
        rounds=6,
    )
    second = plant_job(
        cast.consortium,
        title="Tumour linear, noise 8",
        institutions=[a],
        version=version,
        metrics=[0.52, 0.61, 0.66],
        rounds=6,
        noise_multiplier=8.0,
        model={"name": "logistic_regression", "params": {}},
    )
    plant_job(cast.consortium, title="Hospital B alone", institutions=[b], metrics=[0.5])
    plant_job(cast.consortium, title="Finished earlier", institutions=[a], state="completed")
    plant_job(cast.consortium, title="Still a draft", state=JobState.DRAFT)
    jobs = reverse("training:job-list", args=[cast.consortium.slug])
    cookie = session_cookie(cast.researcher, live_server.url)
    errors: list[str] = []

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = signed_in_page(browser, base_url=live_server.url, cookie=cookie, errors=errors)

            # Filter: Hospital A's running jobs.
            page.goto(jobs)
            page.get_by_label("Participant").select_option(label="Hospital A")
            page.get_by_label("State").select_option(label="Running")
            page.get_by_role("button", name="Filter").click()
            expect(page).to_have_url(re.compile(r"participant=hospital-a.*state=running"))
            table = page.locator("#jobs")
            expect(table.get_by_role("link")).to_have_count(2)
            expect(table.get_by_role("link", name="Hospital B alone")).to_have_count(0)
            expect(page.locator("#jobs-count")).to_have_text("2 jobs match.")
            shot(page, "job-list-filtered-1280")

            # Tick both and compare.
            page.get_by_label(f"Compare job #{first.pk}").check()
            page.get_by_label(f"Compare job #{second.pk}").check()
            page.get_by_role("button", name="Compare the two ticked jobs").click()
            expect(page).to_have_url(re.compile(rf"/jobs/compare/\?a={first.pk}&b={second.pk}$"))
            expect(page.get_by_role("heading", level=1)).to_have_text(
                f"Job #{first.pk} and job #{second.pk} side by side"
            )
            sides = page.locator("#compare-sides")
            expect(sides).to_contain_text("Tumour MLP, noise 5")
            expect(sides).to_contain_text("Tumour linear, noise 8")
            expect(sides).to_contain_text("0.8200 accuracy after round 4")
            # Plotly drew both jobs in the one chart.
            chart = page.locator("#chart-compare")
            expect(chart.locator(".main-svg").first).to_be_visible()
            expect(chart.locator(".scatterlayer .trace")).to_have_count(2)
            expect(chart.locator(".legendtext")).to_have_count(2)
            expect(page.locator("#privacy-a")).to_contain_text("Hospital B")
            shot(page, "job-compare-1280")
            fits(page, 1280)

            # The phone's width: both pages fit, the tables scroll in their boxes.
            page.set_viewport_size({"width": 390, "height": 844})
            page.reload()
            expect(chart.locator(".main-svg").first).to_be_visible()
            shot(page, "job-compare-390")
            fits(page, 390)
            page.go_back()
            page.goto(jobs + "?participant=hospital-a&state=running")
            expect(table.get_by_role("link")).to_have_count(2)
            shot(page, "job-list-filtered-390")
            fits(page, 390)
        finally:
            browser.close()
    assert not errors, errors
