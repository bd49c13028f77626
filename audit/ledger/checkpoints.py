"""Publishing the ledger's signed checkpoints, serving proofs, recording the sites' witnesses.

The ledger (:mod:`.chain`) is also a Merkle tree (:mod:`.merkle`, leaf ``i`` the entry with
``seq == i + 1``). This module keeps that tree in memory per process, extended with the entries
appended since it last looked, and signs its head with the centre's key (:mod:`.keys`) as a
C2SP checkpoint (:mod:`.checkpoint`), stored as :class:`~audit.models.LedgerCheckpoint`. The
site workers fetch the newest checkpoint with a consistency proof from the last one they saw,
check both and countersign (:func:`witness_record`), so a ledger rewritten at the centre, even
by someone with every right on the database, is caught by the first site that looks.

**The cache is checked, never trusted.** Each look re-reads the newest entry it already holds
and requires every new entry to chain on it (``prev_hash``), so a history rewritten under the
cache is seen at once and the tree is rebuilt from the rows as they now are. Before a new head
is signed, the tree must still give the newest stored checkpoint's root at that checkpoint's
size (which, by the tree's construction, vouches for every earlier one too). If it does not,
history was rewritten under a head the centre signed: :func:`checkpoint_publish` refuses
(:class:`LedgerRewritten`, logged as an error) rather than sign a second, contradicting head.
Whoever also deletes the checkpoint rows gets a new head signed, and every site holding an old
one refuses it, because no consistency proof joins them.

The leaf is the entry's ``entry_hash``, which commits to the entry's content only for someone
who recomputes it: an entry altered without recomputing the hashes leaves the tree as it was,
and is the chain's to catch (``verify_ledger``); one altered and re-hashed along the chain
(the "consistent" rewrite) moves every later leaf, and the tree catches it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from audit.ledger.checkpoint import (
    Checkpoint,
    NoteSignature,
    SignedCheckpoint,
    parse_signed_checkpoint,
    sign_checkpoint,
    verify_cosignature,
)
from audit.ledger.keys import ledger_origin, signing_key_pem
from audit.ledger.merkle import MerkleTree, ProofError, entry_leaf
from audit.models import CheckpointWitness, LedgerCheckpoint, LedgerEntry

__all__ = [
    "CheckpointNotPublished",
    "CheckpointRootMismatch",
    "LedgerRewritten",
    "WitnessLine",
    "WitnessResult",
    "checkpoint_latest",
    "checkpoint_publish",
    "checkpoint_with_proof",
    "checkpoint_witnesses",
    "consistency_proof",
    "inclusion_proof",
    "ledger_tree",
    "ledger_tree_from_rows",
    "signed_checkpoint_of",
    "witness_key_name",
    "witness_record",
]

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64  # what the first entry chains on (chain.GENESIS_HASH)
_CHUNK = 5000


class LedgerRewritten(RuntimeError):
    """The ledger's rows no longer give a head the centre signed, or no longer chain."""


class CheckpointNotPublished(LookupError):
    """A tree size for which this centre never signed a checkpoint."""


class CheckpointRootMismatch(ValueError):
    """A root other than the one this centre signed at that tree size."""


def _rows(from_seq: int, *, stream: bool = True) -> Iterable[tuple[int, str, str]]:
    rows = (
        LedgerEntry.objects.filter(seq__gte=from_seq)
        .order_by("seq")
        .values_list("seq", "prev_hash", "entry_hash")
    )
    # Streamed for a whole ledger (flat memory); the few entries since the last look are
    # fetched at once (a server-side cursor costs PostgreSQL a round trip of its own).
    return rows.iterator(chunk_size=_CHUNK) if stream else rows


def _chained_leaves(
    rows: Iterable[tuple[int, str, str]], *, seq: int, prev: str
) -> tuple[list[bytes], str]:
    """The leaves of ``rows``, which must be entries ``seq, seq + 1, ...``, each chained on the
    one before (the first on ``prev``); :class:`LedgerRewritten` saying where they are not."""
    leaves: list[bytes] = []
    for row_seq, prev_hash, entry_hash in rows:
        if row_seq != seq:
            raise LedgerRewritten(
                f"the ledger's rows skip from entry #{seq - 1} to #{row_seq}: an entry is "
                "missing, so no tree head can be signed (run manage.py verify_ledger)"
            )
        if prev_hash != prev:
            raise LedgerRewritten(
                f"entry #{row_seq} does not chain on the entry before it (run manage.py "
                "verify_ledger): no tree head can be signed over a broken chain"
            )
        leaves.append(entry_leaf(entry_hash))
        prev = entry_hash
        seq += 1
    return leaves, prev


def ledger_tree_from_rows() -> MerkleTree:
    """A tree built afresh from every row of today's ledger, sharing nothing with the cache
    (what ``verify_ledger --checkpoint`` checks a saved checkpoint against)."""
    leaves, _ = _chained_leaves(_rows(1), seq=1, prev=GENESIS_HASH)
    return MerkleTree(leaves)


class _TreeCache:
    """This process's tree and the hash of its last leaf's entry, behind one lock (Daphne
    serves requests from several threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tree = MerkleTree()
        self.last_hash = GENESIS_HASH

    def refreshed(self) -> MerkleTree:
        with self.lock:
            size = self.tree.size
            rows = iter(_rows(size, stream=False) if size else _rows(1))
            if size:
                first = next(rows, None)
                if first is None or first[0] != size or first[2] != self.last_hash:
                    return self._rebuild(size)
            try:
                leaves, last = _chained_leaves(rows, seq=size + 1, prev=self.last_hash)
            except LedgerRewritten:
                if not size:
                    raise
                return self._rebuild(size)
            self.tree.extend(leaves)  # reads of sizes already reached never change
            self.last_hash = last
            return self.tree

    def _rebuild(self, cached_size: int) -> MerkleTree:
        """The rows changed under the cache (or the database is another one: tests): start
        again from the rows as they are. Whether that contradicts a signed head is
        :func:`checkpoint_publish`'s to decide."""
        logger.warning(
            "ledger tree: the entry at #%d is not the one this process read before; "
            "rebuilding the Merkle tree from the database",
            cached_size,
        )
        leaves, last = _chained_leaves(_rows(1), seq=1, prev=GENESIS_HASH)
        self.tree = MerkleTree(leaves)  # a new object: readers of the old one are unaffected
        self.last_hash = last
        return self.tree


_cache = _TreeCache()


def ledger_tree() -> MerkleTree:
    """The tree over today's ledger, brought up to date (its size is the ledger's length)."""
    return _cache.refreshed()


def signed_checkpoint_of(row: LedgerCheckpoint) -> SignedCheckpoint:
    """The stored note, parsed (it was written by :func:`checkpoint_publish`)."""
    return parse_signed_checkpoint(row.note)


def checkpoint_latest() -> LedgerCheckpoint | None:
    """The newest stored checkpoint, without publishing one (reports name it)."""
    return LedgerCheckpoint.objects.order_by("-tree_size").first()


def _check_against(tree: MerkleTree, row: LedgerCheckpoint) -> None:
    if row.tree_size > tree.size:
        raise LedgerRewritten(
            f"the ledger has {tree.size} entries but this centre signed checkpoint "
            f"{row.tree_size}: entries it covered were deleted (history rolled back); "
            "refusing to sign a new checkpoint"
        )
    if tree.root(row.tree_size).hex() != row.root_hash:
        raise LedgerRewritten(
            f"the ledger's first {row.tree_size} entries no longer give the root of "
            f"checkpoint {row.tree_size} that this centre signed ({row.root_hash[:16]}...): "
            "history was rewritten under it; refusing to sign a new checkpoint"
        )


def checkpoint_publish() -> LedgerCheckpoint:
    """The signed checkpoint of the ledger's current head, signing one if the head moved.

    Raises :class:`LedgerRewritten` (and logs it as an error) when today's rows contradict
    the newest checkpoint already signed: the centre does not sign over a rewritten history.
    """
    return _publish()[0]


def _signed_within(row: LedgerCheckpoint, seconds: float) -> bool:
    return seconds > 0 and row.created_at > timezone.now() - dt.timedelta(seconds=seconds)


def _publish(*, reuse_within: float = 0.0) -> tuple[LedgerCheckpoint, MerkleTree]:
    """The newest checkpoint and today's tree: a new head signed when the ledger moved, unless
    the newest was signed less than ``reuse_within`` seconds ago. Either way today's rows are
    checked against the newest signed head first."""
    # The checkpoint first, then the rows: a head signed by another process is then never
    # ahead of the rows read here, unless rows it covered are gone.
    latest = checkpoint_latest()
    tree = ledger_tree()
    if latest is not None:
        try:
            _check_against(tree, latest)
        except LedgerRewritten as exc:
            logger.error("ledger checkpoint refused: %s", exc)
            raise
        if latest.tree_size == tree.size or _signed_within(latest, reuse_within):
            return latest, tree
    size = tree.size
    origin = ledger_origin()
    signed = sign_checkpoint(
        Checkpoint(origin, size, tree.root(size)), name=origin, private_pem=signing_key_pem()
    )
    try:
        with transaction.atomic():
            row = LedgerCheckpoint.objects.create(
                tree_size=size, root_hash=signed.checkpoint.root_hash.hex(), note=signed.text()
            )
    except IntegrityError:  # another process signed this size first: the same head
        row = LedgerCheckpoint.objects.get(tree_size=size)
        _check_against(tree, row)
    return row, tree


def checkpoint_with_proof(since: int) -> tuple[LedgerCheckpoint, list[bytes] | None]:
    """The checkpoint a site is served, and the consistency proof from the tree of ``since``
    entries to it, from the same tree (one look at the ledger); None instead of a proof when
    ``since`` is beyond the checkpoint (whoever saw that tree saw a longer ledger).

    The checkpoint is :func:`checkpoint_publish`'s, except that a head signed less than
    ``LEDGER_CHECKPOINT_SECONDS`` ago is served again even if the ledger moved since. Every
    upload moves the ledger and every site asks with its round's model, so signing each time
    would store about one checkpoint per site and round (a thousand a round at a thousand
    sites) and sign on nearly every model request. A site is then at most that many seconds
    behind the head, which it never needed: it witnesses that the history it saw was kept,
    and the next checkpoint covers what came after. Today's rows are still checked against
    the newest signed head on every request, so a rewrite is refused as soon as before."""
    row, tree = _publish(reuse_within=settings.LEDGER_CHECKPOINT_SECONDS)
    if since > row.tree_size:
        return row, None
    return row, tree.consistency_proof(since, row.tree_size)


def consistency_proof(old_size: int, new_size: int) -> list[bytes]:
    """RFC 9162's proof that the tree of ``new_size`` extends the one of ``old_size``
    (:class:`~audit.ledger.merkle.ProofError` for sizes the ledger has not reached)."""
    return ledger_tree().consistency_proof(old_size, new_size)


def inclusion_proof(seq: int, tree_size: int | None = None) -> tuple[str, list[bytes], int, bytes]:
    """Entry ``seq``'s hash, its audit path in the tree of ``tree_size`` entries (default:
    today's), that size and the tree's root at it (:class:`~audit.ledger.merkle.ProofError`
    for an entry or size the ledger does not hold)."""
    tree = ledger_tree()
    size = tree.size if tree_size is None else tree_size
    if seq < 1:
        raise ProofError(f"entries are numbered from 1, got seq {seq}")
    proof = tree.inclusion_proof(seq - 1, size)
    entry_hash = LedgerEntry.objects.values_list("entry_hash", flat=True).get(seq=seq)
    return entry_hash, proof, size, tree.root(size)


def witness_key_name(institution_slug: str) -> str:
    """The name a site's worker cosigns under: its institution's slug (unique, no spaces)."""
    return institution_slug


@dataclass(frozen=True)
class WitnessResult:
    witness: CheckpointWitness
    created: bool


def witness_record(
    *,
    tree_size: int,
    root_hash: str,
    cosignature: NoteSignature,
    institution_id: int,
    institution_slug: str,
    credential_id: int | None,
    public_key: str,
) -> WitnessResult:
    """Store a site's cosignature of the checkpoint the centre signed at ``tree_size``.

    The cosignature must verify, under the site's name, with ``public_key`` (its credential's
    registered key) over that checkpoint's text: a forged or misdirected one raises
    :class:`~audit.ledger.checkpoint.BadCheckpointSignature`. A size never signed raises
    :class:`CheckpointNotPublished`; a root other than the one signed at that size,
    :class:`CheckpointRootMismatch`. A site that witnessed the checkpoint already gets its
    first witness back.
    """
    try:
        row = LedgerCheckpoint.objects.get(tree_size=tree_size)  # unique; get() orders nothing
    except LedgerCheckpoint.DoesNotExist:
        raise CheckpointNotPublished(
            f"this centre never signed a checkpoint of size {tree_size}"
        ) from None
    if row.root_hash != root_hash:
        raise CheckpointRootMismatch(
            f"the checkpoint of size {tree_size} this centre signed has root "
            f"{row.root_hash}, not {root_hash}"
        )
    name = witness_key_name(institution_slug)
    verify_cosignature(
        signed_checkpoint_of(row).checkpoint, cosignature, name=name, public_pem=public_key
    )
    witness = CheckpointWitness(
        checkpoint=row,
        institution_id=institution_id,
        credential_id=credential_id,
        key_name=name,
        public_key=public_key,
        signature_line=cosignature.line(),
    )
    if _inserted(witness):
        return WitnessResult(witness, created=True)
    # The site witnessed this checkpoint before (or its other request did, at the same moment).
    return WitnessResult(
        CheckpointWitness.objects.get(checkpoint=row, institution_id=institution_id), False
    )


def _inserted(witness: CheckpointWitness) -> bool:
    """Insert ``witness``; False when the site's witness of that checkpoint is there already.

    The insert is tried first: a site witnesses a checkpoint once, so looking before would cost
    every upload a query for the rare second time. Outside a transaction (the upload's witness
    comes after its update committed) a refused INSERT breaks nothing, and BEGIN and COMMIT
    around it would be two more round trips; inside a caller's, a savepoint keeps the caller's
    transaction usable."""
    in_transaction = transaction.get_connection().in_atomic_block
    try:
        with transaction.atomic() if in_transaction else contextlib.nullcontext():
            witness.save(force_insert=True)
    except IntegrityError:
        return False
    return True


@dataclass(frozen=True)
class WitnessLine:
    """One site's witness of a checkpoint, as reports and the API show it."""

    site: str
    witnessed_at: dt.datetime
    signature_line: str


def checkpoint_witnesses(row: LedgerCheckpoint) -> list[WitnessLine]:
    """The sites that cosigned ``row``, in the order they did."""
    return [
        WitnessLine(slug, at, line)
        for slug, at, line in CheckpointWitness.objects.filter(checkpoint=row)
        .order_by("created_at", "pk")
        .values_list("institution__slug", "created_at", "signature_line")
    ]
