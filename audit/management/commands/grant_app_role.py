"""``manage.py grant_app_role [ROLE]``: make ROLE the role the application connects as.

Without ROLE, the user of ``APP_DATABASE_URL`` (the URL the server connects with: the
deployment's unit passes it so, keeping the role's name and password out of the command
line). Run it as the owner role (``DATABASE_URL`` naming the owner), after ``migrate``: see
``audit.ledger.database_roles`` for what it grants and why, and docs/deploy/ for the two
roles in a deployment. It refuses, saying why, a role that could switch the ledger's
triggers off (a superuser, an owner of the tables, a member of the owner role).
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from audit.ledger.database_roles import RoleSetupError, grant_app_role


class Command(BaseCommand):
    help = (
        "Grant ROLE the application's rights (every table; the ledger read and append only). "
        "Run as the owner role after migrate."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "role",
            nargs="?",
            help="the PostgreSQL role the server and workers use (default: the user of "
            "APP_DATABASE_URL)",
        )

    def handle(self, *args, role: str | None, **options):
        if not role:
            url = os.environ.get("APP_DATABASE_URL", "")
            role = unquote(urlsplit(url).username or "") if url else ""
            if not role:
                raise CommandError(
                    "name the application's role, or set APP_DATABASE_URL to the URL the "
                    "server connects with (its user is the role)"
                )
        try:
            grant = grant_app_role(connection, role)
        except RoleSetupError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(
            self.style.SUCCESS(
                f"{grant.role} may now use {grant.tables} tables in schema {grant.schema} "
                f"owned by {grant.owner}; ledger {grant.ledger_rights}"
            )
        )
