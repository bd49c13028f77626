"""The training-job governance flow through the REST API: data sets, proposals
refused for each term of the agreement (with the problems a client can act on),
each approver's decision, stale decisions, drafts, cancellation; every action's
ledger entries, and a chain that still verifies."""

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from consortium.governance.models import Notification
from consortium.governance.services.agreements import agreement_amend, agreement_version_publish
from consortium.governance.services.withdrawals import consent_withdraw
from tests.support.agreements import sign
from tests.support.api_client import api
from tests.support.job_api import (
    DATASET,
    GAUSSIAN,
    agreement_and_datasets_in_force,
    decide_body,
    logistic_spec,
    propose_logistic,
)
from tests.support.ledger_checks import LedgerWatch
from training.jobs.datasets import dataset_register
from training.jobs.proposals import job_create_draft
from training.models import (
    Approval,
    JobParticipant,
    JobState,
    PrivacyReservation,
    SiteDataset,
    TrainingJob,
)


@pytest.fixture
def version(cast):
    return agreement_and_datasets_in_force(cast)


def post_job(cast, user=None, draft=False, **spec_overrides):
    return api(user or cast.researcher).post(
        "/api/jobs/",
        {
            "consortium": cast.consortium.slug,
            "title": "Tumour classifier",
            "spec": logistic_spec(**spec_overrides),
            "draft": draft,
        },
        format="json",
    )


# --- Site data sets -------------------------------------------------------------------


def test_steward_registers_updates_and_removes_a_data_set(cast, version):
    watch = LedgerWatch()
    body = {
        **DATASET,
        "institution": cast.hospital_a.slug,
        "key": "scans",
        "schema": {"label": "malignant"},
    }
    response = api(cast.steward).post("/api/datasets/", body, format="json")
    assert response.status_code == 201, response.json()
    data = response.json()
    assert data["institution"] == "hospital-a" and data["key"] == "scans"
    assert data["input_shape"] == [30] and data["schema"] == {"label": "malignant"}
    watch.assert_events(ledger_events.DATASET_REGISTERED)

    watch = LedgerWatch()
    response = api(cast.steward).patch(
        f"/api/datasets/{data['id']}/", {"num_records": 1200}, format="json"
    )
    assert response.status_code == 200, response.json()
    assert response.json()["num_records"] == 1200
    watch.assert_events(ledger_events.DATASET_UPDATED)

    watch = LedgerWatch()
    response = api(cast.steward).delete(f"/api/datasets/{data['id']}/")
    assert response.status_code == 204
    assert not SiteDataset.objects.filter(pk=data["id"]).exists()
    watch.assert_events(ledger_events.DATASET_REMOVED)


def test_data_set_list_filters(cast, version):
    client = api(cast.auditor)
    assert client.get("/api/datasets/").json()["count"] == 2
    only_a = client.get("/api/datasets/", {"institution": "hospital-a"}).json()
    assert [d["institution"] for d in only_a["results"]] == ["hospital-a"]
    assert client.get("/api/datasets/", {"key": "nothing"}).json()["count"] == 0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_classes": 1}, "n_classes"),
        ({"input_shape": [3, 32, 32]}, "input_shape"),
        ({"key": "Bad Key"}, "key"),
        ({"num_records": 0}, "num_records"),
        ({"modality": "audio"}, "modality"),
    ],
)
def test_bad_data_set_is_400_naming_the_field(cast, version, overrides, field):
    watch = LedgerWatch()
    body = {**DATASET, "institution": cast.hospital_a.slug, "key": "new-set", **overrides}
    response = api(cast.steward).post("/api/datasets/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()
    watch.assert_events()


def test_duplicate_data_set_key_is_409(cast, version):
    body = {**DATASET, "institution": cast.hospital_a.slug}
    response = api(cast.steward).post("/api/datasets/", body, format="json")
    assert response.status_code == 409
    assert "already offers" in response.json()["detail"]


def test_a_data_set_in_use_cannot_be_removed(cast, version):
    job = propose_logistic(cast)
    dataset = SiteDataset.objects.get(institution=cast.hospital_a, key="tumours")
    watch = LedgerWatch()
    response = api(cast.steward).delete(f"/api/datasets/{dataset.pk}/")
    assert response.status_code == 409
    assert f"Job #{job.pk}" in response.json()["detail"]
    assert SiteDataset.objects.filter(pk=dataset.pk).exists()
    watch.assert_events()


# --- Proposing --------------------------------------------------------------------------


def test_propose_a_job(cast, version):
    watch = LedgerWatch()
    response = post_job(cast)
    assert response.status_code == 201, response.json()
    data = response.json()
    job = TrainingJob.objects.get(pk=data["id"])
    assert job.state == JobState.AWAITING_APPROVAL
    assert data["state"] == "awaiting_approval"
    assert data["spec"] == job.spec and data["spec"]["participants"] == ["hospital-a", "hospital-b"]
    assert data["spec_digest"] == job.spec_digest
    assert data["agreement_version"] == version.pk and data["agreement_version_number"] == 1
    assert data["proposer_repr"] == job.proposer_repr and data["approval_deadline"]
    assert [(p["institution"], p["status"], p["decision"]) for p in data["participants"]] == [
        ("hospital-a", "active", None),
        ("hospital-b", "active", None),
    ]
    assert [r["institution"] for r in data["reservations"]] == ["hospital-a", "hospital-b"]
    assert all(r["epsilon"] == pytest.approx(5.02, abs=0.01) for r in data["reservations"])
    assert all(r["status"] == "reserved" for r in data["reservations"])
    proposed, changed = watch.assert_events(
        ledger_events.JOB_PROPOSED, ledger_events.JOB_STATE_CHANGED
    )
    assert f'"spec_digest":"{job.spec_digest}"' in proposed.payload_text
    # Each participant's approver is told.
    assert Notification.objects.filter(user__in=[cast.approver, cast.approver_b]).count() == 2


def test_retrieve_matches_what_the_list_shows(cast, version):
    job = propose_logistic(cast)
    client = api(cast.auditor)
    detail = client.get(f"/api/jobs/{job.pk}/").json()
    row = client.get("/api/jobs/").json()["results"][0]
    assert row["id"] == detail["id"] == job.pk
    for field in ["title", "state", "spec_digest", "agreement_version", "approval_deadline"]:
        assert row[field] == detail[field], field
    assert "spec" not in row and "reservations" not in row


def test_job_list_filters(cast, version):
    job = propose_logistic(cast)
    job_create_draft(
        acting_user=cast.researcher, consortium=cast.consortium, title="Draft", spec=logistic_spec()
    )
    client = api(cast.admin)
    assert client.get("/api/jobs/").json()["count"] == 2
    awaiting = client.get("/api/jobs/", {"state": "awaiting_approval"}).json()
    assert [j["id"] for j in awaiting["results"]] == [job.pk]
    assert client.get("/api/jobs/", {"consortium": "elsewhere"}).json()["count"] == 0
    assert client.get("/api/jobs/", {"state": "nonsense"}).status_code == 400


def problems_of(response):
    assert response.status_code == 409, response.json()
    body = response.json()
    assert body["code"] == "not_compliant"
    assert body["detail"]
    return body["problems"]


@pytest.mark.parametrize(
    "overrides, term, institutions",
    [
        (
            {
                "privacy_pipeline": [
                    {"filter": "partial_sharing", "fraction": 0.8},
                    GAUSSIAN,
                ]
            },
            "shared_fraction",
            [""],
        ),
        (
            {"privacy_pipeline": [{"filter": "partial_sharing", "fraction": 0.4}]},
            "dp_mechanism",
            [""],
        ),
    ],
    ids=["shared_fraction", "dp_mechanism"],
)
def test_proposal_breaking_a_term_is_409_with_problems(
    cast, version, overrides, term, institutions
):
    watch = LedgerWatch()
    problems = problems_of(post_job(cast, **overrides))
    assert [(p["term"], p["institution"]) for p in problems] == [(term, i) for i in institutions]
    assert all(p["message"] for p in problems)
    assert not TrainingJob.objects.exists()
    assert not PrivacyReservation.objects.exists()
    (refused,) = watch.assert_events(ledger_events.JOB_PROPOSAL_REFUSED)
    assert f'"term":"{term}"' in refused.payload_text


def test_proposal_without_the_data_set_names_the_institution(cast, version):
    dataset_register(
        acting_user=cast.steward,
        institution=cast.hospital_a,
        **{**DATASET, "key": "only-at-a"},
    )
    watch = LedgerWatch()
    problems = problems_of(post_job(cast, dataset_key="only-at-a"))
    assert [(p["term"], p["institution"]) for p in problems] == [("dataset", "hospital-b")]
    assert "Hospital B" in problems[0]["message"] and "only-at-a" in problems[0]["message"]
    watch.assert_events(ledger_events.JOB_PROPOSAL_REFUSED)


def test_proposal_over_budget_gives_projection_cap_and_spent(cast, version):
    first = propose_logistic(cast)  # ε ≈ 5.02 at each site
    watch = LedgerWatch()
    heavier = [
        {"filter": "partial_sharing", "fraction": 0.4},
        {**GAUSSIAN, "noise_multiplier": 2.5},  # ε ≈ 6.21 alone, ≈ 8.48 with the first
    ]
    problems = problems_of(post_job(cast, privacy_pipeline=heavier))
    assert [(p["term"], p["institution"]) for p in problems] == [
        ("budget", "hospital-a"),
        ("budget", "hospital-b"),
    ]
    message = problems[0]["message"]
    assert "projected ε 8.48" in message
    assert "cap 8.00" in message
    assert "already spent 5.02" in message
    assert TrainingJob.objects.get() == first
    watch.assert_events(ledger_events.JOB_PROPOSAL_REFUSED)


def test_proposal_with_a_withdrawn_institution_is_refused(cast, version):
    consent_withdraw(
        acting_user=cast.approver_b,
        agreement=version.agreement,
        institution=cast.hospital_b,
        reason="Our ethics board revoked approval.",
    )
    watch = LedgerWatch()
    problems = problems_of(post_job(cast))
    assert [(p["term"], p["institution"]) for p in problems] == [("withdrawn", "hospital-b")]
    watch.assert_events(ledger_events.JOB_PROPOSAL_REFUSED)
    # Without it, the job goes ahead.
    response = post_job(cast, participants=["hospital-a"])
    assert response.status_code == 201, response.json()


def test_proposal_with_an_unsigned_amendment_names_who_has_not_signed(cast, version):
    """An amendment signed by hospital A only: no agreement is in force, and the
    refusal names hospital B's missing signature."""
    amendment = agreement_amend(acting_user=cast.admin, agreement=version.agreement)
    amendment = agreement_version_publish(acting_user=cast.admin, version=amendment)
    sign(amendment, cast.approver, cast.hospital_a)
    watch = LedgerWatch()
    problems = problems_of(post_job(cast))
    assert ("signature", "hospital-b") in [(p["term"], p["institution"]) for p in problems]
    assert ("signature", "hospital-a") not in [(p["term"], p["institution"]) for p in problems]
    signature = next(p for p in problems if p["term"] == "signature")
    assert "Hospital B" in signature["message"] and "version 2" in signature["message"]
    watch.assert_events(ledger_events.JOB_PROPOSAL_REFUSED)


def test_proposal_without_an_agreement_in_force(cast):
    dataset_register(acting_user=cast.steward, institution=cast.hospital_a, **DATASET)
    problems = problems_of(post_job(cast))
    assert [p["term"] for p in problems] == ["agreement"]


def test_malformed_spec_is_400_with_paths(cast, version):
    watch = LedgerWatch()
    response = post_job(
        cast,
        rounds=0,
        optimizer={"name": "sgd", "lr": "fast"},
        participants=["hospital-a", "Hospital B"],
        colour="blue",
    )
    assert response.status_code == 400
    errors = response.json()["spec"]
    paths = {e.split(": ", 1)[0] for e in errors}
    assert {"rounds", "optimizer.lr", "participants[1]", "colour"} <= paths
    assert "rounds: must be an integer from 1 to 1000" in errors
    assert not TrainingJob.objects.exists()
    watch.assert_events()


def test_model_that_does_not_fit_the_purpose_is_a_spec_error(cast, version):
    response = post_job(cast, model={"name": "small_cnn"}, purpose="segmentation")
    assert response.status_code == 400
    assert any(e.startswith("model.name: ") for e in response.json()["spec"])


def test_spec_must_be_an_object(cast, version):
    response = api(cast.researcher).post(
        "/api/jobs/",
        {"consortium": cast.consortium.slug, "title": "T", "spec": [1, 2]},
        format="json",
    )
    assert response.status_code == 400
    assert "spec" in response.json()


# --- Deciding ---------------------------------------------------------------------------


def test_every_approver_approves_and_the_job_is_approved(cast, version):
    job = propose_logistic(cast)
    watch = LedgerWatch()
    response = api(cast.approver).post(
        f"/api/jobs/{job.pk}/decide/", decide_body(job, cast.hospital_a), format="json"
    )
    assert response.status_code == 201, response.json()
    data = response.json()
    assert data["decision"] == "approved" and data["valid"] is True
    assert data["institution"] == "hospital-a" and data["job_state"] == "awaiting_approval"
    watch.assert_events(ledger_events.JOB_DECISION)

    inbox_b = api(cast.approver_b).get("/api/approvals/inbox/").json()
    assert [(i["job"], i["institutions"]) for i in inbox_b["results"]] == [(job.pk, ["hospital-b"])]
    watch = LedgerWatch()
    response = api(cast.approver_b).post(
        f"/api/jobs/{job.pk}/decide/", decide_body(job, cast.hospital_b), format="json"
    )
    assert response.status_code == 201, response.json()
    assert response.json()["job_state"] == "approved"
    _decision, changed = watch.assert_events(
        ledger_events.JOB_DECISION, ledger_events.JOB_STATE_CHANGED
    )
    assert '"to_state":"approved"' in changed.payload_text
    job.refresh_from_db()
    assert job.state == JobState.APPROVED
    assert api(cast.approver_b).get("/api/approvals/inbox/").json()["count"] == 0

    detail = api(cast.auditor).get(f"/api/jobs/{job.pk}/").json()
    assert [p["decision"]["decision"] for p in detail["participants"]] == ["approved"] * 2


def test_a_rejection_with_its_reason_rejects_the_job(cast, version):
    job = propose_logistic(cast)
    client = api(cast.approver_b)
    no_reason = client.post(
        f"/api/jobs/{job.pk}/decide/",
        decide_body(job, cast.hospital_b, "rejected"),
        format="json",
    )
    assert no_reason.status_code == 400 and "reason" in no_reason.json()
    watch = LedgerWatch()
    response = client.post(
        f"/api/jobs/{job.pk}/decide/",
        decide_body(job, cast.hospital_b, "rejected", "Too few rounds to be useful."),
        format="json",
    )
    assert response.status_code == 201, response.json()
    assert response.json()["job_state"] == "rejected"
    watch.assert_events(ledger_events.JOB_DECISION, ledger_events.JOB_STATE_CHANGED)
    job.refresh_from_db()
    assert job.state == JobState.REJECTED and "Too few rounds" in job.end_reason
    # The budget it reserved is given back.
    assert set(job.reservations.values_list("status", flat=True)) == {"released"}
    # No more decisions on a rejected job.
    late = api(cast.approver).post(
        f"/api/jobs/{job.pk}/decide/", decide_body(job, cast.hospital_a), format="json"
    )
    assert late.status_code == 409 and late.json()["code"] == "invalid_transition"


def test_a_stale_decision_is_409_and_records_nothing(cast, version):
    job = propose_logistic(cast)
    seen = decide_body(job, cast.hospital_a)
    watch = LedgerWatch()
    response = api(cast.researcher).patch(
        f"/api/jobs/{job.pk}/", {"spec": logistic_spec(rounds=8)}, format="json"
    )
    assert response.status_code == 200, response.json()
    assert response.json()["spec_digest"] != job.spec_digest
    watch.assert_events(ledger_events.JOB_SPEC_CHANGED)

    watch = LedgerWatch()
    response = api(cast.approver).post(f"/api/jobs/{job.pk}/decide/", seen, format="json")
    assert response.status_code == 409
    assert response.json()["code"] == "stale"
    assert not Approval.objects.exists()
    watch.assert_events()


def test_a_change_voids_earlier_approvals_in_the_history(cast, version):
    job = propose_logistic(cast)
    api(cast.approver).post(
        f"/api/jobs/{job.pk}/decide/", decide_body(job, cast.hospital_a), format="json"
    )
    api(cast.researcher).patch(
        f"/api/jobs/{job.pk}/", {"spec": logistic_spec(rounds=8)}, format="json"
    )
    job.refresh_from_db()
    api(cast.approver).post(
        f"/api/jobs/{job.pk}/decide/", decide_body(job, cast.hospital_a), format="json"
    )
    history = api(cast.auditor).get(f"/api/jobs/{job.pk}/approvals/").json()
    assert history["count"] == 2
    assert [(a["institution"], a["valid"]) for a in history["results"]] == [
        ("hospital-a", True),
        ("hospital-a", False),
    ]
    assert history["results"][0]["spec_digest"] == job.spec_digest
    assert history["results"][0]["agreement_version_number"] == 1
    assert verify_chain().ok


def test_an_approver_decides_only_for_their_own_institution(cast, version):
    job = propose_logistic(cast)
    watch = LedgerWatch()
    response = api(cast.approver).post(
        f"/api/jobs/{job.pk}/decide/", decide_body(job, cast.hospital_b), format="json"
    )
    # The caller sees Hospital B (a fellow member) but may not act for it: 403, not a 400.
    assert response.status_code == 403
    assert response.json()["code"] == "not_approver"
    assert "Only an approver of Hospital B" in response.json()["detail"]
    watch.assert_events()


def test_a_non_compliant_change_is_409_with_problems(cast, version):
    job = propose_logistic(cast)
    watch = LedgerWatch()
    response = api(cast.researcher).patch(
        f"/api/jobs/{job.pk}/",
        {"spec": logistic_spec(privacy_pipeline=[{"filter": "partial_sharing", "fraction": 0.4}])},
        format="json",
    )
    assert [p["term"] for p in problems_of(response)] == ["dp_mechanism"]
    unchanged = TrainingJob.objects.get(pk=job.pk)
    assert (unchanged.spec_digest, unchanged.state) == (job.spec_digest, job.state)
    assert unchanged.reservations.filter(status="reserved").count() == 2
    # Nothing changed, but the refused change is on the record.
    (refusal,) = watch.assert_events(ledger_events.JOB_PROPOSAL_REFUSED)
    assert json.loads(refusal.payload_text)["job_id"] == job.pk


# --- Drafts and cancelling ----------------------------------------------------------------


def test_save_a_draft_then_submit_it(cast, version):
    watch = LedgerWatch()
    response = post_job(cast, draft=True)
    assert response.status_code == 201, response.json()
    data = response.json()
    assert data["state"] == "draft" and data["participants"] == [] and data["reservations"] == []
    assert data["agreement_version"] is None
    watch.assert_events(ledger_events.JOB_DRAFTED)

    watch = LedgerWatch()
    response = api(cast.researcher).patch(
        f"/api/jobs/{data['id']}/", {"title": "Tumour classifier, 12 rounds"}, format="json"
    )
    assert response.status_code == 200 and response.json()["title"].endswith("12 rounds")
    watch.assert_events(ledger_events.JOB_SPEC_CHANGED)

    watch = LedgerWatch()
    response = api(cast.researcher).post(f"/api/jobs/{data['id']}/submit/")
    assert response.status_code == 200, response.json()
    assert response.json()["state"] == "awaiting_approval"
    assert len(response.json()["reservations"]) == 2
    watch.assert_events(ledger_events.JOB_PROPOSED, ledger_events.JOB_STATE_CHANGED)

    again = api(cast.researcher).post(f"/api/jobs/{data['id']}/submit/")
    assert again.status_code == 409 and again.json()["code"] == "invalid_transition"


def test_submitting_a_non_compliant_draft_is_409_with_problems(cast, version):
    draft = job_create_draft(
        acting_user=cast.researcher,
        consortium=cast.consortium,
        title="Draft",
        spec=logistic_spec(dataset_key="nowhere"),
    )
    watch = LedgerWatch()
    problems = problems_of(api(cast.researcher).post(f"/api/jobs/{draft.pk}/submit/"))
    assert [(p["term"], p["institution"]) for p in problems] == [
        ("dataset", "hospital-a"),
        ("dataset", "hospital-b"),
    ]
    draft.refresh_from_db()
    assert draft.state == JobState.DRAFT
    watch.assert_events(ledger_events.JOB_PROPOSAL_REFUSED)


def test_cancel_a_job(cast, version):
    job = propose_logistic(cast)
    client = api(cast.researcher)
    assert client.post(f"/api/jobs/{job.pk}/cancel/", {"reason": ""}, format="json").json() == {
        "reason": ["This field may not be blank."]
    }
    watch = LedgerWatch()
    response = client.post(
        f"/api/jobs/{job.pk}/cancel/", {"reason": "The protocol changed."}, format="json"
    )
    assert response.status_code == 200, response.json()
    data = response.json()
    assert data["state"] == "cancelled" and data["end_reason"] == "The protocol changed."
    assert {r["status"] for r in data["reservations"]} == {"released"}
    (changed,) = watch.assert_events(ledger_events.JOB_STATE_CHANGED)
    assert '"to_state":"cancelled"' in changed.payload_text
    again = client.post(f"/api/jobs/{job.pk}/cancel/", {"reason": "Twice."}, format="json")
    assert again.status_code == 409


# --- Inbox, notifications, query counts ------------------------------------------------------


def test_inbox_lists_what_waits_on_the_approver(cast, version):
    job = propose_logistic(cast)
    inbox = api(cast.approver).get("/api/approvals/inbox/").json()
    assert inbox["count"] == 1
    (item,) = inbox["results"]
    assert item == {
        "job": job.pk,
        "title": job.title,
        "consortium": cast.consortium.slug,
        "approval_deadline": item["approval_deadline"],
        "spec_digest": job.spec_digest,
        "agreement_version": version.pk,
        "institutions": ["hospital-a"],
    }
    assert item["approval_deadline"]
    assert api(cast.researcher).get("/api/approvals/inbox/").json()["count"] == 0


def test_notifications_and_mark_read(cast, version):
    first = propose_logistic(cast)
    propose_logistic(cast, rounds=2)
    client = api(cast.approver)
    listed = client.get("/api/notifications/").json()
    assert listed["count"] == 2
    assert all(n["read_at"] is None for n in listed["results"])
    ids = [n["id"] for n in listed["results"] if f"#{first.pk} " in n["message"]]
    watch = LedgerWatch()
    response = client.post("/api/notifications/mark-read/", {"ids": ids}, format="json")
    assert response.json() == {"marked": 1}
    assert client.post("/api/notifications/mark-read/", {}, format="json").json() == {"marked": 1}
    assert client.post("/api/notifications/mark-read/", {}, format="json").json() == {"marked": 0}
    assert all(n["read_at"] for n in client.get("/api/notifications/").json()["results"])
    watch.assert_events()  # reading is not a governance act
    # Another user's ids are not theirs to mark.
    other = Notification.objects.filter(user=cast.approver_b).values_list("pk", flat=True)
    response = api(cast.researcher).post(
        "/api/notifications/mark-read/", {"ids": list(other)}, format="json"
    )
    assert response.json() == {"marked": 0}
    assert Notification.objects.filter(user=cast.approver_b, read_at__isnull=True).count() == 2


def test_job_list_query_count_does_not_grow(cast, version):
    light = [{"filter": "partial_sharing", "fraction": 0.4}, {**GAUSSIAN, "noise_multiplier": 40}]

    def queries():
        client = api(cast.auditor)
        with CaptureQueriesContext(connection) as ctx:
            response = client.get("/api/jobs/")
        assert response.status_code == 200
        return len(ctx.captured_queries), response.json()["count"]

    propose_logistic(cast, rounds=1, privacy_pipeline=light)
    one, count = queries()
    assert count == 1
    for rounds in range(2, 6):
        propose_logistic(cast, rounds=rounds, privacy_pipeline=light)
    five, count = queries()
    assert count == 5
    assert five == one
    assert JobParticipant.objects.count() == 10


def test_every_action_leaves_a_verifiable_chain(cast, version):
    """The whole flow, end to end, then the chain."""
    job_id = post_job(cast).json()["id"]
    job = TrainingJob.objects.get(pk=job_id)
    for user, institution in [(cast.approver, cast.hospital_a), (cast.approver_b, cast.hospital_b)]:
        api(user).post(f"/api/jobs/{job_id}/decide/", decide_body(job, institution), format="json")
    draft_id = post_job(cast, draft=True, rounds=3).json()["id"]
    api(cast.admin).post(f"/api/jobs/{draft_id}/cancel/", {"reason": "Not needed."}, format="json")
    events = list(
        LedgerEntry.objects.filter(event__startswith="job.")
        .order_by("seq")
        .values_list("event", flat=True)
    )
    assert events == [
        ledger_events.JOB_PROPOSED,
        ledger_events.JOB_STATE_CHANGED,
        ledger_events.JOB_DECISION,
        ledger_events.JOB_DECISION,
        ledger_events.JOB_STATE_CHANGED,
        ledger_events.JOB_DRAFTED,
        ledger_events.JOB_STATE_CHANGED,
    ]
    assert verify_chain().ok


def test_schema_describes_the_training_endpoints(tmp_path):
    import yaml
    from django.core.management import call_command

    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    schema = yaml.safe_load(target.read_text())
    for path in [
        "/api/datasets/",
        "/api/datasets/{id}/",
        "/api/jobs/",
        "/api/jobs/{id}/",
        "/api/jobs/{id}/submit/",
        "/api/jobs/{id}/cancel/",
        "/api/jobs/{id}/decide/",
        "/api/jobs/{id}/approvals/",
        "/api/approvals/inbox/",
        "/api/notifications/",
        "/api/notifications/mark-read/",
    ]:
        assert path in schema["paths"], path
    refused = schema["paths"]["/api/jobs/"]["post"]["responses"]["409"]
    assert refused["content"]["application/json"]["schema"]["$ref"].endswith("/ComplianceError")
    problem = schema["components"]["schemas"]["Problem"]["properties"]
    assert set(problem) == {"term", "institution", "message"}
