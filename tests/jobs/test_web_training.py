"""Training flows through the browser pages (Django test client).

A steward registers the site's data sets, an administrator proposes a job
through the form, each hospital's approver reads the review page and decides,
and the job moves on. Each flow asserts on the rows it leaves, on the ledger
entries (``audit.ledger.events``) and that the chain still verifies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser

import pytest
from django.urls import reverse

from audit.ledger import events as ledger_events
from consortium.governance.models import Notification, Role
from tests.support.agreements import agreement_in_force
from tests.support.factories import MembershipFactory, UserFactory
from tests.support.ledger_checks import ledger_records
from tests.support.training_fixtures import DATASET_KEY
from tests.support.training_pages import (
    AGREEMENT_TITLE,
    dataset_data,
    job_data,
    steward_registers_datasets,
)
from training.jobs.datasets import dataset_register
from training.models import (
    Approval,
    JobParticipant,
    JobState,
    PrivacyReservation,
    SiteDataset,
    TrainingJob,
)

pytestmark = pytest.mark.django_db


# --- helpers ---------------------------------------------------------------------------


def steward_of(cast, institution, username):
    user = UserFactory(username=username)
    MembershipFactory(
        user=user, consortium=cast.consortium, institution=institution, role=Role.DATA_STEWARD
    )
    return user


def text_of(response) -> str:
    """The page's visible text with tags dropped and whitespace collapsed."""
    html = response.content.decode()
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", html)
    import html as html_lib

    return re.sub(r"\s+", " ", html_lib.unescape(text))


def url(name, *args):
    return reverse(f"training:{name}", args=args)


@dataclass
class World:
    cast: object
    version: object

    def client(self, who):
        return self.cast.client_for(who)


@pytest.fixture
def world(cast):
    return World(cast=cast, version=agreement_in_force(cast, title=AGREEMENT_TITLE))


@pytest.fixture
def ready(world):
    """The world with the data set offered at both hospitals."""
    steward_registers_datasets(world.cast)
    return world


def propose_through_form(world, who="admin", **overrides):
    cast = world.cast
    response = world.client(who).post(
        url("job-create", cast.consortium.slug), job_data(cast, **overrides)
    )
    return response


# --- data sets ------------------------------------------------------------------------------


def test_steward_registers_edits_and_removes_a_data_set_at_each_institution(world):
    cast = world.cast
    steward_b = steward_of(cast, cast.hospital_b, "steward_b")
    for user, institution in ((cast.steward, cast.hospital_a), (steward_b, cast.hospital_b)):
        client = cast.client_for(None)
        client.force_login(user)
        new = url("dataset-create", cast.consortium.slug, institution.slug)
        assert client.get(new).status_code == 200
        with ledger_records(ledger_events.DATASET_REGISTERED):
            response = client.post(new, dataset_data())
        assert response.status_code == 302
        assert response.url == url("dataset-list", cast.consortium.slug, institution.slug)
        dataset = SiteDataset.objects.get(institution=institution, key=DATASET_KEY)
        assert dataset.input_shape == [30]
        assert dataset.schema == {"label": "malignant"}
        assert dataset.created_by == user
        page = client.get(response.url)
        assert "Tumour measurements from biopsies" in text_of(page)

    # Image data typed as "1, 28, 28"; bad input comes back with field errors, kept.
    client = cast.client_for("steward")
    new = url("dataset-create", cast.consortium.slug, cast.hospital_a.slug)
    with ledger_records():
        response = client.post(
            new,
            dataset_data(key="scans", modality="image", input_shape="1, 2x, 28", schema="[1]"),
        )
    assert response.status_code == 200
    form = response.context["form"]
    assert "input_shape" in form.errors and "schema" in form.errors
    assert 'value="1, 2x, 28"' in response.content.decode()
    with ledger_records():  # the service's own rule: images have three dimensions
        response = client.post(new, dataset_data(key="scans", modality="image", input_shape="28"))
    assert "three numbers" in " ".join(response.context["form"].errors["input_shape"])
    with ledger_records():  # the key is taken
        response = client.post(new, dataset_data())
    assert "already offers" in " ".join(response.context["form"].errors["key"])
    with ledger_records(ledger_events.DATASET_REGISTERED):
        response = client.post(
            new, dataset_data(key="scans", modality="image", input_shape="1, 28, 28", schema="")
        )
    assert SiteDataset.objects.get(key="scans").input_shape == [1, 28, 28]

    # Edit: the key is fixed, the rest changes.
    edit = url("dataset-edit", cast.consortium.slug, cast.hospital_a.slug, DATASET_KEY)
    assert 'value="30"' in client.get(edit).content.decode()
    with ledger_records(ledger_events.DATASET_UPDATED):
        response = client.post(edit, dataset_data(key="renamed", num_records="800"))
    assert response.status_code == 302
    dataset = SiteDataset.objects.get(institution=cast.hospital_a, key=DATASET_KEY)
    assert dataset.num_records == 800
    assert not SiteDataset.objects.filter(key="renamed").exists()

    # Remove.
    remove = url("dataset-remove", cast.consortium.slug, cast.hospital_a.slug, "scans")
    assert client.get(remove).status_code == 200
    with ledger_records(ledger_events.DATASET_REMOVED):
        assert client.post(remove).status_code == 302
    assert not SiteDataset.objects.filter(key="scans").exists()

    # The institution page links to its data sets.
    detail = reverse(
        "consortium:institution-detail", args=[cast.consortium.slug, cast.hospital_a.slug]
    )
    assert url("dataset-list", cast.consortium.slug, cast.hospital_a.slug) in (
        client.get(detail).content.decode()
    )


def test_a_data_set_in_use_cannot_be_removed(ready):
    cast = ready.cast
    propose_through_form(ready)
    remove = url("dataset-remove", cast.consortium.slug, cast.hospital_a.slug, DATASET_KEY)
    with ledger_records():
        response = cast.client_for("steward").post(remove)
    assert response.status_code == 200
    assert "uses 'tumours'" in text_of(response)
    assert SiteDataset.objects.filter(institution=cast.hospital_a, key=DATASET_KEY).exists()


# --- proposing ----------------------------------------------------------------------------


def test_admin_proposes_through_the_form_and_approvers_are_told(
    ready, mailoutbox, django_capture_on_commit_callbacks
):
    cast = ready.cast
    client = ready.client("admin")
    page = client.get(url("job-create", cast.consortium.slug))
    assert page.status_code == 200
    html = page.content.decode()
    # The pipeline box comes prefilled with a pipeline a typical agreement accepts,
    # the help table lists every filter, the dataset key offers the keys registered.
    assert "partial_sharing" in html and "percentile_clipping" in html
    for name in ("exclude_layers", "laplace_noise", "svt", "dp_sgd"):
        assert f"<code>{name}</code>" in html
    assert '<datalist id="dataset-keys"><option value="tumours">' in html
    assert 'name="momentum_restart" id="id_momentum_restart" checked' in html
    assert '<label for="id_rounds">' in html

    with (
        django_capture_on_commit_callbacks(execute=True),
        ledger_records(ledger_events.JOB_PROPOSED, ledger_events.JOB_STATE_CHANGED),
    ):
        response = propose_through_form(ready)
    job = TrainingJob.objects.get()
    assert response.status_code == 302
    assert response.url == url("job-detail", cast.consortium.slug, job.pk)
    assert job.state == JobState.AWAITING_APPROVAL
    assert job.proposer == cast.admin
    assert job.agreement_version == ready.version
    assert job.spec["momentum_restart"] is True
    assert job.spec["min_participants"] == 2
    assert [f["filter"] for f in job.spec["privacy_pipeline"]] == [
        "partial_sharing",
        "percentile_clipping",
        "gaussian_noise",
    ]
    assert set(job.participants.values_list("institution__slug", flat=True)) == {
        cast.hospital_a.slug,
        cast.hospital_b.slug,
    }
    reservations = PrivacyReservation.objects.filter(job=job)
    assert reservations.count() == 2
    assert all(r.status == PrivacyReservation.Status.RESERVED for r in reservations)

    for approver in (cast.approver, cast.approver_b):
        notification = Notification.objects.get(user=approver)
        assert "needs your institution's approval" in notification.message
        assert notification.url == url("job-detail", cast.consortium.slug, job.pk)
    assert len(mailoutbox) == 1
    assert set(mailoutbox[0].to) == {cast.approver.email, cast.approver_b.email}

    # The job page shows the spec readably, the pipeline in words, the ledger history.
    page = client.get(response.url)
    text = text_of(page)
    assert "Awaiting approval" in text
    assert "Share only the 40% of coordinates with the largest change (top-k)" in text
    assert job.spec_digest in text
    assert "job.proposed" in text and "job.state_changed" in text
    assert f"version {ready.version.number}" in text
    assert "awaited" in text

    # The approver's top bar counts the unread notification.
    assert "Notifications (1 unread)" in text_of(ready.client("approver").get(response.url))


def _refused(ready, expected_problems, **overrides):
    """Propose through the form; assert the refusal box, kept input and no job."""
    cast = ready.cast
    with ledger_records(ledger_events.JOB_PROPOSAL_REFUSED):
        response = propose_through_form(ready, **overrides)
    assert response.status_code == 200
    text = text_of(response)
    assert "This job breaks the agreement in force" in text
    for term, institution, phrase in expected_problems:
        problems = response.context["compliance"].problems
        assert any(
            p.term == term and p.institution == institution and phrase in p.message
            for p in problems
        ), problems
        assert f"Term: {term}" in text
        if institution:
            assert f"Institution: {institution}" in text
        assert phrase in text
    assert not TrainingJob.objects.exists()
    assert not PrivacyReservation.objects.exists()
    # Everything typed is still in the form.
    form = response.context["form"]
    typed = job_data(cast, **overrides)
    for name in ("title", "dataset_key", "rounds", "privacy_pipeline", "model_params"):
        assert form[name].value() == typed[name], name
    html = response.content.decode()
    assert 'value="Tumour classifier"' in html
    return response


def test_a_job_without_partial_sharing_breaks_the_shared_fraction_term(ready):
    pipeline = [{"filter": "gaussian_noise", "noise_multiplier": 4.0, "clip_norm": 1.0}]
    _refused(
        ready,
        [("shared_fraction", "", "allows at most 40%")],
        privacy_pipeline=json.dumps(pipeline),
    )


def test_a_participant_without_the_data_set_is_named(world):
    cast = world.cast
    dataset_register(
        acting_user=cast.steward,
        institution=cast.hospital_a,
        key="only-a",
        description="Only at A",
        modality="tabular",
        num_records=500,
        input_shape=[30],
        n_classes=2,
    )
    _refused(
        world,
        [("dataset", cast.hospital_b.slug, "offers no data set with the key 'only-a'")],
        dataset_key="only-a",
    )


def test_too_many_rounds_break_the_budget_with_the_projection(ready):
    response = _refused(
        ready, [("budget", ready.cast.hospital_a.slug, "projected ε")], rounds="200"
    )
    text = text_of(response)
    assert "its cap 8" in text and "already spent" in text


def test_spec_errors_come_back_next_to_their_fields(ready):
    with ledger_records():
        response = propose_through_form(ready, rounds="5000", lr="50", min_participants="3")
    assert response.status_code == 200
    form = response.context["form"]
    assert "from 1 to 1000" in " ".join(form.errors["rounds"])
    assert form.errors["lr"]
    assert "at most the number of participants" in " ".join(form.errors["min_participants"])
    summary = response.context["spec_errors"]
    assert any(s.startswith("rounds:") for s in summary)
    assert any(s.startswith("optimizer.lr:") for s in summary)
    assert "Nothing was saved" in text_of(response)
    assert form["rounds"].value() == "5000"
    # Malformed JSON is caught by the form itself, kept as typed.
    with ledger_records():
        response = propose_through_form(ready, privacy_pipeline='[{"filter": ')
    assert "not valid JSON" in " ".join(response.context["form"].errors["privacy_pipeline"])
    assert response.context["form"]["privacy_pipeline"].value() == '[{"filter": '
    assert not TrainingJob.objects.exists()


# --- reviewing and deciding ----------------------------------------------------------------


def test_each_approver_reviews_and_approves_then_the_proposer_is_told(
    ready, mailoutbox, django_capture_on_commit_callbacks
):
    cast = ready.cast
    propose_through_form(ready, who="researcher")
    job = TrainingJob.objects.get()
    review = url("job-review", cast.consortium.slug, job.pk)

    inbox = ready.client("approver").get(url("approval-inbox", cast.consortium.slug))
    assert [r.job.pk for r in inbox.context["pending"]] == [job.pk]
    assert review in inbox.content.decode()

    for who, institution in (("approver", cast.hospital_a), ("approver_b", cast.hospital_b)):
        client = ready.client(who)
        page = client.get(review)
        assert page.status_code == 200
        text = text_of(page)
        reservation = PrivacyReservation.objects.get(job=job, institution=institution)
        assert (
            f"Your data set {DATASET_KEY} (500 records, Tumours at {institution.name}) "
            "would be used to train mlp" in text
        )
        assert "for 5 rounds of 1 local epoch" in text
        assert "What leaves your site: only model updates, after these filters, in order:" in text
        assert "Share only the 40% of coordinates with the largest change (top-k)" in text
        assert "Clip every update at its 95th percentile of absolute values" in text
        assert "Add Gaussian noise with noise multiplier 4.0" in text
        assert "At most 40% of the model is shared per round." in text
        assert f"this job would spend ε {reservation.epsilon:.2f}" in text
        assert "of its cap 8.00 at δ 0.00001" in text
        assert f"Proposed by {job.proposer_repr} on" in text
        assert f"Agreement: Tumour DUA version {ready.version.number}." in text
        form = page.context["form"]
        assert form.initial["spec_digest"] == job.spec_digest
        data = {
            "institution": institution.pk,
            "decision": "approved",
            "reason": "",
            "spec_digest": job.spec_digest,
            "agreement_version_id": job.agreement_version_id,
        }
        last = who == "approver_b"
        events = [ledger_events.JOB_DECISION] + ([ledger_events.JOB_STATE_CHANGED] if last else [])
        with django_capture_on_commit_callbacks(execute=True), ledger_records(*events):
            response = client.post(review, data)
        assert response.status_code == 302
        assert response.url == url("job-detail", cast.consortium.slug, job.pk)

    job.refresh_from_db()
    assert job.state == JobState.APPROVED
    assert Approval.objects.filter(job=job, decision="approved").count() == 2
    assert Notification.objects.filter(
        user=cast.researcher, message__contains="is approved"
    ).exists()
    assert any(cast.researcher.email in m.to and "approved" in m.subject for m in mailoutbox)
    # Nothing left in the inbox; the job page shows both decisions.
    inbox = ready.client("approver").get(url("approval-inbox", cast.consortium.slug))
    assert inbox.context["pending"] == []
    text = text_of(ready.client("auditor").get(url("job-detail", cast.consortium.slug, job.pk)))
    assert "Approved (queued)" in text
    assert text.count("Approved by") == 2


def test_a_rejection_needs_a_reason_and_rejects_the_job(ready, django_capture_on_commit_callbacks):
    cast = ready.cast
    propose_through_form(ready)
    job = TrainingJob.objects.get()
    review = url("job-review", cast.consortium.slug, job.pk)
    client = ready.client("approver_b")
    data = {
        "institution": cast.hospital_b.pk,
        "decision": "rejected",
        "reason": "",
        "spec_digest": job.spec_digest,
        "agreement_version_id": job.agreement_version_id,
    }
    with ledger_records():
        response = client.post(review, data)
    assert response.status_code == 200
    assert response.context["form"].errors["reason"]
    reason = "Our ethics board has not cleared this cohort."
    with (
        django_capture_on_commit_callbacks(execute=True),
        ledger_records(ledger_events.JOB_DECISION, ledger_events.JOB_STATE_CHANGED),
    ):
        response = client.post(review, {**data, "reason": reason})
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.state == JobState.REJECTED
    assert reason in job.end_reason
    assert not PrivacyReservation.objects.filter(job=job, status="reserved").exists()
    text = text_of(ready.client("admin").get(url("job-detail", cast.consortium.slug, job.pk)))
    assert "Rejected" in text and reason in text
    assert Notification.objects.filter(user=cast.admin, message__contains=reason).exists()


def test_a_stale_decision_is_refused_and_the_approver_sees_the_new_spec(ready):
    cast = ready.cast
    propose_through_form(ready)
    job = TrainingJob.objects.get()
    review = url("job-review", cast.consortium.slug, job.pk)
    client = ready.client("approver")
    page = client.get(review)
    shown_digest = page.context["form"].initial["spec_digest"]
    shown_version = page.context["form"].initial["agreement_version_id"]

    # The proposer changes the job meanwhile (6 rounds instead of 5).
    edit = url("job-edit", cast.consortium.slug, job.pk)
    edit_page = ready.client("admin").get(edit)
    assert "voids the approvals given so far" in text_of(edit_page)
    assert edit_page.context["form"]["rounds"].value() == 5
    with ledger_records(ledger_events.JOB_SPEC_CHANGED):
        response = ready.client("admin").post(edit, job_data(cast, rounds="6", action="save"))
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.spec["rounds"] == 6 and job.spec_digest != shown_digest

    with ledger_records():
        response = client.post(
            review,
            {
                "institution": cast.hospital_a.pk,
                "decision": "approved",
                "reason": "Looks fine to us.",
                "spec_digest": shown_digest,
                "agreement_version_id": shown_version,
            },
        )
    assert response.status_code == 200
    text = text_of(response)
    assert "This job or the agreement changed since you opened it" in text
    assert "please review again" in text
    assert "for 6 rounds" in text
    assert not Approval.objects.exists()
    form = response.context["form"]
    assert not form.is_bound
    assert form.initial["spec_digest"] == job.spec_digest
    assert f'value="{job.spec_digest}"' in response.content.decode()
    assert form.initial["reason"] == "Looks fine to us."  # nothing typed is lost

    # Deciding again on what is shown now counts.
    with ledger_records(ledger_events.JOB_DECISION):
        response = client.post(
            review,
            {
                "institution": cast.hospital_a.pk,
                "decision": "approved",
                "spec_digest": job.spec_digest,
                "agreement_version_id": job.agreement_version_id,
            },
        )
    assert response.status_code == 302
    assert Approval.objects.get().spec_digest == job.spec_digest


def test_an_approval_voided_by_a_change_is_listed_as_superseded(ready):
    cast = ready.cast
    propose_through_form(ready)
    job = TrainingJob.objects.get()
    ready.client("approver").post(
        url("job-review", cast.consortium.slug, job.pk),
        {
            "institution": cast.hospital_a.pk,
            "decision": "approved",
            "spec_digest": job.spec_digest,
            "agreement_version_id": job.agreement_version_id,
        },
    )
    ready.client("admin").post(
        url("job-edit", cast.consortium.slug, job.pk), job_data(cast, rounds="6", action="save")
    )
    page = ready.client("approver").get(url("job-detail", cast.consortium.slug, job.pk))
    row = next(
        r for r in page.context["participants"] if r["participant"].institution == cast.hospital_a
    )
    assert row["decision"] is None and len(row["superseded"]) == 1
    assert "superseded" in text_of(page)
    # And the job is back in the approver's inbox.
    inbox = ready.client("approver").get(url("approval-inbox", cast.consortium.slug))
    assert [r.job.pk for r in inbox.context["pending"]] == [job.pk]


# --- cancelling, drafts, notifications -------------------------------------------------------


def test_the_proposer_cancels_with_a_reason(ready, django_capture_on_commit_callbacks):
    cast = ready.cast
    propose_through_form(ready, who="researcher")
    job = TrainingJob.objects.get()
    cancel = url("job-cancel", cast.consortium.slug, job.pk)
    client = ready.client("researcher")
    assert client.get(cancel).status_code == 200
    with ledger_records():
        response = client.post(cancel, {"reason": ""})
    assert response.status_code == 200 and response.context["form"].errors["reason"]
    with (
        django_capture_on_commit_callbacks(execute=True),
        ledger_records(ledger_events.JOB_STATE_CHANGED),
    ):
        response = client.post(cancel, {"reason": "The cohort definition changed."})
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED
    assert job.end_reason == "The cohort definition changed."
    assert set(PrivacyReservation.objects.values_list("status", flat=True)) == {"released"}
    assert Notification.objects.filter(
        user=cast.approver, message__contains="was cancelled"
    ).exists()
    text = text_of(client.get(url("job-detail", cast.consortium.slug, job.pk)))
    assert "The cohort definition changed." in text
    assert "Cancel the job" not in text  # no action offered on a terminal job


def test_a_draft_is_saved_then_submitted(ready, django_capture_on_commit_callbacks):
    cast = ready.cast
    with ledger_records(ledger_events.JOB_DRAFTED):
        response = propose_through_form(ready, who="researcher", action="draft")
    job = TrainingJob.objects.get()
    assert response.status_code == 302
    assert job.state == JobState.DRAFT
    assert not JobParticipant.objects.exists() and not PrivacyReservation.objects.exists()
    assert not Notification.objects.exists()
    detail = url("job-detail", cast.consortium.slug, job.pk)
    assert "Submit for approval" in text_of(ready.client("researcher").get(detail))
    assert "Submit for approval" not in text_of(ready.client("approver").get(detail))

    # Edit the draft, then submit it.
    with ledger_records(ledger_events.JOB_SPEC_CHANGED):
        ready.client("researcher").post(
            url("job-edit", cast.consortium.slug, job.pk),
            job_data(cast, title="Tumour classifier v2", action="save"),
        )
    job.refresh_from_db()
    assert job.title == "Tumour classifier v2"
    with (
        django_capture_on_commit_callbacks(execute=True),
        ledger_records(ledger_events.JOB_PROPOSED, ledger_events.JOB_STATE_CHANGED),
    ):
        response = ready.client("researcher").post(url("job-submit", cast.consortium.slug, job.pk))
    assert response.status_code == 302 and response.url == detail
    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL
    assert PrivacyReservation.objects.filter(job=job).count() == 2
    assert Notification.objects.filter(user=cast.approver).exists()


def test_submitting_a_draft_that_breaks_the_agreement_says_why(ready):
    cast = ready.cast
    propose_through_form(ready, action="draft", rounds="200")
    job = TrainingJob.objects.get()
    with ledger_records(ledger_events.JOB_PROPOSAL_REFUSED):
        response = ready.client("admin").post(
            url("job-submit", cast.consortium.slug, job.pk), follow=True
        )
    text = text_of(response)
    assert "This job breaks the agreement in force" in text and "projected ε" in text
    job.refresh_from_db()
    assert job.state == JobState.DRAFT


def test_notifications_page_and_mark_all_read(ready):
    cast = ready.cast
    propose_through_form(ready)
    client = ready.client("approver")
    page = client.get(url("notification-list"))
    assert page.status_code == 200
    assert "Notifications (1 unread)" in text_of(page)
    assert 'class="unread"' in page.content.decode()
    response = client.post(url("notification-list"))
    assert response.status_code == 302
    assert not Notification.objects.filter(user=cast.approver, read_at__isnull=True).exists()
    page = client.get(url("notification-list"))
    assert "Notifications (0 unread)" in text_of(page)
    assert 'class="unread"' not in page.content.decode()


def test_job_list_filters_by_state_and_links_from_the_dashboard(ready):
    cast = ready.cast
    propose_through_form(ready, title="Proposed one")
    propose_through_form(ready, title="Drafted one", action="draft")
    client = ready.client("auditor")
    jobs = url("job-list", cast.consortium.slug)
    text = text_of(client.get(jobs))
    assert "Proposed one" in text and "Drafted one" in text
    text = text_of(client.get(jobs, {"state": "draft"}))
    assert "Drafted one" in text and "Proposed one" not in text
    dashboard = client.get(reverse("consortium:consortium-detail", args=[cast.consortium.slug]))
    assert jobs in dashboard.content.decode()
    assert url("approval-inbox", cast.consortium.slug) in dashboard.content.decode()


class _Labels(HTMLParser):
    """Collects the ids of visible form controls and the targets of <label for>."""

    def __init__(self):
        super().__init__()
        self.controls, self.labelled = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "label" and attrs.get("for"):
            self.labelled.add(attrs["for"])
        elif tag in ("input", "select", "textarea"):
            hidden = attrs.get("type") in ("hidden", "submit")
            if not hidden and attrs.get("name") != "csrfmiddlewaretoken":
                self.controls.append(attrs.get("id") or attrs.get("name"))


def test_every_field_of_the_new_pages_has_a_label(ready):
    cast = ready.cast
    propose_through_form(ready)
    job = TrainingJob.objects.get()
    slug = cast.consortium.slug
    pages = [
        ("admin", url("job-create", slug)),
        ("admin", url("job-edit", slug, job.pk)),
        ("admin", url("job-cancel", slug, job.pk)),
        ("admin", url("job-list", slug)),
        ("approver", url("job-review", slug, job.pk)),
        ("steward", url("dataset-create", slug, cast.hospital_a.slug)),
        ("steward", url("dataset-edit", slug, cast.hospital_a.slug, DATASET_KEY)),
    ]
    for who, page in pages:
        parser = _Labels()
        parser.feed(ready.client(who).get(page).content.decode())
        assert parser.controls, page
        unlabelled = [c for c in parser.controls if c not in parser.labelled]
        assert not unlabelled, (page, unlabelled)
