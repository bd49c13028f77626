"""``manage.py generate_site_key --out PATH``: a new Ed25519 signing key for a site worker.

Run it on the hospital's worker machine. The private key is written to ``PATH`` (mode 0600;
an existing file is kept unless ``--force``) and never leaves the machine; the public key is
printed, for the data steward to paste on the institution's "Worker credentials" page when
creating the worker's credentials. Needs no database.
"""

from __future__ import annotations

import os
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from training.fl.signing import generate_keypair


class Command(BaseCommand):
    help = "Write a new Ed25519 private key for a site worker (0600) and print its public key."
    requires_system_checks: list = []

    def add_arguments(self, parser):
        parser.add_argument("--out", required=True, help="Where to write the private key (PEM).")
        parser.add_argument(
            "--force", action="store_true", help="Replace an existing key file at --out."
        )

    def handle(self, *args, out: str, force: bool, **options):
        path = Path(out).expanduser()
        if path.exists() and not force:
            raise CommandError(f"{path} exists; pass --force to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        private_pem, public_pem = generate_keypair()
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_pem)
        tmp.replace(path)
        path.chmod(0o600)
        self.stderr.write(f"Private key written to {path} (0600); keep it on this machine.")
        self.stderr.write("Register this public key with the site's worker credentials:")
        self.stdout.write(public_pem.rstrip("\n"))
