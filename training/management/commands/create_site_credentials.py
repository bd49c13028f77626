"""``manage.py create_site_credentials --institution SLUG --public-key FILE_OR_PEM --actor
USERNAME``: create a site worker's credentials, as the institution's "Worker credentials" page
does, and print its token once.

The public key is the one ``generate_site_key`` printed on the site's machine (the private key stays
there), given as a file or as the PEM text. The actor needs what the page asks
(``training.manage_site_credentials``: the institution's administrator or data steward, never the
consortium's administrators nor a superuser: :mod:`consortium.core.access`; see
:mod:`consortium.governance.management.operator` for why ``--actor`` names a person). The token is
printed, alone, on standard output and never again: only its hash is kept. Give it to the site as
``SITE_TOKEN``; what else the worker needs is on standard error.

Ledger: ``site.credential_created``, by the actor.
"""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from audit.ledger.keys import public_key_env_value
from consortium.governance.management.operator import (
    actor_named,
    add_actor_argument,
    institution_by_slug,
    read_public_key,
    require_permission,
    service_errors,
)
from consortium.governance.services.institutions import key_fingerprint
from training.rounds.credentials import site_credential_create


class Command(BaseCommand):
    help = "Create a site worker's credentials (API token) from its public key; prints the token."

    def add_arguments(self, parser):
        parser.add_argument("--institution", required=True, help="The institution's slug.")
        parser.add_argument(
            "--public-key",
            required=True,
            metavar="FILE_OR_PEM",
            help="The worker's Ed25519 public key: a PEM file or the PEM text.",
        )
        parser.add_argument(
            "--label",
            default="site-worker",
            help="A name to tell this worker apart, e.g. gpu-node-1 (default site-worker).",
        )
        add_actor_argument(parser)

    def handle(self, *args, **options):
        actor = actor_named(options["actor"])
        institution = institution_by_slug(options["institution"])
        require_permission(
            actor,
            "training.manage_site_credentials",
            institution,
            doing=f"create worker credentials for {institution.slug}",
            who="its institution administrators and data stewards",
        )
        key = read_public_key(options["public_key"], option="--public-key")
        if not key:
            raise CommandError(
                "--public-key is empty: give the worker's public key (the PEM that "
                "'generate_site_key' printed on the site's machine), or the file holding it."
            )
        with service_errors():
            credential, token = site_credential_create(
                acting_user=actor,
                institution=institution,
                label=options["label"],
                public_key=key,
            )
        self.stderr.write(
            f"Credentials “{credential.label}” created for {institution.name} (token "
            f"{credential.token_prefix}…, key {key_fingerprint(credential.public_key)}). The "
            "token below is shown once: give it to the site's worker as SITE_TOKEN, with "
            f"SITE_SLUG={institution.slug} and CENTRAL_URL={settings.SITE_URL}, and the "
            "centre's key for the ledger's checkpoints, which the worker checks before every "
            f"task: CENTRAL_LEDGER_PUBLIC_KEY={public_key_env_value()}"
        )
        self.stdout.write(token)
