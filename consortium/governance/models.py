"""Governance: consortia, institutions, memberships, invitations and data-use
agreements (docs/architecture.md, section 3). Rows are written only through ``services``."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Role(models.TextChoices):
    """Consortium-wide roles have no institution; the others belong to one."""

    CONSORTIUM_ADMIN = "consortium_admin", "Consortium administrator"
    AUDITOR = "auditor", "Auditor"
    INSTITUTION_ADMIN = "institution_admin", "Institution administrator"
    APPROVER = "approver", "Approver"
    DATA_STEWARD = "data_steward", "Data steward"
    RESEARCHER = "researcher", "Researcher"


# Sorted where they enter a migration: a set's order changes between runs.
CONSORTIUM_ROLES = frozenset({Role.CONSORTIUM_ADMIN, Role.AUDITOR})
INSTITUTION_ROLES = frozenset(
    {Role.INSTITUTION_ADMIN, Role.APPROVER, Role.DATA_STEWARD, Role.RESEARCHER}
)


class DPMechanism(models.TextChoices):
    """The differential-privacy mechanism an agreement may require of every job."""

    NONE = "none", "None required"
    LAPLACE = "laplace", "Laplace noise"
    GAUSSIAN = "gaussian", "Gaussian noise"
    SVT = "svt", "Sparse vector technique"
    DP_SGD = "dp_sgd", "DP-SGD at the site"


class ModelFamily(models.TextChoices):
    """Model families an agreement can permit; jobs name a model of one family."""

    LINEAR = "linear", "Linear models (logistic regression)"
    MLP = "mlp", "Multilayer perceptrons"
    CNN = "cnn", "Convolutional networks"
    UNET = "unet", "U-Net segmentation networks"
    CUSTOM = "custom", "Registered custom models"


class Purpose(models.TextChoices):
    """What a job's model is for; an agreement permits some of these."""

    CLASSIFICATION = "classification", "Classification (diagnosis, risk prediction)"
    SEGMENTATION = "segmentation", "Segmentation (delineating lesions or organs)"


def all_purposes() -> list[str]:
    return sorted(Purpose.values)


class Consortium(models.Model):
    """A group of institutions that train models together under one agreement."""

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "consortia"

    def __str__(self) -> str:
        return self.name


class Institution(models.Model):
    """A hospital or research site. ``slug`` names its worker queue (``site.<slug>``).

    ``worker_public_key`` is the site worker's Ed25519 public key (PEM), against
    which the central side verifies signed model updates.
    """

    consortium = models.ForeignKey(
        Consortium, on_delete=models.PROTECT, related_name="institutions"
    )
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    country = models.CharField(max_length=64, blank=True)
    worker_public_key = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["consortium", "name"], name="uniq_institution_name")
        ]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    """A user's role in a consortium, and for institution roles, in one institution.

    A user may hold several memberships (one row per role).
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    consortium = models.ForeignKey(Consortium, on_delete=models.CASCADE, related_name="memberships")
    institution = models.ForeignKey(
        Institution, null=True, blank=True, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=32, choices=Role.choices)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["consortium", "institution__name", "role"]
        constraints = [
            # Two partial constraints, since SQLite has no NULLS NOT DISTINCT.
            models.UniqueConstraint(
                fields=["user", "consortium", "role"],
                condition=Q(institution__isnull=True),
                name="uniq_consortium_membership",
            ),
            models.UniqueConstraint(
                fields=["user", "institution", "role"],
                condition=Q(institution__isnull=False),
                name="uniq_institution_membership",
            ),
            models.CheckConstraint(
                name="membership_role_matches_scope",
                condition=(
                    Q(institution__isnull=True, role__in=sorted(CONSORTIUM_ROLES))
                    | Q(institution__isnull=False, role__in=sorted(INSTITUTION_ROLES))
                ),
            ),
        ]

    def __str__(self) -> str:
        where = self.institution or self.consortium
        return f"{self.user} – {self.get_role_display()} at {where}"


class Invitation(models.Model):
    """An emailed invitation to join with a role. Only the token's hash is stored."""

    consortium = models.ForeignKey(Consortium, on_delete=models.CASCADE, related_name="invitations")
    institution = models.ForeignKey(
        Institution, null=True, blank=True, on_delete=models.CASCADE, related_name="invitations"
    )
    email = models.EmailField()
    role = models.CharField(max_length=32, choices=Role.choices)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Invitation of {self.email} as {self.get_role_display()}"

    @property
    def is_pending(self) -> bool:
        return (
            self.accepted_at is None
            and self.revoked_at is None
            and self.expires_at > timezone.now()
        )

    @property
    def status(self) -> str:
        if self.accepted_at:
            return "accepted"
        if self.revoked_at:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "pending"


class Agreement(models.Model):
    """A data-use agreement; its terms live in immutable published versions."""

    consortium = models.ForeignKey(Consortium, on_delete=models.PROTECT, related_name="agreements")
    title = models.CharField(max_length=200)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.title


class FinalModelAccess(models.TextChoices):
    """Who may download a job's global models (the final model above all) through the product:
    a term of the data-use agreement the job runs under. Whoever may see the job still sees the
    model's digest, lineage and where it is stored; this term decides only who takes a copy."""

    PARTICIPANTS_AND_ADMINS = (
        "participants_and_admins",
        "Members of the participating institutions and the consortium's administrators",
    )
    PARTICIPANTS = "participants", "Members of the participating institutions only"
    NOBODY = "nobody", "Nobody: the model stays on the consortium's server"


class AgreementVersion(models.Model):
    """One version of an agreement's terms.

    A draft may be edited; publishing freezes it (``content_digest`` is the
    SHA-256 of its canonical terms and text, and signatures record it). An
    amendment is a new version, which needs new signatures.

    ``allows_central_validation_set``, ``final_model_access`` and the privacy audit's terms
    (``privacy_audit_required``, ``audit_max_median_ssim``, ``audit_max_success_rate``) came
    after versions had been signed: each enters the digested terms only when it differs from its
    default, so every earlier version keeps its digest (``services.agreements.version_terms``).
    """

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        PUBLISHED = "published", "Published"

    agreement = models.ForeignKey(Agreement, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT)
    purpose = models.TextField()
    permitted_purposes = models.JSONField(
        default=all_purposes, help_text="The kinds of model jobs may train (Purpose values)."
    )
    permitted_model_families = models.JSONField(default=list)
    max_shared_fraction = models.DecimalField(
        max_digits=4,
        decimal_places=3,
        validators=[MinValueValidator(0), MaxValueValidator(1)],
        help_text="Largest fraction of the model a site may share per round (0 to 1).",
    )
    required_dp_mechanism = models.CharField(
        max_length=16, choices=DPMechanism.choices, default=DPMechanism.GAUSSIAN
    )
    epsilon_cap = models.DecimalField(
        max_digits=8,
        decimal_places=3,
        validators=[MinValueValidator(0)],
        help_text="Each institution's total privacy budget ε in this consortium.",
    )
    delta = models.DecimalField(
        max_digits=12,
        decimal_places=10,
        validators=[MinValueValidator(0), MaxValueValidator(1)],
        help_text="The δ at which ε is accounted.",
    )
    allows_central_validation_set = models.BooleanField(
        default=False,
        help_text=(
            "An institution's data steward may send records to the consortium's server as a "
            "central validation set, on which models are evaluated centrally."
        ),
    )
    final_model_access = models.CharField(
        max_length=32,
        choices=FinalModelAccess.choices,
        default=FinalModelAccess.PARTICIPANTS_AND_ADMINS,
        help_text=(
            "Who may download a job's models (the final model above all) from the consortium's "
            "server. Members of an institution that has withdrawn from the job never may; "
            "everyone who sees the job still sees the model's digest and lineage."
        ),
    )
    privacy_audit_required = models.BooleanField(
        default=False,
        help_text=(
            "Before an institution approves a job, its own site worker attacks the update the "
            "job would send, under the job's privacy pipeline, on a few of the site's records, "
            "and reports only the figures (the privacy audit). Required: a job must ask for "
            "the audit, and no institution may approve it before its own audit is in."
        ),
    )
    audit_max_median_ssim = models.DecimalField(
        max_digits=4,
        decimal_places=3,
        null=True,
        blank=True,
        validators=[MinValueValidator(0), MaxValueValidator(1)],
        help_text=(
            "Highest median similarity (SSIM) between a site's image records and what the "
            "audit's attacks rebuild of them that an institution may approve: 1 is an exact "
            "copy; around 0.3 a reconstruction is hard to recognise. Empty: no maximum. Applies "
            "to image records only (a tabular audit measures no SSIM)."
        ),
    )
    audit_max_success_rate = models.DecimalField(
        max_digits=4,
        decimal_places=3,
        null=True,
        blank=True,
        validators=[MinValueValidator(0), MaxValueValidator(1)],
        help_text=(
            "Highest success rate an institution may approve: the share of its audited records "
            "that the audit's attacks rebuild (0 to 1; 0.25 is one record in four). Empty: no "
            "maximum."
        ),
    )
    valid_from = models.DateField()
    valid_until = models.DateField()
    text = models.TextField(help_text="The full text of the agreement.")
    content_digest = models.CharField(max_length=64, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    published_at = models.DateTimeField(null=True, blank=True)
    published_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )

    class Meta:
        ordering = ["agreement", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["agreement", "number"], name="uniq_version_number"),
            # At most one draft per agreement at a time.
            models.UniqueConstraint(
                fields=["agreement"],
                condition=Q(status="draft"),
                name="one_draft_per_agreement",
            ),
            models.CheckConstraint(
                name="version_dates_ordered", condition=Q(valid_until__gte=models.F("valid_from"))
            ),
        ]

    def __str__(self) -> str:
        return f"{self.agreement} v{self.number} ({self.status})"

    @property
    def is_published(self) -> bool:
        return self.status == self.Status.PUBLISHED

    def is_within_dates(self, on=None) -> bool:
        today = on or timezone.localdate()
        return self.valid_from <= today <= self.valid_until


class Signature(models.Model):
    """An institution's approver signing one published version's exact text."""

    version = models.ForeignKey(
        AgreementVersion, on_delete=models.PROTECT, related_name="signatures"
    )
    institution = models.ForeignKey(
        Institution, on_delete=models.PROTECT, related_name="signatures"
    )
    signer = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    signer_repr = models.CharField(max_length=255)
    typed_name = models.CharField(max_length=200)
    content_digest = models.CharField(max_length=64)
    signed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["signed_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["version", "institution"], name="one_signature_per_institution"
            )
        ]

    def __str__(self) -> str:
        return f"{self.institution} signed {self.version}"


class Withdrawal(models.Model):
    """An institution withdrawing consent under an agreement.

    It blocks the institution from future jobs; later issues use it to flag the
    models derived from its contributions.
    """

    agreement = models.ForeignKey(Agreement, on_delete=models.PROTECT, related_name="withdrawals")
    institution = models.ForeignKey(
        Institution, on_delete=models.PROTECT, related_name="withdrawals"
    )
    reason = models.TextField()
    withdrawn_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    withdrawn_by_repr = models.CharField(max_length=255)
    withdrawn_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-withdrawn_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["agreement", "institution"], name="one_withdrawal_per_institution"
            )
        ]

    def __str__(self) -> str:
        return f"{self.institution} withdrew from {self.agreement}"


class Notification(models.Model):
    """A message for one user in the app (the same news also goes by email)."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications"
    )
    consortium = models.ForeignKey(
        Consortium, on_delete=models.CASCADE, related_name="notifications"
    )
    message = models.CharField(max_length=500)
    url = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    read_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["user", "read_at"])]

    def __str__(self) -> str:
        return self.message


class APITokenScope(models.TextChoices):
    """What a personal API token may do: read only (GET, HEAD, OPTIONS), or act too."""

    READ = "read", "Read only"
    ACT = "act", "Read and act"


class APIToken(models.Model):
    """A person's API token, for scripts and notebooks that call ``/api/`` as that person.

    Only the SHA-256 of the secret is stored (the secret is shown once, when created), with
    its first characters to tell tokens apart. It always expires, may be revoked, and acts
    with its owner's rights, limited by its scope. Not a site worker's token
    (``training.SiteCredential``): those authenticate a hospital's worker, these a person.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, help_text="What it is for, to tell it apart.")
    scope = models.CharField(max_length=8, choices=APITokenScope.choices)
    token_prefix = models.CharField(max_length=12, help_text="The token's first characters.")
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    second_factor = models.BooleanField(
        default=False,
        help_text="Created in a session that had verified its second factor: only such a token "
        "may do the acts that need one (consortium.core.second_factor).",
    )

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.user} API token {self.name} ({self.token_prefix}…)"

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "active"

    @property
    def is_active(self) -> bool:
        return self.status == "active"
