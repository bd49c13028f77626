"""LOG_FORMAT=json: every record one JSON line on stderr, with the call's extra fields, in a
process that loads the settings as the web server, the coordinator and the site workers do;
Celery's own logging set-up keeps it. The default stays the human format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = """
import logging
import django
django.setup()
log = logging.getLogger("training.rounds.coordinator")
log.warning("round %s closed", 3, extra={"job_id": 7, "round": 3, "site": "barts"})
try:
    1 / 0
except ZeroDivisionError:
    log.exception("aggregation failed")
# What a Celery worker does at start (the coordinator, beat, the site workers): it must
# leave the settings' handlers in place.
from consortium.celery import app
app.log.setup_logging_subsystem(loglevel="INFO")
logging.getLogger("celery.worker").info("after celery's set-up")
from celery.utils.log import get_task_logger
get_task_logger("training.rounds.tasks").info("from a task logger")

@app.task(name="observability.test_task")
def task():
    logging.getLogger("training.rounds.tasks").info("inside a task", extra={"job_id": 8})

task.apply(task_id="task-123")
print("stdout stays clean")
"""


def run(**env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CONSORTIUM_"))}
    clean.pop("LOG_FORMAT", None)
    clean.update(env, DJANGO_SETTINGS_MODULE="consortium.settings")
    return subprocess.run(
        [sys.executable, "-c", PROGRAM],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_json_lines_with_extras_through_celerys_setup():
    done = run(LOG_FORMAT="json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stdout stays clean"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses, alone
    by_message = {r["message"]: r for r in records}

    closed = by_message["round 3 closed"]
    assert closed["level"] == "WARNING"
    assert closed["logger"] == "training.rounds.coordinator"
    assert (closed["job_id"], closed["round"], closed["site"]) == (7, 3, "barts")
    assert closed["time"].startswith("20") and "T" in closed["time"]

    failed = by_message["aggregation failed"]
    assert failed["level"] == "ERROR"
    assert "ZeroDivisionError" in failed["exc_info"]

    assert by_message["after celery's set-up"]["logger"] == "celery.worker"
    assert by_message["from a task logger"]["level"] == "INFO"

    inside = by_message["inside a task"]
    assert inside["task_id"] == "task-123"
    assert inside["task_name"] == "observability.test_task"
    assert inside["job_id"] == 8


def test_the_default_stays_human():
    done = run()
    assert done.returncode == 0, done.stderr
    first = done.stderr.splitlines()[0]
    assert "round 3 closed" in first
    assert not first.lstrip().startswith("{")


def test_an_unknown_format_is_refused():
    done = run(LOG_FORMAT="xml")
    assert done.returncode != 0
    assert "LOG_FORMAT must be text or json" in done.stderr


def test_production_refuses_a_short_metrics_token():
    done = run(
        CONSORTIUM_ENV="production",
        DJANGO_SECRET_KEY="k" * 40,
        DJANGO_ALLOWED_HOSTS="example.org",
        SITE_URL="https://example.org",
        LEDGER_SIGNING_KEY="/etc/consortium/ledger-signing-key.pem",
        EMAIL_ALLOW_CONSOLE="true",
        METRICS_TOKEN="short",
    )
    assert done.returncode != 0
    assert "METRICS_TOKEN must be at least 32" in done.stderr
