"""Training services: compliance with the agreement in force, privacy budgets
replayed and reserved, the job state machine, approvals, expiry, withdrawal of
consent and cancellation. Every test ends with a verifiable ledger."""

import datetime as dt
import json

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from consortium.core.errors import ConflictError, ServiceError
from consortium.governance.models import Notification
from consortium.governance.services.withdrawals import consent_withdraw
from tests.support.agreements import add_institution, agreement_in_force, amend, sign
from tests.support.training_fixtures import (
    CHEAP,
    COSTLY,
    TrainingScene,
    make_scene,
    make_spec,
    offer_dataset,
    offer_datasets,
    pipeline,
)
from training.jobs.accounting import PrivacyEvent, epsilon_spent, events_for_pipeline
from training.jobs.approvals import jobs_expire_overdue
from training.jobs.compliance import ComplianceError, check_job_compliance
from training.jobs.proposals import (
    job_cancel,
    job_create_draft,
    job_propose,
    job_submit,
    job_update_spec,
)
from training.jobs.spec import spec_digest, validate_spec
from training.jobs.transitions import TRANSITIONS, InvalidTransition, job_transition
from training.models import (
    Approval,
    JobParticipant,
    JobState,
    PrivacyReservation,
    TrainingJob,
)

A, B, C = "hospital-a", "hospital-b", "hospital-c"
DELTA = 1e-5
CAP = 8.0


@pytest.fixture
def scene(cast) -> TrainingScene:
    """Hospitals A and B under TERMS (ε cap 8 at δ 1e-5), both offering ``tumours``."""
    return make_scene(cast)


@pytest.fixture(autouse=True)
def _ledger_stays_verifiable(db):
    yield
    result = verify_chain()
    assert result.ok, result.summary()


def entries(event, **payload):
    """Ledger entries of ``event`` whose payload holds every ``payload`` item."""
    found = []
    for entry in LedgerEntry.objects.filter(event=event).order_by("seq"):
        data = json.loads(entry.payload_text)
        if all(data.get(k) == v for k, v in payload.items()):
            found.append((entry, data))
    return found


def last_entry():
    entry = LedgerEntry.objects.order_by("-seq").first()
    return entry, json.loads(entry.payload_text)


def events_of(spec: dict, num_records: int = 1000) -> list[PrivacyEvent]:
    spec = validate_spec(spec)
    return events_for_pipeline(
        spec["privacy_pipeline"],
        rounds=spec["rounds"],
        local_epochs=spec["local_epochs"],
        batch_size=spec["batch_size"],
        num_records=num_records,
    )


def live_epsilon(institution) -> float:
    """What the institution has reserved or spent, replayed by the accountant."""
    events = []
    for text in (
        PrivacyReservation.objects.filter(institution=institution)
        .exclude(status=PrivacyReservation.Status.RELEASED)
        .values_list("events_text", flat=True)
    ):
        events.extend(PrivacyEvent.from_json(e) for e in json.loads(text))
    return epsilon_spent(events, delta=DELTA)


def reservation_statuses(job) -> dict[str, str]:
    return {r.institution.slug: r.status for r in job.reservations.select_related("institution")}


# --- Compliance -----------------------------------------------------------------------


def test_compliant_job_is_proposed_with_one_reservation_per_participant(scene):
    spec = make_spec(**CHEAP)
    before = timezone.now()
    job = scene.propose(**CHEAP)

    assert job.state == JobState.AWAITING_APPROVAL
    assert job.agreement_version == scene.version
    assert job.proposer == scene.cast.researcher
    assert job.approval_deadline == job.proposed_at + dt.timedelta(hours=48)
    assert job.proposed_at >= before
    participants = job.participants.select_related("institution")
    assert sorted(p.institution.slug for p in participants) == [A, B]
    assert {p.status for p in participants} == {JobParticipant.Status.ACTIVE}

    expected = epsilon_spent(events_of(spec), delta=DELTA)
    assert 2.5 < expected < 3.0  # noise 5 for 10 rounds, as the fixtures promise
    reservations = list(job.reservations.select_related("institution"))
    assert sorted(r.institution.slug for r in reservations) == [A, B]
    for reservation in reservations:
        assert reservation.status == PrivacyReservation.Status.RESERVED
        assert reservation.delta == DELTA
        events = [PrivacyEvent.from_json(e) for e in json.loads(reservation.events_text)]
        assert events == events_of(spec)
        assert reservation.epsilon == epsilon_spent(events, delta=DELTA) == expected

    ((entry, payload),) = entries(ledger_events.JOB_PROPOSED, job_id=job.pk)
    assert payload["spec_digest"] == job.spec_digest
    assert payload["agreement_version"] == 1
    assert payload["participants"] == [A, B]
    assert payload["projected_epsilon"] == {A: round(expected, 6), B: round(expected, 6)}
    ((_, change),) = entries(ledger_events.JOB_STATE_CHANGED, job_id=job.pk)
    assert (change["from_state"], change["to_state"]) == ("draft", "awaiting_approval")
    # Both institutions' approvers are asked (notification, and email on commit).
    asked = set(
        Notification.objects.filter(message__contains="needs your").values_list(
            "user__username", flat=True
        )
    )
    assert asked == {"approver", "approver_b"}


def test_proposal_email_goes_out_on_commit(scene, mailoutbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        scene.propose()
    assert len(mailoutbox) == 1
    assert sorted(mailoutbox[0].to) == ["approver@example.org", "approver_b@example.org"]
    assert "needs your institution's approval" in mailoutbox[0].subject


def _no_agreement(cast):
    offer_datasets(cast)
    return make_spec()


def _unknown_participant(cast):
    agreement_in_force(cast)
    offer_datasets(cast)
    return make_spec(participants=[A, B, "nowhere"])


def _unsigned_amendment(cast):
    version = agreement_in_force(cast)
    offer_datasets(cast)
    new = amend(cast, version, sign_by_all=False, epsilon_cap="6")
    sign(new, cast.approver, cast.hospital_a)  # hospital B has not signed version 2
    return make_spec()


def _withdrawn(cast):
    version = agreement_in_force(cast)
    offer_datasets(cast)
    consent_withdraw(
        acting_user=cast.approver_b,
        agreement=version.agreement,
        institution=cast.hospital_b,
        reason="The ethics board revoked our approval.",
    )
    return make_spec()


def _segmentation(cast):
    agreement_in_force(cast, permitted_model_families=["mlp", "unet"])
    offer_datasets(cast, modality="segmentation", input_shape=(1, 32, 32))
    return make_spec(purpose="segmentation", model={"name": "small_unet"})


def _family(cast):
    agreement_in_force(cast, permitted_model_families=["linear"])
    offer_datasets(cast)
    return make_spec()


def _shared_fraction(cast):
    agreement_in_force(cast)
    offer_datasets(cast)
    return make_spec(privacy_pipeline=pipeline(fraction=None))


def _dp_mechanism(cast):
    agreement_in_force(cast)
    offer_datasets(cast)
    laplace = {"filter": "laplace_noise", "epsilon": 0.1, "sensitivity": 1.0}
    return make_spec(privacy_pipeline=[*pipeline(noise_multiplier=None), laplace])


def _missing_dataset(cast):
    agreement_in_force(cast)
    offer_dataset(cast, cast.hospital_a)
    offer_dataset(cast, cast.hospital_b, key="other")
    return make_spec()


def _modality(cast):
    agreement_in_force(cast)
    offer_dataset(cast, cast.hospital_a)
    offer_dataset(cast, cast.hospital_b, modality="image", input_shape=(1, 28, 28))
    return make_spec()


def _shapes(cast):
    agreement_in_force(cast)
    offer_dataset(cast, cast.hospital_a, input_shape=(30,))
    offer_dataset(cast, cast.hospital_b, input_shape=(20,))
    return make_spec()


def _budget(cast):
    agreement_in_force(cast)
    offer_datasets(cast)
    return make_spec(noise_multiplier=1.0, rounds=40)  # ε ≈ 48.8 against a cap of 8


REFUSALS = {
    # case: (arrange, term, institutions named by that term, words in its message)
    "agreement": (_no_agreement, "agreement", {""}, ["No data-use agreement is in force"]),
    "participants": (_unknown_participant, "participants", {"nowhere"}, ["'nowhere'"]),
    "signature": (_unsigned_amendment, "signature", {B}, ["Hospital B", "version 2"]),
    "withdrawn": (_withdrawn, "withdrawn", {B}, ["Hospital B", "withdrawn"]),
    "purpose": (_segmentation, "purpose", {""}, ["classification", "not segmentation"]),
    "model_family": (_family, "model_family", {""}, ["mlp family", "linear"]),
    "shared_fraction": (_shared_fraction, "shared_fraction", {""}, ["100%", "40%"]),
    "dp_mechanism": (_dp_mechanism, "dp_mechanism", {""}, ["Gaussian noise"]),
    "dataset_missing": (_missing_dataset, "dataset", {B}, ["Hospital B", "'tumours'"]),
    "dataset_modality": (_modality, "dataset", {B}, ["Hospital B", "images", "tabular"]),
    "dataset_shapes": (_shapes, "dataset", {""}, ["differ in shape"]),
    "budget": (_budget, "budget", {A, B}, ["projected ε 48.80", "cap 8.00", "already spent 0.00"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_job_that_breaks_a_term_is_refused_and_leaves_nothing(cast, case):
    arrange, term, named, words = REFUSALS[case]
    spec = arrange(cast)
    reserved_before = PrivacyReservation.objects.count()

    with pytest.raises(ComplianceError) as caught:
        job_propose(
            acting_user=cast.researcher, consortium=cast.consortium, title="Refused", spec=spec
        )

    error = caught.value
    assert error.code == "not_compliant"
    problems = [p for p in error.problems if p.term == term]
    assert {p.institution for p in problems} == named, error.problems
    for word in words:
        assert any(word in p.message for p in problems), (word, problems)
    assert all(p.message.rstrip(".") in str(error) for p in error.problems)
    # Nothing was created or reserved, nobody was asked ...
    assert not TrainingJob.objects.exists()
    assert not JobParticipant.objects.exists()
    assert PrivacyReservation.objects.count() == reserved_before == 0
    assert not Notification.objects.filter(message__contains="Refused").exists()
    # ... but the refusal is on the record, with every problem.
    entry, payload = last_entry()
    assert entry.event == ledger_events.JOB_PROPOSAL_REFUSED
    assert entry.actor == cast.researcher
    assert payload["title"] == "Refused"
    assert payload["problems"] == [p.to_json() for p in error.problems]
    assert payload["spec_digest"] == spec_digest(validate_spec(spec))


def test_budget_refusal_names_only_the_institution_over_its_cap(scene):
    first = scene.propose(participants=[A], min_participants=1, **COSTLY)
    assert reservation_statuses(first) == {A: "reserved"}
    already = epsilon_spent(events_of(make_spec(**COSTLY)), delta=DELTA)

    with pytest.raises(ComplianceError) as caught:
        scene.propose(**COSTLY)

    (problem,) = caught.value.problems
    assert (problem.term, problem.institution) == ("budget", A)
    assert f"already spent {already:.2f}" in problem.message
    assert "exceeds its cap 8.00" in problem.message
    assert "Hospital A: projected ε" in problem.message
    assert TrainingJob.objects.count() == 1


def test_submitting_a_draft_runs_the_same_checks(scene):
    draft = job_create_draft(
        acting_user=scene.cast.researcher,
        consortium=scene.cast.consortium,
        title="Draft",
        spec=make_spec(noise_multiplier=1.0, rounds=40),
    )
    assert draft.state == JobState.DRAFT and not draft.reservations.exists()
    with pytest.raises(ComplianceError) as caught:
        job_submit(acting_user=scene.cast.researcher, job=draft)
    assert {p.term for p in caught.value.problems} == {"budget"}
    draft.refresh_from_db()
    assert draft.state == JobState.DRAFT
    assert not draft.reservations.exists() and not draft.participants.exists()
    assert last_entry()[0].event == ledger_events.JOB_PROPOSAL_REFUSED

    job_update_spec(acting_user=scene.cast.researcher, job=draft, spec=make_spec())
    job = job_submit(acting_user=scene.cast.researcher, job=draft)
    assert job.state == JobState.AWAITING_APPROVAL
    assert reservation_statuses(job) == {A: "reserved", B: "reserved"}


# --- Budgets are replayed, reserved and released ------------------------------------------


def test_a_projection_replays_recorded_events_with_the_new_job(scene):
    spec_a = make_spec(**CHEAP)
    spec_b = make_spec(noise_multiplier=4.0, rounds=12)
    job_a = scene.propose(**CHEAP)
    events_a, events_b = events_of(spec_a), events_of(spec_b)

    report = check_job_compliance(consortium=scene.cast.consortium, spec=validate_spec(spec_b))
    assert report.ok, report.problems
    for slug in (A, B):
        projection = report.projections[slug]
        assert projection.already_spent == epsilon_spent(events_a, delta=DELTA)
        assert projection.job_cost == epsilon_spent(events_b, delta=DELTA)
        assert projection.projected == epsilon_spent(events_a + events_b, delta=DELTA)
        # A replay, not a sum: Rényi DP composes to less than the two costs added.
        assert projection.projected < projection.already_spent + projection.job_cost - 0.5

    job_b = scene.propose(noise_multiplier=4.0, rounds=12)
    for reservation in job_b.reservations.all():
        assert reservation.epsilon == epsilon_spent(events_b, delta=DELTA)
    ((_, proposed),) = entries(ledger_events.JOB_PROPOSED, job_id=job_b.pk)
    assert proposed["projected_epsilon"][A] == round(epsilon_spent(events_b, delta=DELTA), 6)
    assert live_epsilon(scene.cast.hospital_a) == epsilon_spent(events_a + events_b, delta=DELTA)
    assert job_a.pk != job_b.pk


def _cancel(scene, job):
    job_cancel(acting_user=scene.cast.researcher, job=job, reason="Wrong data set")


def _reject(scene, job):
    scene.decide(job, scene.cast.hospital_b, "rejected", reason="Not this quarter")


def _expire(scene, job):
    jobs_expire_overdue(now=job.approval_deadline + dt.timedelta(seconds=1))


def _fail(scene, job):
    job_transition(acting_user=None, job=job, to_state=JobState.FAILED, reason="coordinator lost")


@pytest.mark.parametrize("release", [_cancel, _reject, _expire, _fail])
def test_a_job_that_ends_unrun_gives_its_budget_back(scene, release):
    job_a = scene.propose(**COSTLY)
    with pytest.raises(ComplianceError) as caught:
        scene.propose(title="Second", **COSTLY)
    assert {(p.term, p.institution) for p in caught.value.problems} == {
        ("budget", A),
        ("budget", B),
    }

    release(scene, job_a)

    job_a.refresh_from_db()
    assert job_a.is_terminal
    assert reservation_statuses(job_a) == {A: "released", B: "released"}
    assert all(r.released_at for r in job_a.reservations.all())
    assert live_epsilon(scene.cast.hospital_a) == 0.0
    job_b = scene.propose(title="Second", **COSTLY)
    assert job_b.state == JobState.AWAITING_APPROVAL
    assert live_epsilon(scene.cast.hospital_a) <= CAP


def test_an_approved_job_keeps_its_reservation(scene):
    job = scene.propose(**COSTLY)
    scene.decide(job, scene.cast.hospital_a)
    scene.decide(job, scene.cast.hospital_b)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED
    assert reservation_statuses(job) == {A: "reserved", B: "reserved"}
    with pytest.raises(ComplianceError):
        scene.propose(title="Second", **COSTLY)


# --- The state machine ----------------------------------------------------------------


def job_in_state(scene, state: str) -> TrainingJob:
    """A job brought to ``state`` through the services that lead there (cheap in ε,
    so that many live jobs fit the cap)."""
    cast = scene.cast
    spec = make_spec(noise_multiplier=8.0, rounds=5)
    if state == JobState.DRAFT:
        return job_create_draft(
            acting_user=cast.researcher, consortium=cast.consortium, title="J", spec=spec
        )
    job = job_propose(acting_user=cast.researcher, consortium=cast.consortium, title="J", spec=spec)
    if state == JobState.CANCELLED:
        job_cancel(acting_user=cast.admin, job=job, reason="no longer needed")
    elif state == JobState.REJECTED:
        scene.decide(job, cast.hospital_a, "rejected", reason="Too many rounds")
    elif state == JobState.EXPIRED:
        TrainingJob.objects.filter(pk=job.pk).update(approval_deadline=timezone.now())
        jobs_expire_overdue()
    elif state != JobState.AWAITING_APPROVAL:
        scene.decide(job, cast.hospital_a)
        scene.decide(job, cast.hospital_b)
        if state == JobState.FAILED:
            job_transition(acting_user=None, job=job, to_state=JobState.FAILED, reason="diverged")
        elif state in (JobState.RUNNING, JobState.COMPLETED):
            job_transition(acting_user=None, job=job, to_state=JobState.RUNNING)
            if state == JobState.COMPLETED:
                job_transition(acting_user=None, job=job, to_state=JobState.COMPLETED)
    job.refresh_from_db()
    assert job.state == state
    return job


FROM_STATES = [
    JobState.DRAFT,
    JobState.AWAITING_APPROVAL,
    JobState.APPROVED,
    JobState.RUNNING,
    JobState.COMPLETED,
    JobState.CANCELLED,
    JobState.EXPIRED,
]
ILLEGAL = [(f, t) for f in FROM_STATES for t in JobState.values if t not in TRANSITIONS[f]]


@pytest.mark.parametrize(("from_state", "to_state"), ILLEGAL)
def test_an_illegal_transition_is_refused_clearly(scene, from_state, to_state):
    job = job_in_state(scene, from_state)
    before = LedgerEntry.objects.count()
    with pytest.raises(InvalidTransition) as caught:
        job_transition(acting_user=scene.cast.admin, job=job, to_state=to_state)
    message = str(caught.value)
    assert f"Job #{job.pk}" in message
    assert JobState(from_state).label.lower() in message
    assert f"cannot become {JobState(to_state).label.lower()}" in message
    assert caught.value.code == "invalid_transition"
    job.refresh_from_db()
    assert job.state == from_state
    assert LedgerEntry.objects.count() == before


def test_an_unknown_state_is_an_invalid_transition(scene):
    job = job_in_state(scene, JobState.APPROVED)
    with pytest.raises(InvalidTransition, match="unknown state 'paused'"):
        job_transition(acting_user=None, job=job, to_state="paused")


ENGINE_MOVES = [
    (JobState.APPROVED, JobState.RUNNING),
    (JobState.APPROVED, JobState.FAILED),
    (JobState.RUNNING, JobState.COMPLETED),
    (JobState.RUNNING, JobState.FAILED),
    (JobState.AWAITING_APPROVAL, JobState.FAILED),
]


@pytest.mark.parametrize(("from_state", "to_state"), ENGINE_MOVES)
def test_each_engine_transition_is_a_ledger_entry(scene, from_state, to_state):
    job = job_in_state(scene, from_state)
    job_transition(
        acting_user=scene.cast.admin, job=job, to_state=to_state, reason="engine says so"
    )
    job.refresh_from_db()
    assert job.state == to_state
    entry, payload = last_entry()
    assert entry.event == ledger_events.JOB_STATE_CHANGED
    assert entry.actor == scene.cast.admin
    assert payload == {
        "job_id": job.pk,
        "from_state": from_state,
        "to_state": to_state,
        "reason": "engine says so",
    }
    assert job.end_reason == ("engine says so" if job.is_terminal else "")
    released = to_state == JobState.FAILED
    assert all((r.status == "released") == released for r in job.reservations.all())


SERVICE_MOVES = [
    (JobState.DRAFT, JobState.AWAITING_APPROVAL),
    (JobState.DRAFT, JobState.CANCELLED),
    (JobState.AWAITING_APPROVAL, JobState.APPROVED),
    (JobState.AWAITING_APPROVAL, JobState.REJECTED),
    (JobState.AWAITING_APPROVAL, JobState.EXPIRED),
    (JobState.AWAITING_APPROVAL, JobState.CANCELLED),
    (JobState.APPROVED, JobState.CANCELLED),
    (JobState.RUNNING, JobState.CANCELLED),
]


@pytest.mark.parametrize(("from_state", "to_state"), SERVICE_MOVES)
def test_moves_with_their_own_service_cannot_bypass_it(scene, from_state, to_state):
    """Submitting skips no compliance check and approving no approval: those moves
    are legal only through job_submit, approval_decide, job_cancel and expiry."""
    assert to_state in TRANSITIONS[from_state]
    job = job_in_state(scene, from_state)
    with pytest.raises(InvalidTransition, match="only through"):
        job_transition(acting_user=scene.cast.admin, job=job, to_state=to_state)
    job.refresh_from_db()
    assert job.state == from_state


def test_every_state_is_reachable_and_each_step_is_recorded(scene):
    seen = set()
    for state in JobState.values:
        job = job_in_state(scene, state)
        seen |= {
            (p["from_state"], p["to_state"])
            for _, p in entries(ledger_events.JOB_STATE_CHANGED, job_id=job.pk)
        }
    legal = {(f, t) for f, targets in TRANSITIONS.items() for t in targets}
    assert seen <= legal
    assert {t for _, t in seen} == set(JobState.values) - {JobState.DRAFT}


# --- Approvals ------------------------------------------------------------------------


def test_all_approvals_in_approves_and_queues_the_job(
    scene, mailoutbox, django_capture_on_commit_callbacks
):
    cast = scene.cast
    job = scene.propose()
    first = scene.decide(job, cast.hospital_a)
    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL
    assert (first.decision, first.spec_digest, first.agreement_version_id) == (
        "approved",
        job.spec_digest,
        scene.version.pk,
    )
    with django_capture_on_commit_callbacks(execute=True):
        scene.decide(job, cast.hospital_b)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED
    assert job.end_reason == ""

    decisions = entries(ledger_events.JOB_DECISION, job_id=job.pk)
    assert [(e.institution_slug, p["decision"]) for e, p in decisions] == [
        (A, "approved"),
        (B, "approved"),
    ]
    assert all(p["spec_digest"] == job.spec_digest for _, p in decisions)
    assert last_entry()[1]["to_state"] == "approved"
    told = set(
        Notification.objects.filter(message__contains="is approved").values_list(
            "user__username", flat=True
        )
    )
    assert told == {"researcher", "approver", "approver_b"}
    (mail,) = mailoutbox
    assert "approved by every participant" in mail.subject
    assert sorted(mail.to) == sorted(
        [cast.researcher.email, cast.approver.email, cast.approver_b.email]
    )


def test_a_rejection_needs_a_reason_and_rejects_the_job(scene, mailoutbox):
    cast = scene.cast
    job = scene.propose()
    scene.decide(job, cast.hospital_a)
    for reason in ("", "   ", "no"):
        with pytest.raises(ValidationError):
            scene.decide(job, cast.hospital_b, "rejected", reason=reason)
    with pytest.raises(ValidationError):
        scene.decide(job, cast.hospital_b, "maybe")
    assert job.approvals.count() == 1

    scene.decide(job, cast.hospital_b, "rejected", reason="Our data set is being re-labelled")
    job.refresh_from_db()
    assert job.state == JobState.REJECTED
    assert job.end_reason == "Hospital B rejected it: Our data set is being re-labelled"
    assert reservation_statuses(job) == {A: "released", B: "released"}
    told = set(
        Notification.objects.filter(message__contains="was rejected").values_list(
            "user__username", flat=True
        )
    )
    assert told == {"researcher", "approver", "approver_b"}
    with pytest.raises(InvalidTransition, match="rejected: it takes no decisions"):
        scene.decide(job, cast.hospital_a)


def test_only_an_approver_of_a_participant_decides(scene):
    cast = scene.cast
    job = scene.propose(participants=[A], min_participants=1)
    for user, institution in [
        (cast.researcher, cast.hospital_a),  # a member, not an approver
        (cast.steward, cast.hospital_a),
        (cast.admin, cast.hospital_a),  # consortium admin is no institution approver
        (cast.approver_b, cast.hospital_a),  # approver, but of another institution
        (cast.outsider, cast.hospital_a),
    ]:
        with pytest.raises(ServiceError, match="Only an approver of Hospital A"):
            scene.decide(job, institution, user=user)
    with pytest.raises(ServiceError, match="Hospital B does not take part"):
        scene.decide(job, cast.hospital_b)  # approver_b, for a non-participant
    assert not Approval.objects.exists()
    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL


def test_a_decision_on_an_old_spec_is_stale(scene):
    cast = scene.cast
    job = scene.propose()
    old_digest = job.spec_digest
    job_update_spec(acting_user=cast.researcher, job=job, spec=make_spec(rounds=12))
    job.refresh_from_db()
    assert job.spec_digest != old_digest
    with pytest.raises(ConflictError) as caught:
        scene.decide(job, cast.hospital_a, spec_digest=old_digest)
    assert caught.value.code == "stale"
    assert not Approval.objects.exists()
    assert not entries(ledger_events.JOB_DECISION)


def test_a_spec_change_voids_the_approvals_already_given(scene):
    cast = scene.cast
    job = scene.propose(**CHEAP)
    scene.decide(job, cast.hospital_a)
    old_digest = job.spec_digest
    old_reservations = set(job.reservations.values_list("pk", flat=True))

    new_spec = make_spec(noise_multiplier=5.0, rounds=12)
    job_update_spec(acting_user=cast.researcher, job=job, spec=new_spec)
    job.refresh_from_db()
    ((entry, payload),) = entries(ledger_events.JOB_SPEC_CHANGED, job_id=job.pk)
    assert payload["approvals_voided"] == 1
    assert (payload["old_spec_digest"], payload["spec_digest"]) == (old_digest, job.spec_digest)
    cost = epsilon_spent(events_of(new_spec), delta=DELTA)
    assert payload["projected_epsilon"] == {A: round(cost, 6), B: round(cost, 6)}
    # The budget is reserved anew for the new spec, and only once; the old
    # reservations stay as released history.
    reservations = list(job.reservations.exclude(status=PrivacyReservation.Status.RELEASED))
    assert not old_reservations & {r.pk for r in reservations}
    released = job.reservations.filter(status=PrivacyReservation.Status.RELEASED)
    assert set(released.values_list("pk", flat=True)) == old_reservations
    assert sorted(r.epsilon for r in reservations) == [cost, cost]
    assert live_epsilon(cast.hospital_a) == cost

    scene.decide(job, cast.hospital_b)  # on the new digest
    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL  # A's approval was for the old spec
    scene.decide(job, cast.hospital_a)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED


def test_a_spec_change_that_breaks_a_term_changes_nothing(scene):
    job = scene.propose()
    digest = job.spec_digest
    with pytest.raises(ComplianceError) as caught:
        job_update_spec(
            acting_user=scene.cast.researcher,
            job=job,
            spec=make_spec(noise_multiplier=1.0, rounds=40),
        )
    assert {p.term for p in caught.value.problems} == {"budget"}
    job.refresh_from_db()
    assert job.spec_digest == digest
    assert reservation_statuses(job) == {A: "reserved", B: "reserved"}


def test_a_new_agreement_version_rebinds_the_job_and_asks_again(scene):
    cast = scene.cast
    job = scene.propose()
    scene.decide(job, cast.hospital_a)
    v2 = amend(cast, scene.version, text="Version 2: model updates only, kept for 5 years.")

    with pytest.raises(ConflictError) as caught:
        scene.decide(job, cast.hospital_b, agreement_version_id=scene.version.pk)
    assert caught.value.code == "stale"
    job.refresh_from_db()
    assert job.agreement_version == v2  # the rebinding stays, though the decision did not
    ((_, rebound),) = entries(ledger_events.JOB_AGREEMENT_REBOUND, job_id=job.pk)
    assert (rebound["old_version"], rebound["new_version"]) == (1, 2)
    assert Approval.objects.count() == 1

    scene.decide(job, cast.hospital_b)  # under version 2
    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL  # A approved under version 1 only
    scene.decide(job, cast.hospital_a)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED
    assert len(entries(ledger_events.JOB_AGREEMENT_REBOUND, job_id=job.pk)) == 1


def test_a_new_version_the_job_breaks_fails_it_when_someone_decides(scene):
    cast = scene.cast
    job = scene.propose(**CHEAP)  # ε ≈ 2.81 per hospital
    amend(cast, scene.version, epsilon_cap="2")

    with pytest.raises(ConflictError) as caught:
        scene.decide(job, cast.hospital_a)
    assert caught.value.code == "not_compliant"
    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert "no longer complies" in job.end_reason and "cap 2.00" in job.end_reason
    assert reservation_statuses(job) == {A: "released", B: "released"}
    assert not Approval.objects.exists()
    assert entries(ledger_events.JOB_STATE_CHANGED, job_id=job.pk, to_state="failed")


def test_no_decision_while_an_amendment_awaits_signatures(scene):
    cast = scene.cast
    job = scene.propose()
    v2 = amend(cast, scene.version, sign_by_all=False, text="Version 2 of the text.")
    sign(v2, cast.approver, cast.hospital_a)

    with pytest.raises(ConflictError) as caught:
        scene.decide(job, cast.hospital_a)
    assert caught.value.code == "no_agreement"
    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL  # it waits, it does not fail
    assert not Approval.objects.exists()

    sign(v2, cast.approver_b, cast.hospital_b)
    with pytest.raises(ConflictError, match="changed since you opened it"):
        scene.decide(job, cast.hospital_a, agreement_version_id=scene.version.pk)
    scene.decide(job, cast.hospital_a)
    scene.decide(job, cast.hospital_b)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED and job.agreement_version == v2


# --- Expiry ---------------------------------------------------------------------------


def test_overdue_jobs_expire(scene):
    job = scene.propose()
    assert jobs_expire_overdue(now=job.approval_deadline - dt.timedelta(seconds=1)) == 0
    assert jobs_expire_overdue(now=job.approval_deadline) == 1
    job.refresh_from_db()
    assert job.state == JobState.EXPIRED
    assert "were not all in by" in job.end_reason
    assert reservation_statuses(job) == {A: "released", B: "released"}
    entry, payload = last_entry()
    assert entry.event == ledger_events.JOB_STATE_CHANGED and payload["to_state"] == "expired"
    assert Notification.objects.filter(user=scene.cast.researcher, message__contains="expired")
    assert jobs_expire_overdue(now=job.approval_deadline + dt.timedelta(days=1)) == 0


def test_the_expire_jobs_command_and_task(scene):
    from io import StringIO

    from training.rounds.tasks import expire_overdue_jobs

    first, second = scene.propose(title="One"), scene.propose(title="Two", **CHEAP)
    TrainingJob.objects.filter(pk=first.pk).update(
        approval_deadline=timezone.now() - dt.timedelta(minutes=1)
    )
    out = StringIO()
    call_command("expire_jobs", stdout=out)
    assert out.getvalue().strip() == "1 job(s) expired."
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.state, second.state) == (JobState.EXPIRED, JobState.AWAITING_APPROVAL)

    TrainingJob.objects.filter(pk=second.pk).update(
        approval_deadline=timezone.now() - dt.timedelta(minutes=1)
    )
    assert expire_overdue_jobs() == 1
    second.refresh_from_db()
    assert second.state == JobState.EXPIRED


def test_deciding_on_an_overdue_job_expires_it(scene):
    job = scene.propose()
    scene.decide(job, scene.cast.hospital_a)
    TrainingJob.objects.filter(pk=job.pk).update(
        approval_deadline=timezone.now() - dt.timedelta(seconds=1)
    )
    with pytest.raises(ConflictError) as caught:
        scene.decide(job, scene.cast.hospital_b)
    assert caught.value.code == "expired"
    job.refresh_from_db()
    assert job.state == JobState.EXPIRED  # committed, though the decision was refused
    assert reservation_statuses(job) == {A: "released", B: "released"}
    assert Approval.objects.count() == 1
    assert not entries(ledger_events.JOB_DECISION, job_id=job.pk, institution=B)


# --- Withdrawal of consent ----------------------------------------------------------------


@pytest.fixture
def three(cast) -> TrainingScene:
    """Hospitals A, B and C under one agreement, each offering the data set."""
    cast.hospital_c, cast.approver_c = add_institution(cast, "Hospital C")
    return make_scene(cast)


def withdraw(scene, institution, reason="Our ethics board withdrew its approval."):
    return consent_withdraw(
        acting_user=scene.approver_of(institution),
        agreement=scene.version.agreement,
        institution=institution,
        reason=reason,
    )


def test_withdrawal_removes_the_institution_from_its_jobs(three):
    cast = three.cast
    job = three.propose(participants=[A, B, C], min_participants=2)
    other = three.propose(title="A and C only", participants=[A, C], min_participants=2)

    withdraw(three, cast.hospital_b)

    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL
    removed = job.participants.get(institution=cast.hospital_b)
    assert removed.status == JobParticipant.Status.REMOVED
    assert removed.removed_at is not None
    assert removed.removed_reason == "consent withdrawn: Our ethics board withdrew its approval."
    assert reservation_statuses(job) == {A: "reserved", B: "released", C: "reserved"}
    assert live_epsilon(cast.hospital_b) == 0.0
    ((entry, payload),) = entries(ledger_events.JOB_PARTICIPANT_REMOVED, job_id=job.pk)
    assert entry.institution_slug == B
    assert payload["reason"] == removed.removed_reason
    assert not entries(ledger_events.JOB_PARTICIPANT_REMOVED, job_id=other.pk)
    # B no longer decides; the others still do, and suffice.
    with pytest.raises(ServiceError, match="does not take part"):
        three.decide(job, cast.hospital_b)
    three.decide(job, cast.hospital_a)
    three.decide(job, cast.hospital_c)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED


def test_a_job_left_below_its_minimum_fails(three):
    cast = three.cast
    job = three.propose(participants=[A, B], min_participants=2)
    approved = three.propose(title="Approved", participants=[B, C], min_participants=2)
    three.decide(approved, cast.hospital_b)
    three.decide(approved, cast.hospital_c)

    withdraw(three, cast.hospital_b)

    for j in (job, approved):
        j.refresh_from_db()
        assert j.state == JobState.FAILED
        assert "Hospital B withdrew; 1 participant(s) remain, fewer than the minimum of 2" in (
            j.end_reason
        )
        assert set(reservation_statuses(j).values()) == {"released"}
        last_change = entries(ledger_events.JOB_STATE_CHANGED, job_id=j.pk)[-1][1]
        assert (last_change["from_state"], last_change["to_state"]) == (
            "awaiting_approval" if j is job else "approved",
            "failed",
        )
    assert live_epsilon(cast.hospital_a) == live_epsilon(cast.hospital_c) == 0.0


def test_a_job_whose_remaining_participants_all_approved_is_approved(three):
    cast = three.cast
    job = three.propose(participants=[A, B, C], min_participants=2)
    three.decide(job, cast.hospital_a)
    three.decide(job, cast.hospital_c)
    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL

    withdraw(three, cast.hospital_b)

    job.refresh_from_db()
    assert job.state == JobState.APPROVED
    assert job.participants.filter(status=JobParticipant.Status.ACTIVE).count() == 2
    assert last_entry()[1]["to_state"] == "approved"


def test_an_approved_job_above_its_minimum_stays_approved(three):
    cast = three.cast
    job = three.propose(participants=[A, B, C], min_participants=2)
    for institution in (cast.hospital_a, cast.hospital_b, cast.hospital_c):
        three.decide(job, institution)
    withdraw(three, cast.hospital_c)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED
    assert reservation_statuses(job) == {A: "reserved", B: "reserved", C: "released"}


def test_a_withdrawn_institution_takes_part_in_no_new_job(three):
    withdraw(three, three.cast.hospital_c)
    with pytest.raises(ComplianceError) as caught:
        three.propose(participants=[A, C], min_participants=1)
    assert [(p.term, p.institution) for p in caught.value.problems] == [("withdrawn", C)]
    assert three.propose(participants=[A, B]).state == JobState.AWAITING_APPROVAL


# --- Cancellation ---------------------------------------------------------------------


def test_cancelling_needs_a_reason(scene):
    job = scene.propose()
    for reason in ("", "   ", None):
        with pytest.raises(ValidationError):
            job_cancel(acting_user=scene.cast.researcher, job=job, reason=reason)
    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL


def test_the_proposer_cancels_and_everyone_is_told(scene):
    job = scene.propose()
    job_cancel(acting_user=scene.cast.researcher, job=job, reason="  Wrong cohort ")
    job.refresh_from_db()
    assert (job.state, job.end_reason) == (JobState.CANCELLED, "Wrong cohort")
    entry, payload = last_entry()
    assert entry.event == ledger_events.JOB_STATE_CHANGED and entry.actor == scene.cast.researcher
    assert (payload["to_state"], payload["reason"]) == ("cancelled", "Wrong cohort")
    told = set(
        Notification.objects.filter(message__contains="was cancelled").values_list(
            "user__username", flat=True
        )
    )
    assert told == {"researcher", "approver", "approver_b"}


@pytest.mark.parametrize("state", [JobState.DRAFT, JobState.APPROVED, JobState.RUNNING])
def test_an_unfinished_job_can_be_cancelled(scene, state):
    job = job_in_state(scene, state)
    job_cancel(acting_user=scene.cast.admin, job=job, reason="Budget cut")
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED
    assert set(reservation_statuses(job).values()) <= {"released"}


@pytest.mark.parametrize("state", [JobState.COMPLETED, JobState.REJECTED, JobState.CANCELLED])
def test_a_finished_job_cannot_be_cancelled(scene, state):
    job = job_in_state(scene, state)
    before = LedgerEntry.objects.count()
    with pytest.raises(InvalidTransition, match="cannot become cancelled"):
        job_cancel(acting_user=scene.cast.admin, job=job, reason="Too late")
    job.refresh_from_db()
    assert job.state == state
    assert LedgerEntry.objects.count() == before
