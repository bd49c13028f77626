"""For tests that start processes of their own: the environment those processes get (the
test database's URL for a PostgreSQL child, a private broker and folders for a demo run),
and a start line that releases several children at the same moment."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
#: The Redis database a demo run's broker uses when the suite runs on Redis (flushed first).
DEMO_REDIS_DB = int(os.environ.get("DEMO_TEST_REDIS_DB", "13"))


# --- PostgreSQL children ----------------------------------------------------------------------


def child_database_url() -> str:
    """The URL of the database this test runs on, for a child process."""
    # pytest-django renamed the database (test_<name>): children must use that one.
    s = connection.settings_dict
    auth = quote(s["USER"] or "", safe="")
    if s.get("PASSWORD"):
        auth += ":" + quote(s["PASSWORD"], safe="")
    host = s.get("HOST") or "127.0.0.1"
    port = s.get("PORT") or 5432
    return f"postgres://{auth}@{host}:{port}/{s['NAME']}"


def fresh_database_url(tmp: Path, purpose: str) -> str:
    """A new, empty database for a stack of processes the test starts, of the kind the suite
    runs on: a SQLite file under ``tmp``, or ``<test database>_<purpose>`` on the PostgreSQL
    server (dropped first if a killed run left it)."""
    db = settings.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.postgresql":
        return f"sqlite:///{tmp / f'{purpose}.sqlite3'}"
    import psycopg2

    name = f"{db['NAME']}_{purpose}"[:63]
    conn = psycopg2.connect(
        dbname="postgres",
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        host=db.get("HOST") or None,
        port=db.get("PORT") or None,
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    user = db.get("USER") or ""
    auth = f"{user}:{db['PASSWORD']}@" if db.get("PASSWORD") else (f"{user}@" if user else "")
    return f"postgres://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{name}"


def child_env() -> dict:
    """The environment of a ``python -c`` child that sets Django up on the test database."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "consortium.settings",
        "DATABASE_URL": child_database_url(),
        "PYTHONPATH": str(ROOT),
    }


def release_together(start_file: Path, children: list) -> None:
    """Wait (60 s at most) until each child has touched ``<start_file>.ready<n>``, then create
    ``start_file``, the line they all wait behind. A child that dies first fails the test."""
    deadline = time.monotonic() + 60
    while len(list(start_file.parent.glob(f"{start_file.name}.ready*"))) < len(children):
        assert time.monotonic() < deadline, "children did not start"
        assert all(c.poll() is None for c in children), "a child died before the start"
        time.sleep(0.01)
    start_file.touch()


# --- A demo run of the test's own -------------------------------------------------------------


def redis_url_on_db(url: str, db: int) -> str:
    """``url`` (a Redis URL, its query dropped) pointing at database number ``db``."""
    base = re.sub(r"/\d*$", "", url.split("?", 1)[0].rstrip("/"))
    return f"{base}/{db}"


def private_broker(env: dict, tmp_path: Path) -> dict:
    """``env`` with a broker no other test meets: the filesystem transport in
    ``tmp_path/broker``, or on Redis database DEMO_REDIS_DB, flushed."""
    url = settings.CELERY_BROKER_URL
    if url.startswith("filesystem://"):
        env["CELERY_DATA_DIR"] = str(tmp_path / "broker")
    elif url.startswith(("redis://", "rediss://")):
        import redis  # only when the suite runs on Redis: the package may be absent otherwise

        env["CELERY_BROKER_URL"] = redis_url_on_db(url, DEMO_REDIS_DB)
        redis.Redis.from_url(env["CELERY_BROKER_URL"]).flushdb()
    return env


def demo_env(tmp_path: Path, *, database_url: str, var: Path, **extra: str) -> dict:
    """The environment of a ``manage.py demo`` run: its own database, artifact folder
    (``tmp_path/artifacts``), demo folder ``var`` and private broker, and ``extra``."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "DEMO_VAR_DIR": str(var),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    return private_broker(env, tmp_path)
