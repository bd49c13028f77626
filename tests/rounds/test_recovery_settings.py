"""The recovery settings are checked against each other at start-up, and a spec's round
timeout against the tick (issue 13: "Re-dispatch happens before a round's deadline, whatever
the two settings are")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs.test_spec import errors_of, minimal_spec
from training import queues
from training.jobs.spec import validate_spec

ROOT = Path(__file__).resolve().parents[2]
GOOD = {
    "redispatch_after": 300,
    "claim_lease": 30,
    "relay_every": 1,
    "heartbeat_every": 5,
    "outbox_stale": 60,
}


def test_the_defaults_are_consistent():
    assert queues.recovery_timing_problems(**GOOD) == []


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"redispatch_after": 5}, "shorter than the periodic tick (10 s)"),
        ({"claim_lease": 2}, "FL_CLAIM_LEASE_SECONDS=2 is too short to be renewed"),
        ({"heartbeat_every": 0.5}, "FL_COORDINATOR_HEARTBEAT_SECONDS=0.5 must be at least"),
        ({"relay_every": 0}, "FL_OUTBOX_RELAY_SECONDS=0 (> 0)"),
        ({"outbox_stale": 10}, "set it to 15 or more"),
    ],
)
def test_each_inconsistency_is_named(change, says):
    (problem,) = queues.recovery_timing_problems(**{**GOOD, **change})
    assert says in problem


def test_a_process_refuses_to_start_on_inconsistent_settings():
    env = {**os.environ, "FL_CLAIM_LEASE_SECONDS": "1", "FL_REDISPATCH_AFTER_SECONDS": "2"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "FL_REDISPATCH_AFTER_SECONDS=2 is shorter than the periodic tick" in result.stderr
    assert "FL_CLAIM_LEASE_SECONDS=1 is too short" in result.stderr


def test_a_round_timeout_leaves_a_tick_between_redispatch_and_deadline():
    assert 2 * queues.ROUNDS_TICK.every_seconds == queues.MIN_ROUND_TIMEOUT_SECONDS
    errors = errors_of(minimal_spec(round_timeout_seconds=queues.MIN_ROUND_TIMEOUT_SECONDS - 1))
    assert list(errors) == ["round_timeout_seconds"]
    assert str(queues.MIN_ROUND_TIMEOUT_SECONDS) in errors["round_timeout_seconds"]
    spec = validate_spec(minimal_spec(round_timeout_seconds=queues.MIN_ROUND_TIMEOUT_SECONDS))
    assert spec["round_timeout_seconds"] == queues.MIN_ROUND_TIMEOUT_SECONDS
