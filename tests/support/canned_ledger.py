"""The ledger side of a canned central server, for tests that drive the site worker
(``training.site.worker.run_site_round``) with a hand-written client instead of the site API.

The worker checks the centre's ledger before every training task
(``training.site.ledger_witness``); these canned answers are those of a centre whose ledger is
empty and stays so: a checkpoint of size 0 signed by a key of its own, and every witness taken.
The tests that check the witnessing itself run the real API (tests/ledger/test_site_witness.py).
"""

from __future__ import annotations

from audit.ledger.checkpoint import Checkpoint, checkpoint_to_json, sign_checkpoint
from audit.ledger.merkle import EMPTY_ROOT
from training.fl.signing import generate_keypair

ORIGIN = "central.invalid/ledger"
_PRIVATE_PEM, PUBLIC_PEM = generate_keypair()


class CannedLedger:
    """Mix into a canned client: ``ledger_checkpoint`` and ``ledger_witness`` as the centre of
    an empty ledger answers them (not counted among the client's requests)."""

    def ledger_checkpoint(self, since):
        signed = sign_checkpoint(
            Checkpoint(ORIGIN, 0, EMPTY_ROOT), name=ORIGIN, private_pem=_PRIVATE_PEM
        )
        return {
            "checkpoint": checkpoint_to_json(signed),
            "consistency_proof": [],
            "since": since,
            "public_key": PUBLIC_PEM,
        }

    def ledger_witness(self, body):
        return 201, {"tree_size": body["tree_size"], "duplicate": False}
