"""Training jobs: what each site offers, the jobs proposed over those offers,
each hospital's decision, and the privacy budget each job reserves
(docs/architecture.md, sections 3 and 4). Rows are written only through the services of
``training.jobs`` (datasets, proposals, approvals, transitions) and ``training.rounds``.

Why one module: these are the ``training`` app's tables, one schema with foreign keys running
through it (a job's rounds, updates, evaluations, scores, the validation sets its evaluation
reads), and its migrations are made from this module; Django finds an app's models here, and a
package of model modules would only scatter the one place a reader looks for the schema.
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


class SiteWorkerStatus(models.Model):
    """What a site's worker last said of itself in its heartbeat (``POST
    /api/site/v1/heartbeat/``), one row per credential: when it was last heard from, which
    release and site protocol it runs, on which device and host. It is what the institution's
    page, the dashboard and a job's approver read to tell an online worker from one that is
    not (``training.rounds.heartbeats``); it is operational state, not a governance act, so it
    is overwritten in place and written in no ledger."""

    credential = models.OneToOneField(
        SiteCredential, on_delete=models.CASCADE, related_name="worker_status"
    )
    last_seen_at = models.DateTimeField()
    started_at = models.DateTimeField(
        null=True, blank=True, help_text="When the worker process now running first reported."
    )
    protocol = models.PositiveSmallIntegerField(help_text="The site protocol version it speaks.")
    version = models.CharField(max_length=64, help_text="The worker's software release.")
    device = models.CharField(max_length=200, help_text='"cuda:<device name>" or "cpu".')
    hostname = models.CharField(max_length=255, blank=True)
    interval_seconds = models.PositiveIntegerField(
        help_text="Seconds between its reports (SITE_HEARTBEAT_SECONDS)."
    )

    class Meta:
        ordering = ["-last_seen_at"]

    def __str__(self) -> str:
        return f"{self.credential} last seen {self.last_seen_at:%Y-%m-%d %H:%M:%S}"


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
    # The aggregation claim (OPEN -> AGGREGATING) is a lease: the coordinator that holds it
    # renews ``lease_expires_at`` while it works, and closes the round only while
    # ``claim_token`` is still its own; a coordinator killed mid-aggregation lets the lease run
    # out and the next tick claims the round again (training.rounds.coordinator).
    claim_token = models.CharField(max_length=32, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)

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
    # Indexed: the intake looks every upload's digest up to refuse replays (a copy of an update
    # already received is refused without counting against the site).
    update_digest = models.CharField(max_length=64, blank=True, db_index=True)
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


class RoundEvaluation(models.Model):
    """The evaluation of a closed round's models at the sites (a job whose spec evaluates at the
    ``sites``: ``training.jobs.spec.evaluation_settings``; ``training.rounds.site_evaluation``).

    The coordinator builds the round's coalition models from the shared updates, asks every
    participating site to evaluate them and the round's model on its own validation share, and
    closes the evaluation once every site has reported or its deadline has passed: the round's
    metric and its contribution scores are then the record-weighted combination of the
    reports. ``asked_models`` lists what the sites were asked, ``[{"digest": d, "sites": [...]}]``:
    the coalition of sites each model was built from (the round's model is listed too, under
    the sites whose updates made it). ``plan`` is the contribution method and parameters the
    coalitions were chosen for."""

    class State(models.TextChoices):
        COLLECTING = "collecting", "Collecting the sites' evaluations"
        CLOSED = "closed", "Closed"

    round = models.OneToOneField(Round, on_delete=models.CASCADE, related_name="evaluation")
    state = models.CharField(max_length=16, choices=State.choices, default=State.COLLECTING)
    global_digest = models.CharField(max_length=64)
    asked_models = models.JSONField()
    plan = models.JSONField()
    requested_at = models.DateTimeField(default=timezone.now)
    deadline = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"evaluation of {self.round} ({self.state})"

    @property
    def digests(self) -> list[str]:
        return sorted({m["digest"] for m in self.asked_models})


class SiteEvaluation(models.Model):
    """One site's part in a round's evaluation: asked, then reported (the signed report's
    canonical text and signature, as the ledger's ``evaluation.reported`` entry holds them),
    or missing when the evaluation closed without it."""

    class Status(models.TextChoices):
        ASKED = "asked", "Asked"
        REPORTED = "reported", "Reported"
        MISSING = "missing", "Missing"

    evaluation = models.ForeignKey(
        RoundEvaluation, on_delete=models.CASCADE, related_name="site_evaluations"
    )
    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ASKED)
    sent_at = models.DateTimeField(default=timezone.now)
    records = models.PositiveIntegerField(null=True, blank=True)
    report_text = models.TextField(blank=True)
    report_digest = models.CharField(max_length=64, blank=True)
    signature = models.CharField(max_length=200, blank=True)
    reported_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["evaluation", "institution__slug"]
        constraints = [
            models.UniqueConstraint(
                fields=["evaluation", "institution"], name="uniq_site_evaluation"
            )
        ]

    def __str__(self) -> str:
        return f"{self.institution} on {self.evaluation.round} ({self.status})"


class PrivacyAudit(models.Model):
    """One site's privacy audit of a job's update, asked before the approvers decide
    (the spec's ``privacy_audit``; ``training.jobs.privacy_audits``).

    The site trains one local step as the job would on a few of its own records, applies the
    job's pipeline, attacks its own update and reports only figures, signed
    (:mod:`training.fl.audit_report`). An audit is bound to the spec digest it ran against: a
    changed spec asks again. ``outcome`` is ``measured`` (``summary`` holds the figures) or
    ``out_of_reach`` (``reason`` says why the audit cannot attack this model)."""

    class Status(models.TextChoices):
        ASKED = "asked", "Asked"
        REPORTED = "reported", "Reported"

    class Outcome(models.TextChoices):
        MEASURED = "measured", "Measured"
        OUT_OF_REACH = "out_of_reach", "Out of the audit's reach"

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="privacy_audits")
    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="+")
    spec_digest = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ASKED)
    asked_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(default=timezone.now)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, blank=True)
    #: The report's summary figures (``AuditResult.to_json()["summary"]``, with
    #: ``conclusive`` and ``shared_fraction``), for pages and the approval gate.
    summary = models.JSONField(null=True, blank=True)
    reason = models.TextField(blank=True)
    report_text = models.TextField(blank=True)
    report_digest = models.CharField(max_length=64, blank=True)
    signature = models.CharField(max_length=200, blank=True)
    reported_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job", "institution__slug", "-asked_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["job", "institution", "spec_digest"], name="uniq_privacy_audit"
            )
        ]

    def __str__(self) -> str:
        return f"privacy audit of {self.job} by {self.institution} ({self.status})"


class AuditPicture(models.Model):
    """A picture for the approvers of what the audit's attacks rebuild under a job's pipeline,
    drawn centrally from a bundled **public** data set of the same shape as the job's records
    (never a site's records; :func:`training.fl.inversion.reconstruction_picture`). ``png`` is
    empty while it is drawn, or when no bundled set fits (``note`` says why)."""

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="audit_pictures")
    spec_digest = models.CharField(max_length=64)
    dataset_key = models.CharField(max_length=64, blank=True)
    png = models.BinaryField(blank=True, default=b"")
    figures = models.JSONField(null=True, blank=True)
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    drawn_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["job", "spec_digest"], name="uniq_audit_picture")
        ]

    def __str__(self) -> str:
        return f"audit picture of {self.job}"


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


class CentralValidationSet(models.Model):
    """A validation set the consortium holds for one data set key: records an institution's
    data steward sent to the consortium's server because the agreement in force allows a
    central validation set (``AgreementVersion.allows_central_validation_set``). Jobs on that
    key may then evaluate their models ``central``ly on it (``training.jobs.compliance``
    checks it exists, ``training.rounds.validation_sets`` loads it).

    The records are in the artifact store as the engine's tensor container (``x`` and ``y``)
    under ``digest``: what the models are measured on, content-addressed. ``upload_sha256`` is
    the SHA-256 of the file as it was uploaded, so the steward can match it to their copy. A
    newer upload for the same key replaces this one (``replaced_at``); a job keeps the set that
    was current when it started, so its rounds are measured alike."""

    class Format(models.TextChoices):
        CSV = "csv", "CSV (header row, a label column, numeric features)"
        NPZ = "npz", "NumPy archive (images with labels or masks)"

    consortium = models.ForeignKey(
        Consortium, on_delete=models.PROTECT, related_name="validation_sets"
    )
    key = models.CharField(max_length=64)
    institution = models.ForeignKey(
        Institution,
        on_delete=models.PROTECT,
        related_name="validation_sets",
        help_text="The institution whose data steward uploaded it.",
    )
    agreement_version = models.ForeignKey(
        AgreementVersion,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="The agreement version in force that allowed it.",
    )
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    uploaded_by_repr = models.CharField(max_length=255)
    file_name = models.CharField(max_length=255)
    file_format = models.CharField(max_length=8, choices=Format.choices)
    upload_sha256 = models.CharField(max_length=64)
    digest = models.CharField(max_length=64, help_text="The stored records' artifact digest.")
    size_bytes = models.PositiveBigIntegerField()
    num_records = models.PositiveIntegerField()
    modality = models.CharField(max_length=16, choices=Modality.choices)
    input_shape = models.JSONField(help_text="Shape of one input: [features] or [C, H, W].")
    n_classes = models.PositiveIntegerField(help_text="Classes its labels show (largest + 1).")
    created_at = models.DateTimeField(default=timezone.now)
    replaced_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["consortium", "key", "-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["consortium", "key"],
                condition=Q(replaced_at__isnull=True),
                name="one_current_validation_set",
            )
        ]
        indexes = [models.Index(fields=["consortium", "key", "created_at"])]

    def __str__(self) -> str:
        return f"central validation set '{self.key}' from {self.institution}"


class OutboxMessage(models.Model):
    """A Celery message that must follow a commit: written in the same transaction as the
    state change that calls for it, and published by the relay until the broker takes it
    (``training.outbox``). A broker outage delays the message, never drops it, and the
    request that caused it never fails after its commit.

    Delivery is at least once (a relay killed between publishing and marking the row sent
    publishes it again), which every task of ``training.queues`` tolerates: each is a
    compare-and-set on our own rows. Sent rows are kept a day for operators, then deleted."""

    task = models.CharField(max_length=100, help_text="A task name of training.queues.")
    queue = models.CharField(max_length=200)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    available_at = models.DateTimeField(
        default=timezone.now, help_text="When the relay may next try to publish it."
    )
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["pk"]
        indexes = [
            models.Index(
                fields=["available_at"],
                condition=Q(sent_at__isnull=True),
                name="outbox_pending",
            ),
            models.Index(fields=["sent_at"], name="outbox_sent"),
        ]

    def __str__(self) -> str:
        state = f"sent {self.sent_at:%H:%M:%S}" if self.sent_at else f"pending ({self.attempts})"
        return f"{self.task} to {self.queue}, {state}"


class ServiceHeartbeat(models.Model):
    """What a central process last said of itself: one row per process (``instance`` is
    ``host:pid``), overwritten in place. The coordinator's worker writes one every few seconds
    (with its relay's last pass), the periodic tick one per run; ``/health/``, ``/metrics`` and
    the dashboard read them to tell a live coordinator from a dead one
    (``training.liveness``). Operational state, not a governance act: no ledger entry."""

    class Component(models.TextChoices):
        COORDINATOR = "coordinator", "Coordinator worker"
        TICK = "tick", "Periodic tick"

    component = models.CharField(max_length=32, choices=Component.choices)
    instance = models.CharField(max_length=255)
    hostname = models.CharField(max_length=255, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    interval_seconds = models.FloatField(help_text="Seconds between its heartbeats.")
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["component", "-last_seen_at"]
        constraints = [
            models.UniqueConstraint(fields=["component", "instance"], name="uniq_service_heartbeat")
        ]

    def __str__(self) -> str:
        return f"{self.component} {self.instance} last seen {self.last_seen_at:%H:%M:%S}"
