"""``manage.py create_api_token --user USERNAME --scope read|act --days N [--name NAME]``: a
personal API token for an account, as its "API tokens" page makes one, for an operator's or a
script's set-up (a person usually makes their own in the browser).

The token is printed, alone, on standard output, and never again: only its hash is kept
(``consortium.governance.services.api_tokens``). It expires after ``--days`` days, at most
``API_TOKEN_MAX_DAYS``; a ``read`` token may only read. Send it as
``Authorization: Bearer <token>``.

The token carries no second factor (``APIToken.second_factor`` is false): where
``TWO_FACTOR_REQUIRED``, it cannot do the acts that need one (``consortium.core.second_factor``);
a person makes such a token on their API tokens page, in a session that has verified.

Ledger: ``account.api_token_created``, authored by the account the token belongs to (a token
acts as its owner, so the entry names the owner, whoever typed the command).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from consortium.governance.management.operator import service_errors
from consortium.governance.models import APITokenScope
from consortium.governance.services.api_tokens import api_token_create


class Command(BaseCommand):
    help = (
        "Create a personal API token for an account; the token is printed once. It carries no "
        "second factor: where TWO_FACTOR_REQUIRED, it cannot sign, approve, export or mint "
        "credentials (a person makes such a token on their API tokens page after verifying)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--user", required=True, metavar="USERNAME", help="The account the token acts as."
        )
        parser.add_argument(
            "--scope",
            required=True,
            choices=APITokenScope.values,
            help="read: GET, HEAD and OPTIONS only; act: anything the account may do.",
        )
        parser.add_argument(
            "--days",
            required=True,
            type=int,
            help=f"Its lifetime in days, 1 to API_TOKEN_MAX_DAYS ({settings.API_TOKEN_MAX_DAYS}).",
        )
        parser.add_argument("--name", default="manage.py create_api_token", help="What it is for.")

    def handle(self, *args, **options):
        username = (options["user"] or "").strip()
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"--user: there is no account named '{username}'.")
        if not user.is_active:
            raise CommandError(f"--user: the account '{username}' is deactivated.")
        with service_errors():
            token, secret = api_token_create(
                acting_user=user,
                name=options["name"],
                scope=options["scope"],
                days=options["days"],
                by_operator=True,
            )
        expires = timezone.localtime(token.expires_at)
        self.stderr.write(
            f"API token '{token.name}' ({token.get_scope_display().lower()}) for "
            f"{user.get_username()}, expires {expires:%Y-%m-%d %H:%M %Z}. It is shown once: "
            "send it as 'Authorization: Bearer <token>'."
        )
        self.stdout.write(secret)
