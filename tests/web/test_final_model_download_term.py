"""Who may download a job's models is the agreement's term ``final_model_access`` (of the
version the job runs under), not a rule fixed in the code: "participants_and_admins" (the
default, the rule from before the term), "participants" (not the consortium's administrators as
such) or "nobody" (the model stays on the consortium's server). A refused download is the same
404 as a missing model and writes nothing to the ledger; the job page says why, in the term's
words, and offers no button it would refuse.
"""

from __future__ import annotations

import html
import re

import pytest
from django.urls import reverse

from audit.models import LedgerEntry
from tests.support.fl_harness import use_artifact_folder
from tests.support.job_page_fixtures import job_with_rounds
from tests.support.training_fixtures import make_scene

pytestmark = pytest.mark.django_db

EVERYONE = ("admin", "researcher", "approver", "steward", "other_member", "auditor")


@pytest.fixture(autouse=True)
def _artifacts(settings, tmp_path):
    return use_artifact_folder(settings, tmp_path / "artifacts")


def job_under(cast, access: str | None):
    """A completed two-round job (hospitals A and B) under an agreement with the term."""
    scene = make_scene(cast) if access is None else make_scene(cast, final_model_access=access)
    job = job_with_rounds(scene, rounds=2)
    assert job.agreement_version.final_model_access == (access or "participants_and_admins")
    return job


def download_url(job, round_index: int = 2) -> str:
    return reverse("training:job-model-download", args=[job.consortium.slug, job.pk, round_index])


def model_block(cast, who: str, job) -> str:
    url = reverse("training:job-detail", args=[job.consortium.slug, job.pk])
    response = cast.client_for(who).get(url)
    assert response.status_code == 200
    page = re.sub(r"\s+", " ", html.unescape(response.content.decode()))
    start = page.index('id="model"')
    return page[start : page.index("</section>", start)]


@pytest.mark.parametrize(
    ("access", "allowed"),
    [
        (None, {"admin", "researcher", "approver", "steward", "other_member"}),
        ("participants_and_admins", {"admin", "researcher", "approver", "steward", "other_member"}),
        ("participants", {"researcher", "approver", "steward", "other_member"}),
        ("nobody", set()),
    ],
)
def test_the_rule_applies_the_jobs_agreement_term(cast, access, allowed):
    job = job_under(cast, access)
    for who in EVERYONE:
        user = getattr(cast, who)
        assert user.has_perm("training.download_model", job) is (who in allowed), who


def test_under_participants_an_admin_outside_the_job_is_refused_and_told_why(cast):
    job = job_under(cast, "participants")
    model = model_block(cast, "admin", job)
    assert download_url(job) not in model
    refusal = model.split('id="model-download-refused"', 1)[1]
    assert "lets only members of the institutions still taking part in the job" in refusal
    assert "Data-use agreement" in refusal  # names the agreement and its version
    assert "Only the consortium's administrators and" not in model  # no false promise
    assert cast.client_for("admin").get(download_url(job)).status_code == 404
    assert not LedgerEntry.objects.filter(event="model.downloaded").exists()
    # A participating institution's member still downloads it, on the record.
    response = cast.client_for("researcher").get(download_url(job))
    assert response.status_code == 200
    assert LedgerEntry.objects.filter(event="model.downloaded").count() == 1


def test_under_participants_a_withdrawn_institutions_member_is_refused(cast):
    job = job_under(cast, "participants")
    job.participants.filter(institution=cast.hospital_b).update(status="removed")
    assert download_url(job) not in model_block(cast, "other_member", job)
    assert cast.client_for("other_member").get(download_url(job)).status_code == 404
    assert not LedgerEntry.objects.filter(event="model.downloaded").exists()


def test_under_nobody_no_one_downloads_and_the_page_says_the_model_stays(cast):
    job = job_under(cast, "nobody")
    for who in ("admin", "researcher", "approver", "other_member"):
        model = model_block(cast, who, job)
        assert download_url(job) not in model and 'id="model-download"' not in model, who
        assert "keeps the final model, and every model of the job, on the consortium's server" in (
            model
        ), who
        assert "nobody downloads them through this site" in model
        assert job.agreement_version.content_digest  # the model facts stay on the page
        assert 'id="model-digest"' in model
        assert cast.client_for(who).get(download_url(job)).status_code == 404, who
        assert cast.client_for(who).get(download_url(job, 1)).status_code == 404, who
    assert not LedgerEntry.objects.filter(event="model.downloaded").exists()


def test_under_the_default_an_admin_still_downloads(cast):
    job = job_under(cast, None)
    assert download_url(job) in model_block(cast, "admin", job)
    assert cast.client_for("admin").get(download_url(job)).status_code == 200
    assert LedgerEntry.objects.filter(event="model.downloaded").count() == 1
