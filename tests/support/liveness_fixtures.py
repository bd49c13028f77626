"""Rows for the liveness tests (absent sites, the job page's waiting words, the services
panel): a running job, rounds written directly with each site's final status, and a site
worker last heard some time ago. What those tests check is the counting and the words, not the
coordinator that produces the rows."""

from __future__ import annotations

import datetime as dt

from django.utils import timezone

from training.fl.signing import generate_keypair
from training.jobs.transitions import job_transition
from training.models import GlobalModel, JobState, Round, SiteUpdate, SiteWorkerStatus
from training.rounds import credentials
from training.rounds.heartbeats import worker_heartbeat_record


def running_job(scene):
    """Hospitals A and B, approved by both, running (the researcher proposed it)."""
    cast = scene.cast
    job = scene.propose()
    scene.decide(job, cast.hospital_a)
    scene.decide(job, cast.hospital_b)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED
    return job_transition(acting_user=None, job=job, to_state=JobState.RUNNING)


def add_round(job, index, statuses: dict, *, state=Round.State.CLOSED, now=None) -> Round:
    """Round ``index`` of ``job`` in ``state``, with one update per institution in
    ``statuses`` (institution -> SiteUpdate status; an institution left out was not asked)."""
    now = now or timezone.now()
    model, _ = GlobalModel.objects.get_or_create(
        job=job, round_index=0, defaults={"digest": "0" * 64, "lineage_hash": "1" * 64}
    )
    rnd = Round.objects.create(
        job=job,
        index=index,
        state=state,
        global_model_in=model,
        opened_at=now - dt.timedelta(minutes=5),
        deadline=now + dt.timedelta(minutes=5),
        closed_at=None if state == Round.State.OPEN else now,
    )
    for institution, status in statuses.items():
        SiteUpdate.objects.create(
            round=rnd, institution=institution, status=status, sent_at=now - dt.timedelta(minutes=4)
        )
    return rnd


def worker_heard(cast, institution, *, ago: dt.timedelta | None, hostname="node-7"):
    """A worker credential for ``institution`` whose last heartbeat was ``ago`` (None: its
    worker never reported), every 30 s."""
    _private, public_pem = generate_keypair()
    credential, _token = credentials.site_credential_create(
        acting_user=cast.admin, institution=institution, label="worker", public_key=public_pem
    )
    if ago is not None:
        worker_heartbeat_record(
            credential=credential,
            protocol=1,
            version="0.1.0",
            device="cpu",
            interval_seconds=30,
            hostname=hostname,
            uptime_seconds=3600,
        )
        SiteWorkerStatus.objects.filter(credential=credential).update(
            last_seen_at=timezone.now() - ago
        )
    return credential
