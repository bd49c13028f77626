"""The counts an operator's ``/metrics`` scrape reads (``consortium.observability.metrics``).

Each function is one query, whatever the number of jobs, rounds or updates: the database
groups and counts, and only the groups come back (a few states, a few reason codes, one row
per site). A scrape every 15 s must stay cheap on a consortium with years of history, so
nothing here reads rows one by one.

Every label these counts end up in is bounded: states and statuses are the models' choices,
a rejection's reason is its refusal *code* (``training.rounds.verification.Rejection.code``,
a fixed word such as ``bad_signature``), never the free text told to the site, and sites are
the consortium's institutions.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from django.db.models import Count, JSONField, Q
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.models import LedgerEntry
from consortium.governance.models import Institution
from training.models import JobState, Round, SiteCredential, SiteUpdate, TrainingJob
from training.queues import CENTRAL_QUEUE, SCORING_QUEUE, site_queue
from training.rounds.heartbeats import online_window

__all__ = [
    "OTHER_CODE",
    "RoundCount",
    "SiteWorkerBeat",
    "jobs_by_state",
    "queues_to_measure",
    "rejections_by_code",
    "rounds_by_state",
    "site_updates_by_status",
    "site_worker_beats",
]

#: The label of a refusal code that is not a plain code word (an older or corrupt entry): the
#: label set stays bounded whatever a ledger payload holds.
OTHER_CODE = "other"
_CODE_WORD = re.compile(r"[a-z][a-z0-9_]{0,39}")


@dataclass(frozen=True)
class RoundCount:
    """Rounds in one (round state, job state) pair; of them, how many are past their deadline
    and how many hold an aggregation lease that ran out (a claim a dead coordinator left)."""

    state: str
    job_state: str
    count: int
    past_deadline: int
    lease_expired: int


def rounds_by_state(now: dt.datetime | None = None) -> list[RoundCount]:
    """Every round, counted by its state and its job's state. One query."""
    now = now or timezone.now()
    rows = (
        Round.objects.values("state", "job__state")
        .annotate(
            n=Count("pk"),
            past_deadline=Count("pk", filter=Q(deadline__lt=now)),
            lease_expired=Count(
                "pk",
                filter=Q(state=Round.State.AGGREGATING, lease_expires_at__lt=now),
            ),
        )
        .order_by()
    )
    return [
        RoundCount(
            state=row["state"],
            job_state=row["job__state"],
            count=row["n"],
            past_deadline=row["past_deadline"],
            lease_expired=row["lease_expired"],
        )
        for row in rows
    ]


def jobs_by_state() -> dict[str, int]:
    """Training jobs per state, every state present (0 when none). One query."""
    counts = dict.fromkeys(JobState.values, 0)
    for row in TrainingJob.objects.values("state").annotate(n=Count("pk")).order_by():
        counts[row["state"]] = row["n"]
    return counts


def site_updates_by_status() -> dict[str, int]:
    """Sites' updates per status (dispatched, accepted, rejected, straggler), every status
    present. One query."""
    counts = dict.fromkeys(SiteUpdate.Status.values, 0)
    for row in SiteUpdate.objects.values("status").annotate(n=Count("pk")).order_by():
        counts[row["status"]] = row["n"]
    return counts


def rejections_by_code() -> dict[str, int]:
    """Rejected updates per refusal code, from the ledger's ``round.update_rejected`` entries.

    The code is kept only there (the ``SiteUpdate`` row keeps the reason's text, which names
    sample counts, key labels and library messages and so cannot be a label). The database
    reads the code out of the canonical JSON payload and groups by it (SQLite's
    ``json_extract``, PostgreSQL's ``->>``), so one query returns one row per code. A
    replayed upload is recorded nowhere (``training.rounds.intake``) and is not counted."""
    payload = Cast("payload_text", output_field=JSONField())
    rows = (
        LedgerEntry.objects.filter(event=ledger_events.UPDATE_REJECTED)
        .annotate(code=KeyTextTransform("code", payload))
        .values("code")
        .annotate(n=Count("pk"))
        .order_by()
    )
    counts: dict[str, int] = {}
    for row in rows:
        code = row["code"] if _CODE_WORD.fullmatch(row["code"] or "") else OTHER_CODE
        counts[code] = counts.get(code, 0) + row["n"]
    return counts


@dataclass(frozen=True)
class SiteWorkerBeat:
    """A site with live worker credentials: whether one of its workers is online and how long
    ago the most recent one reported (None: never)."""

    site: str
    online: bool
    age_seconds: float | None


def site_worker_beats(now: dt.datetime | None = None) -> list[SiteWorkerBeat]:
    """Per institution with at least one live credential, its workers' latest heartbeat
    (``training.rounds.heartbeats``' rule for online: within three of its own intervals).
    One query, one row per live credential."""
    now = now or timezone.now()
    rows = (
        SiteCredential.objects.filter(revoked_at__isnull=True)
        .values_list(
            "institution__slug", "worker_status__last_seen_at", "worker_status__interval_seconds"
        )
        .order_by()
    )
    sites: dict[str, tuple[bool, dt.datetime | None]] = {}
    for slug, seen, interval in rows:
        online, latest = sites.get(slug, (False, None))
        if seen is not None:
            online = online or now - seen <= online_window(interval)
            latest = seen if latest is None or seen > latest else latest
        sites[slug] = (online, latest)
    return [
        SiteWorkerBeat(
            site=slug,
            online=online,
            age_seconds=None if latest is None else max(0.0, (now - latest).total_seconds()),
        )
        for slug, (online, latest) in sorted(sites.items())
    ]


def queues_to_measure() -> list[str]:
    """The broker queues worth measuring: ``central``, ``scoring`` (a backlog there is rounds
    waiting for their scores) and ``site.<slug>`` of every institution
    that has a live worker credential or takes part in a running job (a site with tasks and
    no worker is exactly the queue that grows). Bounded by the consortium's sites, not by what
    anyone names a queue. One query."""
    slugs = (
        Institution.objects.filter(
            Q(site_credentials__revoked_at__isnull=True)
            | Q(job_participations__job__state=JobState.RUNNING)
        )
        .values_list("slug", flat=True)
        .distinct()
        .order_by("slug")
    )
    return [CENTRAL_QUEUE, SCORING_QUEUE, *(site_queue(slug) for slug in slugs)]
