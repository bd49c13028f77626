"""``manage.py score_contributions --job ID``: score the closed rounds of a job that have no
contribution entry yet, then the job's total if it has completed.

The coordinator scores each round right after closing it, in a transaction of its own
(``training.rounds.contributions``); a coordinator killed between the two commits, or a job that ran
before contribution scoring existed, leaves rounds unscored. This command fills them in; rounds
already scored (or recorded as unavailable) are left as they are.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from training.models import TrainingJob
from training.rounds.contributions import job_score_missing


class Command(BaseCommand):
    help = "Score the closed rounds of a job that have no contribution entry in the ledger yet."

    def add_arguments(self, parser):
        parser.add_argument("--job", type=int, required=True, help="The training job's id.")

    def handle(self, *args, job: int, **options):
        if not TrainingJob.objects.filter(pk=job).exists():
            raise CommandError(f"no training job #{job}")
        outcomes = job_score_missing(job)
        if not outcomes:
            self.stdout.write(f"Job #{job} has no closed round.")
        for index, outcome in sorted(outcomes.items()):
            self.stdout.write(f"round {index}: {outcome}")
