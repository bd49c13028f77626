"""An institution's privacy history, read grouped (``selectors.accepted_privacy_events``).

Every budget check (each round the coordinator sends, each proposal) and every accountability
page replays the privacy events of an institution's accepted updates, a history that grows by
one update per round it takes part in. The database now groups identical event lists and counts
them, so what Python parses and replays is one event per distinct release, not one per round:
these tests hold the ε to the per-update replay it replaces and the work to the history's
distinct events.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.support.agreements import agreement_in_force
from tests.support.planted_jobs import EVENT, plant_job
from training.jobs.accounting import PrivacyEvent, epsilon_spent
from training.jobs.selectors import (
    accepted_privacy_events,
    committed_privacy_events,
    job_accountability,
)
from training.models import SiteUpdate

pytestmark = pytest.mark.django_db

DELTA = 1e-5
SAMPLED = {
    "mechanism": "sampled_gaussian",
    "params": {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 20},
    "count": 1,
    "source": "dp_sgd",
}
PURE = {"mechanism": "pure_epsilon", "params": {"epsilon": 0.1}, "count": 2, "source": "svt"}


def per_update_history(institution, job=None) -> list[PrivacyEvent]:
    """The history as it was replayed before: every accepted update's own list, one by one."""
    updates = SiteUpdate.objects.filter(institution=institution, status="accepted")
    if job is not None:
        updates = updates.filter(round__job=job)
    return [
        PrivacyEvent.from_json(raw)
        for events in updates.values_list("privacy_events", flat=True)
        for raw in events
    ]


@pytest.fixture
def history(cast):
    """Job "first": both hospitals, six rounds of the planted Gaussian event. Job "second":
    hospital A alone, four rounds of a DP-SGD event and a pure one (counted twice each); a
    rejected update of hospital B in it, whose events never count."""
    version = agreement_in_force(cast)
    hospitals = [cast.hospital_a, cast.hospital_b]
    first = plant_job(
        cast.consortium, title="first", institutions=hospitals, version=version, metrics=[0.5] * 6
    )
    second = plant_job(
        cast.consortium,
        title="second",
        institutions=[cast.hospital_a],
        version=version,
        metrics=[0.5] * 4,
    )
    SiteUpdate.objects.filter(round__job=second).update(privacy_events=[SAMPLED, PURE])
    SiteUpdate.objects.create(
        round=second.rounds.first(),
        institution=cast.hospital_b,
        status=SiteUpdate.Status.REJECTED,
        privacy_events=[SAMPLED],
    )
    return first, second


def test_identical_events_are_one_event_with_their_count(cast, history):
    first, second = history
    a, b = cast.hospital_a.pk, cast.hospital_b.pk

    grouped = accepted_privacy_events(SiteUpdate.objects.all(), "institution_id", "round__job_id")

    gaussian = PrivacyEvent("gaussian", {"noise_multiplier": 5.0}, 6, "gaussian_noise")
    assert grouped[(a, first.pk)] == [gaussian]
    assert grouped[(b, first.pk)] == [gaussian]
    assert grouped[(a, second.pk)] == [
        PrivacyEvent("pure_epsilon", {"epsilon": 0.1}, 8, "svt"),
        PrivacyEvent(
            "sampled_gaussian",
            {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 20},
            4,
            "dp_sgd",
        ),
    ]
    assert (b, second.pk) not in grouped, "a rejected update's events are not spent"


def test_the_epsilon_replayed_is_the_per_update_replays(cast, history):
    first, second = history
    spent = committed_privacy_events([cast.hospital_a.pk, cast.hospital_b.pk])
    for institution in (cast.hospital_a, cast.hospital_b):
        assert epsilon_spent(spent[institution.pk], delta=DELTA) == pytest.approx(
            epsilon_spent(per_update_history(institution), delta=DELTA), rel=1e-12
        )
    accounts = {row.institution.pk: row for row in job_accountability(second).rows}
    assert accounts[cast.hospital_a.pk].epsilon_job == pytest.approx(
        epsilon_spent(per_update_history(cast.hospital_a, second), delta=DELTA), rel=1e-12
    )
    assert accounts[cast.hospital_a.pk].epsilon_total == pytest.approx(
        epsilon_spent(per_update_history(cast.hospital_a), delta=DELTA), rel=1e-12
    )


def test_a_longer_history_is_not_more_to_replay(cast):
    """Thirty rounds are read in as many queries as three, into as many events."""
    version = agreement_in_force(cast)
    sizes = {}
    for institution, rounds in ((cast.hospital_a, 3), (cast.hospital_b, 30)):
        plant_job(
            cast.consortium,
            title=f"{rounds} rounds",
            institutions=[institution],
            version=version,
            metrics=[0.5] * rounds,
            rounds=rounds,
        )
        with CaptureQueriesContext(connection) as queries:
            spent = committed_privacy_events([institution.pk])
        assert spent[institution.pk] == [
            PrivacyEvent(EVENT["mechanism"], EVENT["params"], rounds, EVENT["source"])
        ]
        sizes[rounds] = len(queries)
    assert sizes[3] == sizes[30]
