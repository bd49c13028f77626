"""Settings parse the environment strictly and refuse unsafe production setups."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def load_settings(**env):
    """Import the settings module in a fresh interpreter with ``env`` only."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CONSORTIUM_"))}
    clean.pop("DATABASE_URL", None)
    clean.update(env)
    code = (
        "import consortium.settings as s;"
        "print(s.DEBUG, s.SESSION_COOKIE_SECURE if hasattr(s,'SESSION_COOKIE_SECURE') else None,"
        " s.DATABASES['default']['ENGINE'], s.SECRET_KEY[:4], s.DATABASES['default']['NAME'])"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True
    )


def test_defaults_import_with_no_environment():
    result = load_settings()
    assert result.returncode == 0, result.stderr
    debug, _, engine, _, name = result.stdout.split()
    assert debug == "True"
    assert engine == "django.db.backends.sqlite3"
    assert name == str(ROOT / "db.sqlite3")  # not relative to the working directory


def test_production_refuses_the_development_key():
    result = load_settings(CONSORTIUM_ENV="production", DJANGO_ALLOWED_HOSTS="example.org")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr


def test_production_with_a_real_key_is_secure():
    result = load_settings(
        CONSORTIUM_ENV="production",
        DJANGO_SECRET_KEY="$" + "x" * 40,  # a leading $ is not a variable reference
        DJANGO_ALLOWED_HOSTS="example.org",
    )
    assert result.returncode == 0, result.stderr
    debug, cookie_secure, _, key_start, _ = result.stdout.split()
    assert (debug, cookie_secure, key_start) == ("False", "True", "$xxx")


def test_unknown_environment_is_refused():
    result = load_settings(CONSORTIUM_ENV="staging")
    assert result.returncode != 0 and "CONSORTIUM_ENV" in result.stderr


def test_malformed_boolean_is_refused():
    result = load_settings(DJANGO_DEBUG="maybe")
    assert result.returncode != 0


@pytest.mark.django_db
def test_sqlite_runs_in_wal_mode_with_a_busy_timeout():
    if connection.vendor != "sqlite":
        pytest.skip("the embedded default only")
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA busy_timeout")
        assert cursor.fetchone()[0] == 30000
    assert settings.DATABASES["default"]["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
