"""The centre's side of the checkpoints (``audit.ledger.checkpoints``, ``audit.ledger.keys``):
its key, made once in development and refused when it is not an Ed25519 key; one row per
head (and, for the sites, at most one a ``LEDGER_CHECKPOINT_SECONDS``); and a history
rewritten or rolled back under a signed head, refused loudly."""

from __future__ import annotations

import datetime as dt
import logging
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from audit.ledger.chain import append_entry
from audit.ledger.checkpoints import (
    LedgerRewritten,
    checkpoint_publish,
    checkpoint_with_proof,
    ledger_tree,
    signed_checkpoint_of,
)
from audit.ledger.keys import ledger_origin, public_key_pem, signing_key_pem
from audit.ledger.merkle import entry_leaf, verify_consistency
from audit.ledger.merkle import ledger_tree as tree_of
from audit.models import LedgerCheckpoint, LedgerEntry
from tests.support.ledger_checks import rewrite_ledger_consistently, tamper_ledger

pytestmark = pytest.mark.django_db


def grow(n: int) -> None:
    for i in range(n):
        append_entry(event="test.entry", payload={"i": i})


def test_development_makes_one_key_under_var_and_keeps_it(settings, tmp_path):
    settings.BASE_DIR = tmp_path
    settings.LEDGER_SIGNING_KEY = ""
    first = signing_key_pem()
    path = tmp_path / "var" / "ledger" / "signing-key.pem"
    assert path.read_bytes() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signing_key_pem() == first and public_key_pem().startswith("-----BEGIN PUBLIC KEY")
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_a_configured_key_that_is_not_ed25519_is_refused_saying_so(settings, tmp_path):
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "rsa.pem"
    path.write_bytes(rsa_pem)
    settings.LEDGER_SIGNING_KEY = str(path)
    with pytest.raises(ImproperlyConfigured, match="the ledger's key is Ed25519"):
        signing_key_pem()
    settings.LEDGER_SIGNING_KEY = str(tmp_path / "missing.pem")
    with pytest.raises(ImproperlyConfigured, match="cannot be read"):
        signing_key_pem()


def test_the_origin_is_the_sites_host_unless_set(settings):
    settings.SITE_URL = "https://consortium.example.org"
    settings.LEDGER_ORIGIN = ""
    assert ledger_origin() == "consortium.example.org/ledger"
    settings.LEDGER_ORIGIN = "example.org/our-ledger"
    assert ledger_origin() == "example.org/our-ledger"


def test_the_tree_follows_the_ledger_and_matches_one_built_from_scratch(db):
    grow(3)
    assert (
        ledger_tree().root()
        == tree_of(LedgerEntry.objects.order_by("seq").values_list("entry_hash", flat=True)).root()
    )
    grow(4)
    hashes = list(LedgerEntry.objects.order_by("seq").values_list("entry_hash", flat=True))
    tree = ledger_tree()
    assert tree.size == len(hashes)
    assert tree.root() == tree_of(hashes).root()
    assert tree.leaf_hash(len(hashes) - 1) == tree_of([hashes[-1]]).leaf_hash(0)
    assert entry_leaf(hashes[0])  # the leaves are the entries' hashes


def test_one_row_per_head(db):
    grow(2)
    first = checkpoint_publish()
    assert checkpoint_publish().pk == first.pk
    grow(1)
    second = checkpoint_publish()
    assert second.tree_size == first.tree_size + 1
    assert LedgerCheckpoint.objects.count() == 2


def test_a_history_rewritten_under_a_signed_head_is_refused_and_logged(db, caplog):
    grow(5)
    signed = checkpoint_publish()
    rewrite_ledger_consistently(2, {"i": "changed"})
    with (
        caplog.at_level(logging.ERROR, logger="audit.ledger.checkpoints"),
        pytest.raises(LedgerRewritten, match="history was rewritten"),
    ):
        checkpoint_publish()
    assert f"checkpoint {signed.tree_size}" in caplog.text
    assert LedgerCheckpoint.objects.count() == 1  # nothing signed over it


def test_a_ledger_rolled_back_under_a_signed_head_is_refused(db):
    grow(5)
    signed = checkpoint_publish()
    table = LedgerEntry._meta.db_table
    tamper_ledger(f"DELETE FROM {table} WHERE seq > %s", [signed.tree_size - 2])  # noqa: S608
    with pytest.raises(LedgerRewritten, match="rolled back"):
        checkpoint_publish()


def test_a_site_is_served_the_head_signed_within_the_interval_even_if_the_ledger_moved(settings):
    """``LEDGER_CHECKPOINT_SECONDS``: at most one signed head a second (by default) for the
    sites, instead of one per upload; the proof still joins what the site saw to it."""
    settings.LEDGER_CHECKPOINT_SECONDS = 60
    grow(3)
    first, _proof = checkpoint_with_proof(0)
    grow(2)
    again, proof = checkpoint_with_proof(first.tree_size)
    assert again.pk == first.pk and proof == []  # no new head signed, the same one served
    assert LedgerCheckpoint.objects.count() == 1
    assert ledger_tree().size == first.tree_size + 2

    # Once the newest head is older than the interval, the next site's request signs one.
    LedgerCheckpoint.objects.filter(pk=first.pk).update(
        created_at=timezone.now() - dt.timedelta(seconds=61)
    )
    newer, proof = checkpoint_with_proof(first.tree_size)
    assert newer.tree_size == first.tree_size + 2 and LedgerCheckpoint.objects.count() == 2
    old, new = signed_checkpoint_of(first).checkpoint, signed_checkpoint_of(newer).checkpoint
    verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, proof)


def test_within_the_interval_a_rewritten_history_is_still_refused(settings):
    settings.LEDGER_CHECKPOINT_SECONDS = 60
    grow(5)
    checkpoint_with_proof(0)
    rewrite_ledger_consistently(2, {"i": "changed"})
    with pytest.raises(LedgerRewritten, match="history was rewritten"):
        checkpoint_with_proof(0)


def test_reports_and_auditors_get_the_head_signed_whatever_the_interval(settings):
    """``checkpoint_publish`` (a report's anchor, ``verify_ledger``, the auditors' API) must
    cover the newest entry: the interval is only for what the sites are served."""
    settings.LEDGER_CHECKPOINT_SECONDS = 60
    grow(2)
    served, _proof = checkpoint_with_proof(0)
    grow(1)
    assert checkpoint_publish().tree_size == served.tree_size + 1


def test_with_no_interval_every_moved_head_is_signed_for_the_sites(settings):
    settings.LEDGER_CHECKPOINT_SECONDS = 0
    grow(2)
    first, _proof = checkpoint_with_proof(0)
    grow(1)
    assert checkpoint_with_proof(first.tree_size)[0].tree_size == first.tree_size + 1
