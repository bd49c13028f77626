"""What the approver sees of the privacy audit before deciding: each institution's audit in
words next to its ε on the review page (asked and waiting, measured, inconclusive, out of the
audit's reach), the agreement's maximum risk against the figure, the picture drawn from
bundled **public** data of the job's shape (served to whoever may see the job, never to an
outsider), the job page's list of audits, and drawing that picture on the coordinator.

The audit rows are written directly here (the site's report and its intake are tested in
tests/rounds/); the picture is drawn for real on the digits with a small MLP.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import re
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from tests.support.agreements import TERMS
from tests.support.training_fixtures import make_scene, offer_dataset
from training.fl.audit_report import summary_of
from training.models import AuditPicture, PrivacyAudit

pytestmark = pytest.mark.django_db

#: The smallest valid PNG: one white pixel (what the view must hand back byte for byte).
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a4944415408d763f80f00010101001bb6ee560000000049454e44ae426082"
)

AUDIT = {"records": 2, "seed": 3}


def result(*, ssim: float, success: float, conclusive: bool = True) -> dict:
    """An audit result's JSON as a site reports it (``AuditResult.to_json()``), image records."""
    return {
        "modality": "image",
        "summary": {"median_ssim": ssim, "median_psnr": 21.5, "success_rate": success},
        "records": [
            {"record": 0, "attack": "ig", "success": success > 0, "ssim": ssim, "psnr": 21.5},
            {"record": 1, "attack": "dlg", "success": False, "ssim": ssim - 0.05, "psnr": 19.0},
        ],
        "shared_fraction": 0.4,
        "label_inference": "ran",
        "conclusive": conclusive,
        "calibration": {"records": 2, "success_rate": 1.0 if conclusive else 0.0},
    }


def audited(job, institution, **fields) -> PrivacyAudit:
    """``institution``'s audit of the job's current spec, with ``fields`` (the proposal has
    already asked every participant: the row is there, or made here)."""
    audit, _ = PrivacyAudit.objects.update_or_create(
        job=job, institution=institution, spec_digest=job.spec_digest, defaults=fields
    )
    return audit


def measured(job, institution, **figures) -> PrivacyAudit:
    return audited(
        job,
        institution,
        status=PrivacyAudit.Status.REPORTED,
        outcome=PrivacyAudit.Outcome.MEASURED,
        summary=summary_of(result(**figures)),
        reported_at=timezone.now(),
    )


def asked(job, institution, at: dt.datetime) -> PrivacyAudit:
    return audited(
        job, institution, status=PrivacyAudit.Status.ASKED, asked_at=at, outcome="", summary=None
    )


def page_text(response) -> str:
    assert response.status_code == 200, response.content.decode()[:2000]
    return re.sub(r"\s+", " ", html.unescape(response.content.decode()))


def review_page(cast, job, who: str = "approver") -> str:
    url = reverse("training:job-review", args=[job.consortium.slug, job.pk])
    return page_text(cast.client_for(who).get(url))


def job_page(cast, job, who: str = "approver") -> str:
    url = reverse("training:job-detail", args=[job.consortium.slug, job.pk])
    return page_text(cast.client_for(who).get(url))


def section(page: str, marker: str) -> str:
    start = page.index(marker)
    return page[start : page.index("</section>", start)]


def picture_url(job) -> str:
    return reverse("training:job-audit-picture", args=[job.consortium.slug, job.pk])


@pytest.fixture
def scene(cast):
    return make_scene(cast)


@pytest.fixture
def job(scene):
    return scene.propose(privacy_audit=AUDIT)


# --- The review page, state by state ------------------------------------------------------------


def test_the_review_page_says_what_an_attacker_rebuilt_from_your_updates(cast, job):
    measured(job, cast.hospital_a, ssim=0.96, success=0.5)
    at = timezone.make_aware(dt.datetime(2030, 1, 2, 14, 5))
    asked(job, cast.hospital_b, at)

    page = review_page(cast, job)
    words = section(page, 'id="plain-words"')
    own = words[words.index('id="audit-hospital-a"') :]
    assert "What an attacker could rebuild from your updates" in own
    assert (
        "With this pipeline (40% of the update shared) an attacker rebuilt a record of yours "
        "with similarity 0.96 out of 1 (median SSIM; best 0.96)" in own
    )
    assert "50% of the records audited count as rebuilt" in own
    # Next to the institution's ε block, before the other participants.
    assert words.index('id="guarantee-hospital-a"') < words.index('id="audit-hospital-a"')
    # Hospital B's audit is still with its worker, said with when it was asked.
    local = timezone.localtime(at)
    other = words[words.index('id="audit-hospital-b"') :]
    assert f"Asked at {local:%H:%M} on {local:%Y-%m-%d}, waiting for Hospital B's worker." in other
    assert "a record of yours" not in other


def test_another_institutions_measured_audit_names_its_records(cast, job):
    measured(job, cast.hospital_b, ssim=0.41, success=0.0)
    page = review_page(cast, job)
    other = page[page.index('id="audit-hospital-b"') :]
    assert "an attacker rebuilt a record of Hospital B with similarity 0.41 out of 1" in other


def test_an_inconclusive_audit_says_a_low_figure_proves_nothing(cast, job):
    measured(job, cast.hospital_a, ssim=0.08, success=0.0, conclusive=False)
    page = review_page(cast, job)
    own = page[page.index('id="audit-hospital-a"') :]
    assert "similarity 0.08 out of 1" in own
    assert "Inconclusive: these bounded attacks rebuilt none of 2 records" in own
    assert "inconclusive</span>" in own


def test_an_audit_out_of_reach_gives_its_reason(cast, job):
    audited(
        job,
        cast.hospital_a,
        status=PrivacyAudit.Status.REPORTED,
        outcome=PrivacyAudit.Outcome.OUT_OF_REACH,
        reason="the model has 2,400,000 trainable parameters, more than the audit's 500,000",
        reported_at=timezone.now(),
    )
    page = review_page(cast, job)
    own = page[page.index('id="audit-hospital-a"') :]
    assert (
        "This model is beyond the audit's reach at Hospital A: the model has 2,400,000 "
        "trainable parameters, more than the audit's 500,000." in own
    )
    assert "out of reach</span>" in own


def test_a_job_without_the_audit_says_so_and_shows_no_picture(cast, scene):
    job = scene.propose()
    page = review_page(cast, job)
    assert "This job asks for no privacy audit before approval." in page
    assert 'id="audit-picture"' not in page
    assert 'id="privacy-audits"' not in job_page(cast, job)


@pytest.mark.parametrize(
    ("ssim", "words"),
    [
        (0.96, "Median SSIM 0.96: above the agreement's maximum of 0.30: approval is refused."),
        (0.12, "Median SSIM 0.12: within the agreement's maximum of 0.30."),
        (0.304, "Median SSIM 0.304: above the agreement's maximum of 0.300: approval is refused."),
    ],
)
def test_the_agreements_maximum_risk_is_held_against_the_figure(cast, ssim, words):
    scene = make_scene(cast, privacy_audit_required=True, audit_max_median_ssim=Decimal("0.3"))
    job = scene.propose(privacy_audit=AUDIT)
    measured(job, cast.hospital_a, ssim=ssim, success=0.0)
    page = review_page(cast, job)
    own = page[page.index('id="audit-hospital-a"') :]
    assert words in own
    assert "The agreement requires this audit before Hospital A may approve" in own
    # The page and the approval gate agree: the badge is red exactly when the gate refuses.
    refused = "approval is refused" in words
    assert ("badge bad" in own[: own.index("</p>")]) is refused


def test_an_inconclusive_audit_under_a_maximum_is_refused(cast):
    scene = make_scene(cast, privacy_audit_required=True, audit_max_success_rate=Decimal("0.25"))
    job = scene.propose(privacy_audit=AUDIT)
    measured(job, cast.hospital_a, ssim=0.05, success=0.0, conclusive=False)
    own = review_page(cast, job)
    own = own[own.index('id="audit-hospital-a"') :]
    assert "Inconclusive, so the agreement's maximum risk cannot be shown to hold" in own
    assert "within the agreement's maximum" not in own


# --- The picture ------------------------------------------------------------------------------


def drawn(job, png: bytes = TINY_PNG) -> AuditPicture:
    picture, _ = AuditPicture.objects.update_or_create(
        job=job,
        spec_digest=job.spec_digest,
        defaults={
            "dataset_key": "digits",
            "png": png,
            "figures": {"record": 0, "attack": "ig", "success": True, "ssim": 0.87, "psnr": 18.2},
            "note": "",
            "drawn_at": timezone.now(),
        },
    )
    return picture


def test_the_review_page_shows_the_picture_once_with_its_caption(cast, job):
    drawn(job)
    measured(job, cast.hospital_a, ssim=0.96, success=0.5)
    page = review_page(cast, job)
    assert page.count("<img ") == 1
    figure = page[page.index('id="audit-picture"') :]
    figure = figure[: figure.index("</figure>")]
    assert f'src="{picture_url(job)}?v={job.spec_digest[:12]}"' in figure
    assert re.search(r'alt="[^"]*public data set digits[^"]*SSIM 0\.87 out of 1', figure)
    assert "Left: a record of the bundled public data set digits" in figure
    assert "under this job's pipeline (SSIM 0.87 out of 1)" in figure
    assert "never your records" in figure


def test_the_page_says_when_the_picture_is_being_drawn_or_cannot_be(cast, job):
    # Proposing asked for the picture: its row waits for the coordinator.
    assert "being drawn" in review_page(cast, job)
    note = (
        "No bundled public data set has records of this job's shape ([3, 64, 64] images), so "
        "no picture is drawn; the figures are your sites' own."
    )
    AuditPicture.objects.update_or_create(
        job=job, spec_digest=job.spec_digest, defaults={"note": note, "drawn_at": timezone.now()}
    )
    page = review_page(cast, job)
    assert note in page
    assert "<img " not in page


@pytest.mark.parametrize(
    ("who", "status"),
    [
        ("approver", 200),
        ("other_member", 200),
        ("auditor", 200),
        ("researcher", 200),
        ("outsider", 404),
    ],
)
def test_the_picture_is_served_to_whoever_may_see_the_job(cast, job, who, status):
    drawn(job)
    response = cast.client_for(who).get(picture_url(job))
    assert response.status_code == status
    if status == 200:
        assert response["Content-Type"] == "image/png"
        assert response.content == TINY_PNG
        assert "private" in response["Cache-Control"]


def test_the_picture_asks_an_anonymous_visitor_to_sign_in(cast, job):
    drawn(job)
    response = cast.client_for("anonymous").get(picture_url(job))
    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


def test_no_picture_is_a_404(cast, job):
    assert cast.client_for("approver").get(picture_url(job)).status_code == 404
    AuditPicture.objects.filter(job=job).update(note="none fits", drawn_at=timezone.now())
    assert cast.client_for("approver").get(picture_url(job)).status_code == 404


def test_a_picture_of_an_earlier_spec_is_not_served(cast, job):
    drawn(job)
    AuditPicture.objects.filter(job=job).update(spec_digest="0" * 64)
    assert cast.client_for("approver").get(picture_url(job)).status_code == 404


# --- The job page ---------------------------------------------------------------------------------


def test_the_job_page_lists_each_institutions_audit(cast, job):
    measured(job, cast.hospital_a, ssim=0.96, success=0.5)
    asked(job, cast.hospital_b, timezone.now())
    drawn(job)
    audits = section(job_page(cast, job, who="other_member"), 'id="privacy-audits"')
    rows = re.findall(r"<tr data-audit-state=\"(\w+)\">\s*<th scope=\"row\">([^<]+)</th>", audits)
    assert rows == [("measured", "Hospital A"), ("asked", "Hospital B")]
    assert "an attacker rebuilt a record of Hospital A with similarity 0.96 out of 1" in audits
    assert "waiting for Hospital B's worker" in audits
    assert 'id="audit-picture"' in audits


# --- Drawing the picture on the coordinator ------------------------------------------------------


def digits_job(cast, **spec):
    """A job on a digits-shaped data set (64 features, 10 classes) at both hospitals, under
    an agreement that lets it share its whole update unfiltered (the attack's best case)."""
    from tests.support.agreements import agreement_in_force
    from tests.support.training_fixtures import TrainingScene

    version = agreement_in_force(cast, required_dp_mechanism="none", max_shared_fraction="1")
    datasets = [
        offer_dataset(cast, institution, key="digits", input_shape=(64,), n_classes=10)
        for institution in (cast.hospital_a, cast.hospital_b)
    ]
    scene = TrainingScene(cast=cast, version=version, datasets=datasets)
    return scene.propose(dataset_key="digits", **spec)


def test_drawing_the_picture_of_a_digits_job_stores_a_png_and_its_figures(cast):
    from PIL import Image

    from training.rounds.audit_pictures import draw_audit_picture

    job = digits_job(
        cast,
        privacy_audit={"records": 1, "seed": 0},
        model={"name": "logistic_regression"},
        evaluation={"where": "sites"},
        privacy_pipeline=[],
    )
    status = draw_audit_picture(job_id=job.pk, spec_digest=job.spec_digest)
    assert "drawn from digits" in status
    picture = AuditPicture.objects.get(job=job, spec_digest=job.spec_digest)
    assert picture.dataset_key == "digits" and picture.note == ""
    assert picture.drawn_at is not None
    image = Image.open(io.BytesIO(bytes(picture.png)))
    assert image.format == "PNG"
    # An 8x8 record beside its reconstruction, with a gap, at 8 screen pixels a pixel.
    assert image.size == (17 * 8, 8 * 8)
    assert picture.figures["record"] == 0
    # Unfiltered, one record's update of a linear model gives the record away (the analytic
    # attack reads it off the gradient): the picture shows a near-exact copy.
    assert picture.figures["success"] is True
    assert picture.figures["ssim"] > 0.9
    # Idempotent: a second delivery of the task draws nothing anew.
    drawn_at = picture.drawn_at
    assert "already drawn" in draw_audit_picture(job_id=job.pk, spec_digest=job.spec_digest)
    picture.refresh_from_db()
    assert picture.drawn_at == drawn_at


def test_a_job_whose_records_fit_no_bundled_set_gets_a_note_and_no_png(cast):
    from tests.support.agreements import agreement_in_force
    from tests.support.training_fixtures import TrainingScene
    from training.rounds.audit_pictures import draw_audit_picture

    version = agreement_in_force(
        cast, permitted_model_families=[*TERMS["permitted_model_families"], "cnn"]
    )
    datasets = [
        offer_dataset(
            cast, institution, key="scans", modality="image", input_shape=(3, 64, 64), n_classes=2
        )
        for institution in (cast.hospital_a, cast.hospital_b)
    ]
    scene = TrainingScene(cast=cast, version=version, datasets=datasets)
    job = scene.propose(
        dataset_key="scans", model={"name": "small_cnn"}, privacy_audit=True, batch_size=8
    )
    status = draw_audit_picture(job_id=job.pk, spec_digest=job.spec_digest)
    assert "no bundled data set fits" in status
    picture = AuditPicture.objects.get(job=job, spec_digest=job.spec_digest)
    assert bytes(picture.png) == b""
    assert picture.figures is None
    assert picture.note == (
        "No bundled public data set has records of this job's shape ([3, 64, 64] images), so "
        "no picture is drawn; the figures are your sites' own."
    )
    assert cast.client_for("approver").get(picture_url(job)).status_code == 404


def test_a_spec_changed_since_the_task_was_queued_draws_nothing(cast, job):
    from training.rounds.audit_pictures import draw_audit_picture

    status = draw_audit_picture(job_id=job.pk, spec_digest="f" * 64)
    assert "no longer current" in status
    assert not AuditPicture.objects.filter(job=job, spec_digest="f" * 64).exists()


def test_the_table_of_bundled_shapes_matches_the_bundled_data():
    from training.fl.holdout import BUNDLED_DATASETS
    from training.fl.inversion import bundled_records
    from training.rounds.audit_pictures import BUNDLED_SHAPES

    assert {b.key for b in BUNDLED_SHAPES} == set(BUNDLED_DATASETS)
    for shape in BUNDLED_SHAPES:
        data = bundled_records(shape.key, image_model=shape.modality == "image", part="validation")
        assert tuple(data.x.shape[1:]) == shape.input_shape, shape
        assert data.n_classes == shape.n_classes, shape
        assert int(data.y.max()) < shape.n_classes, shape
