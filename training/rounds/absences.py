"""Sites that stopped taking part: a site that missed N rounds in a row of a running job.

Why this exists: a site whose worker is gone for good does not fail a job whose other sites
still make ``min_participants``, but every round then waits its full timeout for it, and
nobody is told. The job page names such a site ("St Thomas' missed the last 3 rounds"), and
the tick tells the people who can act on it, once per streak: the job's proposer (who may
cancel or re-propose without it), the consortium's administrators, and the site's own
institution administrators (who can restart its worker).

*Missed* means the site was asked for the round and never reported: its
:class:`~training.models.SiteUpdate` ended ``STRAGGLER`` in a closed or failed round. A
rejected update is not a miss (the site is there; its update was bad), and a round the site was
not asked for (left out to spare its privacy budget) neither breaks nor extends a streak. N is
the setting ``FL_ABSENT_ROUNDS_ALERT`` (default :data:`DEFAULT_ALERT_ROUNDS`).

Once per streak, whatever the number of ticks and coordinators: the notice is a ledger entry
``site.absent`` (job, site, the rounds missed), and the check for an earlier notice of the same
streak is made after taking the ledger's head lock (:func:`audit.ledger.chain.lock_chain`),
which every writer of the ledger takes: two coordinators' ticks run the check one after the
other, and the second finds the first's entry. An earlier notice belongs to the same streak
unless the site reported in a round after the last round it names; so a site that came back
and then missed N rounds again is notified of again. The entry is also the durable record of
when the consortium was told, which an auditor reading the job's history can see.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry, lock_chain
from audit.ledger.selectors import entries_about
from consortium.governance.models import Membership, Role
from training.jobs.notifications import job_url, notify
from training.models import JobParticipant, JobState, Round, SiteUpdate, TrainingJob
from training.rounds.heartbeats import SiteWorkers, site_workers
from training.rounds.liveness_words import worker_state_words

__all__ = [
    "DEFAULT_ALERT_ROUNDS",
    "Absence",
    "absent_sites",
    "alert_rounds",
    "notify_absent_sites",
]

#: Rounds in a row a site may miss before it is shown as absent (``FL_ABSENT_ROUNDS_ALERT``).
DEFAULT_ALERT_ROUNDS = 3

_FINISHED_ROUNDS = (Round.State.CLOSED, Round.State.FAILED)
_JOB_LABEL = TrainingJob._meta.label_lower


def alert_rounds() -> int:
    """N: how many rounds in a row a site may miss before it is shown and reported absent."""
    return max(1, int(getattr(settings, "FL_ABSENT_ROUNDS_ALERT", DEFAULT_ALERT_ROUNDS)))


@dataclass(frozen=True)
class Absence:
    """A site of a job on a streak of missed rounds. ``rounds``: the rounds it missed in a row
    up to the job's latest finished round, oldest first; ``returned_round``: the latest round
    it did report in before the streak (None: it never reported in this job)."""

    job_id: int
    institution_id: int
    institution: str
    slug: str
    rounds: tuple[int, ...]
    returned_round: int | None = None

    @property
    def missed(self) -> int:
        return len(self.rounds)

    @property
    def text(self) -> str:
        """``St Thomas' missed the last 3 rounds (rounds 4 to 6)``."""
        span = (
            f"round {self.rounds[0]}"
            if self.missed == 1
            else f"rounds {self.rounds[0]} to {self.rounds[-1]}"
            if self.rounds[-1] - self.rounds[0] + 1 == self.missed
            else "rounds " + ", ".join(str(r) for r in self.rounds)
        )
        noun = "round" if self.missed == 1 else f"{self.missed} rounds"
        return f"{self.institution} missed the last {noun} ({span})"


#: How many of a job's latest finished rounds (times N) one check reads for every site: a
#: streak that reaches further back is followed into the history for that site alone.
WINDOW_ROUNDS_PER_N = 2


def absent_sites(job_ids, *, threshold: int | None = None) -> dict[int, list[Absence]]:
    """Per job id asked, its active participants that missed at least ``threshold`` (default
    :func:`alert_rounds`) of their latest finished rounds in a row, by institution name.

    The tick runs this every few seconds for every running job, so what it reads stays bounded
    by the number of sites, not by the rounds run so far: the sites' updates in each job's
    latest ``WINDOW_ROUNDS_PER_N × threshold`` finished rounds (a streak that ends inside the
    window is decided there), then, for the few sites that reported nothing in the whole window
    (absent, or left out of rounds to spare their budget), their earlier history, to count the
    streak back to their last report. A site left out of every round in the window is not
    waited on, and not reported. Four queries at most, whatever the number of jobs."""
    threshold = alert_rounds() if threshold is None else threshold
    ids = list(job_ids)
    found: dict[int, list[Absence]] = {i: [] for i in ids}
    if not ids:
        return found
    latest = dict(
        Round.objects.filter(job_id__in=ids, state__in=_FINISHED_ROUNDS)
        .values("job_id")
        .annotate(last=Max("index"))
        .values_list("job_id", "last")
    )
    if not latest:
        return found
    active = set(
        JobParticipant.objects.filter(
            job_id__in=latest.keys(), status=JobParticipant.Status.ACTIVE
        ).values_list("job_id", "institution_id")
    )
    window = WINDOW_ROUNDS_PER_N * max(1, threshold)
    first_in_window = {job_id: max(1, last - window + 1) for job_id, last in latest.items()}
    in_window = Q()
    for job_id, first in first_in_window.items():
        in_window |= Q(round__job_id=job_id, round__index__gte=first)
    streaks: dict[tuple[int, int], _Streak] = {}
    _follow(_update_rows(in_window), active, streaks)
    cut = [key for key, streak in streaks.items() if streak.open and first_in_window[key[0]] > 1]
    if cut:
        earlier = Q()
        for job_id, institution_id in cut:
            earlier |= Q(
                round__job_id=job_id,
                institution_id=institution_id,
                round__index__lt=first_in_window[job_id],
            )
        _follow(_update_rows(earlier), active, streaks)
    for (job_id, institution_id), streak in streaks.items():
        if len(streak.missed) >= threshold:
            found[job_id].append(
                Absence(
                    job_id=job_id,
                    institution_id=institution_id,
                    institution=streak.name,
                    slug=streak.slug,
                    rounds=tuple(sorted(streak.missed)),
                    returned_round=streak.returned,
                )
            )
    for absences in found.values():
        absences.sort(key=lambda a: a.institution)
    return found


@dataclass
class _Streak:
    """One site's run of missed rounds in one job, counted back from the newest round."""

    name: str
    slug: str
    missed: list[int] = field(default_factory=list)
    returned: int | None = None

    @property
    def open(self) -> bool:
        """Still counting back: no report of the site's found yet."""
        return self.returned is None


def _update_rows(where: Q):
    """The sites' updates in finished rounds matching ``where``: newest round first per site."""
    return (
        SiteUpdate.objects.filter(where, round__state__in=_FINISHED_ROUNDS)
        .order_by("round__job_id", "institution_id", "-round__index")
        .values_list(
            "round__job_id",
            "institution_id",
            "round__index",
            "status",
            "institution__name",
            "institution__slug",
        )
    )


def _follow(rows, active: set, streaks: dict[tuple[int, int], _Streak]) -> None:
    """Extend each active site's streak with ``rows`` (newest first per site), up to its
    latest report: a straggler round is a miss, any other status ends the streak."""
    for job_id, institution_id, index, status, name, slug in rows.iterator():
        key = (job_id, institution_id)
        if key not in active:
            continue
        streak = streaks.setdefault(key, _Streak(name=name, slug=slug))
        if not streak.open:
            continue
        if status == SiteUpdate.Status.STRAGGLER:
            streak.missed.append(index)
        else:
            streak.returned = index


# --- Telling people (the periodic tick) ---------------------------------------------------------


def notify_absent_sites(now: dt.datetime | None = None) -> list[Absence]:
    """Record and tell of each site of a running job that has just reached a streak of
    :func:`alert_rounds` missed rounds; returns the absences newly told of (empty on a tick
    that finds nothing new). Run by the coordinator's periodic tick; safe to run twice, or on
    two coordinators at once (see the module's docstring)."""
    now = now or timezone.now()
    threshold = alert_rounds()
    jobs = {
        j.pk: j
        for j in TrainingJob.objects.filter(state=JobState.RUNNING).select_related(
            "consortium", "proposer"
        )
    }
    candidates = [a for found in absent_sites(jobs, threshold=threshold).values() for a in found]
    if not candidates:
        return []
    workers = site_workers({a.institution_id for a in candidates}, now=now)
    told = []
    for absence in candidates:
        if _tell_once(jobs[absence.job_id], absence, workers[absence.institution_id], now=now):
            told.append(absence)
    return told


def _already_told(job: TrainingJob, absence: Absence) -> bool:
    """Whether this streak was told of: the site's latest ``site.absent`` entry for the job
    names a round after which the site has not reported."""
    payload_text = (
        entries_about(_JOB_LABEL, str(job.pk))
        .filter(event=ledger_events.SITE_ABSENT, institution_slug=absence.slug)
        .order_by("-seq")
        .values_list("payload_text", flat=True)
        .first()
    )
    if payload_text is None:
        return False
    told_up_to = max(json.loads(payload_text).get("rounds") or [0])
    return absence.returned_round is None or absence.returned_round < told_up_to


def _tell_once(job: TrainingJob, absence: Absence, workers: SiteWorkers, *, now) -> bool:
    # A streak already told of is the common case on every tick while a site stays away:
    # answered without the ledger's lock, which every writer of the ledger waits on.
    if _already_told(job, absence):
        return False
    with transaction.atomic():
        # The ledger's head lock first (the project's lock order): a second tick, here or on
        # another coordinator, waits, then sees this one's entry.
        lock_chain()
        if not TrainingJob.objects.filter(pk=job.pk, state=JobState.RUNNING).exists():
            return False
        if _already_told(job, absence):
            return False
        append_entry(
            event=ledger_events.SITE_ABSENT,
            actor=None,
            subject=job,
            consortium_slug=job.consortium.slug,
            institution_slug=absence.slug,
            payload={
                "job_id": job.pk,
                "site": absence.slug,
                "rounds_missed": absence.missed,
                "rounds": list(absence.rounds),
                "threshold": alert_rounds(),
            },
        )
        notify(
            users=_whom_to_tell(job, absence),
            consortium=job.consortium,
            message=_message(job, absence, workers, now=now),
            url=job_url(job),
        )
    return True


def _whom_to_tell(job: TrainingJob, absence: Absence) -> list:
    """The proposer, the consortium's administrators and the site's institution
    administrators: who can decide about the job, and who can bring the worker back."""
    admins = Membership.objects.filter(
        Q(consortium_id=job.consortium_id, institution__isnull=True, role=Role.CONSORTIUM_ADMIN)
        | Q(institution_id=absence.institution_id, role=Role.INSTITUTION_ADMIN)
    ).select_related("user")
    return [job.proposer, *(m.user for m in admins)]


def _message(job: TrainingJob, absence: Absence, workers: SiteWorkers, *, now) -> str:
    return (
        f"Job #{job.pk} “{job.title}”: {absence.text}; {worker_state_words(workers, now=now)}. "
        "Each round now waits its full timeout for it."
    )
