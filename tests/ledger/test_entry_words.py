"""Ledger entries in words (audit.ledger.words): what the activity lists and the histories say
instead of event codes, with institutions named by name, and never an error on an old payload."""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

import pytest

from audit.ledger import events as ev
from audit.ledger.words import entry_sentence, event_words
from consortium.core.live import entry_json

NAMES = {"barts": "Barts Health", "st-thomas": "St Thomas’"}


def test_an_accepted_update_names_the_hospital_and_the_round():
    sentence = entry_sentence(
        ev.UPDATE_ACCEPTED, {"job_id": 3, "round": 2, "site": "barts"}, name_of=NAMES.get
    )
    assert sentence == "Update accepted from Barts Health for round 2"


def test_a_decision_names_the_entry_institution():
    sentence = entry_sentence(
        ev.JOB_DECISION,
        {"job_id": 7, "decision": "approved"},
        institution="St Thomas’",
    )
    assert sentence == "St Thomas’ approved job #7"


def test_a_refused_update_says_why_and_a_closed_round_counts_the_late():
    refused = entry_sentence(
        ev.UPDATE_REJECTED, {"round": 1, "site": "barts", "reason": "bad signature"}
    )
    assert refused == "Update from barts refused in round 1: bad signature"
    closed = entry_sentence(ev.ROUND_CLOSED, {"round": 4, "sites": ["a", "b"], "stragglers": ["c"]})
    assert closed == "Round 4 closed with 2 updates, 1 site(s) late"


def test_an_old_payload_falls_back_to_the_events_words():
    assert entry_sentence(ev.UPDATE_ACCEPTED, {}) == event_words(ev.UPDATE_ACCEPTED).rstrip(".")
    assert entry_sentence("tool.synthetic", {"x": 1}) == "tool.synthetic"


@pytest.mark.parametrize("event", list(ev.all_events()), ids=str)
def test_every_event_has_words_that_read_as_a_sentence(event):
    words = entry_sentence(event, {})
    assert words and "_" not in words.split(" ", 1)[0], words


def test_a_live_entry_carries_its_words_and_the_servers_clock_with_its_zone():
    entry = SimpleNamespace(
        seq=12,
        event=str(ev.UPDATE_ACCEPTED),
        payload_text=json.dumps({"job_id": 1, "round": 3, "site": "st-thomas"}),
        created_at=dt.datetime(2026, 12, 5, 10, 4, 5, tzinfo=dt.UTC),
        actor_repr="worker",
        institution_slug="st-thomas",
        entry_hash="ab" * 32,
    )
    data = entry_json(entry, NAMES)
    assert data["words"] == "Update accepted from St Thomas’ for round 3"
    assert data["time_text"] == "10:04:05 UTC"
    assert data["institution_name"] == "St Thomas’"
    assert data["event"] == "round.update_accepted"
