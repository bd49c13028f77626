"""``manage.py invite_member --consortium SLUG [--institution SLUG] --email EMAIL --role ROLE
--actor USERNAME``: invite someone to a role, as the page "Invite someone" does.

Consortium-wide roles (``consortium_admin``, ``auditor``) take no ``--institution``; the others
(``institution_admin``, ``approver``, ``data_steward``, ``researcher``) need one. The actor needs
what the page asks (``consortium.invite_to_consortium`` on the consortium, or
``consortium.invite_to_institution`` on the institution: its administrators); being a superuser
is not enough (:mod:`consortium.core.access`). The invitation is emailed; its one-time link is
printed, alone, on standard output.

Ledger: ``member.invited``, by the actor (and ``member.joined``, by the invitee, on accepting).
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from consortium.governance.management.operator import (
    actor_named,
    add_actor_argument,
    consortium_by_slug,
    institution_by_slug,
    require_permission,
    service_errors,
)
from consortium.governance.models import Role
from consortium.governance.services.members import invitation_create, invitation_url


class Command(BaseCommand):
    help = "Invite someone by email to a role in a consortium or one of its institutions."

    def add_arguments(self, parser):
        parser.add_argument("--consortium", required=True, help="The consortium's slug.")
        parser.add_argument(
            "--institution",
            default="",
            help="The institution's slug (for institution roles; none for consortium roles).",
        )
        parser.add_argument("--email", required=True, help="The address to invite.")
        parser.add_argument("--role", required=True, help="One of: " + ", ".join(Role.values) + ".")
        add_actor_argument(parser)

    def handle(self, *args, **options):
        actor = actor_named(options["actor"])
        role = options["role"].strip()
        if role not in Role.values:
            raise CommandError(
                f"--role: unknown role '{role}'; choose one of {', '.join(Role.values)}."
            )
        consortium = consortium_by_slug(options["consortium"])
        institution = None
        if options["institution"]:
            institution = institution_by_slug(options["institution"], consortium=consortium)
            require_permission(
                actor,
                "consortium.invite_to_institution",
                institution,
                doing=f"invite people to {institution.slug}",
                who=f"the administrators of {consortium.slug} or of {institution.slug}",
            )
        else:
            require_permission(
                actor,
                "consortium.invite_to_consortium",
                consortium,
                doing=f"invite people to consortium-wide roles of {consortium.slug}",
                who="its consortium administrators",
            )
        with service_errors():
            invitation, token = invitation_create(
                acting_user=actor,
                consortium=consortium,
                email=options["email"],
                role=role,
                institution=institution,
            )
        expires = timezone.localtime(invitation.expires_at)
        self.stderr.write(
            f"{invitation.email} is invited as {Role(role).label} at "
            f"{institution or consortium}; the invitation was emailed. The link below works "
            f"once, for that address, until {expires:%Y-%m-%d %H:%M %Z}:"
        )
        self.stdout.write(invitation_url(token))
