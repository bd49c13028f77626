"""Training jobs: what each site offers, the jobs proposed over those offers,
each hospital's decision, and the privacy budget each job reserves
(docs/architecture.md, sections 3 and 4). Rows are written only through the services of
``training.jobs`` (datasets, proposals, approvals, transitions) and ``training.rounds``.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from consortium.governance.models import AgreementVersion, Consortium, Institution


class Modality(models.TextChoices):
    TABULAR = "tabular", "Tabular records"
    IMAGE = "image", "Images"
    SEGMENTATION = "segmentation", "Images with segmentation masks"


class SiteDataset(models.Model):
    """The description of a data set one site offers. Only this description
    reaches the central side: the records stay on site, where the worker maps
    ``key`` to its own files."""

    institution = models.ForeignKey(Institution, on_delete=models.CASCADE, related_name="datasets")
    key = models.CharField(max_length=64)
    description = models.TextField()
    modality = models.CharField(max_length=16, choices=Modality.choices)
    num_records = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    input_shape = models.JSONField(help_text="Shape of one input: [features] or [C, H, W].")
    n_classes = models.PositiveIntegerField(validators=[MinValueValidator(2)])
    schema = models.JSONField(
        default=dict, blank=True, help_text="Optional: column names, units, label meaning."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["institution__name", "key"]
        constraints = [
            models.UniqueConstraint(fields=["institution", "key"], name="uniq_dataset_key")
        ]

    def __str__(self) -> str:
        return f"{self.key} at {self.institution}"


class JobState(models.TextChoices):
    DRAFT = "draft", "Draft"
    AWAITING_APPROVAL = "awaiting_approval", "Awaiting approval"
    APPROVED = "approved", "Approved (queued)"
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    REJECTED = "rejected", "Rejected"
    EXPIRED = "expired", "Expired"


TERMINAL_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.REJECTED, JobState.EXPIRED}
)


class TrainingJob(models.Model):
    """A federated training job. ``spec_text`` is the canonical JSON of the
    validated spec and ``spec_digest`` its SHA-256: approvals bind to the digest,
    so any change to the spec voids them."""

    consortium = models.ForeignKey(Consortium, on_delete=models.PROTECT, related_name="jobs")
    title = models.CharField(max_length=200)
    spec_text = models.TextField()
    spec_digest = models.CharField(max_length=64, db_index=True)
    agreement_version = models.ForeignKey(
        AgreementVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="jobs"
    )
    state = models.CharField(
        max_length=24, choices=JobState.choices, default=JobState.DRAFT, db_index=True
    )
    proposer = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    proposer_repr = models.CharField(max_length=255)
    created_at = models.DateTimeField(default=timezone.now)
    proposed_at = models.DateTimeField(null=True, blank=True)
    approval_deadline = models.DateTimeField(null=True, blank=True)
    state_changed_at = models.DateTimeField(default=timezone.now)
    end_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["consortium", "state"])]

    def __str__(self) -> str:
        return f"Job #{self.pk} {self.title}"

    @property
    def spec(self) -> dict:
        return json.loads(self.spec_text)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class JobParticipant(models.Model):
    """An institution taking part in a job. A withdrawal of consent removes it
    from the next round on; the row stays, with when and why."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        REMOVED = "removed", "Removed"

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="participants")
    institution = models.ForeignKey(
        Institution, on_delete=models.PROTECT, related_name="job_participations"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    removed_at = models.DateTimeField(null=True, blank=True)
    removed_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["institution__name"]
        constraints = [
            models.UniqueConstraint(fields=["job", "institution"], name="uniq_job_participant")
        ]

    def __str__(self) -> str:
        return f"{self.institution} in {self.job}"


class Approval(models.Model):
    """One approver's decision for one institution. It counts only while the
    job's spec digest and agreement version are those it was made under; older
    decisions stay as history."""

    class Decision(models.TextChoices):
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="approvals")
    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="+")
    decision = models.CharField(max_length=16, choices=Decision.choices)
    reason = models.TextField(blank=True)
    spec_digest = models.CharField(max_length=64)
    agreement_version = models.ForeignKey(
        AgreementVersion, on_delete=models.PROTECT, related_name="+"
    )
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_by_repr = models.CharField(max_length=255)
    decided_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-decided_at"]
        indexes = [models.Index(fields=["job", "institution", "spec_digest"])]

    def __str__(self) -> str:
        return f"{self.institution} {self.decision} {self.job}"


class PrivacyReservation(models.Model):
    """The privacy events one job will spend at one institution, reserved when
    the job is proposed so that two jobs cannot both fit a cap only one fits.

    ``events_text`` is canonical JSON of ``training.jobs.accounting.PrivacyEvent``
    records: budgets are always replayed from these by the accountant, never
    summed by hand. A released reservation (job rejected, cancelled, expired,
    or the institution removed) no longer counts.
    """

    class Status(models.TextChoices):
        RESERVED = "reserved", "Reserved"
        SPENT = "spent", "Spent"
        RELEASED = "released", "Released"

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="reservations")
    institution = models.ForeignKey(
        Institution, on_delete=models.PROTECT, related_name="privacy_reservations"
    )
    events_text = models.TextField()
    epsilon = models.FloatField(help_text="This job's own ε at the agreement's δ (for display).")
    delta = models.FloatField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RESERVED)
    created_at = models.DateTimeField(default=timezone.now)
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["job", "institution"],
                condition=~Q(status="released"),
                name="one_live_reservation_per_job_institution",
            )
        ]

    def __str__(self) -> str:
        return f"{self.institution}: ε {self.epsilon:.3f} for {self.job} ({self.status})"


class SiteCredential(models.Model):
    """A site worker's credentials: an API token (only its SHA-256 is stored; the
    token is shown once) and the worker's Ed25519 public key, against which
    each update's signature is checked. A revoked credential is refused."""

    institution = models.ForeignKey(
        Institution, on_delete=models.CASCADE, related_name="site_credentials"
    )
    label = models.CharField(max_length=100)
    token_prefix = models.CharField(max_length=12, help_text="The token's first characters.")
    token_hash = models.CharField(max_length=64, unique=True)
    public_key = models.TextField(help_text="The worker's Ed25519 public key (PEM).")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.institution} worker {self.label} ({self.token_prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class GlobalModel(models.Model):
    """One version of a job's global model. ``digest`` is the SHA-256 of its
    packed tensors (the artifact's name in the store); ``lineage_hash`` chains it
    over its parent, the sorted digests of the updates it was made from and
    their weights, so the model's history can be recomputed."""

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="global_models")
    round_index = models.PositiveIntegerField(help_text="0 is the initial model.")
    digest = models.CharField(max_length=64)
    lineage_hash = models.CharField(max_length=64)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    size_bytes = models.PositiveBigIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["job", "round_index"]
        constraints = [
            models.UniqueConstraint(fields=["job", "round_index"], name="uniq_global_model_round")
        ]

    def __str__(self) -> str:
        return f"{self.job} model r{self.round_index} {self.digest[:12]}"


class Round(models.Model):
    """One federated round. State lives here, not in Celery's result store:
    transitions are compare-and-set updates, so a task delivered twice, or a
    coordinator restarted mid-round, does no harm."""

    class State(models.TextChoices):
        OPEN = "open", "Collecting updates"
        AGGREGATING = "aggregating", "Aggregating"
        CLOSED = "closed", "Closed"
        FAILED = "failed", "Failed"

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="rounds")
    index = models.PositiveIntegerField(help_text="1-based.")
    state = models.CharField(max_length=16, choices=State.choices, default=State.OPEN)
    global_model_in = models.ForeignKey(
        GlobalModel, on_delete=models.PROTECT, related_name="rounds_started"
    )
    global_model_out = models.ForeignKey(
        GlobalModel, null=True, blank=True, on_delete=models.PROTECT, related_name="rounds_ended"
    )
    opened_at = models.DateTimeField(default=timezone.now)
    deadline = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)
    failure_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["job", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="uniq_round_index")]

    def __str__(self) -> str:
        return f"{self.job} round {self.index} ({self.state})"


class SiteUpdate(models.Model):
    """One site's contribution to one round: dispatched, then received and
    verified (accepted) or refused (rejected, with the reason), or never
    received (straggler).

    ``start_digest`` is the model the site was sent, and its update is a delta
    relative to that model: for fedavg the round's global model, for cyclic the
    previous site's result (an artifact, not a ``GlobalModel``). The site API
    serves a site the start models of its own updates. ``sent_at`` is when the
    site task was last sent; it stays null while a cyclic site waits for its
    turn (``dispatched_at`` is when the site was asked for the round)."""

    class Status(models.TextChoices):
        DISPATCHED = "dispatched", "Dispatched"
        ACCEPTED = "accepted", "Accepted"
        REJECTED = "rejected", "Rejected"
        STRAGGLER = "straggler", "Straggler"

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="updates")
    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DISPATCHED)
    samples = models.PositiveIntegerField(default=0)
    update_digest = models.CharField(max_length=64, blank=True)
    signature = models.TextField(blank=True)
    size_bytes = models.PositiveBigIntegerField(default=0)
    pipeline = models.JSONField(default=list, blank=True)
    privacy_events = models.JSONField(default=list, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    reject_reason = models.TextField(blank=True)
    credential = models.ForeignKey(
        SiteCredential, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    dispatched_at = models.DateTimeField(default=timezone.now)
    start_digest = models.CharField(
        max_length=64,
        blank=True,
        help_text="SHA-256 of the model the site was sent (its update is relative to it); "
        "empty until it is sent.",
    )
    sent_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the site task was last sent; null while a cyclic site waits its turn.",
    )
    received_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["round", "institution__name"]
        constraints = [
            models.UniqueConstraint(fields=["round", "institution"], name="uniq_round_site")
        ]

    def __str__(self) -> str:
        return f"{self.institution} in {self.round} ({self.status})"


class ContributionScore(models.Model):
    """One site's contribution score for one round, for display queries.

    The truth is the ``contribution.scored`` ledger entry (``ledger_seq``) written in the same
    transaction, which also holds the coalition values the score was computed from
    (``training.rounds.contributions``); these rows only make the pages' per-institution sums one
    query. ``metric`` is what a coalition was valued by (accuracy, Dice), ``method`` the method
    actually used (``auto`` resolved)."""

    job = models.ForeignKey(
        TrainingJob, on_delete=models.CASCADE, related_name="contribution_scores"
    )
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="contribution_scores")
    round_index = models.PositiveIntegerField()
    institution = models.ForeignKey(
        Institution, on_delete=models.PROTECT, related_name="contribution_scores"
    )
    method = models.CharField(max_length=32)
    metric = models.CharField(max_length=32)
    score = models.FloatField()
    ledger_seq = models.PositiveBigIntegerField(
        help_text="Sequence number of the contribution.scored ledger entry."
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["job", "round_index", "institution__name"]
        constraints = [
            models.UniqueConstraint(
                fields=["round", "institution"], name="uniq_contribution_round_site"
            )
        ]
        indexes = [models.Index(fields=["institution", "job"])]

    def __str__(self) -> str:
        return f"{self.institution} r{self.round_index} of {self.job}: {self.score:.4f}"
