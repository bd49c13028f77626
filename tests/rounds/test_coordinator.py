"""The coordinator (training.rounds.coordinator) driven round by round, without a real worker.

Messages the code sends (``current_app.send_task``) are caught in an in-memory list (the
``broker`` fixture, tests/support/coordinator_harness.py) and delivered by hand: central tasks
call the coordinator, site tasks run the real site worker code
(``training.site.worker.run_site_round``: real local training, privacy filters, packing and
Ed25519 signing) against the site API through Django's test client, so every update is
verified and recorded by ``training.rounds.intake.update_receive``.
"""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone

from audit.ledger.canonical import canonical_json
from audit.ledger.chain import verify_chain
from consortium.celery import app
from tests.support.canned_ledger import CannedLedger
from tests.support.coordinator_harness import InProcessClient, job_payloads, propose_and_start
from training.jobs.accounting import PrivacyEvent
from training.models import (
    GlobalModel,
    JobState,
    PrivacyReservation,
    Round,
    SiteUpdate,
)
from training.rounds import coordinator
from training.rounds.artifacts import artifact_store
from training.site.client import CentralError, RoundModel
from training.site.worker import WrongSite, run_site_round

# --- A job from start to end ---------------------------------------------------------------


def test_fedavg_job_runs_every_round_and_chains_its_models(c3, broker):
    job = propose_and_start(c3, broker, rounds=3)
    assert job.state == JobState.RUNNING
    slugs = sorted(s.slug for s in c3.sites)

    # Round 1 went to every site at once, ids and digests only, on each site's queue.
    first = broker.site_tasks()
    model0 = GlobalModel.objects.get(job=job, round_index=0)
    assert sorted(m["queue"] for m in first) == [f"site.{s}" for s in slugs]
    assert all(
        m["kwargs"]
        == {
            "job_id": job.pk,
            "round_index": 1,
            "site": m["kwargs"]["site"],
            "spec_digest": job.spec_digest,
            "start_digest": model0.digest,
        }
        for m in first
    )
    assert all(u.start_digest == model0.digest for u in SiteUpdate.objects.filter(round__job=job))
    assert model0.lineage_hash == coordinator.genesis_lineage(model0.digest)

    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.end_reason
    assert job.reservations.filter(status=PrivacyReservation.Status.SPENT).count() == 3

    # The model chain recomputes from the stored artifacts and accepted updates.
    models = list(GlobalModel.objects.filter(job=job).order_by("round_index"))
    assert [m.round_index for m in models] == [0, 1, 2, 3]
    for parent, child in zip(models, models[1:], strict=False):
        assert child.parent_id == parent.pk
        rnd = Round.objects.get(job=job, index=child.round_index)
        assert rnd.state == Round.State.CLOSED
        assert rnd.global_model_in_id == parent.pk and rnd.global_model_out_id == child.pk
        accepted = rnd.updates.filter(status=SiteUpdate.Status.ACCEPTED)
        assert accepted.count() == 3
        pairs = [(u.update_digest, u.samples) for u in accepted]
        assert child.lineage_hash == coordinator.lineage_hash(
            parent.lineage_hash, child.digest, pairs
        )
        assert artifact_store().exists(child.digest)

    # The ledger: one round.opened and one round.closed per round, with the fields.
    opened = job_payloads("round.opened", job)
    closed = job_payloads("round.closed", job)
    assert [e["round"] for e in opened] == [1, 2, 3]
    assert [e["round"] for e in closed] == [1, 2, 3]
    for entry, child, parent in zip(closed, models[1:], models[:-1], strict=True):
        assert entry["global_digest"] == child.digest
        assert entry["parent_digest"] == parent.digest
        assert entry["lineage_hash"] == child.lineage_hash
        assert entry["stragglers"] == []
        assert [u["weight"] for u in entry["updates"]] == [
            w for _d, w in sorted([u["update_digest"], u["weight"]] for u in entry["updates"])
        ]
        assert sorted(entry["sites"]) == slugs
        assert entry["metrics"]["validation_records"] == 114
    assert opened[0]["sites"] == slugs

    # Metrics on the consortium's validation set: the model learns.
    accuracy = [m.metrics["validation_accuracy"] for m in models[1:]]
    loss = [m.metrics["validation_loss"] for m in models[1:]]
    assert accuracy[-1] > 0.85
    assert loss[-1] < loss[0]
    assert verify_chain().ok


def test_job_start_twice_does_nothing_the_second_time(c3, broker):
    job = propose_and_start(c3, broker)
    assert broker.run(coordinator.job_start, job.pk) is None
    assert GlobalModel.objects.filter(job=job).count() == 1
    assert Round.objects.filter(job=job).count() == 1
    assert len(broker.site_tasks()) == 3


def _run_queued_site_tasks(c3, broker):
    """Run every queued site task (in process, as its site), leaving central messages queued."""
    for message in list(broker.messages):
        broker.messages.remove(message)
        site = c3.site(message["kwargs"]["site"])
        broker.run(
            run_site_round,
            **message["kwargs"],
            config=site.config(),
            client=InProcessClient(site.token),
        )


def test_round_maybe_close_delivered_twice_closes_once(c3, broker):
    job = propose_and_start(c3, broker, rounds=2)
    # Run the site tasks but hold the central messages back.
    rnd = Round.objects.get(job=job, index=1)
    _run_queued_site_tasks(c3, broker)
    closes = [m for m in broker.messages if m["name"] == "training.round_maybe_close"]
    assert len(closes) == 1  # asked by the round's last accepted update only
    assert broker.run(coordinator.round_maybe_close, rnd.pk) == "closed"
    assert broker.run(coordinator.round_maybe_close, rnd.pk) == "not_open"
    assert [e["round"] for e in job_payloads("round.closed", job)] == [1]
    assert GlobalModel.objects.filter(job=job, round_index=1).count() == 1
    assert Round.objects.filter(job=job, index=2).count() == 1


def test_site_task_delivered_twice_is_a_harmless_duplicate(c3, broker):
    job = propose_and_start(c3, broker, rounds=1)
    site = c3.site(broker.messages[0]["kwargs"]["site"])
    task = dict(broker.messages[0]["kwargs"])
    client = InProcessClient(site.token)
    first = broker.run(run_site_round, **task, config=site.config(), client=client)
    again = broker.run(run_site_round, **task, config=site.config(), client=client)
    assert first["status"] == "accepted"
    assert again["status"] == "skipped"  # the job says the update is in: no second training
    update = SiteUpdate.objects.get(round__job=job, institution=site.institution)
    assert update.status == SiteUpdate.Status.ACCEPTED
    assert len(job_payloads("round.update_accepted", job)) == 1


def test_a_site_reports_its_training_time_in_its_metrics(c3, broker):
    """The round benchmark tells local compute from overhead by it (docs/performance.md)."""
    job = propose_and_start(c3, broker, rounds=1)
    site = c3.site(broker.messages[0]["kwargs"]["site"])
    task = dict(broker.messages[0]["kwargs"])
    broker.run(run_site_round, **task, config=site.config(), client=InProcessClient(site.token))
    update = SiteUpdate.objects.get(round__job=job, institution=site.institution)
    assert update.status == SiteUpdate.Status.ACCEPTED
    assert isinstance(update.metrics["train_seconds"], float)
    assert 0 <= update.metrics["train_seconds"] < 60


def test_worker_refuses_a_task_for_another_site(c3, broker):
    job = propose_and_start(c3, broker, rounds=1)
    task = dict(broker.messages[0]["kwargs"])
    other = next(s for s in c3.sites if s.slug != task["site"])
    with pytest.raises(WrongSite):
        run_site_round(**task, config=other.config(), client=InProcessClient(other.token))
    assert not SiteUpdate.objects.filter(round__job=job, status="accepted").exists()


# --- Deadlines and stragglers ---------------------------------------------------------------


def test_deadline_with_the_minimum_closes_the_round_and_records_stragglers(c3, broker):
    job = propose_and_start(c3, broker, rounds=1, min_participants=2)
    late = c3.sites[2].slug
    broker.deliver(drop_sites={late})
    rnd = Round.objects.get(job=job, index=1)
    assert rnd.state == Round.State.OPEN  # still waiting for the third site
    assert broker.run(coordinator.round_maybe_close, rnd.pk) == "waiting"

    after = rnd.deadline + dt.timedelta(seconds=1)
    report = broker.run(coordinator.rounds_tick, now=after)
    assert report.closed == [rnd.pk]
    rnd.refresh_from_db()
    assert rnd.state == Round.State.CLOSED
    assert rnd.updates.get(institution__slug=late).status == SiteUpdate.Status.STRAGGLER
    (closed,) = job_payloads("round.closed", job)
    assert closed["stragglers"] == [late]
    assert len(closed["updates"]) == 2
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED


def test_deadline_without_the_minimum_fails_the_round_and_the_job(c3, broker):
    job = propose_and_start(c3, broker, rounds=2, min_participants=2)
    keep = c3.sites[0].slug
    broker.deliver(drop_sites={s.slug for s in c3.sites if s.slug != keep})
    rnd = Round.objects.get(job=job, index=1)
    outcome = broker.run(
        coordinator.round_maybe_close, rnd.pk, now=rnd.deadline + dt.timedelta(seconds=1)
    )
    assert outcome == "failed"
    rnd.refresh_from_db()
    job.refresh_from_db()
    assert rnd.state == Round.State.FAILED
    assert "fewer than the minimum of 2" in rnd.failure_reason
    assert job.state == JobState.FAILED
    assert "round 1 failed" in job.end_reason and "fewer than the minimum" in job.end_reason
    (failed,) = job_payloads("round.failed", job)
    assert len(failed["stragglers"]) == 2
    assert not GlobalModel.objects.filter(job=job, round_index=1).exists()
    assert verify_chain().ok


# --- Budgets ---------------------------------------------------------------------------------


def _spend_elsewhere(c3, institution, epsilon):
    """Another job at ``institution`` holds a live reservation of ``epsilon`` (pure ε)."""
    from tests.support.fl_harness import job_spec
    from training.jobs.proposals import job_create_draft

    other = job_create_draft(
        acting_user=c3.scene.cast.researcher,
        consortium=c3.scene.cast.consortium,
        title="Another study",
        spec=job_spec([s.slug for s in c3.sites]),
    )
    event = PrivacyEvent("pure_epsilon", {"epsilon": epsilon}, 1, "another study")
    PrivacyReservation.objects.create(
        job=other,
        institution=institution,
        events_text=canonical_json([event.to_json()]),
        epsilon=epsilon,
        delta=1e-5,
    )


GAUSSIAN = [
    {"filter": "gaussian_noise", "noise_multiplier": 5.0, "clip_norm": 1.0},
]


def test_a_site_over_its_cap_is_not_sent_the_next_round(c3, broker):
    job = propose_and_start(c3, broker, rounds=2, min_participants=2, privacy_pipeline=GAUSSIAN)
    # Round 1 runs; meanwhile hospital C commits nearly its whole cap (8) to another job.
    broker.deliver(only_central=True)
    broker.messages, broker.lost = broker.lost, []
    site_c = c3.sites[2]
    _spend_elsewhere(c3, site_c.institution, 7.99)
    broker.deliver()

    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.end_reason
    round2 = Round.objects.get(job=job, index=2)
    assert sorted(round2.updates.values_list("institution__slug", flat=True)) == sorted(
        s.slug for s in c3.sites[:2]
    )
    sent2 = [m["kwargs"]["site"] for m in broker.site_tasks() if m["kwargs"]["round_index"] == 2]
    assert site_c.slug not in sent2 and len(sent2) == 2
    (skipped,) = job_payloads("round.site_skipped", job)
    assert skipped["site"] == site_c.slug and skipped["round"] == 2
    assert "exceeds its cap" in skipped["reason"]
    (opened2,) = [e for e in job_payloads("round.opened", job) if e["round"] == 2]
    assert opened2["skipped"] == [site_c.slug]
    # The accepted updates carry the Gaussian filter's events (what the check replays).
    events = SiteUpdate.objects.filter(round__job=job, status="accepted").first().privacy_events
    assert events and events[0]["mechanism"] == "gaussian"


def test_too_few_sites_within_budget_fails_the_job_before_sending(c3, broker):
    job = propose_and_start(c3, broker, rounds=2, min_participants=3, privacy_pipeline=GAUSSIAN)
    broker.deliver(only_central=True)
    broker.messages, broker.lost = broker.lost, []
    _spend_elsewhere(c3, c3.sites[2].institution, 7.99)
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert "round 2 was not sent" in job.end_reason
    assert "privacy budget" in job.end_reason
    assert not Round.objects.filter(job=job, index=2).exists()
    assert not [m for m in broker.site_tasks() if m["kwargs"]["round_index"] == 2]
    assert verify_chain().ok


# --- Restarts and lost messages ----------------------------------------------------------------


def test_after_a_restart_the_job_resumes_from_its_last_closed_round(c3, broker, monkeypatch):
    job = propose_and_start(c3, broker, rounds=2)
    # The coordinator "dies" right after closing round 1: round 2 is never opened.
    monkeypatch.setattr(coordinator, "round_open", lambda *a, **k: None)
    broker.deliver()
    monkeypatch.undo()
    monkeypatch.setattr(app, "send_task", broker.send_task)
    assert Round.objects.get(job=job, index=1).state == Round.State.CLOSED
    assert not Round.objects.filter(job=job, index=2).exists()

    report = broker.run(coordinator.rounds_tick)
    assert report.resumed == [job.pk]
    round2 = Round.objects.get(job=job, index=2)
    assert round2.global_model_in == GlobalModel.objects.get(job=job, round_index=1)
    assert broker.run(coordinator.rounds_tick).resumed == []  # once only
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED


def test_a_lost_site_task_is_sent_again(c3, broker, settings):
    settings.FL_REDISPATCH_AFTER_SECONDS = 60
    job = propose_and_start(c3, broker, rounds=1)
    lost_site = c3.sites[1].slug
    broker.deliver(drop_sites={lost_site})
    rnd = Round.objects.get(job=job, index=1)
    assert rnd.state == Round.State.OPEN
    before = len(broker.site_tasks())

    assert broker.run(coordinator.rounds_tick).redispatched == []  # not yet overdue
    later = timezone.now() + dt.timedelta(seconds=61)
    report = broker.run(coordinator.rounds_tick, now=later)
    assert len(report.redispatched) == 1
    again = broker.site_tasks()[before:]
    assert [m["kwargs"]["site"] for m in again] == [lost_site]
    assert broker.run(coordinator.rounds_tick, now=later).redispatched == []  # CAS: once
    broker.deliver()
    rnd.refresh_from_db()
    assert rnd.state == Round.State.CLOSED


def test_an_approved_job_whose_start_was_lost_is_started_by_the_tick(c3, broker):
    job = broker.run(c3.propose_and_approve)
    broker.messages.clear()  # the job_start message is lost
    assert broker.run(coordinator.rounds_tick).started == []  # within the grace period
    later = timezone.now() + dt.timedelta(minutes=5)
    assert broker.run(coordinator.rounds_tick, now=later).started == [job.pk]
    job.refresh_from_db()
    assert job.state == JobState.RUNNING


def test_open_rounds_of_a_cancelled_job_fail(c3, broker):
    from training.jobs.proposals import job_cancel

    job = propose_and_start(c3, broker)
    job_cancel(acting_user=c3.scene.cast.admin, job=job, reason="The study was stopped.")
    report = broker.run(coordinator.rounds_tick)
    rnd = Round.objects.get(job=job, index=1)
    assert report.failed == [rnd.pk]
    assert rnd.state == Round.State.FAILED and "cancelled" in rnd.failure_reason
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED


# --- Cyclic ---------------------------------------------------------------------------------


def test_cyclic_topology_visits_the_sites_in_turn(c3, broker):
    from training.fl.aggregate import apply_update, cyclic_order
    from training.fl.serialization import pack_tensors, sha256_hex, unpack_tensors

    job = propose_and_start(c3, broker, rounds=2, topology="cyclic")
    slugs = [s.slug for s in c3.sites]
    assert len(broker.site_tasks()) == 1  # one site at a time
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.end_reason

    tasks = broker.site_tasks()
    for index in (1, 2):
        visited = [m["kwargs"]["site"] for m in tasks if m["kwargs"]["round_index"] == index]
        assert visited == cyclic_order(slugs, index - 1)
        rnd = Round.objects.get(job=job, index=index)
        # Each site started from the previous site's result, and the round's model is the last.
        state = unpack_tensors(artifact_store().get(rnd.global_model_in.digest))
        starts = [m["kwargs"]["start_digest"] for m in tasks if m["kwargs"]["round_index"] == index]
        assert starts[0] == rnd.global_model_in.digest
        for position, slug in enumerate(visited):
            assert sha256_hex(pack_tensors(state)) == starts[position]
            update = rnd.updates.get(institution__slug=slug)
            assert update.start_digest == starts[position] and update.sent_at is not None
            tensors = unpack_tensors(artifact_store().get(update.update_digest))
            delta = {
                k.removeprefix("delta/"): v for k, v in tensors.items() if k.startswith("delta/")
            }
            state = apply_update(state, delta)
        assert sha256_hex(pack_tensors(state)) == rnd.global_model_out.digest
    sent = job_payloads("round.site_sent", job)
    assert [e["site"] for e in sent] == [
        *cyclic_order(slugs, 0),
        *cyclic_order(slugs, 1),
    ]


def test_a_lost_cyclic_site_task_is_sent_again_from_the_same_start_model(c3, broker, settings):
    from training.fl.aggregate import cyclic_order

    settings.FL_REDISPATCH_AFTER_SECONDS = 60
    job = propose_and_start(c3, broker, rounds=1, topology="cyclic", min_participants=2)
    first, second, third = cyclic_order([s.slug for s in c3.sites], 0)
    broker.deliver(drop_sites={second})
    rnd = Round.objects.get(job=job, index=1)
    rows = {u.institution.slug: u for u in rnd.updates.select_related("institution")}
    assert rows[first].status == SiteUpdate.Status.ACCEPTED
    assert rows[second].sent_at is not None and rows[second].start_digest
    assert rows[second].start_digest != rnd.global_model_in.digest  # the first site's result
    assert rows[third].sent_at is None and rows[third].start_digest == ""

    # Only the site that was sent and never reported goes again, from the same model.
    later = timezone.now() + dt.timedelta(seconds=61)
    report = broker.run(coordinator.rounds_tick, now=later)
    assert report.redispatched == [rows[second].pk]
    (again,) = broker.messages
    assert again["kwargs"]["site"] == second
    assert again["kwargs"]["start_digest"] == rows[second].start_digest
    broker.messages.clear()

    # Its update is rejected after all: the third site starts from the second's start model.
    SiteUpdate.objects.filter(pk=rows[second].pk).update(
        status=SiteUpdate.Status.REJECTED, reject_reason="test"
    )
    assert broker.run(coordinator.round_maybe_close, rnd.pk) == "waiting"
    (sent,) = broker.messages
    assert sent["kwargs"]["site"] == third
    assert sent["kwargs"]["start_digest"] == rows[second].start_digest
    broker.deliver()
    rnd.refresh_from_db()
    assert rnd.state == Round.State.CLOSED
    assert rnd.updates.get(institution__slug=third).start_digest == rows[second].start_digest
    (closed,) = job_payloads("round.closed", job)
    assert sorted(closed["sites"]) == sorted([first, third])
    assert closed["rejected"] == {second: "test"}


# --- Wiring ----------------------------------------------------------------------------------


def test_tasks_are_routed_and_scheduled(settings):
    import training.rounds.tasks as tasks

    for name in ("training.job_start", "training.round_maybe_close", "training.rounds_tick"):
        assert settings.CELERY_TASK_ROUTES[name] == {"queue": "central"}
        assert name in app.tasks
    assert settings.CELERY_BEAT_SCHEDULE["rounds-tick"] == {
        "task": "training.rounds_tick",
        "schedule": 10.0,
    }
    site = tasks.site_train
    assert site.acks_late and site.reject_on_worker_lost
    assert site.soft_time_limit == settings.FL_SITE_TASK_SOFT_LIMIT
    assert site.time_limit > site.soft_time_limit


def test_run_site_worker_command_builds_the_worker_arguments(tmp_path, monkeypatch, capsys):
    from django.core.management import call_command

    key = tmp_path / "key.pem"
    key.write_text("placeholder")
    monkeypatch.setenv("SITE_SLUG", "north")
    monkeypatch.setenv("CENTRAL_URL", "https://central.example")
    monkeypatch.setenv("SITE_TOKEN", "fls_x")
    monkeypatch.setenv("SITE_SIGNING_KEY", str(key))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    call_command("run_site_worker", "--print-argv", "--pool", "solo")
    argv = capsys.readouterr().out.split()
    assert argv[:3] == ["worker", "-Q", "site.north"]
    for pair in (["--concurrency", "1"], ["--prefetch-multiplier", "1"], ["-O", "fair"]):
        i = argv.index(pair[0])
        assert argv[i : i + 2] == pair
    assert argv[argv.index("--pool") + 1] == "solo"

    monkeypatch.delenv("SITE_TOKEN")
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="SITE_TOKEN"):
        call_command("run_site_worker", "--print-argv")


# --- The site worker never touches the database ------------------------------------------------


def test_run_site_round_uses_no_database(tmp_path):
    """No ``db`` fixture: pytest-django refuses every query here, so a single ORM call in the
    site task's code would fail this test."""
    import hashlib

    import torch

    from tests.support.fl_harness import job_spec, write_site_csv
    from training.fl.data import demo_split
    from training.fl.models import build_model
    from training.fl.serialization import pack_tensors, state_to_cpu_float, unpack_tensors
    from training.fl.signing import generate_keypair, update_message, verify_update
    from training.jobs.spec import canonical_spec_text, spec_digest, validate_spec
    from training.site.client import WorkerConfig

    spec = validate_spec(job_spec(["north", "south"]))
    text = canonical_spec_text(spec)
    torch.manual_seed(0)
    model = build_model("training.fl.models.LogisticRegression", input_shape=[30], n_classes=2)
    global_bytes = pack_tensors(state_to_cpu_float(model.state_dict()))
    global_digest = hashlib.sha256(global_bytes).hexdigest()
    write_site_csv(tmp_path / "data", demo_split("breast-cancer", ["north", "south"])["north"])
    private_pem, public_pem = generate_keypair()
    (tmp_path / "key.pem").write_bytes(private_pem)
    uploads = []

    class CannedClient(CannedLedger):
        def job(self, job_id):
            return {
                "id": job_id,
                "spec_text": text,
                "spec_digest": spec_digest(spec),
            }

        def round_model(self, job_id, round_index, ledger_since=None):
            return RoundModel(
                data=global_bytes, digest=global_digest, spec_digest=spec_digest(spec)
            )

        def upload(self, job_id, round_index, **kwargs):
            uploads.append(kwargs)
            return 201, {"duplicate": False}

    config = WorkerConfig(
        site_slug="north",
        central_url="http://central.invalid",
        token="fls_x",
        signing_key_path=tmp_path / "key.pem",
        data_root=tmp_path / "data",
    )
    result = run_site_round(
        job_id=9,
        round_index=3,
        site="north",
        spec_digest=spec_digest(spec),
        start_digest=global_digest,
        config=config,
        client=CannedClient(),
    )
    assert result["status"] == "accepted"
    (upload,) = uploads
    assert hashlib.sha256(upload["data"]).hexdigest() == upload["digest"] == result["update_digest"]
    verify_update(
        public_pem,
        update_message(
            job_id=9,
            round_index=3,
            site="north",
            update_digest=upload["digest"],
            samples=upload["samples"],
        ),
        upload["signature"],
    )
    tensors = unpack_tensors(upload["data"])
    assert set(tensors) == {"delta/linear.weight", "delta/linear.bias"}

    # A spec that changed since the task was sent is refused before any training.
    from training.site.worker import IntegrityFailure

    with pytest.raises(IntegrityFailure):
        run_site_round(
            job_id=9,
            round_index=3,
            site="north",
            spec_digest="0" * 64,
            start_digest=global_digest,
            config=config,
            client=CannedClient(),
        )


# --- The site worker's requests: one before training, from a job's second round on -------------


def _count_requests(monkeypatch) -> list[tuple[str, str]]:
    """(request, token) for every job and round-model request a site worker makes here."""
    calls = []
    for name in ("job", "round_model"):
        original = getattr(InProcessClient, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, self.auth["HTTP_AUTHORIZATION"].removeprefix("Site ")))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(InProcessClient, name, counting)
    return calls


def test_a_site_fetches_its_job_once_per_spec_digest(c3, broker, monkeypatch):
    """The spec is immutable for its digest: after the first round a site asks only for the
    round's model before it trains (docs/performance.md, "Round overhead")."""
    calls = _count_requests(monkeypatch)
    job = propose_and_start(c3, broker, rounds=3)
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED
    for site in c3.sites:
        mine = [name for name, token in calls if token == site.token]
        assert mine.count("round_model") == 3
        assert mine.count("job") == 1


def _run_round_one(c3, broker):
    """Run round 1's site tasks and its close; round 2's site tasks are left in broker.lost."""
    _run_queued_site_tasks(c3, broker)
    broker.deliver(only_central=True)
    return {m["kwargs"]["site"]: m["kwargs"] for m in broker.lost}


def test_a_revoked_site_is_refused_though_it_knows_the_job(c3, broker, cast):
    from training.models import SiteCredential
    from training.rounds.credentials import site_credential_revoke

    job = propose_and_start(c3, broker, rounds=2, min_participants=2)
    round_two = _run_round_one(c3, broker)
    assert Round.objects.get(job=job, index=2).state == Round.State.OPEN
    revoked = c3.sites[0]
    site_credential_revoke(
        acting_user=cast.admin,
        credential=SiteCredential.objects.get(institution=revoked.institution),
    )
    with pytest.raises(CentralError) as refused:
        broker.run(
            run_site_round,
            **round_two[revoked.slug],
            config=revoked.config(),
            client=InProcessClient(revoked.token),
        )
    assert refused.value.status == 401
    update = SiteUpdate.objects.get(round__job=job, round__index=2, institution=revoked.institution)
    assert update.status == SiteUpdate.Status.DISPATCHED
    # The others train round 2 from what they already know.
    other = c3.sites[1]
    result = broker.run(
        run_site_round,
        **round_two[other.slug],
        config=other.config(),
        client=InProcessClient(other.token),
    )
    assert result["status"] == "accepted"


# --- The site worker's checks, without a database ---------------------------------------------


class _Central(CannedLedger):
    """A canned central server for one job (id 9) and round (3): counts the requests."""

    def __init__(self, tmp_path):
        import hashlib

        import torch

        from tests.support.fl_harness import job_spec, write_site_csv
        from training.fl.data import demo_split
        from training.fl.models import build_model
        from training.fl.serialization import pack_tensors, state_to_cpu_float
        from training.fl.signing import generate_keypair
        from training.jobs.spec import canonical_spec_text, spec_digest, validate_spec
        from training.site.client import WorkerConfig

        self.spec = validate_spec(job_spec(["north", "south"]))
        self.text = canonical_spec_text(self.spec)
        self.digest = spec_digest(self.spec)
        torch.manual_seed(0)
        model = build_model("training.fl.models.LogisticRegression", input_shape=[30], n_classes=2)
        self.model = pack_tensors(state_to_cpu_float(model.state_dict()))
        self.model_digest = hashlib.sha256(self.model).hexdigest()
        write_site_csv(tmp_path / "data", demo_split("breast-cancer", ["north", "south"])["north"])
        private_pem, _public_pem = generate_keypair()
        (tmp_path / "key.pem").write_bytes(private_pem)
        self.config = WorkerConfig(
            site_slug="north",
            central_url="http://central.invalid",
            token="fls_" + tmp_path.name,
            signing_key_path=tmp_path / "key.pem",
            data_root=tmp_path / "data",
        )
        self.sent = RoundModel(data=self.model, digest=self.model_digest, spec_digest=self.digest)
        self.refusal: CentralError | None = None
        self.calls: list[str] = []
        self.uploads: list[dict] = []

    def job(self, job_id):
        self.calls.append("job")
        return {"id": job_id, "spec_text": self.text, "spec_digest": self.digest}

    def round_model(self, job_id, round_index, ledger_since=None):
        self.calls.append("round_model")
        if self.refusal is not None:
            raise self.refusal
        return self.sent

    def upload(self, job_id, round_index, **kwargs):
        self.calls.append("upload")
        self.uploads.append(kwargs)
        return 201, {"duplicate": False}

    def run(self, **task):
        task = {"spec_digest": self.digest, "start_digest": self.model_digest, **task}
        return run_site_round(
            job_id=9, round_index=3, site="north", config=self.config, client=self, **task
        )


def test_the_job_spec_is_fetched_once_per_digest_and_always_checked(tmp_path):
    from dataclasses import replace

    from training.site.worker import IntegrityFailure, job_spec

    central = _Central(tmp_path)
    first = job_spec(central, central.config, 9, central.digest)
    first.spec["rounds"] = 999  # a task's own copy: the kept spec is untouched
    again = job_spec(central, central.config, 9, central.digest)
    assert central.calls == ["job"]
    assert again.spec == central.spec
    assert (again.input_shape, again.n_classes) == (None, None)  # none given: the local data's

    # Another digest is another spec: fetched, and refused when the server's does not match,
    # every time (a refused spec is not kept).
    for _ in range(2):
        with pytest.raises(IntegrityFailure, match="the job changed since the task was sent"):
            job_spec(central, central.config, 9, "0" * 64)
    assert central.calls == ["job", "job", "job"]
    # Another credential keeps its own.
    job_spec(central, replace(central.config, token="fls_other"), 9, central.digest)
    assert central.calls == ["job", "job", "job", "job"]


def test_a_site_trains_only_from_the_model_and_spec_its_task_names(tmp_path):
    from training.site.worker import IntegrityFailure

    central = _Central(tmp_path)
    assert central.run()["status"] == "accepted"
    assert central.run()["status"] == "accepted"
    assert central.calls == ["round_model", "job", "upload", "round_model", "upload"]

    # The server sends another model, or bytes that are not the model it names, or says the
    # job's spec is not the one the task carries: refused before training, every time.
    for sent in (
        RoundModel(data=central.model, digest="f" * 64, spec_digest=central.digest),
        RoundModel(
            data=central.model + b"x", digest=central.model_digest, spec_digest=central.digest
        ),
        RoundModel(data=central.model, digest=central.model_digest, spec_digest="e" * 64),
    ):
        central.sent, central.calls = sent, []
        with pytest.raises(IntegrityFailure):
            central.run()
        assert central.calls == ["round_model"]


@pytest.mark.parametrize(
    "code", ["already_received", "round_closed", "job_not_running", "not_dispatched"]
)
def test_a_site_skips_a_round_that_no_longer_asks_it(tmp_path, code):
    central = _Central(tmp_path)
    central.refusal = CentralError("409", status=409, body={"detail": "no", "code": code})
    assert central.run()["status"] == "skipped"
    assert central.calls == ["round_model"]  # no job request, no training, no upload


def test_a_site_not_sent_the_round_or_refused_fails_its_task(tmp_path):
    from training.site.worker import IntegrityFailure

    central = _Central(tmp_path)
    central.refusal = CentralError("409", status=409, body={"detail": "no", "code": "not_sent"})
    with pytest.raises(IntegrityFailure):
        central.run()
    central.refusal = CentralError("401", status=401, body={"detail": "revoked"})
    with pytest.raises(CentralError):
        central.run()
    assert central.uploads == []
