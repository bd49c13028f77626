"""``manage.py verify_ledger``: recompute the hash chain and compare it with the head.

Exits 0 on an intact chain (printing the entry count and head hash) and non-zero
naming the first entry that does not match, and why. It streams the rows, so
memory does not grow with the ledger's length.
"""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError

from audit.ledger.chain import verify_chain


class Command(BaseCommand):
    help = "Verify the ledger's hash chain; exit non-zero at the first entry that fails."

    def add_arguments(self, parser):
        parser.add_argument(
            "--chunk-size",
            type=int,
            default=5000,
            help="Rows fetched per round trip (default 5000).",
        )

    def handle(self, *args, chunk_size: int, **options):
        started = time.perf_counter()
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
