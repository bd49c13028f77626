"""``manage.py add_institution --consortium SLUG --slug SLUG --name NAME --actor USERNAME``:
add an institution (a hospital site) to a consortium, as the page "Add an institution" does.

The actor needs what the page asks (``consortium.add_institution``: the consortium's administrator);
being a superuser is not enough (:mod:`consortium.core.access`). The institution's slug names its
site worker's queue (``site.<slug>``) and never changes. ``--worker-public-key`` (optional, PEM text
or a file) registers the site worker's Ed25519 public key now; it can be registered later on the
institution's page, or given with ``create_site_credentials``.

Ledger: ``institution.created``, by the actor.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand

from consortium.governance.management.operator import (
    actor_named,
    add_actor_argument,
    consortium_by_slug,
    read_public_key,
    require_permission,
    service_errors,
)
from consortium.governance.services.institutions import institution_create


class Command(BaseCommand):
    help = "Add an institution (a hospital site) to a consortium."

    def add_arguments(self, parser):
        parser.add_argument("--consortium", required=True, help="The consortium's slug.")
        parser.add_argument(
            "--slug", required=True, help="The institution's slug: its queue is site.<slug>."
        )
        parser.add_argument("--name", required=True, help="The institution's name.")
        parser.add_argument("--country", default="", help="Its country (optional).")
        parser.add_argument(
            "--worker-public-key",
            default="",
            metavar="FILE_OR_PEM",
            help="The site worker's Ed25519 public key: a PEM file or the PEM text (optional).",
        )
        add_actor_argument(parser)

    def handle(self, *args, **options):
        actor = actor_named(options["actor"])
        consortium = consortium_by_slug(options["consortium"])
        require_permission(
            actor,
            "consortium.add_institution",
            consortium,
            doing=f"add institutions to {consortium.slug}",
            who="its consortium administrators",
        )
        key = read_public_key(options["worker_public_key"], option="--worker-public-key")
        with service_errors():
            institution = institution_create(
                acting_user=actor,
                consortium=consortium,
                name=options["name"],
                slug=options["slug"],
                country=options["country"],
                worker_public_key=key,
            )
        self.stdout.write(
            f"{institution.name} ({institution.slug}) joined {consortium.name}; its site "
            f"worker's queue is site.{institution.slug}."
        )
