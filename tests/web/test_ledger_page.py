"""The ledger page reads in words and fits the window: each event named in words with its code
beside it, payloads folded (issue 14: the payloads printed inline made the table 826 px wider
than a 1,280 px window, and event codes wrapped one character per line)."""

from __future__ import annotations

import re

import pytest

from audit.ledger.words import event_words


@pytest.mark.django_db
def test_events_are_named_in_words_with_their_code_and_payloads_are_folded(cast):
    response = cast.client_for("auditor").get(f"/consortia/{cast.consortium.slug}/ledger/")
    assert response.status_code == 200
    body = response.content.decode()
    assert "Hospital A joined the consortium" in body
    assert '<code class="event-code">institution.created</code>' in body
    rows = re.findall(r'<td class="ledger-payload">(.*?)</td>', body, re.S)
    assert rows, body[:3000]
    assert all(row.strip().startswith("<details><summary>") for row in rows)


def test_words_for_an_unregistered_event_are_its_code():
    assert event_words("test.synthetic") == "test.synthetic"


def test_words_never_end_inside_a_parenthesis():
    from audit.ledger.events import all_events

    for event in all_events():
        words = event_words(event)
        assert words.count("(") == words.count(")"), (event, words)
        assert words.endswith("."), (event, words)
