"""Settings, read from the environment with strict parsing and safe defaults.

With no environment at all this module gives the *embedded default*: a SQLite
file in the project folder, Celery over kombu's filesystem transport, the
in-memory channel layer and the console email backend. Setting
``DATABASE_URL``, ``CELERY_BROKER_URL`` and ``CHANNEL_LAYER_URL`` turns the same
code into the distributed layout of docs/architecture.md, section 2.

``CONSORTIUM_ENV=production`` switches on the production posture: ``DEBUG``
off, the development secret key refused, secure cookies and security headers, and
mail that would reach nobody (the console backend) refused unless
``EMAIL_ALLOW_CONSOLE`` allows it.

Why one module: Django reads one settings module, and many settings here depend on ones read
before them (the posture, the database, the paths); split over files, that order would be
hidden in imports. What is more than a value (parsing the proxy list, checking a key, the
lockout's rules) lives in the modules the settings name, not here.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

# Task names and queues: one registry that imports nothing (so settings may read it).
from training.queues import (
    CENTRAL_QUEUE,
    DEFAULT_BROKER_CONSUMER_TIMEOUT_SECONDS,
    TimeLimitError,
    celery_beat_schedule,
    celery_task_routes,
    recovery_timing_problems,
    task_time_limits,
)

BASE_DIR = Path(__file__).resolve().parent.parent

# django-environ reads a value starting with "$" as a reference to another
# variable (and silently falls back to the default when that is unset), so the
# secret key is read from os.environ directly; escape_proxy lets other values
# write a literal "$" as "\$".
env = environ.Env()
env.escape_proxy = True

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def env_bool(name: str, *, default: bool) -> bool:
    """A boolean that refuses anything but the usual spellings (django-environ
    reads "maybe" as False, which would hide a typo in a security setting)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in _TRUE | _FALSE:
        raise ImproperlyConfigured(f"{name} must be true or false, not {raw!r}")
    return value in _TRUE


DEVELOPMENT_SECRET_KEY = "dev-insecure-key-never-use-in-production"  # noqa: S105

ENVIRONMENT = env.str("CONSORTIUM_ENV", default="development")
if ENVIRONMENT not in {"development", "production", "test"}:
    raise ImproperlyConfigured(
        f"CONSORTIUM_ENV must be development, production or test, not {ENVIRONMENT!r}"
    )
PRODUCTION = ENVIRONMENT == "production"

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or DEVELOPMENT_SECRET_KEY
if PRODUCTION and (SECRET_KEY == DEVELOPMENT_SECRET_KEY or len(SECRET_KEY) < 32):
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY must be set to a random value of at least 32 characters "
        "in production; the development key is refused."
    )

DEBUG = env_bool("DJANGO_DEBUG", default=not PRODUCTION)
ALLOWED_HOSTS = env.list(
    "DJANGO_ALLOWED_HOSTS", default=[] if PRODUCTION else ["127.0.0.1", "localhost", "testserver"]
)
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
# The public URL of this server, used in invitation emails and by site workers.
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000").rstrip("/")
# Every link in mail (invitations, notifications) and the site workers' CENTRAL_URL in the
# credentials page's set-up block is built from SITE_URL: in production a missing one would
# send people and workers to 127.0.0.1. A site worker (SITE_SLUG set) builds no link.
if not SITE_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured(f"SITE_URL must be an http(s) URL, not {SITE_URL!r}")
if PRODUCTION and not os.environ.get("SITE_URL") and not os.environ.get("SITE_SLUG"):
    raise ImproperlyConfigured(
        "SITE_URL is unset: in production every link in mail and in the site workers' set-up "
        "is built from it. Set it to the server's public URL, e.g. "
        "https://consortium.example.org"
    )

# The centre's Ed25519 key (PKCS#8 PEM file) that signs the ledger's checkpoints, and the log's
# name in them (audit.ledger.keys). Empty outside production: a key made once under var/.
LEDGER_SIGNING_KEY = env.str("LEDGER_SIGNING_KEY", default="")
if PRODUCTION and not LEDGER_SIGNING_KEY and not os.environ.get("SITE_SLUG"):
    raise ImproperlyConfigured(
        "LEDGER_SIGNING_KEY is unset: in production the ledger's checkpoints, which the sites "
        "witness, are signed with a key of the centre's own. Make one with `manage.py "
        "generate_site_key --out /etc/consortium/ledger-signing-key.pem` and set the path."
    )
LEDGER_ORIGIN = env.str("LEDGER_ORIGIN", default="")
# A checkpoint signed less than this many seconds ago is served to the sites again, even if the
# ledger moved (audit.ledger.checkpoints.checkpoint_with_proof): about one signed checkpoint a
# second at most, instead of one per upload. 0 signs the head on every request that finds it
# moved.
_checkpoint_seconds = env.str("LEDGER_CHECKPOINT_SECONDS", default="1")
try:
    LEDGER_CHECKPOINT_SECONDS = float(_checkpoint_seconds)
except ValueError:
    LEDGER_CHECKPOINT_SECONDS = -1.0
if not 0 <= LEDGER_CHECKPOINT_SECONDS <= 3600:
    raise ImproperlyConfigured(
        "LEDGER_CHECKPOINT_SECONDS must be a number of seconds from 0 (sign every new head) to "
        f"3600, not {_checkpoint_seconds!r}"
    )

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "rules.apps.AutodiscoverRulesConfig",
    "pgtrigger",
    "django_tables2",
    "django_htmx",
    "channels",
    "axes",
    # Second factor (consortium.core.second_factor): TOTP authenticator apps and backup codes.
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_otp.plugins.otp_static",
    "consortium.governance",
    "audit",
    "training",
]

MIDDLEWARE = [
    # Outermost: swaps Django's technical 404/500 pages (DEBUG) for the app's own.
    "consortium.core.error_pages.AppErrorPagesMiddleware",
    # Outside the error pages, so theirs carry the headers too (consortium.core.security_headers).
    "consortium.core.security_headers.SecurityHeadersMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # request.user.is_verified(): whether this session passed its second factor.
    "django_otp.middleware.OTPMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # Signs out a session idle or too old (SESSION_IDLE_MINUTES, SESSION_MAX_AGE_HOURS); after
    # the messages, to say why on the sign-in page.
    "consortium.core.session_timeout.SessionTimeoutMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes asks: it turns a lockout into a response.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "consortium.urls"
# A refused CSRF check answers with the app's page, in its layout (consortium.core.error_pages).
CSRF_FAILURE_VIEW = "consortium.core.error_pages.csrf_failure"
# With DEBUG on, the app's error pages are shown instead of Django's technical ones (which list
# the URL patterns, the settings and a traceback to whoever asked); a developer at their own
# machine may ask for the technical ones.
TECHNICAL_ERROR_PAGES = env_bool("DJANGO_TECHNICAL_ERROR_PAGES", default=False)
WSGI_APPLICATION = "consortium.wsgi.application"
ASGI_APPLICATION = "consortium.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "consortium.governance.context_processors.navigation",
                "training.web.context_processors.notifications",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------
# The default is a SQLite file in the project folder, built from BASE_DIR so it
# does not depend on the working directory.
DEFAULT_DATABASE_URL = f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
DATABASES = {"default": env.db_url("DATABASE_URL", default=DEFAULT_DATABASE_URL)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A web process and a worker write the same file: WAL lets readers go on
    # while one writer writes, IMMEDIATE takes the write lock at BEGIN so two
    # writers queue instead of failing with "database is locked" mid-transaction.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA busy_timeout=30000; "
        "PRAGMA synchronous=NORMAL;",
    }
else:
    # 0 by default: under Daphne (ASGI) every request runs in a thread of its own, and a
    # persistent connection per thread exhausted PostgreSQL's 100 connections within a minute of
    # ten site workers uploading (Django's docs: disable persistent connections under ASGI).
    # A WSGI deployment, or the Celery workers, may set DATABASE_CONN_MAX_AGE.
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=0))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DATABASE_IS_POSTGRES = DATABASES["default"]["ENGINE"] in {
    "django.db.backends.postgresql",
    "django.db.backends.postgresql_psycopg2",
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth -----------------------------------------------------------------------
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "rules.permissions.ObjectPermissionBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "consortium:overview"
LOGOUT_REDIRECT_URL = "login"

# Sign-in lockout (django-axes, consortium/core/lockout.py). Failures are counted per account
# (from any address) and per client address (for any account), each against its own limit:
# by address alone, one NAT or the proxy locked a whole hospital out while guesses at one
# account spread over many addresses were never stopped; by account alone, one address could
# try a few passwords on every account. The address's limit is higher, so that the ordinary
# mistakes of many people behind one hospital's NAT do not lock them all out. Both locks end
# after the cool-off (axes' default is a lock for good, until an operator acts), and failures
# while locked do not extend it, so nobody can keep someone else's account locked; a reset by
# email lifts the account's lock.
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=10)
AXES_ADDRESS_FAILURE_LIMIT = env.int("AXES_ADDRESS_FAILURE_LIMIT", default=50)
AXES_COOLOFF_TIME = env.float("AXES_COOLOFF_HOURS", default=0.25)
if AXES_FAILURE_LIMIT < 1 or AXES_ADDRESS_FAILURE_LIMIT < AXES_FAILURE_LIMIT:
    raise ImproperlyConfigured(
        f"AXES_FAILURE_LIMIT ({AXES_FAILURE_LIMIT}) must be at least 1, and "
        f"AXES_ADDRESS_FAILURE_LIMIT ({AXES_ADDRESS_FAILURE_LIMIT}) at least as large: one "
        "address is shared by many people behind a hospital's NAT."
    )
if not AXES_COOLOFF_TIME > 0:
    raise ImproperlyConfigured(
        f"AXES_COOLOFF_HOURS must be more than 0 (hours, e.g. 0.25), not {AXES_COOLOFF_TIME}"
    )
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_RESET_ON_SUCCESS = True
AXES_HANDLER = "consortium.core.lockout.AccountAndAddressHandler"
AXES_CLIENT_IP_CALLABLE = "consortium.core.lockout.client_ip_address"
AXES_LOCKOUT_CALLABLE = "consortium.core.lockout.lockout_response"
AXES_ENABLED = env_bool("AXES_ENABLED", default=True)
AXES_VERBOSE = False
# The reverse proxies whose X-Forwarded-For is believed (addresses or networks, comma-separated;
# docs/deploy/central.env: nginx on 127.0.0.1). Empty, the default: the header is never read and
# the client is the connection's peer, REMOTE_ADDR. A client can write any X-Forwarded-For it
# likes, so only the entries a listed proxy appended count (consortium.core.lockout).
TRUSTED_PROXIES = env.list("TRUSTED_PROXIES", default=[])
for _proxy in TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_proxy.strip(), strict=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"TRUSTED_PROXIES: {_proxy!r} is not an IP address or network "
            "(e.g. 127.0.0.1 or 10.0.0.0/8)"
        ) from None

# A verified second factor (TOTP or a backup code) before an act that signs, approves, exports or
# mints a credential (consortium.core.second_factor); on by default in production only.
TWO_FACTOR_REQUIRED = env_bool("TWO_FACTOR_REQUIRED", default=PRODUCTION)
# The name authenticator apps show beside the account.
OTP_TOTP_ISSUER = "FL Consortium"

# Invitations expire; the token is sent by email and only its hash is stored.
INVITATION_TTL_HOURS = env.int("INVITATION_TTL_HOURS", default=72)
# Personal API tokens always expire; a person chooses a lifetime up to this many days.
API_TOKEN_MAX_DAYS = env.int("API_TOKEN_MAX_DAYS", default=90)
if not 1 <= API_TOKEN_MAX_DAYS <= 366:
    raise ImproperlyConfigured(
        f"API_TOKEN_MAX_DAYS={API_TOKEN_MAX_DAYS}: set a number of days from 1 to 366."
    )

# --- Internationalisation ----------------------------------------------------------
LANGUAGE_CODE = "en-gb"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Static files -----------------------------------------------------------------
STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    # plotly.js from the installed plotly package, as vendor/plotly.min.js (no CDN).
    "consortium.staticfinders.PlotlyFinder",
]
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # The manifest storage fails on any static path before collectstatic has
    # run, so it is production-only.
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if PRODUCTION
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
    # Model files (global models, site updates), content-addressed by SHA-256
    # (training.rounds.artifacts). Any Django storage backend works here: for S3, install
    # django-storages and use {"BACKEND": "storages.backends.s3.S3Storage",
    # "OPTIONS": {"bucket_name": ...}}. The default is a local folder.
    "artifacts": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {
            "location": env.str("ARTIFACT_ROOT", default=str(BASE_DIR / "var" / "artifacts")),
            "file_permissions_mode": 0o640,
            "directory_permissions_mode": 0o750,
        },
    },
}

# --- Email -----------------------------------------------------------------------
_email = env.email_url("EMAIL_URL", default="consolemail://")
EMAIL_BACKEND = _email.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
for _key in (
    "EMAIL_HOST",
    "EMAIL_PORT",
    "EMAIL_HOST_USER",
    "EMAIL_HOST_PASSWORD",
    "EMAIL_FILE_PATH",
):
    if _email.get(_key):
        globals()[_key] = _email[_key]
EMAIL_USE_TLS = bool(_email.get("EMAIL_USE_TLS", False))
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="consortium@localhost")
# Invitations and notifications are mail: in production, a backend that delivers nothing (the
# console, the default; or the dummy and in-memory ones) would lose every one without a word, so
# it is refused here unless EMAIL_ALLOW_CONSOLE says it is meant. A site worker (SITE_SLUG set)
# sends no mail and needs no EMAIL_URL.
EMAIL_ALLOW_CONSOLE = env_bool("EMAIL_ALLOW_CONSOLE", default=False)
UNDELIVERED_EMAIL_BACKENDS = frozenset(
    {
        "django.core.mail.backends.console.EmailBackend",
        "django.core.mail.backends.dummy.EmailBackend",
        "django.core.mail.backends.locmem.EmailBackend",
    }
)
if (
    PRODUCTION
    and EMAIL_BACKEND in UNDELIVERED_EMAIL_BACKENDS
    and not EMAIL_ALLOW_CONSOLE
    and not os.environ.get("SITE_SLUG")
):
    raise ImproperlyConfigured(
        f"EMAIL_URL {'is unset' if 'EMAIL_URL' not in os.environ else 'delivers no mail'} "
        f"({EMAIL_BACKEND.rsplit('.', 2)[-2]} backend): in production, invitations and "
        "notifications would reach nobody. Set EMAIL_URL to your mail server (e.g. "
        "smtp+tls://user:password@smtp.example.org:587), or EMAIL_ALLOW_CONSOLE=true if mail "
        "going only to the log is meant."
    )

# --- Celery ------------------------------------------------------------------------
# Embedded default: kombu's filesystem transport, a real broker with named
# queues that needs no server. The folders are created by consortium.celery.
CELERY_DATA_DIR = Path(env.str("CELERY_DATA_DIR", default=str(BASE_DIR / "var" / "broker")))
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
# How often a consumer of the embedded broker looks for a message (seconds): each look lists
# the broker's folder, about 0.4% of a core per idle consumer at 50 ms and 1.7% at 10 ms. The
# coordinator (the worker that consumes "central", see consortium.celery) looks more often:
# it is one process, and its pick-up of the round's last upload is on every round's critical
# path; the site workers, one per hospital, keep the slower pace (docs/performance.md,
# "Round overhead").
EMBEDDED_BROKER_POLL_SECONDS = env.float("EMBEDDED_BROKER_POLL_SECONDS", default=0.05)
# The scoring worker (-Q scoring alone) lowers its CPU priority by this much (nice, 0-19) when it
# starts: a round's contribution scores are background work, and where it shares cores with the
# coordinator and the site API it must not slow the next round (docs/performance.md). 0 keeps it.
_scoring_niceness = env.str("SCORING_WORKER_NICENESS", default="10")
if not (_scoring_niceness.isascii() and _scoring_niceness.isdigit()) or int(_scoring_niceness) > 19:
    raise ImproperlyConfigured(
        "SCORING_WORKER_NICENESS must be a whole number from 0 (the coordinator's priority) to "
        f"19 (the lowest), not {_scoring_niceness!r}"
    )
SCORING_WORKER_NICENESS = int(_scoring_niceness)
EMBEDDED_BROKER_CENTRAL_POLL_SECONDS = env.float(
    "EMBEDDED_BROKER_CENTRAL_POLL_SECONDS", default=0.01
)
if CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_DATA_DIR / "out"),
        "data_folder_out": str(CELERY_DATA_DIR / "out"),
        "processed_folder": str(CELERY_DATA_DIR / "processed"),
        # Exchange-to-queue bindings; kombu's default is "control" in the working directory,
        # which a worker and a sender started from different folders would not share.
        "control_folder": str(CELERY_DATA_DIR / "control"),
        "store_processed": False,
        "polling_interval": EMBEDDED_BROKER_POLL_SECONDS,
    }
# Celery's result store is never the truth (round state lives in our rows).
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=None) or None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_DEFAULT_QUEUE = CENTRAL_QUEUE
# The coordinator's tasks run on "central", contribution scoring on "scoring" (a worker of its
# own); the site task is routed by its sender to "site.<slug>". Names, queues and intervals:
# training.queues, the one registry.
CELERY_TASK_ROUTES = celery_task_routes()
CELERY_BEAT_SCHEDULE = celery_beat_schedule()
# A Celery worker runs one task at a time per process (or per thread of a threads pool), so
# unlike Daphne it can keep its PostgreSQL connection between tasks: a new one costs the server
# a process (about 7 ms of its CPU here, and 5 ms of wall on the round's close).
# consortium.celery sets CONN_MAX_AGE to WORKER_DATABASE_CONN_MAX_AGE in every worker on
# PostgreSQL (0: a connection per task, as before) and does around each task what Django does
# around a request (close_old_connections: a broken or expired connection is replaced).
# Celery's own fix-up would close every connection before and after every task; with
# CELERY_DB_REUSE_MAX it leaves them to the above, and recycles them every that many tasks.
WORKER_DATABASE_CONN_MAX_AGE = env.int("WORKER_DATABASE_CONN_MAX_AGE", default=600)
CELERY_DB_REUSE_MAX = 1000

# The largest site update (a packed tensor file) the API accepts, in bytes; the
# request body is refused while it is read once it passes this.
FL_MAX_UPDATE_BYTES = env.int("FL_MAX_UPDATE_BYTES", default=200 * 1024 * 1024)
# Tasks are acknowledged late, and RabbitMQ closes the channel of a consumer that holds a message
# longer than its consumer_timeout (then the task runs again): every task's hard limit fits under
# it (training.queues, "Time limits"). BROKER_CONSUMER_TIMEOUT_SECONDS is the broker's
# consumer_timeout (rabbitmq.conf, in ms there; 30 min by default). The site tasks' limits
# (training.rounds.tasks) default to 1,740 s hard and 1,620 s soft; set higher, they are refused
# here, at start-up, saying what to change. Every other task gets the same ceiling.
BROKER_CONSUMER_TIMEOUT_SECONDS = env.int(
    "BROKER_CONSUMER_TIMEOUT_SECONDS", default=DEFAULT_BROKER_CONSUMER_TIMEOUT_SECONDS
)
try:
    _task_limits = task_time_limits(
        consumer_timeout=BROKER_CONSUMER_TIMEOUT_SECONDS,
        soft=env.int("FL_SITE_TASK_SOFT_LIMIT", default=None),
        hard=env.int("FL_SITE_TASK_HARD_LIMIT", default=None),
    )
except TimeLimitError as exc:
    raise ImproperlyConfigured(str(exc)) from None
FL_SITE_TASK_SOFT_LIMIT = _task_limits.soft
FL_SITE_TASK_HARD_LIMIT = _task_limits.hard
CELERY_TASK_TIME_LIMIT = _task_limits.ceiling
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # Redis's counterpart: a message unacknowledged this long is delivered again (1 h by default).
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": max(3600, BROKER_CONSUMER_TIMEOUT_SECONDS)
    }
# A site task that has not reported after this long is sent again (a killed worker's
# message is dropped by the filesystem broker; uploads are idempotent); so is a round's
# scoring message that no scoring worker took within it, then after as long again as the round
# has waited (training.rounds.scoring_queue).
FL_REDISPATCH_AFTER_SECONDS = env.int("FL_REDISPATCH_AFTER_SECONDS", default=300)
# The coordinator that claims a round for aggregation, and the scoring worker that scores it,
# hold a lease of this long, renewed while they work; one killed mid-round lets it run out and
# the next tick claims the round again or sends it to be scored again (training.rounds.leases).
FL_CLAIM_LEASE_SECONDS = env.int("FL_CLAIM_LEASE_SECONDS", default=30)
# The coordinator's relay thread publishes the outbox every FL_OUTBOX_RELAY_SECONDS and
# writes the coordinator's heartbeat every FL_COORDINATOR_HEARTBEAT_SECONDS; /health/ calls
# the relay failing when a message has waited FL_OUTBOX_STALE_SECONDS (training.outbox,
# training.liveness).
FL_OUTBOX_RELAY_SECONDS = env.float("FL_OUTBOX_RELAY_SECONDS", default=1.0)
FL_COORDINATOR_HEARTBEAT_SECONDS = env.float("FL_COORDINATOR_HEARTBEAT_SECONDS", default=5.0)
FL_OUTBOX_STALE_SECONDS = env.int("FL_OUTBOX_STALE_SECONDS", default=60)
if _recovery_problems := recovery_timing_problems(
    redispatch_after=FL_REDISPATCH_AFTER_SECONDS,
    claim_lease=FL_CLAIM_LEASE_SECONDS,
    relay_every=FL_OUTBOX_RELAY_SECONDS,
    heartbeat_every=FL_COORDINATOR_HEARTBEAT_SECONDS,
    outbox_stale=FL_OUTBOX_STALE_SECONDS,
):
    raise ImproperlyConfigured("; ".join(_recovery_problems))
# An approved job whose start message was lost is started by the tick after this long.
FL_START_GRACE_SECONDS = env.int("FL_START_GRACE_SECONDS", default=30)
# A site that missed this many rounds of a running job in a row is shown as absent on the
# job's page and its proposer notified, once per streak (training.rounds.absences).
FL_ABSENT_ROUNDS_ALERT = env.int("FL_ABSENT_ROUNDS_ALERT", default=3)

# A deployment's own model classes, by dotted path ("bring your own model"):
# {"name": {"class_path": "pkg.module.Class", "modality": "tabular", "description": "..."}}
TRAINING_CUSTOM_MODELS: dict = {}

# --- Channels ----------------------------------------------------------------------
CHANNEL_LAYER_URL = env.str("CHANNEL_LAYER_URL", default="")
if CHANNEL_LAYER_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [CHANNEL_LAYER_URL]},
        }
    }
else:
    # Per process only: fine for one process, never across web and worker.
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# Live pages also poll the ledger head this often (seconds): the in-memory layer does not carry
# the coordinator's wake-ups across processes, and a lost wake-up costs at most this much.
LIVE_POLL_SECONDS = env.float("LIVE_POLL_SECONDS", default=1.0)

# --- REST API ----------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Personal API tokens first: its ``Bearer`` challenge is what an unauthenticated call
        # gets with its 401. No HTTP Basic: a password is never sent to the API.
        "consortium.governance.api.authentication.APITokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # A JSON API: bodies are JSON, except where an endpoint takes a file (its own parsers). A
    # form encoding carries no types (every value a string, nested objects as text), so the
    # schema could not describe what such a body means; another content type is a 415.
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    # drf-spectacular's, plus the 403 of the acts that need a second factor.
    "DEFAULT_SCHEMA_CLASS": "consortium.core.api.schema.ConsortiumAutoSchema",
    "DEFAULT_FILTER_BACKENDS": ["consortium.core.api.filtering.StrictFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "consortium.core.api.pagination.StrictPageNumberPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "consortium.core.api.exceptions.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "FL Consortium API",
    "DESCRIPTION": "Governance and traceability for federated-learning consortia.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # The Swagger and Redoc pages are served from the sidecar package, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Every error status the API answers, declared from each operation's shape, with one body.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "consortium.core.api.schema.declare_error_responses",
    ],
    # Two "status" fields with different choices: name their enums.
    "ENUM_NAME_OVERRIDES": {
        "VersionStatusEnum": "consortium.governance.models.AgreementVersion.Status",
        "InvitationStatusEnum": "consortium.governance.api.serializers.INVITATION_STATUSES",
        "JobStateEnum": "training.models.JobState",
        "ParticipantStatusEnum": "training.models.JobParticipant.Status",
        "ReservationStatusEnum": "training.models.PrivacyReservation.Status",
        "SiteUpdateStatusEnum": "training.models.SiteUpdate.Status",
    },
}

DJANGO_TABLES2_TEMPLATE = "django_tables2/table.html"

# --- Security (production) ------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# Every page loads scripts and styles from /static/ only, and passes data in json_script blocks:
# no 'unsafe-inline' anywhere (consortium.core.security_headers; the live pages' websocket origin
# is added to connect-src per request).
CONTENT_SECURITY_POLICY = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "connect-src": ["'self'"],
    "font-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}
# Powerful browser features the app never uses, denied to it and to anything it could embed.
# Only names Chromium knows (an unknown one is a console warning on every page; the browser
# tests fail on it). Not clipboard-write: the "Copy" buttons use it.
PERMISSIONS_POLICY: dict[str, list[str]] = {
    feature: []
    for feature in (
        "accelerometer",
        "autoplay",
        "camera",
        "display-capture",
        "geolocation",
        "gyroscope",
        "hid",
        "idle-detection",
        "magnetometer",
        "microphone",
        "midi",
        "payment",
        "publickey-credentials-get",
        "screen-wake-lock",
        "serial",
        "usb",
        "xr-spatial-tracking",
    )
}
# Sessions end after SESSION_IDLE_MINUTES without a request made by the person (a live page's
# own refreshes do not count), and SESSION_MAX_AGE_HOURS after sign-in whatever happens
# (consortium.core.session_timeout). 0 switches either off.
SESSION_IDLE_MINUTES = env.int("SESSION_IDLE_MINUTES", default=30)
SESSION_MAX_AGE_HOURS = env.float("SESSION_MAX_AGE_HOURS", default=12.0)
if SESSION_IDLE_MINUTES < 0 or SESSION_MAX_AGE_HOURS < 0:
    raise ImproperlyConfigured(
        "SESSION_IDLE_MINUTES and SESSION_MAX_AGE_HOURS must be 0 (off) or more, not "
        f"{SESSION_IDLE_MINUTES} and {SESSION_MAX_AGE_HOURS}"
    )
if SESSION_MAX_AGE_HOURS:
    # The cookie and the stored session do not outlive the absolute limit either.
    SESSION_COOKIE_AGE = max(60, int(SESSION_MAX_AGE_HOURS * 3600))
if PRODUCTION:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
    SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SAMESITE = "Lax"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"daphne": {"level": "WARNING"}},
}

# --- Monitoring: /metrics and JSON logs (consortium/observability) -----------------------------
# Kept together, last: it wraps what is above (the middleware list, LOGGING).
# /metrics is for operators: a signed-in staff member or superuser, or a scraper sending
# "Authorization: Bearer <METRICS_TOKEN>". Unset, only the signed-in operators may read it.
# Read from os.environ directly, as the secret key is (a token may start with "$").
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "").strip()
if PRODUCTION and METRICS_TOKEN and len(METRICS_TOKEN) < 32:
    raise ImproperlyConfigured(
        "METRICS_TOKEN must be at least 32 random characters in production (e.g. "
        "python -c 'import secrets; print(secrets.token_urlsafe(32))'), or unset."
    )
# "json": every log record is one JSON line on stderr (time, level, logger, message and the
# call's extra fields), in the web server, the coordinator, beat and the site workers.
LOG_FORMAT = env.str("LOG_FORMAT", default="text").strip().lower()
if LOG_FORMAT not in {"text", "json"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be text or json, not {LOG_FORMAT!r}")
# The site API's own server (docs/deploy/systemd/fl-site-api.service sets SITE_API_ONLY=true):
# the hospitals' workers' token-authenticated calls need none of the pages' session, CSRF, second
# factor, lockout or static files, and every middleware costs each of their requests; every
# other path is refused there (consortium.core.site_api_only).
SITE_API_ONLY = env.bool("SITE_API_ONLY", default=False)
if SITE_API_ONLY:
    MIDDLEWARE = [
        "consortium.core.site_api_only.SiteAPIOnlyMiddleware",
        "consortium.core.error_pages.AppErrorPagesMiddleware",
        "consortium.core.security_headers.SecurityHeadersMiddleware",
        "django.middleware.security.SecurityMiddleware",
    ]
    # The admin and the sign-in lockout are the web server's: their paths are refused here.
    SILENCED_SYSTEM_CHECKS = [
        "admin.E408",
        "admin.E409",
        "admin.E410",
        "axes.W002",
    ]
# First, so the request latency it measures includes every other middleware.
MIDDLEWARE.insert(0, "consortium.observability.middleware.RequestLatencyMiddleware")
if LOG_FORMAT == "json":
    from consortium.observability.logging import json_logging  # noqa: E402

    LOGGING = json_logging(LOGGING)
    # A Celery worker would otherwise put its own text handler on the root logger.
    CELERY_WORKER_HIJACK_ROOT_LOGGER = False
