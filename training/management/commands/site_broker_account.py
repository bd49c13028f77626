"""``manage.py site_broker_account --slug SLUG``: a site's own account on the RabbitMQ broker.

Each hospital's worker gets its own broker user (``site-<slug>``), allowed to consume its own
queue ``site.<slug>`` and nothing else: it cannot read another site's queue nor publish to
``central`` (``training.site.broker`` says which rights, and why). By default the command prints
the ``rabbitmqctl`` lines to run on the broker's machine, then, as a shell comment, the
``CELERY_BROKER_URL`` the site must use; ``--apply`` runs them itself (where ``rabbitmqctl``
is installed and may be used: on the broker's machine, as root or the rabbitmq user), checks
that the new account can consume its queue, and prints only the URL. The password is generated
(or read from ``--password-file``) and shown only this once: nothing keeps it.

The URL's host and port are those of ``--broker-url`` (default: this server's
``CELERY_BROKER_URL``; give the name the sites reach the broker by when it differs), its
virtual host that of ``--vhost`` (default: the one ``CELERY_BROKER_URL`` names, which the
coordinator publishes to, and which must exist). Redis and the embedded broker have no per-user
permissions on queues: the command says so and stops.

Not a ledger entry: the account lives on the broker, not in the platform's records.
"""

from __future__ import annotations

import secrets
import subprocess
import urllib.parse
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from consortium.governance.management.operator import institution_by_slug
from training.queues import site_queue
from training.site.broker import (
    AMQP_SCHEMES,
    REDIS_SCHEMES,
    BrokerAccessError,
    broker_vhost,
    check_site_queue_access,
    rabbitmq_account_argvs,
    rabbitmq_account_commands,
    site_broker_url,
    site_permissions,
    site_username,
)


class Command(BaseCommand):
    help = (
        "A site's own RabbitMQ account, allowed to consume only site.<slug>: print the "
        "rabbitmqctl lines (default) or --apply them; prints the site's CELERY_BROKER_URL."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--slug",
            "--institution",
            dest="slug",
            required=True,
            help="The institution's slug (its worker's queue is site.<slug>).",
        )
        parser.add_argument(
            "--vhost",
            help="The RabbitMQ virtual host (default: the one CELERY_BROKER_URL names, '/' "
            "when it names none). It must exist: the coordinator uses it.",
        )
        parser.add_argument("--username", help="The broker user (default site-<slug>).")
        password = parser.add_mutually_exclusive_group()
        password.add_argument(
            "--password-file",
            type=Path,
            help="Read the password from this file (its first line) instead of generating one.",
        )
        password.add_argument(
            "--generate-password",
            action="store_true",
            help="Generate a random password (the default).",
        )
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument(
            "--print",
            dest="apply",
            action="store_false",
            help="Print the rabbitmqctl lines to run on the broker's machine (the default).",
        )
        mode.add_argument(
            "--apply",
            dest="apply",
            action="store_true",
            help="Run them here (rabbitmqctl must be installed and usable), then check the "
            "account.",
        )
        parser.set_defaults(apply=False)
        parser.add_argument(
            "--broker-url",
            help="The broker as the sites reach it (only its scheme, host and port are used; "
            "default: CELERY_BROKER_URL).",
        )
        parser.add_argument(
            "--rabbitmqctl",
            default="rabbitmqctl",
            help="The rabbitmqctl program --apply runs (default: rabbitmqctl on the PATH).",
        )

    def handle(self, *args, **options):
        slug = options["slug"]
        broker_url = options["broker_url"] or settings.CELERY_BROKER_URL
        _refuse_brokers_without_accounts(broker_url)
        institution_by_slug(slug)  # a typo would make an account for a queue nobody uses
        vhost = options["vhost"] or broker_vhost(broker_url)
        username = options["username"] or site_username(slug)
        password = _password(options["password_file"])
        try:
            lines = rabbitmq_account_commands(
                slug, password=password, vhost=vhost, username=username
            )
            url = site_broker_url(broker_url, username=username, password=password, vhost=vhost)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        perms = site_permissions(slug)
        rights = (
            f"configure {perms.configure}, write {perms.write}, read {perms.read}: it may "
            f"consume {site_queue(slug)} and nothing else"
        )
        if not options["apply"]:
            self.stderr.write(
                f"Run these lines on the broker's machine (rabbitmqctl, as root or the rabbitmq "
                f"user) to create the broker user {username} on the virtual host {vhost!r}, "
                f"with {rights}. The last line is the CELERY_BROKER_URL of the site's worker: "
                "the password is shown only this once and kept nowhere."
            )
            for line in lines:
                self.stdout.write(line)
            self.stdout.write(f"# CELERY_BROKER_URL={url}")
            return
        program = options["rabbitmqctl"]
        add_user, *grants = rabbitmq_account_argvs(
            slug, password=password, vhost=vhost, username=username
        )
        _run_rabbitmqctl(program, add_user, password=password, username=username)
        try:
            for argv in grants:
                _run_rabbitmqctl(program, argv, password=password, username=username)
        except CommandError as exc:
            # Not left half made: a user without its permissions would only be in the way.
            subprocess.run(  # noqa: S603 - rabbitmqctl, with arguments we built
                [program, "delete_user", username], capture_output=True, timeout=120, check=False
            )
            raise CommandError(f"{exc} (the user {username} was removed again)") from None
        check_url = settings.CELERY_BROKER_URL
        if urllib.parse.urlsplit(check_url).scheme not in AMQP_SCHEMES:
            check_url = broker_url
        try:
            check_site_queue_access(
                site_broker_url(check_url, username=username, password=password, vhost=vhost),
                slug,
            )
        except BrokerAccessError as exc:
            raise CommandError(f"the account was created, but it does not work: {exc}") from None
        self.stderr.write(
            f"Created the broker user {username} on the virtual host {vhost!r}, with {rights}; "
            f"it can consume {site_queue(slug)} (checked). Give the site's worker this "
            "CELERY_BROKER_URL; the password is shown only this once and kept nowhere."
        )
        self.stdout.write(url)


def _refuse_brokers_without_accounts(broker_url: str) -> None:
    scheme = urllib.parse.urlsplit(broker_url or "").scheme.lower()
    if scheme in AMQP_SCHEMES:
        return
    if scheme in REDIS_SCHEMES:
        raise CommandError(
            "CELERY_BROKER_URL is a Redis broker: Redis has no per-user permissions on queues "
            "here, so there is no account to make. Every site's worker uses the same Redis "
            "password, and all sites share one trust domain: any of them can read or delete "
            "any queue's messages (another site's tasks) and publish to central. For one "
            "account per site, use RabbitMQ (README, 'Broker accounts')."
        )
    if scheme in {"", "filesystem", "memory"}:
        raise CommandError(
            "CELERY_BROKER_URL is the embedded broker (files on this machine): it has no "
            "accounts, and only workers on this machine reach it. For sites on their own "
            "machines, set CELERY_BROKER_URL to RabbitMQ (amqp://...) and run this again."
        )
    raise CommandError(
        f"CELERY_BROKER_URL's scheme {scheme!r} is not RabbitMQ (amqp://): no account to make."
    )


def _password(path: Path | None) -> str:
    if path is None:
        return secrets.token_urlsafe(32)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CommandError(f"--password-file: cannot read {path}: {exc.strerror}") from None
    password = lines[0].strip() if lines else ""
    if not password or any(c.isspace() for c in password):
        raise CommandError(
            f"--password-file: the first line of {path} must be the password (no spaces)."
        )
    return password


def _run_rabbitmqctl(program: str, argv: list[str], *, password: str, username: str) -> None:
    """Run one ``rabbitmqctl`` line. ``add_user`` reads the password from its standard input
    (when it is not on the command line), so it never shows in the process list."""
    argv = [program, *argv[1:]]
    stdin = None
    if argv[1] == "add_user":
        argv, stdin = argv[:3], password + "\n"
    try:
        done = subprocess.run(  # noqa: S603 - rabbitmqctl, with arguments we built
            argv, input=stdin, capture_output=True, text=True, timeout=120, check=False
        )
    except FileNotFoundError:
        raise CommandError(
            f"{program} is not installed here: run this command on the broker's machine, or "
            "run it with --print and the printed lines there."
        ) from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"{program} {argv[1]} did not answer within 120 s.") from None
    if done.returncode == 0:
        return
    said = " ".join((done.stderr or done.stdout).split())
    if argv[1] == "add_user" and "already exists" in said:
        raise CommandError(
            f"the broker user {username} already exists. To give it a new password: "
            f"rabbitmqctl change_password {username} <password> (then the site's "
            "CELERY_BROKER_URL changes); to start again: rabbitmqctl delete_user "
            f"{username}, then this command."
        )
    raise CommandError(f"{program} {argv[1]} failed (exit {done.returncode}): {said}")
