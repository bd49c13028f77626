"""``manage.py create_consortium --slug SLUG --name NAME --admin-email EMAIL --actor USERNAME``:
start a consortium with its first administrator, without a shell.

The first step of a new platform after ``migrate`` and ``createsuperuser``; the superuser is the
``--actor`` (only a superuser may start a consortium: see
:mod:`consortium.governance.services.bootstrap`, which the operator's page
``/consortia/new/`` calls too). ``--admin-email`` is invited as the consortium's administrator:
the invitation is emailed and its one-time link printed, alone, on standard output (what it
means goes to standard error), so a script can keep it. With ``--admin-username``, that existing
account (whose address is ``--admin-email``) is made administrator at once, and the sign-in
page's link is printed instead. The administrator then adds the institutions and invites their
people in the browser (or with ``add_institution`` and ``invite_member``).

Ledger: ``consortium.created`` then ``member.invited`` (or ``member.joined``), by the actor.
"""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand
from django.utils import timezone

from consortium.governance.management.operator import (
    actor_named,
    add_actor_argument,
    service_errors,
)
from consortium.governance.services.bootstrap import consortium_start


class Command(BaseCommand):
    help = (
        "Create a consortium and invite (or appoint) its first administrator; prints the "
        "one-time invitation link (or the sign-in link)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--slug", required=True, help="The consortium's slug (in its URLs).")
        parser.add_argument("--name", required=True, help="The consortium's name.")
        parser.add_argument("--description", default="", help="A line about it (optional).")
        parser.add_argument(
            "--admin-email", required=True, help="The first consortium administrator's address."
        )
        parser.add_argument(
            "--admin-username",
            default="",
            help="Appoint this existing account (its address must be --admin-email) instead "
            "of inviting the address.",
        )
        add_actor_argument(parser)

    def handle(self, *args, **options):
        actor = actor_named(options["actor"])
        with service_errors():
            start = consortium_start(
                acting_user=actor,
                name=options["name"],
                slug=options["slug"],
                description=options["description"],
                admin_email=options["admin_email"],
                admin_username=options["admin_username"],
            )
        consortium = start.consortium
        self.stderr.write(f"Consortium “{consortium.name}” ({consortium.slug}) created.")
        if start.invitation is not None:
            expires = timezone.localtime(start.invitation.expires_at)
            self.stderr.write(
                f"{start.invitation.email} is invited as its administrator; the invitation was "
                f"emailed ({settings.EMAIL_BACKEND.rsplit('.', 2)[-2]} mail backend). The link "
                f"below works once, for that address, until {expires:%Y-%m-%d %H:%M %Z}:"
            )
        else:
            self.stderr.write(
                f"{start.membership.user.get_username()} is its administrator; they sign in "
                "here with their password:"
            )
        self.stdout.write(start.link)
