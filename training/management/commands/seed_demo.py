"""Create the demo consortium (``training.demo.seed``) and print the demo logins.

Running it again changes nothing and prints the logins.
"""

from __future__ import annotations

import os

from django.core.management.base import BaseCommand

from consortium.governance.models import Consortium
from consortium.governance.selectors import agreement_status
from training.demo.seed import DEMO_SLUG, seed_demo_consortium


class Command(BaseCommand):
    help = "Create the demo consortium (idempotent) and print the demo logins."

    def add_arguments(self, parser):
        parser.add_argument(
            "--password",
            default=os.environ.get("DEMO_PASSWORD", "demo-consortium-2026"),
            help="Password for every demo user (default: demo-consortium-2026).",
        )

    def handle(self, *args, password: str, **options):
        logins = seed_demo_consortium(password=password)
        status = agreement_status(Consortium.objects.get(slug=DEMO_SLUG).agreements.first())
        self.stdout.write(self.style.SUCCESS("Demo consortium ready."))
        in_force = "yes" if status.in_force else "no: " + "; ".join(status.reasons)
        self.stdout.write(f"Agreement in force: {in_force}")
        self.stdout.write(f"Logins (password for all: {password}):")
        for username, what in logins:
            self.stdout.write(f"  {username:<26} {what}")
