"""Rows for the metrics tests, written straight into the models: what ``/metrics`` reports is
counts of rows, so each test sets the rows it counts and reads the numbers back.

``ops_scene`` builds, in ``cast``'s consortium: a running job (round 1 closed, round 2 open
and past its deadline), a failed job (its round failed), and a running job whose round is
aggregating under a lease that ran out; the sites' updates in every status; three rejections
in the ledger (two ``bad_signature``, one ``digest_mismatch``) and one whose code is not a
code word; the outbox with two messages pending (one 120 s old, refused twice) and one sent;
the coordinator's heartbeat fresh and the tick's five minutes old; Hospital A's worker seen
10 s ago, Hospital B's never.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
from dataclasses import dataclass

import pytest
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry
from training.models import (
    GlobalModel,
    JobState,
    OutboxMessage,
    Round,
    ServiceHeartbeat,
    SiteCredential,
    SiteUpdate,
    SiteWorkerStatus,
    TrainingJob,
)

_serial = itertools.count(1)


def _digest() -> str:
    return hashlib.sha256(f"model-{next(_serial)}".encode()).hexdigest()


def make_job(consortium, *, state=JobState.RUNNING) -> TrainingJob:
    return TrainingJob.objects.create(
        consortium=consortium,
        title=f"job {next(_serial)}",
        spec_text="{}",
        spec_digest=_digest(),
        state=state,
        proposer_repr="researcher",
    )


def make_round(job, index, *, state, deadline_in=600, lease_in=None) -> Round:
    model = GlobalModel.objects.create(
        job=job, round_index=index - 1, digest=_digest(), lineage_hash=_digest()
    )
    now = timezone.now()
    return Round.objects.create(
        job=job,
        index=index,
        state=state,
        global_model_in=model,
        deadline=now + dt.timedelta(seconds=deadline_in),
        lease_expires_at=None if lease_in is None else now + dt.timedelta(seconds=lease_in),
        claim_token="held" if lease_in is not None else "",
    )


def make_credential(institution, label="node-1") -> SiteCredential:
    return SiteCredential.objects.create(
        institution=institution,
        label=label,
        token_prefix=f"tok{next(_serial)}",
        token_hash=_digest(),
        public_key="-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n",
    )


def plant_rejection(code: str) -> None:
    """A ``round.update_rejected`` entry as the intake writes it (only the code matters
    here; a plain string event is written without the schema check)."""
    append_entry(
        event=str(ledger_events.UPDATE_REJECTED),
        actor_repr="site",
        payload={"code": code, "reason": f"refused ({code}) with 1234 samples"},
    )


@dataclass
class OpsScene:
    running: TrainingJob
    failed: TrainingJob
    stuck: TrainingJob
    credential_a: SiteCredential
    credential_b: SiteCredential


@pytest.fixture
def ops_scene(cast) -> OpsScene:
    a, b = cast.hospital_a, cast.hospital_b
    now = timezone.now()

    running = make_job(cast.consortium)
    closed = make_round(running, 1, state=Round.State.CLOSED, deadline_in=-3600)
    late = make_round(running, 2, state=Round.State.OPEN, deadline_in=-30)
    failed = make_job(cast.consortium, state=JobState.FAILED)
    failed_round = make_round(failed, 1, state=Round.State.FAILED, deadline_in=-7200)
    stuck = make_job(cast.consortium)
    make_round(stuck, 1, state=Round.State.AGGREGATING, deadline_in=300, lease_in=-45)

    SiteUpdate.objects.create(round=closed, institution=a, status=SiteUpdate.Status.ACCEPTED)
    SiteUpdate.objects.create(round=closed, institution=b, status=SiteUpdate.Status.ACCEPTED)
    SiteUpdate.objects.create(round=late, institution=a, status=SiteUpdate.Status.REJECTED)
    SiteUpdate.objects.create(round=late, institution=b, status=SiteUpdate.Status.DISPATCHED)
    SiteUpdate.objects.create(round=failed_round, institution=a, status=SiteUpdate.Status.STRAGGLER)
    for code in ("bad_signature", "bad_signature", "digest_mismatch", "Not a code: 42"):
        plant_rejection(code)

    OutboxMessage.objects.create(
        task="training.round_maybe_close",
        queue="central",
        created_at=now - dt.timedelta(seconds=120),
        attempts=2,
        last_error="ConnectionRefusedError",
    )
    OutboxMessage.objects.create(task="training.site_train", queue="site.hospital-a")
    OutboxMessage.objects.create(task="training.job_start", queue="central", sent_at=now)

    ServiceHeartbeat.objects.create(
        component="coordinator",
        instance="central-1:100",
        last_seen_at=now - dt.timedelta(seconds=2),
        interval_seconds=5,
    )
    ServiceHeartbeat.objects.create(
        component="tick",
        instance="central-1:100",
        last_seen_at=now - dt.timedelta(seconds=300),
        interval_seconds=10,
    )

    credential_a = make_credential(a)
    SiteWorkerStatus.objects.create(
        credential=credential_a,
        last_seen_at=now - dt.timedelta(seconds=10),
        protocol=1,
        version="0.1.0",
        device="cpu",
        interval_seconds=30,
    )
    credential_b = make_credential(b)
    return OpsScene(running, failed, stuck, credential_a, credential_b)
