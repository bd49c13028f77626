"""A site that missed N rounds in a row (``training.rounds.absences``): shown as such, and told
of once per streak, whatever the number of ticks and coordinators.

The rounds are written directly (closed rounds with each site's final status): what is under
test is the counting and the telling, not the coordinator that produces the statuses.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from consortium.governance.models import Membership, Notification, Role
from tests.support.factories import UserFactory
from tests.support.liveness_fixtures import add_round, running_job, worker_heard
from tests.support.training_fixtures import make_scene
from training.jobs.transitions import job_transition
from training.models import (
    JobParticipant,
    JobState,
    SiteUpdate,
)
from training.rounds import absences
from training.rounds.absences import absent_sites, notify_absent_sites
from training.rounds.heartbeats import site_workers

pytestmark = pytest.mark.django_db

S = SiteUpdate.Status


@pytest.fixture
def scene(cast):
    return make_scene(cast)


def rounds_where_b_misses(job, cast, indices, *, start=1):
    """Rounds ``start``.. with A accepted and B a straggler in ``indices`` (else accepted)."""
    for index in range(start, start + len(indices)):
        add_round(
            job,
            index,
            {
                cast.hospital_a: S.ACCEPTED,
                cast.hospital_b: S.STRAGGLER if indices[index - start] else S.ACCEPTED,
            },
        )


def absent_notices(job):
    return [
        json.loads(e.payload_text)
        for e in LedgerEntry.objects.filter(event=ledger_events.SITE_ABSENT).order_by("seq")
        if json.loads(e.payload_text)["job_id"] == job.pk
    ]


def told(user) -> list[str]:
    return list(
        Notification.objects.filter(user=user, message__contains="missed").values_list(
            "message", flat=True
        )
    )


# --- Counting ---------------------------------------------------------------------------------


def test_one_round_short_of_the_streak_is_nothing(scene):
    cast = scene.cast
    job = running_job(scene)
    rounds_where_b_misses(job, cast, [False, True, True])  # 2 in a row, N = 3
    assert absent_sites([job.pk]) == {job.pk: []}
    assert notify_absent_sites() == []
    assert absent_notices(job) == []
    assert told(cast.researcher) == []


def test_n_rounds_missed_in_a_row_is_absent_with_its_rounds(scene):
    cast = scene.cast
    job = running_job(scene)
    rounds_where_b_misses(job, cast, [False, True, True, True])
    [absence] = absent_sites([job.pk])[job.pk]
    assert absence.institution == cast.hospital_b.name
    assert absence.rounds == (2, 3, 4)
    assert absence.returned_round == 1
    assert absence.text == "Hospital B missed the last 3 rounds (rounds 2 to 4)"


def test_a_rejected_update_is_not_a_miss_and_a_round_not_asked_does_not_break_a_streak(scene):
    cast = scene.cast
    job = running_job(scene)
    add_round(job, 1, {cast.hospital_a: S.ACCEPTED, cast.hospital_b: S.STRAGGLER})
    add_round(job, 2, {cast.hospital_a: S.ACCEPTED, cast.hospital_b: S.REJECTED})
    add_round(job, 3, {cast.hospital_a: S.ACCEPTED, cast.hospital_b: S.STRAGGLER})
    add_round(job, 4, {cast.hospital_a: S.ACCEPTED})  # B left out (its privacy budget)
    add_round(job, 5, {cast.hospital_a: S.ACCEPTED, cast.hospital_b: S.STRAGGLER})
    assert absent_sites([job.pk], threshold=3)[job.pk] == []
    [absence] = absent_sites([job.pk], threshold=2)[job.pk]
    assert absence.rounds == (3, 5)
    assert absence.returned_round == 2
    assert absence.text == "Hospital B missed the last 2 rounds (rounds 3, 5)"


def test_the_open_round_does_not_count_and_a_failed_one_does(scene):
    cast = scene.cast
    job = running_job(scene)
    add_round(job, 1, {cast.hospital_a: S.ACCEPTED, cast.hospital_b: S.STRAGGLER})
    add_round(job, 2, {cast.hospital_a: S.ACCEPTED, cast.hospital_b: S.STRAGGLER}, state="failed")
    add_round(job, 3, {cast.hospital_a: S.DISPATCHED, cast.hospital_b: S.DISPATCHED}, state="open")
    [absence] = absent_sites([job.pk], threshold=2)[job.pk]
    assert absence.rounds == (1, 2)
    assert absence.returned_round is None


def test_a_long_streak_is_followed_past_the_window_and_the_rows_read_stay_bounded(scene):
    """The check reads the sites' updates of the latest 2 × N finished rounds; a streak that
    goes further back is followed into the history for that site alone, so a site away for
    20 rounds is reported with all 20, and the rows read for the others do not grow with the
    rounds run."""
    from django.db import connection as conn
    from django.test.utils import CaptureQueriesContext

    cast = scene.cast
    job = running_job(scene)
    rounds_where_b_misses(job, cast, [False] * 5 + [True] * 20)  # rounds 6 to 25
    with CaptureQueriesContext(conn) as queries:
        [absence] = absent_sites([job.pk], threshold=3)[job.pk]
    assert absence.rounds == tuple(range(6, 26))
    assert absence.returned_round == 5
    assert absence.text == "Hospital B missed the last 20 rounds (rounds 6 to 25)"
    assert len(queries) == 4, [q["sql"] for q in queries]
    window_sql = queries.captured_queries[2]["sql"]
    assert '"index" >= 20' in window_sql, window_sql  # rounds 20 to 25: 2 × N = 6 rounds
    # A's latest report is inside the window: only B's history is read.
    history_sql = queries.captured_queries[3]["sql"]
    assert re.search(rf'"institution_id" = {cast.hospital_b.pk}\b', history_sql), history_sql
    assert not re.search(rf'"institution_id" = {cast.hospital_a.pk}\b', history_sql)


def test_a_site_taken_out_of_the_job_is_not_reported(scene):
    cast = scene.cast
    job = running_job(scene)
    rounds_where_b_misses(job, cast, [True, True, True])
    JobParticipant.objects.filter(job=job, institution=cast.hospital_b).update(
        status=JobParticipant.Status.REMOVED
    )
    assert absent_sites([job.pk])[job.pk] == []
    assert notify_absent_sites() == []


def test_the_setting_sets_n(scene, settings):
    cast = scene.cast
    job = running_job(scene)
    rounds_where_b_misses(job, cast, [False, True, True])
    settings.FL_ABSENT_ROUNDS_ALERT = 2
    assert [a.missed for a in absent_sites([job.pk])[job.pk]] == [2]
    settings.FL_ABSENT_ROUNDS_ALERT = 5
    assert absent_sites([job.pk])[job.pk] == []


# --- Telling, once per streak -------------------------------------------------------------------


def test_n_missed_rounds_tell_the_proposer_and_the_administrators_once(scene):
    cast = scene.cast
    b_admin = UserFactory(username="b_admin")
    Membership.objects.create(
        user=b_admin,
        consortium=cast.consortium,
        institution=cast.hospital_b,
        role=Role.INSTITUTION_ADMIN,
    )
    worker_heard(cast, cast.hospital_b, ago=dt.timedelta(minutes=12))
    job = running_job(scene)
    rounds_where_b_misses(job, cast, [True, True, True])

    [absence] = notify_absent_sites()
    assert absence.slug == cast.hospital_b.slug
    assert absent_notices(job) == [
        {
            "job_id": job.pk,
            "site": cast.hospital_b.slug,
            "rounds_missed": 3,
            "rounds": [1, 2, 3],
            "threshold": 3,
        }
    ]
    # The proposer, the consortium's administrator, B's administrator; not A's, nor approvers.
    for user in (cast.researcher, cast.admin, b_admin):
        [message] = told(user)
        assert f"Job #{job.pk}" in message
        assert "Hospital B missed the last 3 rounds (rounds 1 to 3)" in message
        assert "its worker is offline for 12 min (last heard " in message
    for user in (cast.inst_admin, cast.approver, cast.approver_b, cast.auditor):
        assert told(user) == []

    # Another tick, and another after one more missed round: the same streak, nobody told again.
    assert notify_absent_sites() == []
    add_round(job, 4, {cast.hospital_a: S.ACCEPTED, cast.hospital_b: S.STRAGGLER})
    assert notify_absent_sites() == []
    assert len(absent_notices(job)) == 1
    assert len(told(cast.researcher)) == 1
    assert verify_chain().ok


def test_a_site_that_came_back_and_missed_n_again_is_told_of_again(scene):
    cast = scene.cast
    job = running_job(scene)
    rounds_where_b_misses(job, cast, [True, True, True])
    assert len(notify_absent_sites()) == 1
    rounds_where_b_misses(job, cast, [False, True, True], start=4)  # back in 4, then 2 missed
    assert notify_absent_sites() == []
    rounds_where_b_misses(job, cast, [True], start=7)  # the third in a row
    [again] = notify_absent_sites()
    assert again.rounds == (5, 6, 7)
    assert [n["rounds"] for n in absent_notices(job)] == [[1, 2, 3], [5, 6, 7]]
    assert len(told(cast.researcher)) == 2
    assert notify_absent_sites() == []


def test_a_second_coordinator_that_counted_before_the_first_told_does_not_tell_again(
    scene, monkeypatch
):
    """Two ticks at once: both count the streak and find it not yet told of; the first tells
    while the second waits for the ledger's head lock, and the second, checking again under
    the lock, finds the first's entry."""
    cast = scene.cast
    job = running_job(scene)
    rounds_where_b_misses(job, cast, [True, True, True])
    [counted_by_the_second] = absent_sites([job.pk])[job.pk]
    real_lock = absences.lock_chain
    first_told = []

    def the_first_tells_meanwhile():
        monkeypatch.setattr(absences, "lock_chain", real_lock)
        first_told.extend(notify_absent_sites())  # the first coordinator, committed first
        real_lock()

    monkeypatch.setattr(absences, "lock_chain", the_first_tells_meanwhile)
    now = timezone.now()
    workers = site_workers([cast.hospital_b.pk], now=now)[cast.hospital_b.pk]
    job.refresh_from_db()
    assert not absences._tell_once(job, counted_by_the_second, workers, now=now)
    assert len(first_told) == 1
    assert len(absent_notices(job)) == 1
    assert len(told(cast.researcher)) == 1


def test_only_running_jobs_are_reported(scene):
    cast = scene.cast
    job = running_job(scene)
    rounds_where_b_misses(job, cast, [True, True, True])
    job_transition(acting_user=None, job=job, to_state=JobState.FAILED, reason="round 3 failed")
    assert notify_absent_sites() == []
    assert absent_notices(job) == []


@pytest.mark.postgres
@pytest.mark.skipif(
    not django_settings.DATABASE_IS_POSTGRES, reason="needs DATABASE_URL pointing at PostgreSQL"
)
@pytest.mark.django_db(transaction=True)
def test_two_ticks_in_two_threads_tell_once(scene):
    """The same, for real: two threads (two connections, two transactions) run the tick's
    step at once; one entry, one notification each. PostgreSQL only: the test database of the
    embedded SQLite default is an in-memory one shared between threads, whose table locks
    fail at once instead of waiting (a real SQLite file serialises the two IMMEDIATE
    transactions, which the test above stands for)."""
    cast = scene.cast
    job = running_job(scene)
    rounds_where_b_misses(job, cast, [True, True, True])
    start = threading.Barrier(2)
    results, errors = [], []

    def tick():
        try:
            start.wait(timeout=10)
            results.append(notify_absent_sites())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=tick) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert sorted(len(r) for r in results) == [0, 1]
    assert len(absent_notices(job)) == 1
    assert len(told(cast.researcher)) == 1
