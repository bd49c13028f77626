"""The hash chain: appends, verification, tampering, the verify command, and the
ledger's transaction and user-deletion guarantees. Runs on SQLite and PostgreSQL."""

import contextlib
import datetime as dt

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction

from audit.ledger import chain as ledger
from audit.ledger.canonical import canonical_json, sha256_hex
from audit.ledger.chain import GENESIS_HASH, append_entry, verify_chain
from audit.models import LedgerEntry, LedgerHead
from consortium.governance.models import Institution
from consortium.governance.services import recording
from consortium.governance.services.institutions import consortium_create, institution_create
from tests.support.factories import UserFactory
from tests.support.ledger_checks import tamper_ledger

pytestmark = pytest.mark.django_db


def tamper(sql: str, params=()) -> None:
    """Run raw SQL against the ledger as a database superuser with the triggers off."""
    tamper_ledger(sql, params)


def make_chain(n: int = 6, *, actor=None) -> list[LedgerEntry]:
    return [
        append_entry(
            event=f"test.event{i % 2}",
            actor=actor,
            payload={"i": i, "name": f"entry {i}", "ünï": "cödé"},
            consortium_slug="c1",
            institution_slug="h1" if i % 2 else "",
        )
        for i in range(1, n + 1)
    ]


def base_seq() -> int:
    return LedgerHead.objects.get(pk=1).seq


# --- appending ---------------------------------------------------------------------


def test_append_chains_entries():
    start = base_seq()
    entries = make_chain(5)
    assert [e.seq for e in entries] == list(range(start + 1, start + 6))
    first = LedgerEntry.objects.order_by("seq").first()
    assert first.seq == 1
    assert first.prev_hash == GENESIS_HASH == "0" * 64
    for before, after in zip(entries, entries[1:], strict=False):
        assert after.prev_hash == before.entry_hash
    head = LedgerHead.objects.get(pk=1)
    assert (head.seq, head.entry_hash) == (entries[-1].seq, entries[-1].entry_hash)


def test_appends_through_the_head_the_lock_returned_chain_without_reading_it_again(
    django_assert_num_queries,
):
    """The upload's path: ``lock_chain()`` reads the head, each append goes through it (and
    moves it), none reads it again: one statement per append on PostgreSQL, two elsewhere."""
    make_chain(1)
    per_append = 1 if connection.vendor == "postgresql" else 2
    with transaction.atomic():
        head = ledger.lock_chain()
        start = head.seq
        with django_assert_num_queries(3 * per_append):
            entries = [
                append_entry(event="test.held", payload={"i": i}, locked_head=head)
                for i in range(3)
            ]
    assert [e.seq for e in entries] == [start + 1, start + 2, start + 3]
    assert (head.seq, head.entry_hash) == (entries[-1].seq, entries[-1].entry_hash)
    assert LedgerHead.objects.values_list("seq", "entry_hash").get(pk=1) == (
        head.seq,
        head.entry_hash,
    )
    assert verify_chain().ok


class Abandoned(Exception):
    pass


def append_around(head):
    """An append that did not go through ``head``: the chain moved past it."""
    append_entry(event="test.around", payload={})


def append_then_roll_back(head):
    """An append through ``head`` in a savepoint rolled back: ``head`` is ahead of the chain."""
    with contextlib.suppress(Abandoned), transaction.atomic():
        append_entry(event="test.abandoned", payload={}, locked_head=head)
        raise Abandoned


@pytest.mark.parametrize("make_stale", [append_around, append_then_roll_back])
def test_a_stale_held_head_is_refused_and_its_transaction_rolls_back(make_stale):
    """An append chained on a head that is no longer the chain's is refused (a duplicate
    sequence number, or a head that is not where the entry was chained), and nothing the
    transaction wrote commits."""
    make_chain(2)
    before = LedgerHead.objects.values_list("seq", "entry_hash").get(pk=1)
    entries_before = LedgerEntry.objects.count()
    # PostgreSQL's trigger on the entries refuses it first (InternalError), else the append does.
    with pytest.raises(DatabaseError), transaction.atomic():
        head = ledger.lock_chain()
        make_stale(head)
        append_entry(event="test.stale", payload={}, locked_head=head)
    assert LedgerHead.objects.values_list("seq", "entry_hash").get(pk=1) == before
    assert LedgerEntry.objects.count() == entries_before
    assert verify_chain().ok


def test_entry_hash_is_sha256_of_prev_and_canonical_text():
    entry = make_chain(1)[0]
    text = canonical_json(
        {
            "seq": entry.seq,
            "event": entry.event,
            "actor_id": None,
            "actor": "system",
            "subject_type": "",
            "subject_id": "",
            "consortium": "c1",
            "institution": "h1",
            "payload": entry.payload_text,
            "created_at": entry.created_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
    )
    assert entry.entry_hash == sha256_hex(entry.prev_hash + text)
    assert entry.payload_text == canonical_json({"i": 1, "name": "entry 1", "ünï": "cödé"})


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "",
        'quo"te\\back',
        "tab\tnew\nline\x00\x1f",
        "ünïcödé ✓ 😀",
        "\u2028\u2029",
        "</script>",
    ],
)
def test_fast_canonical_text_equals_canonical_json(value):
    """Verification's fast writer must produce the very bytes the definition gives."""
    when = dt.datetime(2026, 11, 26, 20, 6, 1, 0, tzinfo=dt.UTC)
    fields = dict(
        seq=7,
        event=value,
        actor_id=None,
        actor_repr=value,
        subject_type=value,
        subject_id=value,
        consortium_slug=value,
        institution_slug=value,
        payload_text=canonical_json({"k": value, "n": [1, 2.5, None]}),
        created_at=when,
    )
    assert ledger.entry_canonical_text(**fields) == ledger._entry_canonical_text_slow(**fields)
    fields["actor_id"] = 123456789012
    other_tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
    fields["created_at"] = when.astimezone(other_tz).replace(microsecond=42)
    assert ledger.entry_canonical_text(**fields) == ledger._entry_canonical_text_slow(**fields)
    assert '"created_at":"2026-11-26T20:06:01.000042Z"' in ledger.entry_canonical_text(**fields)


# --- verification and tampering -------------------------------------------------------


def test_verify_chain_ok():
    entries = make_chain(6)
    result = verify_chain()
    assert result.ok, result.reason
    assert result.entry_count == entries[-1].seq
    assert result.head_hash == entries[-1].entry_hash
    assert result.first_bad_seq is None


def test_verify_empty_ledger_ok():
    # The cast-free test database starts empty (the head row is 0 / genesis).
    if LedgerEntry.objects.exists():
        pytest.skip("ledger not empty")
    result = verify_chain()
    assert result.ok and result.entry_count == 0 and result.head_hash == GENESIS_HASH


def test_verify_with_small_chunks():
    make_chain(7)
    assert verify_chain(chunk_size=2).ok


def append_during_walk_scenario() -> None:
    """Three entries; then a verification during which another connection commits a fourth
    between the read of the rows and the read of the head. The walk must see one snapshot
    (3 entries, head 3), not report the fourth as deleted entries."""
    import threading

    from django.db import connections

    make_chain(3)
    real_read_head = ledger._read_head

    def append_elsewhere_then_read_head():
        failures = []

        def other_writer():
            try:
                append_entry(event="test.concurrent", payload={"n": 1})
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
            finally:
                connections.close_all()

        writer = threading.Thread(target=other_writer)
        writer.start()
        writer.join()
        assert not failures, failures
        return real_read_head()

    ledger._read_head = append_elsewhere_then_read_head
    try:
        result = verify_chain()
    finally:
        ledger._read_head = real_read_head
    assert result.ok, result.reason
    assert result.entry_count == 3
    assert LedgerHead.objects.get(pk=1).seq == 4 and verify_chain().entry_count == 4


@pytest.mark.django_db(transaction=True)
def test_verify_is_not_fooled_by_an_append_during_the_walk(tmp_path):
    if connection.vendor == "postgresql":
        append_during_walk_scenario()
        return
    # SQLite: the test database is in memory (shared cache: table locks, no WAL snapshots), so
    # the scenario runs against a WAL database file, as deployed, in a process of its own.
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}"}
    script = (
        "import django; django.setup()\n"
        "from django.core.management import call_command\n"
        "call_command('migrate', verbosity=0)\n"
        "from tests.ledger.test_ledger import append_during_walk_scenario\n"
        "append_during_walk_scenario()\n"
        "print('scenario ok')\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env={**env, "DJANGO_SETTINGS_MODULE": "consortium.settings"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0 and "scenario ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize(
    ("case", "sql"),
    [
        ("payload", "UPDATE audit_ledgerentry SET payload_text = %s WHERE seq = %s"),
        ("entry_hash", "UPDATE audit_ledgerentry SET entry_hash = %s WHERE seq = %s"),
        ("actor_repr", "UPDATE audit_ledgerentry SET actor_repr = %s WHERE seq = %s"),
    ],
)
def test_altered_entry_is_named(case, sql):
    entries = make_chain(6)
    target = entries[2].seq
    new_value = {"payload": '{"i":999}', "entry_hash": "f" * 64, "actor_repr": "mallory #9"}[case]
    tamper(sql, [new_value, target])
    result = verify_chain()
    assert not result.ok
    assert result.first_bad_seq == target
    assert "altered" in result.reason
    assert result.entry_count == target - 1
    assert result.head_hash == entries[1].entry_hash


def test_swapped_seq_is_named():
    entries = make_chain(6)
    a, b = entries[2].seq, entries[3].seq
    tamper("UPDATE audit_ledgerentry SET seq = %s WHERE seq = %s", [10**12, a])
    tamper("UPDATE audit_ledgerentry SET seq = %s WHERE seq = %s", [a, b])
    tamper("UPDATE audit_ledgerentry SET seq = %s WHERE seq = %s", [b, 10**12])
    result = verify_chain()
    assert not result.ok
    assert result.first_bad_seq == a
    assert "prev_hash" in result.reason


def test_deleted_middle_row_is_named():
    entries = make_chain(6)
    gone = entries[3].seq
    tamper("DELETE FROM audit_ledgerentry WHERE seq = %s", [gone])
    result = verify_chain()
    assert not result.ok
    assert result.first_bad_seq == gone
    assert "missing" in result.reason


def test_deleted_tail_is_caught_by_the_head():
    entries = make_chain(6)
    tamper("DELETE FROM audit_ledgerentry WHERE seq = %s", [entries[-1].seq])
    result = verify_chain()
    assert not result.ok
    assert result.first_bad_seq == entries[-1].seq
    assert "deleted" in result.reason


def test_entry_added_behind_the_heads_back_is_caught():
    entries = make_chain(3)
    last = entries[-1]
    forged_seq = last.seq + 1
    forged = LedgerEntry(
        seq=forged_seq,
        prev_hash=last.entry_hash,
        event="forged",
        actor_repr="mallory",
        consortium_slug="c1",
        payload_text="{}",
        created_at=last.created_at,
    )
    forged.entry_hash = ledger.chain_hash(
        last.entry_hash,
        ledger.entry_canonical_text(
            seq=forged_seq,
            event="forged",
            actor_id=None,
            actor_repr="mallory",
            subject_type="",
            subject_id="",
            consortium_slug="c1",
            institution_slug="",
            payload_text="{}",
            created_at=last.created_at,
        ),
    )
    forged.save()
    result = verify_chain()
    assert not result.ok
    assert result.first_bad_seq == forged_seq


# --- the verify_ledger command ---------------------------------------------------------


def test_command_ok(capsys):
    entries = make_chain(4)
    call_command("verify_ledger")
    out = capsys.readouterr().out
    assert f"{entries[-1].seq} entries" in out
    assert entries[-1].entry_hash in out


def test_command_fails_naming_the_first_bad_entry():
    entries = make_chain(5)
    target = entries[1].seq
    tamper("UPDATE audit_ledgerentry SET payload_text = %s WHERE seq = %s", ['{"x":1}', target])
    with pytest.raises(CommandError, match=rf"entry #{target}\b.*altered"):
        call_command("verify_ledger")


def test_command_exit_status_is_non_zero():
    """Run as from a shell, a failure is exit status 1 (CommandError -> SystemExit)."""
    entries = make_chain(3)
    tamper("DELETE FROM audit_ledgerentry WHERE seq = %s", [entries[-1].seq])
    from django.core.management import ManagementUtility

    with pytest.raises(SystemExit) as exc:
        ManagementUtility(["manage.py", "verify_ledger"]).execute()
    assert exc.value.code == 1


# --- transactions and users -------------------------------------------------------------


def test_failed_service_writes_neither_row_nor_entry(monkeypatch):
    admin = UserFactory()
    consortium = consortium_create(acting_user=admin, name="Atomic")
    head_before = LedgerHead.objects.values_list("seq", "entry_hash").get(pk=1)
    entries_before = LedgerEntry.objects.count()

    def broken_append(**kwargs):
        raise RuntimeError("ledger unavailable")

    monkeypatch.setattr(recording, "append_entry", broken_append)
    with pytest.raises(RuntimeError, match="ledger unavailable"):
        institution_create(acting_user=admin, consortium=consortium, name="Ghost")
    assert not Institution.objects.filter(name="Ghost").exists()
    assert LedgerEntry.objects.count() == entries_before
    assert LedgerHead.objects.values_list("seq", "entry_hash").get(pk=1) == head_before
    assert verify_chain().ok


def test_service_failing_after_the_entry_rolls_the_entry_back(monkeypatch):
    admin = UserFactory()
    consortium = consortium_create(acting_user=admin, name="Atomic two")
    entries_before = LedgerEntry.objects.count()
    real_append = recording.append_entry

    def append_then_fail(**kwargs):
        real_append(**kwargs)
        raise RuntimeError("crash after the entry")

    monkeypatch.setattr(recording, "append_entry", append_then_fail)
    with pytest.raises(RuntimeError):
        institution_create(acting_user=admin, consortium=consortium, name="Ghost two")
    assert not Institution.objects.filter(name="Ghost two").exists()
    assert LedgerEntry.objects.count() == entries_before
    assert verify_chain().ok


def test_deleting_a_user_keeps_the_entry():
    user = UserFactory(username="leaver", first_name="Lee", last_name="Ver")
    consortium = consortium_create(acting_user=user, name="Leavers")
    entry = LedgerEntry.objects.get(event="consortium.created", consortium_slug=consortium.slug)
    assert entry.actor_id == user.pk
    user_pk = user.pk
    get_user_model().objects.filter(pk=user_pk).delete()
    entry.refresh_from_db()
    assert entry.actor is None
    assert entry.actor_id_at_write == user_pk
    assert entry.actor_repr == f"Lee Ver (leaver) #{user_pk}"
    assert verify_chain().ok
