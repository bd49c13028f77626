"""Reads for training jobs: what a user may see, what waits on an approver, and
whether an approval still counts."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from django.db.models import Count, Exists, OuterRef, Prefetch, Q, QuerySet, Sum

from audit.ledger import events as ledger_events
from audit.ledger.selectors import subjects_recorded
from consortium.core.prepared import PreparedQuery
from consortium.governance.models import Institution, Notification, Role
from consortium.governance.permissions import grants_of
from consortium.governance.selectors import consortium_ids_of, user_institutions_with_role
from training.jobs.accounting import PrivacyEvent, epsilon_spent
from training.models import (
    Approval,
    ContributionScore,
    JobParticipant,
    JobState,
    PrivacyReservation,
    Round,
    SiteDataset,
    SiteUpdate,
    TrainingJob,
)

# Compiled once per connection (consortium.core.prepared): the coordinator reads it twice in
# every close, and compiling its joins cost more than running it.
_ROUND_WITH_JOB = PreparedQuery(
    lambda round_id: Round.objects.select_related("job__consortium", "global_model_in").filter(
        pk=round_id
    ),
    one=True,
    round_id=int,
)


def round_with_job(round_id: int) -> Round | None:
    """A round with its job, the job's consortium and the round's starting model: what the
    coordinator and the contribution scorer read before working on a round."""
    return _ROUND_WITH_JOB.one_or_none(round_id=int(round_id))


def job_rounds_unscored(job_id: int) -> list[int]:
    """The indices of the job's closed rounds that have neither ``contribution.scored`` nor
    ``contribution.unavailable`` yet (the scoring worker has not recorded them): what the demo
    waits for before it verifies the ledger."""
    closed = dict(
        Round.objects.filter(job_id=job_id, state=Round.State.CLOSED).values_list("pk", "index")
    )
    recorded = subjects_recorded(
        [ledger_events.CONTRIBUTION_SCORED, ledger_events.CONTRIBUTION_UNAVAILABLE],
        Round._meta.label_lower,
        [str(pk) for pk in closed],
    )
    return sorted(index for pk, index in closed.items() if str(pk) not in recorded)


def job_spec_texts(job_ids) -> dict[int, str]:
    """Each job's spec as stored with the job (its canonical text, which its spec digest is
    taken over), by job id. The ledger records only the digest: the compliance report checks
    the stored text against it, so it reads the text here rather than the model directly."""
    return dict(TrainingJob.objects.filter(pk__in=list(job_ids)).values_list("pk", "spec_text"))


def jobs_visible_to(user) -> QuerySet[TrainingJob]:
    """Every member of a consortium sees its jobs: consortia are transparent
    inside, closed outside."""
    return TrainingJob.objects.filter(consortium_id__in=consortium_ids_of(user)).select_related(
        "consortium", "agreement_version"
    )


def datasets_visible_to(user) -> QuerySet[SiteDataset]:
    return SiteDataset.objects.filter(
        institution__consortium_id__in=consortium_ids_of(user)
    ).select_related("institution")


def jobs_for_list(user) -> QuerySet[TrainingJob]:
    """Jobs with what a list row shows, in a fixed number of queries."""
    return jobs_visible_to(user).prefetch_related(
        Prefetch(
            "participants",
            queryset=JobParticipant.objects.select_related("institution").order_by(
                "institution__name"
            ),
        )
    )


def jobs_listed(
    user, *, consortium, participant: Institution | None = None, state: str = ""
) -> QuerySet[TrainingJob]:
    """The consortium's jobs page: :func:`jobs_for_list` in ``consortium``, narrowed to the
    jobs ``participant`` took part in (withdrawn or not: it was a participant) and to
    ``state`` when given. Still scoped to the user, so a filter can only narrow what they
    may see."""
    jobs = jobs_for_list(user).filter(consortium=consortium)
    if participant is not None:
        jobs = jobs.filter(participants__institution=participant)
    if state:
        jobs = jobs.filter(state=state)
    return jobs


def job_participant_choices(user, *, consortium) -> QuerySet[Institution]:
    """The institutions the jobs page can be filtered by: those that took part in a job of
    ``consortium`` the user may see, by name. Institutions of other consortia, and ones in no
    job (a filter that could only answer "none"), are not offered.

    Asked as "institutions whose id is among the participants of the visible jobs", not as a
    join with ``DISTINCT``: SQLite planned the join as one index probe per institution and
    job (20 ms at 100 institutions and 1,000 jobs, half the jobs page), where the list of
    participants' ids is read once (2 ms; PostgreSQL 3.9 → 1.8 ms)."""
    visible = jobs_visible_to(user).filter(consortium=consortium)
    took_part = JobParticipant.objects.filter(job__in=visible.values("pk")).values("institution_id")
    return Institution.objects.filter(consortium=consortium, pk__in=took_part).order_by("name")


def jobs_to_compare(user, *, consortium, job_ids) -> dict[int, TrainingJob]:
    """The jobs of ``consortium`` among ``job_ids`` that the user may see, by id, with their
    participants' institutions (what the comparison page shows of each). A missing id and one
    the user may not see are both simply absent, so the page answers them alike."""
    jobs = (
        jobs_visible_to(user)
        .filter(consortium=consortium, pk__in=list(job_ids))
        .prefetch_related(
            Prefetch(
                "participants",
                queryset=JobParticipant.objects.select_related("institution").order_by(
                    "institution__name"
                ),
            )
        )
    )
    return {job.pk: job for job in jobs}


def is_valid_approval(approval: Approval, job: TrainingJob) -> bool:
    """A decision counts only for the spec and agreement version it was made under."""
    return (
        approval.spec_digest == job.spec_digest
        and approval.agreement_version_id == job.agreement_version_id
    )


def current_decisions(job: TrainingJob) -> dict[int, Approval]:
    """The latest *valid* decision per institution (uses prefetched approvals)."""
    decisions: dict[int, Approval] = {}
    for approval in sorted(job.approvals.all(), key=lambda a: a.decided_at, reverse=True):
        if approval.institution_id not in decisions and is_valid_approval(approval, job):
            decisions[approval.institution_id] = approval
    return decisions


def active_participants(job: TrainingJob) -> list[JobParticipant]:
    return [p for p in job.participants.all() if p.status == JobParticipant.Status.ACTIVE]


def institutions_user_decides_for(user, job: TrainingJob) -> QuerySet[Institution]:
    """The user's institutions that take part (actively) in ``job`` and that they approve
    for: the review form's choices. The rule ``training.decide_job`` admits the approvers of
    every participant, also of one no longer taking part, so the review page and its offer ask
    this, not the rule alone."""
    active = {p.institution_id for p in active_participants(job)}
    return user_institutions_with_role(user, job.consortium, Role.APPROVER).filter(pk__in=active)


def institutions_awaiting_decision_from(user, job: TrainingJob) -> QuerySet[Institution]:
    """Of :func:`institutions_user_decides_for`, those with no valid decision yet: what a
    "Review and decide" offer is for (empty once the job no longer awaits approval)."""
    if job.state != JobState.AWAITING_APPROVAL:
        return Institution.objects.none()
    return institutions_user_decides_for(user, job).exclude(pk__in=list(current_decisions(job)))


@dataclass
class PendingReview:
    job: TrainingJob
    institutions: list  # the user's institutions whose decision is awaited


def undecided_participations() -> QuerySet[JobParticipant]:
    """Active participations in jobs awaiting approval that have no valid decision yet: the
    SQL form of :func:`is_valid_approval` (same spec digest and agreement version), for the
    approver's inbox and the dashboard's count of approvals owed."""
    valid_decision = Approval.objects.filter(
        job_id=OuterRef("job_id"),
        institution_id=OuterRef("institution_id"),
        spec_digest=OuterRef("job__spec_digest"),
        agreement_version_id=OuterRef("job__agreement_version_id"),
    )
    return JobParticipant.objects.filter(
        job__state=JobState.AWAITING_APPROVAL, status=JobParticipant.Status.ACTIVE
    ).filter(~Exists(valid_decision))


class Inbox(Sequence):
    """The jobs waiting on a user's decision, as a lazy sequence of :class:`PendingReview`.

    Which jobs wait is decided in SQL (an active participation of one of the user's
    institutions, in a job awaiting approval, with no valid decision from that institution:
    same spec digest and agreement version, as :func:`is_valid_approval` says), so a page of the
    inbox costs three queries (the count, the page's jobs, their waiting participations)
    whatever the number of jobs. Django's ``Paginator`` and DRF's pagination slice it.
    """

    def __init__(self, jobs: QuerySet, waiting: QuerySet):
        self._jobs = jobs
        self._waiting = waiting
        self._count: int | None = None

    def __len__(self) -> int:
        if self._count is None:
            self._count = self._jobs.count()
        return self._count

    def count(self) -> int:
        return len(self)

    def __getitem__(self, index):
        if isinstance(index, int):
            found = self[index : index + 1] if index >= 0 else self[len(self) + index :][:1]
            if not found:
                raise IndexError(index)
            return found[0]
        jobs = list(self._jobs[index])
        names: dict[int, list] = {}
        for p in self._waiting.filter(job_id__in=[j.pk for j in jobs]).select_related(
            "institution"
        ):
            names.setdefault(p.job_id, []).append(p.institution)
        return [
            PendingReview(job=job, institutions=sorted(names[job.pk], key=lambda i: i.name))
            for job in jobs
            if job.pk in names
        ]


def approver_inbox(user, consortium=None) -> Inbox:
    """Jobs awaiting a decision from one of the user's institutions (in ``consortium``, if
    given), earliest deadline first."""
    approver_of = {g.institution_id for g in grants_of(user) if g.role == Role.APPROVER}
    waiting = undecided_participations().filter(
        job__in=jobs_visible_to(user), institution_id__in=approver_of
    )
    if consortium is not None:
        waiting = waiting.filter(job__consortium=consortium)
    jobs = TrainingJob.objects.filter(pk__in=waiting.values("job_id")).order_by(
        "approval_deadline", "pk"
    )
    return Inbox(jobs, waiting)


def live_reservations(institution_ids) -> QuerySet[PrivacyReservation]:
    """Reservations that count against budgets (reserved or spent, not released)."""
    return PrivacyReservation.objects.filter(institution_id__in=institution_ids).exclude(
        status=PrivacyReservation.Status.RELEASED
    )


def notifications_of(user) -> QuerySet[Notification]:
    """The user's own notifications, newest first."""
    return Notification.objects.filter(user=user).select_related("consortium")


def unread_notification_count(user) -> int:
    return Notification.objects.filter(user=user, read_at__isnull=True).count()


def committed_privacy_events(institution_ids, *, exclude_job_id: int | None = None) -> dict:
    """Every privacy event each institution has spent or committed, for replay by
    the accountant: {institution_id: [PrivacyEvent, ...]}.

    The live reservations of jobs count whole (they bound what those jobs will
    spend). Accepted updates count for jobs whose reservation is not counted: the
    excluded job itself (its rounds so far), and jobs whose reservation was
    released when they failed or were cancelled mid-run, since the rounds they
    ran were spent all the same.
    """
    ids = list(institution_ids)
    events: dict[int, list] = defaultdict(list)
    covered: dict[int, set[int]] = defaultdict(set)
    live = live_reservations(ids)
    if exclude_job_id is not None:
        live = live.exclude(job_id=exclude_job_id)
    for institution_id, job_id, text in live.values_list("institution_id", "job_id", "events_text"):
        events[institution_id].extend(PrivacyEvent.from_json(e) for e in json.loads(text))
        covered[institution_id].add(job_id)
    accepted = accepted_privacy_events(
        SiteUpdate.objects.filter(institution_id__in=ids), "institution_id", "round__job_id"
    )
    for (institution_id, job_id), update_events in accepted.items():
        if job_id not in covered[institution_id]:
            events[institution_id].extend(update_events)
    return events


def accepted_privacy_events(updates: QuerySet[SiteUpdate], *keys: str) -> dict[tuple, list]:
    """The privacy events of the accepted updates among ``updates``, per value of ``keys``
    (fields of ``SiteUpdate``, e.g. ``"institution_id", "round__job_id"``): ``{(value, ...):
    [PrivacyEvent, ...]}``, identical events merged into one whose ``count`` says how often.

    Why grouped: every budget check (each round of every job, each proposal) and every
    accountability page replays an institution's whole history, which grows by one update per
    round it takes part in. The database groups the identical event lists (a site's rounds in
    one job carry the same events) and counts them, so Python parses one list per distinct
    list instead of one per update. The accountant composes by count (``count`` applications
    of an event are the event ``count`` times), so the ε replayed is the history's own; pure ε
    is multiplied where it was added up, the same to the last few bits (and no longer
    dependent on the order the database returns rows in, as the sum was).
    """
    merged: dict[tuple, dict[tuple, list]] = defaultdict(dict)
    rows = (
        updates.filter(status=SiteUpdate.Status.ACCEPTED)
        .values(*keys, "privacy_events")
        .annotate(copies=Count("pk"))
        .order_by()
    )
    for row in rows:
        group = merged[tuple(row[key] for key in keys)]
        for raw in row["privacy_events"] or []:
            event = PrivacyEvent.from_json(raw)
            same = (event.mechanism, tuple(sorted(event.params.items())), event.source)
            if same in group:
                group[same][1] += event.count * row["copies"]
            else:
                group[same] = [event, event.count * row["copies"]]
    return {
        key: [
            PrivacyEvent(event.mechanism, event.params, count, event.source)
            for _same, (event, count) in sorted(group.items())
        ]
        for key, group in merged.items()
    }


# --- Accountability: contributions, participation and privacy spent (issue 5) -----------------


@dataclass
class SiteAccount:
    """What one institution gave to one job and what it cost it. ``epsilon_job`` replays the
    privacy events of its accepted updates in this job, ``epsilon_total`` those of every job it
    took part in, both at the job's agreement δ (None without an agreement version)."""

    institution: object
    score: float | None = None  # summed over the rounds scored
    round_scores: dict = field(default_factory=dict)  # round index -> score
    samples: int = 0
    rounds: int = 0  # accepted updates: rounds participated
    rejected: int = 0
    epsilon_job: float | None = None
    epsilon_total: float | None = None
    cap: float | None = None
    delta: float | None = None


@dataclass
class JobAccountability:
    rows: list = field(default_factory=list)  # SiteAccount, by institution name
    rounds: list = field(default_factory=list)  # round indices with scores
    methods: list = field(default_factory=list)
    metrics: list = field(default_factory=list)

    def round_table(self) -> list[tuple[int, list]]:
        """``(round, [score or None per row])`` for the per-round table."""
        return [(i, [r.round_scores.get(i) for r in self.rows]) for i in self.rounds]


def _update_counts(queryset, key: str) -> dict:
    """``{key value: {"samples", "accepted", "rejected"}}`` over ``SiteUpdate`` rows, one query."""
    accepted = Q(status=SiteUpdate.Status.ACCEPTED)
    rows = (
        queryset.order_by()
        .values(key)
        .annotate(
            samples=Sum("samples", filter=accepted),
            accepted=Count("pk", filter=accepted),
            rejected=Count("pk", filter=Q(status=SiteUpdate.Status.REJECTED)),
        )
    )
    return {r[key]: r for r in rows}


def _replay(events: list, delta: float | None) -> float | None:
    if delta is None:
        return None
    try:
        return epsilon_spent(events, delta=delta)
    except ValueError:  # pragma: no cover - events are validated when an update is accepted
        return None


def job_accountability(job: TrainingJob) -> JobAccountability:
    """Per participant of ``job``: its contribution scores (per round and summed), samples
    contributed, rounds participated, updates rejected, and privacy spent against the cap.

    Three queries whatever the number of participants and rounds (the participants come from
    ``job.participants``, prefetched by the job page): the scores, the update counts, and the
    privacy events of the participants' accepted updates.
    """
    participants = sorted(job.participants.all(), key=lambda p: p.institution.name)
    ids = [p.institution_id for p in participants]
    version = job.agreement_version
    cap = float(version.epsilon_cap) if version is not None else None
    delta = float(version.delta) if version is not None else None
    out = JobAccountability()
    rows = {
        p.institution_id: SiteAccount(institution=p.institution, cap=cap, delta=delta)
        for p in participants
    }
    out.rows = list(rows.values())
    methods, metrics, rounds = set(), set(), set()
    for institution_id, index, score, method, metric in ContributionScore.objects.filter(
        job=job
    ).values_list("institution_id", "round_index", "score", "method", "metric"):
        row = rows.get(institution_id)
        if row is None:  # pragma: no cover - a scored site is a participant
            continue
        row.round_scores[index] = score
        row.score = (row.score or 0.0) + score
        methods.add(method)
        metrics.add(metric)
        rounds.add(index)
    out.rounds, out.methods, out.metrics = sorted(rounds), sorted(methods), sorted(metrics)
    counts = _update_counts(SiteUpdate.objects.filter(round__job=job), "institution_id")
    for institution_id, row in rows.items():
        c = counts.get(institution_id) or {}
        row.samples = c.get("samples") or 0
        row.rounds = c.get("accepted") or 0
        row.rejected = c.get("rejected") or 0
    own: dict[int, list] = defaultdict(list)
    every: dict[int, list] = defaultdict(list)
    accepted = accepted_privacy_events(
        SiteUpdate.objects.filter(institution_id__in=ids), "institution_id", "round__job_id"
    )
    for (institution_id, job_id), events in accepted.items():
        every[institution_id].extend(events)
        if job_id == job.pk:
            own[institution_id].extend(events)
    for institution_id, row in rows.items():
        row.epsilon_job = _replay(own[institution_id], delta)
        row.epsilon_total = _replay(every[institution_id], delta)
    return out


@dataclass
class InstitutionJobAccount:
    """One job an institution took part in, as its page shows it."""

    job: object
    participation: object
    score: float | None = None
    round_scores: dict = field(default_factory=dict)
    method: str = ""
    metric: str = ""
    samples: int = 0
    rounds: int = 0
    rejected: int = 0
    epsilon: float | None = None  # this job's, at its agreement's δ
    cap: float | None = None
    delta: float | None = None

    @property
    def round_list(self) -> list[tuple[int, float]]:
        return sorted(self.round_scores.items())


@dataclass
class InstitutionAccountability:
    jobs: list = field(default_factory=list)  # InstitutionJobAccount, newest first
    epsilon_total: float | None = None  # every job, at ``delta``
    cap: float | None = None
    delta: float | None = None
    version: object = None  # the agreement version the total is read against


def institution_accountability(user, institution) -> InstitutionAccountability:
    """Per job the institution took part in (that ``user`` may see): contribution scores,
    samples, rounds, rejected updates and ε spent; and its ε spent over every job, against the
    cap of the agreement of its latest job. Four queries whatever the number of jobs and rounds.
    """
    participations = list(
        JobParticipant.objects.filter(
            institution=institution, job__consortium_id__in=consortium_ids_of(user)
        )
        .select_related("job__agreement_version", "job__consortium")
        .order_by("-job__created_at", "-job_id")
    )
    out = InstitutionAccountability()
    rows: dict[int, InstitutionJobAccount] = {}
    for p in participations:
        version = p.job.agreement_version
        rows[p.job_id] = InstitutionJobAccount(
            job=p.job,
            participation=p,
            cap=float(version.epsilon_cap) if version is not None else None,
            delta=float(version.delta) if version is not None else None,
        )
        if out.version is None and version is not None:
            out.version = version
    out.jobs = list(rows.values())
    if out.version is not None:
        out.cap, out.delta = float(out.version.epsilon_cap), float(out.version.delta)
    for job_id, index, score, method, metric in ContributionScore.objects.filter(
        institution=institution, job_id__in=list(rows)
    ).values_list("job_id", "round_index", "score", "method", "metric"):
        row = rows[job_id]
        row.round_scores[index] = score
        row.score = (row.score or 0.0) + score
        row.method = method if row.method in ("", method) else "mixed"
        row.metric = metric
    counts = _update_counts(
        SiteUpdate.objects.filter(institution=institution, round__job_id__in=list(rows)),
        "round__job_id",
    )
    for job_id, row in rows.items():
        c = counts.get(job_id) or {}
        row.samples = c.get("samples") or 0
        row.rounds = c.get("accepted") or 0
        row.rejected = c.get("rejected") or 0
    per_job: dict[int, list] = defaultdict(list)
    every: list = []
    accepted = accepted_privacy_events(
        SiteUpdate.objects.filter(institution=institution), "round__job_id"
    )
    for (job_id,), events in accepted.items():
        per_job[job_id].extend(events)
        every.extend(events)
    for job_id, row in rows.items():
        row.epsilon = _replay(per_job[job_id], row.delta)
    out.epsilon_total = _replay(every, out.delta)
    return out
