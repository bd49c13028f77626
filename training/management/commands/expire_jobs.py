"""Expire jobs whose approval deadline has passed (for cron, or run by beat)."""

from django.core.management.base import BaseCommand

from training.jobs.approvals import jobs_expire_overdue


class Command(BaseCommand):
    help = "Expire training jobs whose approvals were not all in by their deadline."

    def handle(self, *args, **options):
        count = jobs_expire_overdue()
        self.stdout.write(f"{count} job(s) expired.")
