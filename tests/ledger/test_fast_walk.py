"""Verification's fast walk and the check inside PostgreSQL (audit.ledger.fast_walk).

The tamper tests of test_ledger.py hold what verification answers; these hold that the fast
walk itself vouches for every intact ledger (awkward text, whole-second timestamps, a
numbered actor), that it hands every kind of damage to the definition, and that the check
inside PostgreSQL writes the very bytes Python writes and answers what verify_chain answers.
Runs on SQLite and PostgreSQL."""

import datetime as dt

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from audit.ledger import chain as ledger
from audit.ledger.chain import append_entry, verify_chain, verify_chain_in_database
from audit.models import LedgerEntry
from tests.support.factories import UserFactory
from tests.support.ledger_checks import tamper_ledger

pytestmark = pytest.mark.django_db

AWKWARD_TEXTS = [
    'quo"te\\back',
    "tab\tnew\nline\r\x08\x0c\x01\x1f\x7f",
    "ünïcödé ✓ 😀",
    "\u2028\u2029",
    "</script>",
    "",
]

on_postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the check inside the database is PostgreSQL's"
)


def awkward_chain(monkeypatch) -> list[LedgerEntry]:
    """Entries whose every text column is awkward for JSON, with timestamps of a whole second
    (which SQLite stores without a fraction) and with microseconds, and a numbered actor."""
    user = UserFactory(first_name='Zoë "Q"', last_name="O\\Brien\n")
    entries = []
    for i, text in enumerate(AWKWARD_TEXTS * 2):
        when = dt.datetime(2026, 11, 26, 20, 6, i, 0 if i % 2 else 123456 + i, tzinfo=dt.UTC)
        monkeypatch.setattr(ledger.timezone, "now", lambda when=when: when)
        entries.append(
            append_entry(
                event=f"test.{text}",
                actor=user if i % 3 == 0 else None,
                actor_repr=None if i % 3 == 0 else text or "system",
                payload={"text": text, "n": [i, 2.5, None], text: True},
                subject=user if i % 4 == 0 else None,
                consortium_slug=text,
                institution_slug=text[::-1],
            )
        )
    return entries


def fast_walk_of_ledger():
    with ledger._one_snapshot():
        return ledger._fast_walk(chunk_size=4)


def test_the_fast_walk_vouches_for_an_intact_ledger_of_awkward_text(monkeypatch):
    entries = awkward_chain(monkeypatch)
    walked = fast_walk_of_ledger()
    assert walked is not None, "the fast walk doubted an intact entry: its text is not Python's"
    assert walked.entry_count == entries[-1].seq
    assert walked.last_hash == entries[-1].entry_hash
    assert walked.head == (entries[-1].seq, entries[-1].entry_hash)
    assert verify_chain(chunk_size=3).ok


TAMPERING = {
    "payload": ("UPDATE audit_ledgerentry SET payload_text = '{\"i\":999}' WHERE seq = %s", 4),
    "actor": ("UPDATE audit_ledgerentry SET actor_repr = 'mallory #9' WHERE seq = %s", 4),
    "actor id": ("UPDATE audit_ledgerentry SET actor_id_at_write = 77 WHERE seq = %s", 4),
    "event": ("UPDATE audit_ledgerentry SET event = 'test.other' WHERE seq = %s", 4),
    "subject": ("UPDATE audit_ledgerentry SET subject_id = '999' WHERE seq = %s", 4),
    "time": (
        "UPDATE audit_ledgerentry SET created_at = created_at + interval '1 microsecond' "
        "WHERE seq = %s",
        4,
    ),
    "hash": ("UPDATE audit_ledgerentry SET entry_hash = repeat('f', 64) WHERE seq = %s", 4),
    "link": ("UPDATE audit_ledgerentry SET prev_hash = repeat('e', 64) WHERE seq = %s", 4),
    "deleted": ("DELETE FROM audit_ledgerentry WHERE seq = %s", 4),
    "deleted tail": ("DELETE FROM audit_ledgerentry WHERE seq = %s", -1),
}


def tamper(monkeypatch, case: str) -> tuple[list[LedgerEntry], int]:
    """An awkward chain, damaged as ``case`` says at its fifth entry (or its last)."""
    entries = awkward_chain(monkeypatch)
    sql, which = TAMPERING[case]
    target = entries[which].seq
    if connection.vendor == "sqlite" and case == "time":
        sql = (
            "UPDATE audit_ledgerentry SET created_at = '2026-11-26 20:06:04.123461' WHERE seq = %s"
        )
    tamper_ledger(sql, [target])
    return entries, target


@pytest.mark.parametrize("case", list(TAMPERING))
def test_the_fast_walk_hands_every_damage_to_the_definition(monkeypatch, case):
    entries, target = tamper(monkeypatch, case)
    walked = fast_walk_of_ledger()
    assert walked is None or walked.head != (walked.entry_count, walked.last_hash)
    result = verify_chain()
    assert not result.ok
    assert result.first_bad_seq == target, result.reason


def test_a_timestamp_stored_in_another_form_goes_to_the_definition(monkeypatch):
    """SQLite: the same instant written with a 'T' is not the form the fast walk rewrites, so
    the definition (which reads the instant) decides: intact."""
    if connection.vendor != "sqlite":
        pytest.skip("SQLite stores timestamps as text")
    entries = awkward_chain(monkeypatch)
    tamper_ledger(
        "UPDATE audit_ledgerentry SET created_at = replace(created_at, ' ', 'T') WHERE seq = %s",
        [entries[1].seq],
    )
    assert fast_walk_of_ledger() is None
    assert verify_chain().ok


@on_postgresql
def test_postgresql_writes_the_canonical_text_byte_for_byte(monkeypatch):
    awkward_chain(monkeypatch)
    check = ledger.fast_walk.chain_mismatches_in_database(
        connection,
        LedgerEntry._meta.db_table,
        ledger._CHAIN_DB_COLUMNS,
        genesis=ledger.GENESIS_HASH,
    )
    assert check.intact, check
    result = verify_chain_in_database()
    assert result == verify_chain()
    assert result.ok


@on_postgresql
@pytest.mark.parametrize("case", list(TAMPERING))
def test_the_check_inside_postgresql_answers_what_the_walk_answers(monkeypatch, case):
    entries, target = tamper(monkeypatch, case)
    result = verify_chain_in_database()
    assert not result.ok and result.first_bad_seq == target, result.reason
    assert result == verify_chain()


@on_postgresql
def test_the_command_verifies_inside_postgresql_on_request(monkeypatch, capsys):
    target = awkward_chain(monkeypatch)[2].seq
    call_command("verify_ledger", "--in-database")
    assert "Ledger intact" in capsys.readouterr().out
    tamper_ledger("UPDATE audit_ledgerentry SET actor_repr = 'x' WHERE seq = %s", [target])
    with pytest.raises(CommandError, match=f"BROKEN at entry #{target}"):
        call_command("verify_ledger", "--in-database")


def test_the_command_refuses_to_verify_inside_sqlite():
    if connection.vendor != "sqlite":
        pytest.skip("SQLite has no such check")
    with pytest.raises(CommandError, match="needs PostgreSQL"):
        call_command("verify_ledger", "--in-database")


def test_the_command_checks_the_chain_alone_when_asked_to_verify_inside(tmp_path):
    with pytest.raises(CommandError, match="not with a checkpoint"):
        call_command("verify_ledger", "--in-database", "--checkpoint", str(tmp_path / "c"))
