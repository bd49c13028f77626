#!/usr/bin/env python
"""Page benchmark: server time and queries of the main pages as the consortium grows.

    .venv/bin/python benchmarks/pages.py [--requests N] [--scale F]

Runs on whatever ``DATABASE_URL`` names (SQLite by default), in a throwaway database of its
own (on PostgreSQL it creates and drops ``flc_bench_pages``). It builds the demo consortium
(``seed_demo``), then grows it in two steps and measures the pages below at each size:

* small: 10 institutions, 100 jobs, 10,000 ledger entries;
* large: 100 institutions, 1,000 jobs, 100,000 ledger entries (the issue's figure).

Pages (each requested through Django's test client, as the user who would open it, so the
time is the server's: middleware, views, queries and templates, no network): the consortium
overview, the job list, a completed job's page (5 rounds of 4 sites, with contribution scores
and privacy spent), the approver's inbox, and the ledger page: its newest entries, and an
older page half way down the ledger (keyset pagination: ``?before=<seq>``).

Figures, each against a baseline measured in the same run (these machines are noisy):

* the 95th-percentile server time of each page, as a multiple of the sign-in page's (a page
  that reads nothing), at both sizes, and large/small;
* the number of queries each page makes at both sizes: it must not grow with the data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ledger as ledger_bench  # noqa: E402  (the throwaway database and the fast chain writer)

ledger_bench.BENCH_DB = "flc_bench_pages"

SIZES = {
    "small": {"institutions": 10, "jobs": 100, "entries": 10_000},
    "large": {"institutions": 100, "jobs": 1_000, "entries": 100_000},
}
SITES_PER_JOB = 4
SHOWCASE_ROUNDS = 5


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="timed requests per page")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every size (e.g. 0.1 for a quick run)"
    )
    return parser.parse_args()


# --- Growing the consortium -----------------------------------------------------------------


class Builder:
    """Grows the seeded demo consortium to a size. Institutions and their approvers go through
    the services (their ledger entries are real); jobs, their participants, decisions and the
    showcase job's rounds are bulk-inserted (a thousand proposals through the compliance
    check would take minutes and measure nothing the pages do); the ledger is extended with
    valid chained entries by the ledger benchmark's fast writer."""

    def __init__(self):
        from django.contrib.auth import get_user_model

        from consortium.governance.models import Consortium
        from consortium.governance.selectors import current_version
        from training.demo.scenario import demo_spec
        from training.jobs.spec import canonical_spec_text, spec_digest, validate_spec

        self.User = get_user_model()
        self.consortium = Consortium.objects.get(slug="demo")
        self.admin = self.User.objects.get(username="admin")
        self.version = current_version(self.consortium.agreements.first())
        spec = validate_spec(demo_spec("breast-cancer", SHOWCASE_ROUNDS))
        self.spec_text = canonical_spec_text(spec)
        self.spec_digest = spec_digest(spec)
        self.showcase = None

    def institutions(self) -> list:
        return list(self.consortium.institutions.order_by("pk"))

    def grow_institutions(self, total: int) -> None:
        from consortium.governance.models import Role
        from consortium.governance.services.institutions import institution_create
        from consortium.governance.services.members import membership_grant

        have = self.consortium.institutions.count()
        for i in range(have, total):
            institution = institution_create(
                acting_user=self.admin,
                consortium=self.consortium,
                name=f"Bench Hospital {i:03d}",
                slug=f"bench-{i:03d}",
                country="GB",
            )
            user = self.User.objects.create_user(f"approver-bench-{i:03d}", password="x")
            membership_grant(
                acting_user=self.admin,
                user=user,
                consortium=self.consortium,
                role=Role.APPROVER,
                institution=institution,
                via="benchmark",
            )

    def grow_jobs(self, total: int) -> None:
        from django.utils import timezone

        from training.models import Approval, JobParticipant, JobState, TrainingJob

        # One job in three awaits approval (the inbox's work), the rest spread over the others.
        states = [
            JobState.AWAITING_APPROVAL,
            JobState.COMPLETED,
            JobState.RUNNING,
            JobState.AWAITING_APPROVAL,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.AWAITING_APPROVAL,
            JobState.REJECTED,
            JobState.DRAFT,
        ]
        institutions = self.institutions()
        have = TrainingJob.objects.filter(consortium=self.consortium).count()
        now = timezone.now()
        jobs = [
            TrainingJob(
                consortium=self.consortium,
                title=f"Bench job {i:04d}",
                spec_text=self.spec_text,
                spec_digest=self.spec_digest,
                agreement_version=self.version,
                state=states[i % len(states)],
                proposer=self.admin,
                proposer_repr=str(self.admin),
                proposed_at=now,
                approval_deadline=now + dt.timedelta(days=7),
                created_at=now - dt.timedelta(minutes=i),
            )
            for i in range(have, total)
        ]
        TrainingJob.objects.bulk_create(jobs, batch_size=500)
        new = list(
            TrainingJob.objects.filter(consortium=self.consortium, title__startswith="Bench job")
            .exclude(participants__isnull=False)
            .order_by("pk")
        )
        participants, approvals = [], []
        for n, job in enumerate(new):
            # Every job includes one of the four seeded hospitals, so each approver's inbox
            # holds a share of the awaiting jobs; the rest are spread over the consortium.
            chosen = {institutions[n % 4]}
            k = n
            while len(chosen) < SITES_PER_JOB:
                chosen.add(institutions[4 + (k % (len(institutions) - 4))])
                k += 7
            for m, institution in enumerate(sorted(chosen, key=lambda i: i.pk)):
                participants.append(JobParticipant(job=job, institution=institution))
                if job.state == JobState.AWAITING_APPROVAL and m % 2:
                    approvals.append(
                        Approval(
                            job=job,
                            institution=institution,
                            decision=Approval.Decision.APPROVED,
                            spec_digest=job.spec_digest,
                            agreement_version=self.version,
                            decided_by=self.admin,
                            decided_by_repr=str(self.admin),
                        )
                    )
        JobParticipant.objects.bulk_create(participants, batch_size=1000)
        Approval.objects.bulk_create(approvals, batch_size=1000)

    def showcase_job(self):
        """A completed job with its rounds, updates, models and scores: the job page's case."""
        from django.utils import timezone

        from training.jobs.accounting import events_for_pipeline
        from training.models import (
            ContributionScore,
            GlobalModel,
            JobParticipant,
            JobState,
            Round,
            SiteUpdate,
            TrainingJob,
        )

        if self.showcase is not None:
            return self.showcase
        seeded = self.institutions()[:SITES_PER_JOB]
        job = TrainingJob.objects.create(
            consortium=self.consortium,
            title="Showcase job",
            spec_text=self.spec_text,
            spec_digest=self.spec_digest,
            agreement_version=self.version,
            state=JobState.COMPLETED,
            proposer=self.admin,
            proposer_repr=str(self.admin),
            proposed_at=timezone.now(),
        )
        for institution in seeded:
            JobParticipant.objects.create(job=job, institution=institution)
        spec = job.spec
        events = [
            e.to_json()
            for e in events_for_pipeline(
                spec["privacy_pipeline"],
                rounds=1,
                local_epochs=spec["local_epochs"],
                batch_size=spec["batch_size"],
                num_records=100,
            )
        ]
        parent = GlobalModel.objects.create(
            job=job, round_index=0, digest="0" * 64, lineage_hash="1" * 64
        )
        for index in range(1, SHOWCASE_ROUNDS + 1):
            model = GlobalModel.objects.create(
                job=job,
                round_index=index,
                digest=f"{index:064x}",
                lineage_hash=f"{index + 100:064x}",
                parent=parent,
                metrics={"validation_accuracy": 0.85 + index / 100, "validation_loss": 0.3},
            )
            rnd = Round.objects.create(
                job=job,
                index=index,
                state=Round.State.CLOSED,
                global_model_in=parent,
                global_model_out=model,
                deadline=timezone.now(),
                closed_at=timezone.now(),
            )
            for k, institution in enumerate(seeded):
                SiteUpdate.objects.create(
                    round=rnd,
                    institution=institution,
                    status=SiteUpdate.Status.ACCEPTED,
                    samples=100 + k,
                    update_digest=f"{index * 10 + k:064x}",
                    privacy_events=events,
                    metrics={"train_loss_last_epoch": 0.5 - index / 20},
                    received_at=timezone.now(),
                )
                ContributionScore.objects.create(
                    job=job,
                    round=rnd,
                    round_index=index,
                    institution=institution,
                    method="shapley_exact",
                    metric="accuracy",
                    score=0.01 * (k + 1),
                    ledger_seq=index,
                )
            parent = model
        self.showcase = job
        return job

    def grow_ledger(self, total: int) -> None:
        from audit.models import LedgerHead

        head = LedgerHead.objects.get(pk=1)
        if head.seq >= total:
            return
        writer = ledger_bench.ChainWriter("demo", seq=head.seq, prev=head.entry_hash)
        writer.extend_to(total)

    def grow(self, size: dict) -> None:
        self.grow_institutions(size["institutions"])
        self.grow_jobs(size["jobs"])
        self.showcase_job()
        self.grow_ledger(size["entries"])
        from django.db import connection

        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")


# --- Measuring ------------------------------------------------------------------------------


def measure(client, url: str, requests: int) -> dict:
    from django.db import connection, reset_queries
    from django.test.utils import CaptureQueriesContext

    for _ in range(3):  # warm caches (templates, content types, RDP curves)
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
    reset_queries()  # count from an empty log
    with CaptureQueriesContext(connection) as captured:
        client.get(url)
    queries = len(captured)  # now: the next request's reset_queries empties what it reads
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(url)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200
    times.sort()
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
    return {
        "p95": p95,
        "median": statistics.median(times),
        "queries": queries,
        "bytes": len(response.content),
    }


def pages(builder) -> dict:
    from django.test import Client

    from audit.models import LedgerEntry, LedgerHead
    from training.models import JobParticipant

    slug = builder.consortium.slug
    # An older ledger page: the consortium's entries before the one half way down the chain.
    middle = (
        LedgerEntry.objects.filter(consortium_slug=slug, seq__lte=LedgerHead.objects.get().seq // 2)
        .order_by("-seq")
        .values_list("seq", flat=True)
        .first()
    )
    job = builder.showcase_job()
    inbox_user = builder.User.objects.get(username="approver-barts")
    assert JobParticipant.objects.filter(institution__slug="barts").exists()
    admin, auditor, approver, anonymous = Client(), Client(), Client(), Client()
    admin.force_login(builder.admin)
    auditor.force_login(builder.User.objects.get(username="auditor"))
    approver.force_login(inbox_user)
    return {
        "baseline: sign-in page": (anonymous, "/accounts/login/"),
        "consortium overview": (admin, f"/consortia/{slug}/"),
        "job list": (admin, f"/consortia/{slug}/jobs/"),
        "job page": (admin, f"/consortia/{slug}/jobs/{job.pk}/"),
        "approver inbox": (approver, f"/consortia/{slug}/approvals/"),
        "ledger page": (auditor, f"/consortia/{slug}/ledger/"),
        "older ledger page": (auditor, f"/consortia/{slug}/ledger/?before={middle}"),
    }


def main() -> int:
    args = parse_args()
    os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
    description, cleanup = ledger_bench.prepare_database()
    try:
        ledger_bench.setup_django()
        from django.core.management import call_command
        from django.db import connection

        call_command("seed_demo", stdout=open(os.devnull, "w"))  # noqa: SIM115
        builder = Builder()
        print(f"Database: {description} ({connection.vendor})")
        print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.requests} requests")
        results = {}
        for name, size in SIZES.items():
            scaled = {k: max(8, int(v * args.scale)) for k, v in size.items()}
            started = time.perf_counter()
            builder.grow(scaled)
            built = time.perf_counter() - started
            print(
                f"\n{name}: {scaled['institutions']} institutions, {scaled['jobs']} jobs, "
                f"{scaled['entries']:,} ledger entries (built in {built:.1f} s)"
            )
            results[name] = {}
            plan = pages(builder)
            for page, (client, url) in plan.items():
                results[name][page] = measure(client, url, args.requests)
            base = results[name]["baseline: sign-in page"]["p95"]
            print(f"  {'page':<26}{'p95 ms':>9}{'× sign-in':>11}{'queries':>9}{'KiB':>8}")
            for page, r in results[name].items():
                print(
                    f"  {page:<26}{r['p95'] * 1000:>9.1f}{r['p95'] / base:>11.1f}"
                    f"{r['queries']:>9}{r['bytes'] / 1024:>8.0f}"
                )
        print("\nlarge / small (p95 time as a multiple of the sign-in page's; queries)")
        grew = []
        for page in results["large"]:
            if page.startswith("baseline"):
                continue
            small, large = results["small"][page], results["large"][page]
            rel_small = small["p95"] / results["small"]["baseline: sign-in page"]["p95"]
            rel_large = large["p95"] / results["large"]["baseline: sign-in page"]["p95"]
            flat = large["queries"] <= small["queries"]
            if not flat:
                grew.append(page)
            print(
                f"  {page:<26} time ×{rel_large / rel_small:>5.2f}   queries "
                f"{small['queries']} -> {large['queries']} {'(flat)' if flat else '(GREW)'}"
            )
        print(
            "\nQueries flat for every page." if not grew else f"\nQueries grew: {', '.join(grew)}"
        )
        return 1 if grew else 0
    finally:
        cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
