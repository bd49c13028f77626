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
    for name in (
        "DATABASE_URL",
        "EMAIL_URL",
        "EMAIL_ALLOW_CONSOLE",
        "SITE_SLUG",
        "SITE_URL",
        "LEDGER_SIGNING_KEY",
    ):
        clean.pop(name, None)
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


PRODUCTION = {
    "CONSORTIUM_ENV": "production",
    "DJANGO_SECRET_KEY": "$" + "x" * 40,  # a leading $ is not a variable reference
    "DJANGO_ALLOWED_HOSTS": "example.org",
    "SITE_URL": "https://example.org",
    "LEDGER_SIGNING_KEY": "/etc/consortium/ledger-signing-key.pem",
}
SMTP = "smtp+tls://mailer:secret@smtp.example.org:587"


def test_production_with_a_real_key_is_secure():
    result = load_settings(**PRODUCTION, EMAIL_URL=SMTP)
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


# --- Mail in production: nothing may vanish without a word -----------------------------------


@pytest.mark.parametrize(
    ("email_url", "backend"),
    [(None, "console"), ("consolemail://", "console"), ("dummymail://", "dummy")],
)
def test_production_refuses_mail_that_reaches_nobody(email_url, backend):
    env = dict(PRODUCTION, **({"EMAIL_URL": email_url} if email_url else {}))
    result = load_settings(**env)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "ImproperlyConfigured" in message
    assert ("EMAIL_URL is unset" if email_url is None else "EMAIL_URL delivers no mail") in message
    assert f"({backend} backend)" in message
    assert "invitations and notifications would reach nobody" in message
    assert "EMAIL_ALLOW_CONSOLE=true" in message


def test_production_starts_with_a_mail_server_or_console_mail_allowed():
    assert load_settings(**PRODUCTION, EMAIL_URL=SMTP).returncode == 0
    allowed = load_settings(**PRODUCTION, EMAIL_ALLOW_CONSOLE="true")
    assert allowed.returncode == 0, allowed.stderr
    # The switch is strict like every boolean: a typo does not pass for "allowed".
    typo = load_settings(**PRODUCTION, EMAIL_ALLOW_CONSOLE="yes please")
    assert typo.returncode != 0 and "EMAIL_ALLOW_CONSOLE must be true or false" in typo.stderr


def test_a_site_worker_needs_no_mail_server_in_production():
    result = load_settings(**PRODUCTION, SITE_SLUG="barts")
    assert result.returncode == 0, result.stderr


def test_development_keeps_console_mail():
    result = load_settings(CONSORTIUM_ENV="development")
    assert result.returncode == 0, result.stderr


# --- SITE_URL: every link in mail and in the workers' set-up is built from it ------------------


def test_production_refuses_a_missing_site_url():
    env = {k: v for k, v in PRODUCTION.items() if k != "SITE_URL"}
    result = load_settings(**env, EMAIL_URL=SMTP)
    assert result.returncode != 0
    assert "SITE_URL is unset" in result.stderr and "https://consortium.example.org" in (
        result.stderr
    )
    # A site worker builds no link: it needs none.
    assert load_settings(**env, SITE_SLUG="barts").returncode == 0


def test_production_refuses_to_sign_checkpoints_without_a_key_of_its_own():
    env = {k: v for k, v in PRODUCTION.items() if k != "LEDGER_SIGNING_KEY"}
    result = load_settings(**env, EMAIL_URL=SMTP)
    assert result.returncode != 0
    assert "LEDGER_SIGNING_KEY is unset" in result.stderr
    assert "generate_site_key --out" in result.stderr
    # A site worker signs no checkpoint of the centre's.
    assert load_settings(**env, EMAIL_URL=SMTP, SITE_SLUG="barts").returncode == 0


def test_a_site_url_that_is_not_http_is_refused():
    result = load_settings(SITE_URL="consortium.example.org")
    assert result.returncode != 0 and "SITE_URL must be an http(s) URL" in result.stderr


CHECKPOINT_SECONDS = "LEDGER_CHECKPOINT_SECONDS must be a number of seconds from 0"
NICENESS = "SCORING_WORKER_NICENESS must be a whole number from 0"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        *[
            ("LEDGER_CHECKPOINT_SECONDS", v, CHECKPOINT_SECONDS)
            for v in ("-1", "soon", "7200", "nan")
        ],
        *[("SCORING_WORKER_NICENESS", v, NICENESS) for v in ("-1", "20", "low", "1.5")],
    ],
)
def test_a_number_setting_out_of_its_range_is_refused_naming_it_and_the_value(name, value, says):
    result = load_settings(**{name: value})
    assert result.returncode != 0
    assert says in result.stderr
    assert repr(value) in result.stderr
