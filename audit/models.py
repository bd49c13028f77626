"""The tamper-evident ledger (docs/architecture.md, section 5).

Hand-written on purpose: django-auditlog and django-simple-history hang on model
signals (bypassed by ``update()``, ``bulk_create`` and raw SQL) and neither chains
hashes. Each entry stores its payload as canonical JSON *text* and
``entry_hash = sha256(prev_hash || canonical_json(entry))``; see ``audit.ledger.chain``.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class LedgerEntry(models.Model):
    """One append-only, hash-chained record of something that happened.

    ``actor`` may become NULL when the user is deleted; ``actor_repr`` keeps a
    readable name and ``actor_id_at_write`` the id, both inside the hash. On
    PostgreSQL, plain triggers (``audit.ledger.database_guard``, installed by migration 0004)
    refuse every UPDATE except that one change (``actor`` set to NULL and nothing else), every
    DELETE and TRUNCATE, and any INSERT that does not chain on the head.
    """

    seq = models.PositiveBigIntegerField(unique=True)
    prev_hash = models.CharField(max_length=64)
    entry_hash = models.CharField(max_length=64, unique=True)
    event = models.CharField(max_length=64, db_index=True)
    # No index on the actor: every index is written on every append (the ledger's throughput
    # is its commit rate), and the only query by actor is the SET NULL when a user is deleted,
    # rare enough to scan for.
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="ledger_entries",
        db_index=False,
    )
    actor_id_at_write = models.BigIntegerField(null=True, blank=True)
    actor_repr = models.CharField(max_length=255)
    subject_type = models.CharField(max_length=64, blank=True)
    subject_id = models.CharField(max_length=64, blank=True)
    # Slugs, not foreign keys: the entry must outlive and never follow the rows it names.
    consortium_slug = models.CharField(max_length=64, blank=True)
    institution_slug = models.CharField(max_length=64, blank=True, db_index=True)
    payload_text = models.TextField()
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["seq"]
        verbose_name_plural = "ledger entries"
        indexes = [
            models.Index(fields=["created_at"]),
            # A consortium's entries newest first (the ledger page, the live pages' catch-up):
            # without the seq in the index the database sorts every entry of the consortium to
            # show fifty (272 ms at 100,000 entries on SQLite; 1 ms with it).
            models.Index(fields=["consortium_slug", "seq"], name="ledger_consortium_seq"),
            # The history of one object (a job's page).
            models.Index(fields=["subject_type", "subject_id", "seq"], name="ledger_subject_seq"),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.event} by {self.actor_repr}"


class LedgerHead(models.Model):
    """The single row naming the chain's last entry.

    Appends lock it (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's IMMEDIATE
    transactions already serialise writers), so two writers cannot both chain on
    the same predecessor. Verification also compares it with the last entry, which
    is how a deleted tail is caught. On PostgreSQL a trigger lets it move only one step
    forward, to the entry just chained on it, and never be deleted.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    seq = models.PositiveBigIntegerField(default=0)
    entry_hash = models.CharField(max_length=64, default="0" * 64)

    def __str__(self) -> str:
        return f"head #{self.seq} {self.entry_hash[:12]}"


class LedgerCheckpoint(models.Model):
    """A signed head of the ledger's Merkle tree (``audit.ledger.checkpoints``), as served.

    ``note`` is the signed note byte for byte (the C2SP checkpoint and the centre's signature
    line): what the sites verify and countersign, so it is kept exactly, not rebuilt. One row
    per tree size: the same size always gets the same checkpoint (Ed25519 is deterministic).
    An ordinary table, not guarded like the ledger: whoever rewrites it gains nothing, since
    the sites keep their own copies and check every new head against them.
    """

    tree_size = models.PositiveBigIntegerField(unique=True)
    root_hash = models.CharField(max_length=64)
    note = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-tree_size"]

    def __str__(self) -> str:
        return f"checkpoint {self.tree_size} {self.root_hash[:12]}"


class CheckpointWitness(models.Model):
    """A site's cosignature of a checkpoint: its worker checked the centre's signature and a
    consistency proof from the last head it saw, and signed the same text with its key.

    The public key it was verified with is copied in, so the row proves itself after the
    credential is revoked or deleted; the institution is kept (PROTECT) because the witness
    is evidence about it.
    """

    checkpoint = models.ForeignKey(
        LedgerCheckpoint, on_delete=models.PROTECT, related_name="witnesses"
    )
    institution = models.ForeignKey(
        "consortium.Institution", on_delete=models.PROTECT, related_name="+"
    )
    credential = models.ForeignKey(
        "training.SiteCredential",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    key_name = models.CharField(max_length=100)
    public_key = models.TextField()
    signature_line = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["checkpoint", "created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["checkpoint", "institution"], name="one_witness_per_site_and_checkpoint"
            )
        ]

    def __str__(self) -> str:
        return f"{self.key_name} witnessed checkpoint {self.checkpoint_id}"
