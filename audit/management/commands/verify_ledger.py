"""``manage.py verify_ledger``: recompute the hash chain and compare it with the head.

Exits 0 on an intact chain (printing the entry count and head hash) and non-zero
naming the first entry that does not match, and why. It streams the rows, so
memory does not grow with the ledger's length.

``--in-database`` (PostgreSQL): the database recomputes every hash itself and sends back only
what is wrong, for a quick check of a large ledger with nothing crossing the network. It trusts
the database server's functions, which the ledger is kept against, so the plain command (the
application recomputes every hash) stays the verification of record. Whatever it finds is
walked again by the application, for the same message as the plain command's.

``--checkpoint FILE`` checks instead that a saved signed checkpoint (the note as served, or
the API's JSON form of it) is still a prefix of today's ledger: its signature with the
centre's public key (this server's, or ``--public-key PEM`` for an auditor who holds only
that), then the Merkle tree rebuilt from today's rows, which must give the checkpoint's root
at its size, and the chain must verify (the leaves are the entries' hashes, which only the
chain ties to their content). ``--save-checkpoint FILE`` writes today's signed checkpoint
(signing one if the ledger grew) for an auditor to keep and check later.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from audit.ledger.chain import verify_chain, verify_chain_in_database
from audit.ledger.checkpoint import (
    CheckpointError,
    SignedCheckpoint,
    checkpoint_from_json,
    parse_signed_checkpoint,
    verify_checkpoint,
)
from audit.ledger.checkpoints import (
    LedgerRewritten,
    checkpoint_publish,
    ledger_tree_from_rows,
)
from audit.ledger.keys import public_key_pem


def _read_checkpoint(path: Path) -> SignedCheckpoint:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read the checkpoint {path}: {exc}") from exc
    try:
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CommandError(f"{path} is neither a signed note nor JSON: {exc}") from exc
            if isinstance(data, dict) and isinstance(data.get("checkpoint"), dict):
                data = data["checkpoint"]  # the API's whole answer, saved as it came
            return checkpoint_from_json(data)
        return parse_signed_checkpoint(text)
    except CheckpointError as exc:
        raise CommandError(f"{path} is not a signed checkpoint: {exc}") from exc


class Command(BaseCommand):
    help = (
        "Verify the ledger's hash chain; exit non-zero at the first entry that fails. "
        "With --checkpoint, check that a saved signed checkpoint is a prefix of today's ledger."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--chunk-size",
            type=int,
            default=5000,
            help="Rows fetched per round trip (default 5000).",
        )
        parser.add_argument(
            "--in-database",
            action="store_true",
            help="PostgreSQL only: let the database recompute the hashes (a quick check "
            "that trusts the database server; the plain command is the verification of record).",
        )
        parser.add_argument(
            "--checkpoint",
            metavar="FILE",
            help="A saved signed checkpoint (the note, or its JSON form) to check against "
            "today's ledger.",
        )
        parser.add_argument(
            "--public-key",
            metavar="PEM",
            help="With --checkpoint: the centre's public key (PEM file) to check its "
            "signature with (default: this server's LEDGER_SIGNING_KEY's).",
        )
        parser.add_argument(
            "--save-checkpoint",
            metavar="FILE",
            help="Write today's signed checkpoint (the note) to FILE, to check later.",
        )

    def handle(self, *args, chunk_size: int, **options):
        if options["in_database"] and (options["checkpoint"] or options["save_checkpoint"]):
            raise CommandError("--in-database verifies the chain alone: not with a checkpoint")
        if options["save_checkpoint"]:
            return self._save(Path(options["save_checkpoint"]))
        if options["checkpoint"]:
            return self._check(Path(options["checkpoint"]), options["public_key"])
        if options["public_key"]:
            raise CommandError("--public-key goes with --checkpoint")
        started = time.perf_counter()
        if options["in_database"]:
            try:
                result = verify_chain_in_database(chunk_size=chunk_size)
            except ValueError as exc:
                raise CommandError(str(exc)) from exc
        else:
            result = verify_chain(chunk_size=chunk_size)
        elapsed = time.perf_counter() - started
        if not result.ok:
            raise CommandError(
                f"Ledger BROKEN at entry #{result.first_bad_seq}: {result.reason} "
                f"({result.entry_count} entries verified before it, last good hash "
                f"{result.head_hash})"
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"Ledger intact: {result.entry_count} entries, head hash {result.head_hash} "
                f"(verified in {elapsed:.2f} s)"
            )
        )

    def _save(self, path: Path) -> None:
        try:
            row = checkpoint_publish()
        except LedgerRewritten as exc:
            raise CommandError(f"no checkpoint saved: {exc}") from exc
        path.write_text(row.note, encoding="utf-8")
        self.stdout.write(
            self.style.SUCCESS(f"checkpoint {row.tree_size} (root {row.root_hash}) saved to {path}")
        )

    def _check(self, path: Path, public_key: str | None) -> None:
        signed = _read_checkpoint(path)
        checkpoint = signed.checkpoint
        if public_key:
            try:
                public_pem = Path(public_key).read_bytes()
            except OSError as exc:
                raise CommandError(f"cannot read the public key {public_key}: {exc}") from exc
        else:
            public_pem = public_key_pem().encode("ascii")
        origin = checkpoint.origin
        try:
            verify_checkpoint(signed, origin=origin, name=origin, public_pem=public_pem)
        except CheckpointError as exc:
            raise CommandError(
                f"checkpoint {checkpoint.tree_size}: bad signature, not the centre's: {exc}"
            ) from exc
        try:
            tree = ledger_tree_from_rows()
        except LedgerRewritten as exc:
            raise CommandError(f"today's ledger cannot be read as a tree: {exc}") from exc
        size = checkpoint.tree_size
        if tree.size < size:
            raise CommandError(
                f"checkpoint {size} is NOT a prefix of today's ledger: the ledger has only "
                f"{tree.size} entries (entries it covered were deleted: history rolled back)"
            )
        if tree.root(size) != checkpoint.root_hash:
            raise CommandError(
                f"checkpoint {size} is NOT a prefix of today's ledger: the root differs at size "
                f"{size} (checkpoint {checkpoint.root_hash.hex()}, today "
                f"{tree.root(size).hex()}): history was rewritten"
            )
        # The leaves are the entries' hashes: that they still match the entries' content is
        # the chain's check, without which an entry altered in place would pass.
        chain = verify_chain()
        if not chain.ok:
            raise CommandError(f"checkpoint {size}'s tree still holds, but {chain.summary()}")
        self.stdout.write(
            self.style.SUCCESS(
                f"checkpoint {size} is a prefix of today's ledger ({tree.size} entries, root "
                f"{tree.root().hex()}); signed by {origin}"
            )
        )
