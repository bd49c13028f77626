#!/usr/bin/env python
"""A round's privacy-budget read against a long history: grouped against replayed per update.

    .venv/bin/python benchmarks/privacy_history.py [--sites N] [--rounds 10,100,1000]

Before each round the coordinator replays what every participant has spent
(``training.jobs.selectors.committed_privacy_events``); each proposal and each accountability
page does the same. That history grows by one accepted update per site and round. For a job
of N sites whose history has reached each size, this times the read as the code does it (the
database groups identical event lists and counts them; ``accepted_privacy_events``) against
the read it replaced, measured in the same run on the same rows: every accepted update's list
fetched, parsed and replayed one by one. Both end in the accountant's ε for every site, which
the benchmark checks agree. Prints the median of R repeats of each and their ratio.

Runs on whatever ``DATABASE_URL`` names (SQLite by default), in a throwaway database of its
own (``flc_bench_privacy`` on PostgreSQL, dropped at the end).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ledger as ledger_bench  # noqa: E402  (the throwaway database)

ledger_bench.BENCH_DB = "flc_bench_privacy"
DELTA = 1e-5
#: What a site's accepted update of the demo's DP-SGD pipeline records, per round.
EVENTS = [
    {
        "mechanism": "sampled_gaussian",
        "params": {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 20},
        "count": 1,
        "source": "dp_sgd",
    },
    {"mechanism": "pure_epsilon", "params": {"epsilon": 0.05}, "count": 1, "source": "svt"},
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", default="10,100,1000", help="history sizes, in rounds")
    parser.add_argument("--repeats", type=int, default=7)
    return parser.parse_args()


def plant(sites: int) -> tuple[object, list]:
    """A consortium, ``sites`` institutions and one running job they all take part in."""
    from consortium.governance.models import Consortium, Institution
    from training.models import JobParticipant, JobState, TrainingJob

    consortium = Consortium.objects.create(name="Bench", slug="bench")
    institutions = [
        Institution.objects.create(consortium=consortium, name=f"Site {i}", slug=f"site-{i}")
        for i in range(sites)
    ]
    job = TrainingJob.objects.create(
        consortium=consortium,
        title="long job",
        spec_text="{}",
        spec_digest="0" * 64,
        state=JobState.RUNNING,
        proposer_repr="benchmark",
    )
    JobParticipant.objects.bulk_create(
        JobParticipant(job=job, institution=institution) for institution in institutions
    )
    return job, institutions


def grow(job, institutions, have: int, want: int) -> None:
    """Closed rounds ``have + 1 .. want``, each with an accepted update from every site."""
    from django.utils import timezone

    from training.models import GlobalModel, Round, SiteUpdate

    now = timezone.now()
    start, _ = GlobalModel.objects.get_or_create(
        job=job, round_index=0, defaults={"digest": "0" * 64, "lineage_hash": "0" * 64}
    )
    rounds = Round.objects.bulk_create(
        Round(
            job=job,
            index=i,
            state=Round.State.CLOSED,
            global_model_in=start,  # which model each round started from matters not here
            deadline=now + dt.timedelta(minutes=5),
        )
        for i in range(have + 1, want + 1)
    )
    SiteUpdate.objects.bulk_create(
        (
            SiteUpdate(
                round=rnd,
                institution=institution,
                status=SiteUpdate.Status.ACCEPTED,
                privacy_events=EVENTS,
            )
            for rnd in rounds
            for institution in institutions
        ),
        batch_size=2000,
    )


def grouped(ids: list[int]) -> dict[int, float]:
    """The read as the coordinator does it now, to each site's ε."""
    from training.jobs.accounting import epsilon_spent
    from training.jobs.selectors import committed_privacy_events

    spent = committed_privacy_events(ids)
    return {i: epsilon_spent(spent[i], delta=DELTA) for i in ids}


def per_update(ids: list[int]) -> dict[int, float]:
    """The read it replaced: every accepted update's list parsed and replayed."""
    from training.jobs.accounting import PrivacyEvent, epsilon_spent
    from training.models import SiteUpdate

    events: dict[int, list] = {i: [] for i in ids}
    for institution_id, update_events in SiteUpdate.objects.filter(
        status=SiteUpdate.Status.ACCEPTED, institution_id__in=ids
    ).values_list("institution_id", "privacy_events"):
        events[institution_id].extend(PrivacyEvent.from_json(e) for e in update_events)
    return {i: epsilon_spent(events[i], delta=DELTA) for i in ids}


def timed(read, ids, repeats: int) -> tuple[float, dict]:
    times, result = [], {}
    for _ in range(repeats):
        started = time.perf_counter()
        result = read(ids)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    args = parse_args()
    sizes = sorted(int(n) for n in args.rounds.split(","))
    where, cleanup = ledger_bench.prepare_database()
    try:
        ledger_bench.setup_django()
        job, institutions = plant(args.sites)
        ids = [i.pk for i in institutions]
        grouped(ids)  # the accountant's curves, computed once per process, outside the timings
        print(f"privacy history benchmark: {args.sites} sites, {where}")
        print("| rounds of history | accepted updates | per update (baseline) | grouped | ratio |")
        print("|---:|---:|---:|---:|---:|")
        have = 0
        for size in sizes:
            grow(job, institutions, have, size)
            have = size
            base, expected = timed(per_update, ids, args.repeats)
            now, got = timed(grouped, ids, args.repeats)
            for i in ids:
                if abs(got[i] - expected[i]) > 1e-9 * max(1.0, expected[i]):
                    raise SystemExit(f"site {i}: ε {got[i]!r} grouped, {expected[i]!r} replayed")
            print(
                f"| {size} | {size * args.sites} | {base * 1000:.1f} ms | {now * 1000:.1f} ms "
                f"| {now / base:.3f} |"
            )
    finally:
        cleanup()


if __name__ == "__main__":
    main()
