"""The reads compiled once per connection (``consortium.core.prepared``), the site API's and
those of the coordinator's close and opening of a round: each gives exactly what its queryset
gives (fields, the related objects ``select_related`` caches, the annotations), with a row and
without; and what the helper refuses to prepare, it refuses when first run, saying why."""

from __future__ import annotations

from unittest import mock

import pytest
from django.core.exceptions import ImproperlyConfigured, MultipleObjectsReturned
from django.db import connection, transaction
from django.db.transaction import TransactionManagementError

from consortium.core.prepared import PreparedQuery
from consortium.governance.models import Institution
from tests.rounds.test_site_api import (  # noqa: F401 - the fixtures
    _artifact_root,
    update_tensors,
    upload,
    world,
)
from training import outbox
from training.fl.serialization import pack_tensors, sha256_hex
from training.jobs import selectors as job_selectors
from training.models import SiteUpdate
from training.rounds import (
    aggregation,
    coordinator,
    credentials,
    intake,
    site_selectors,
    states,
    verification,
)

pytestmark = pytest.mark.django_db


def snapshot(obj, annotations=(), depth=3):
    """Every concrete field's value, the annotations, and the same of each related object
    the query cached on it (what ``select_related`` filled in)."""
    if obj is None:
        return None
    state = {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields}
    state["__model__"] = type(obj).__name__
    state["__db__"] = obj._state.db
    state["__adding__"] = obj._state.adding
    for name in annotations:
        state[f"annotation {name}"] = getattr(obj, name)
    if depth:
        for name, related in sorted(obj._state.fields_cache.items()):
            state[f"related {name}"] = snapshot(related, depth=depth - 1)
    return state


def plain_answer(prepared: PreparedQuery, values: dict):
    """What the queryset itself gives, as ``get()`` would, or None."""
    queryset = prepared._build(**values)
    try:
        found = queryset.get()
    except queryset.model.DoesNotExist:
        found = None
    return snapshot(found, annotations=tuple(queryset.query.annotations))


def prepared_answer(prepared: PreparedQuery, values: dict):
    queryset = prepared._build(**values)
    return snapshot(prepared.one_or_none(**values), annotations=tuple(queryset.query.annotations))


def site_api_queries(world, digest: str):  # noqa: F811
    """Each query the site API prepares, with the values a real request would give it."""
    site = world.site.credential
    a, b = world.cast.hospital_a.pk, world.cast.hospital_b.pk
    job, rnd = world.job.pk, world.round
    where = {"job_id": job, "round_index": 1}
    return [
        (credentials._CREDENTIAL_BY_TOKEN_HASH, {"digest": site.token_hash}),
        (site_selectors._ACTIVE_JOB, {"job_id": job, "institution_id": a}),
        (site_selectors._ASKED_ROW, {**where, "institution_id": b}),
        (intake._PARTICIPANT_WITH_JOB, {"job_id": job, "institution_id": a}),
        (intake._SITE_ROW, {**where, "institution_id": a}),
        # Hospital B's row, with hospital A's accepted update's digest: a copy of it.
        (intake._SITE_ROW_WITH_COPY, {**where, "institution_id": b, "digest": digest}),
        (intake._SITE_ROW_WITH_COPY, {**where, "institution_id": a, "digest": "0" * 64}),
        (intake._LOCKED_ROUND, where),
        (
            intake._LOCKED_SITE_ROW,
            {"round_id": rnd.pk, "institution_id": a, "job_id": job, "credential_id": site.pk},
        ),
        (
            verification._SITE_DATASET,
            {"institution_id": a, "key": world.job.spec["dataset_key"]},
        ),
    ]


def test_each_prepared_query_gives_what_its_queryset_gives(world):  # noqa: F811
    data = pack_tensors(update_tensors())
    with mock.patch.object(outbox.current_app, "send_task"):
        assert upload(world, data=data).status_code == 201
    digest = sha256_hex(data)
    cases = site_api_queries(world, digest)
    with transaction.atomic():  # the locked looks run under the chain lock
        for prepared, values in cases:
            expected = plain_answer(prepared, values)
            assert expected is not None, prepared
            assert prepared_answer(prepared, values) == expected, prepared
            # Twice: the second run is the compiled one's.
            assert prepared_answer(prepared, values) == expected, prepared
    copy = intake._SITE_ROW_WITH_COPY.one_or_none(
        job_id=world.job.pk,
        round_index=1,
        institution_id=world.cast.hospital_b.pk,
        digest=digest,
    )
    accepted = SiteUpdate.objects.get(update_digest=digest)
    assert copy.copy_of == accepted.pk  # the annotation is read, not only compared


def coordinator_queries(world):  # noqa: F811
    """Each query the coordinator prepares, with the values a close would give it: one row
    (``one=True``) or every row in the queryset's order."""
    job, rnd = world.job, world.round
    return [
        (job_selectors._ROUND_WITH_JOB, {"round_id": rnd.pk}),
        (coordinator._LOCKED_JOB, {"job_id": job.pk}),
        (coordinator._ROUND_OF_JOB, {"job_id": job.pk, "index": rnd.index}),
        (coordinator._ACTIVE_PARTICIPANTS, {"job_id": job.pk}),
        (aggregation._ROUND_ROWS, {"round_id": rnd.pk}),
        (aggregation._ACCEPTED_ROWS, {"round_id": rnd.pk}),
        (states._FIRST_PARTICIPANT_DATASET, {"job_id": job.pk, "key": job.spec["dataset_key"]}),
    ]


def every_answer(prepared: PreparedQuery, values: dict, *, plain: bool) -> list:
    queryset = prepared._build(**values)
    found = list(queryset) if plain else prepared.all(**values)
    return [snapshot(obj) for obj in found]


def test_the_coordinators_prepared_queries_give_what_their_querysets_give(world):  # noqa: F811
    with mock.patch.object(outbox.current_app, "send_task"):
        assert upload(world).status_code == 201  # one accepted row beside the dispatched one
    with transaction.atomic():  # the job's locked read runs under the chain lock
        for prepared, values in coordinator_queries(world):
            if prepared._one:
                expected = plain_answer(prepared, values)
                assert expected is not None, prepared
                assert prepared_answer(prepared, values) == expected, prepared
                assert prepared_answer(prepared, values) == expected, prepared
            else:
                expected = every_answer(prepared, values, plain=True)
                assert expected, prepared
                assert every_answer(prepared, values, plain=False) == expected, prepared
                assert every_answer(prepared, values, plain=False) == expected, prepared
    # The accepted rows are the accepted ones only, the round's rows all of them, in site order.
    rows = aggregation.round_rows(world.round)
    assert [r.institution.slug for r in rows] == sorted(r.institution.slug for r in rows)
    assert len(rows) >= 2
    accepted = aggregation.accepted_updates(world.round)
    assert [u.status for u in accepted] == [SiteUpdate.Status.ACCEPTED]
    with transaction.atomic():
        for prepared, values in coordinator_queries(world):
            absent = {
                name: (987654 if isinstance(value, int) else "no-such-key")
                for name, value in values.items()
            }
            if prepared._one:
                assert prepared.one_or_none(**absent) is None, prepared
            else:
                assert prepared.all(**absent) == [], prepared


def test_locking_a_job_that_is_gone_says_so(db):
    with transaction.atomic(), pytest.raises(coordinator.TrainingJob.DoesNotExist, match="#98765"):
        coordinator._lock_job(98765)


def test_each_prepared_query_gives_none_where_its_queryset_finds_nothing(world):  # noqa: F811
    missing = 987654
    for prepared, values in site_api_queries(world, "1" * 64):
        absent = {
            name: (missing if isinstance(value, int) else "f" * 64)
            for name, value in values.items()
        }
        with transaction.atomic():
            assert plain_answer(prepared, absent) is None, prepared
            assert prepared.one_or_none(**absent) is None, prepared


def test_a_prepared_query_is_one_query_compiled_once_per_connection(
    world,  # noqa: F811
    django_assert_num_queries,
):
    query = PreparedQuery(
        lambda slug: Institution.objects.select_related("consortium").filter(slug=slug),
        one=True,
        slug=str,
    )
    with mock.patch.object(query, "_compile_with", wraps=query._compile_with) as compile_with:
        for institution in (world.cast.hospital_a, world.cast.hospital_b, world.cast.hospital_a):
            with django_assert_num_queries(1):  # the query log sees it: the counts hold
                found = query.one_or_none(slug=institution.slug)
            assert found.pk == institution.pk
            with django_assert_num_queries(0):  # the related object came with it
                assert found.consortium.pk == institution.consortium_id
    assert compile_with.call_count == 2  # compiled twice, with two markers, on first use only


def test_all_gives_every_row_in_the_querysets_order(world):  # noqa: F811
    query = PreparedQuery(
        lambda consortium_id: Institution.objects.filter(consortium_id=consortium_id).order_by(
            "-name"
        ),
        consortium_id=int,
    )
    consortium_id = world.cast.hospital_a.consortium_id
    expected = list(Institution.objects.filter(consortium_id=consortium_id).order_by("-name"))
    assert len(expected) >= 2
    assert [i.pk for i in query.all(consortium_id=consortium_id)] == [i.pk for i in expected]
    with pytest.raises(ImproperlyConfigured, match="one=True"):
        query.one_or_none(consortium_id=consortium_id)


def test_two_rows_for_one_or_none_is_an_error(world):  # noqa: F811
    query = PreparedQuery(
        lambda consortium_id: Institution.objects.filter(consortium_id=consortium_id),
        one=True,
        consortium_id=int,
    )
    with pytest.raises(MultipleObjectsReturned, match="more than one row"):
        query.one_or_none(consortium_id=world.cast.hospital_a.consortium_id)


def test_values_of_another_kind_or_name_are_refused(world):  # noqa: F811
    query = PreparedQuery(lambda pk: Institution.objects.filter(pk=pk), one=True, pk=int)
    with pytest.raises(TypeError, match="pk must be int"):
        query.one_or_none(pk=True)  # a bool would compare equal to 1
    with pytest.raises(TypeError, match="pk must be int"):
        query.one_or_none(pk=str(world.cast.hospital_a.pk))
    with pytest.raises(TypeError, match=r"takes \['pk'\]"):
        query.one_or_none(id=world.cast.hospital_a.pk)
    with pytest.raises(ImproperlyConfigured, match="is not int or str"):
        PreparedQuery(lambda when: Institution.objects.filter(created_at=when), when=float)


def test_a_parameter_the_lookup_rewrites_or_drops_is_refused_when_first_run(db):
    rewritten = PreparedQuery(
        lambda name: Institution.objects.filter(name__icontains=name), name=str
    )
    with pytest.raises(ImproperlyConfigured, match="does not reach the SQL unchanged"):
        rewritten.all(name="hospital")
    unused = PreparedQuery(
        lambda slug, other: Institution.objects.filter(slug=slug), slug=str, other=int
    )
    with pytest.raises(ImproperlyConfigured, match="parameter other does not reach"):
        unused.all(slug="a", other=1)


@pytest.mark.django_db(transaction=True)
def test_a_locked_read_outside_a_transaction_is_refused_where_the_database_locks(world):  # noqa: F811
    query = PreparedQuery(
        lambda pk: Institution.objects.select_for_update().filter(pk=pk), one=True, pk=int
    )
    pk = world.cast.hospital_a.pk
    with transaction.atomic():
        assert query.one_or_none(pk=pk).pk == pk
    if connection.features.has_select_for_update:  # PostgreSQL: as Django refuses it
        with pytest.raises(TransactionManagementError, match="outside of a transaction"):
            query.one_or_none(pk=pk)
    else:  # SQLite locks the whole database instead: Django runs it, and so does this
        assert query.one_or_none(pk=pk).pk == pk


def test_a_query_whose_sql_changes_with_its_values_is_refused(db):
    calls = iter(range(1, 100))
    moving = PreparedQuery(
        lambda pk: Institution.objects.filter(pk=pk)[: next(calls)], pk=int
    )  # each build a different LIMIT
    with pytest.raises(ImproperlyConfigured, match="change with their values"):
        moving.all(pk=1)


def test_a_constant_equal_to_a_marker_by_chance_is_told_apart(world):  # noqa: F811
    """A marker drawn equal to a constant of the query moves the parameter's places in that
    compilation only: compiled again, the query is prepared with the constant in its place."""
    from consortium.core import prepared

    drawn = iter([{"pk": 5000}, {"pk": 1234}, {"pk": 2000}, {"pk": 3000}, {"pk": 4000}])
    query = PreparedQuery(
        lambda pk: Institution.objects.filter(pk=pk).exclude(pk=1234), one=True, pk=int
    )
    with mock.patch.object(prepared, "_markers", side_effect=lambda params: next(drawn)):
        found = query.one_or_none(pk=world.cast.hospital_a.pk)
    assert found.pk == world.cast.hospital_a.pk
    assert next(drawn, None) is None  # the first pair disagreed, the second agreed
