"""Two proposals at the same moment cannot both pass a cap only one of them fits.

Two OS processes (two connections, two transactions) propose a job each for the
same institution; each job fits the institution's remaining ε on its own, not
both together. ``training.jobs.proposals`` locks the institutions' rows before the
budget check, so the second proposal waits for the first to commit, replays its
reservation and is refused. PostgreSQL only (on SQLite, IMMEDIATE transactions
serialise every writer anyway); skipped there.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.conf import settings

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from tests.support.agreements import agreement_in_force
from tests.support.child_processes import child_env, release_together
from tests.support.training_fixtures import COSTLY, make_spec, offer_datasets
from training.jobs.accounting import PrivacyEvent, epsilon_spent
from training.jobs.selectors import live_reservations
from training.models import JobState, PrivacyReservation, TrainingJob

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not settings.DATABASE_IS_POSTGRES, reason="needs DATABASE_URL pointing at PostgreSQL"
    ),
]

ROOT = Path(__file__).resolve().parents[2]
A, B = "hospital-a", "hospital-b"

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import django
    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import connection
    from consortium.governance.models import Consortium
    from training.jobs.accounting import PrivacyEvent, epsilon_spent
    from training.jobs.compliance import ComplianceError
    from training.jobs.proposals import job_propose

    worker, start_file, out_file = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    spec = json.loads(sys.argv[4])
    consortium = Consortium.objects.get(slug=sys.argv[5])
    user = get_user_model().objects.get(username="researcher")
    # Warm the accountant's caches and the connection before the start line, so that
    # both proposals really run at the same moment.
    epsilon_spent([PrivacyEvent("gaussian", {"noise_multiplier": 3.0}, 40)], delta=1e-5)
    connection.ensure_connection()
    Path(f"{start_file}.ready{worker}").touch()
    while not start_file.exists():  # the barrier
        time.sleep(0.001)
    began = time.time()
    try:
        job = job_propose(acting_user=user, consortium=consortium, title=f"Race {worker}",
                          spec=spec)
        result = {"ok": True, "job_id": job.pk}
    except ComplianceError as exc:
        result = {"ok": False, "problems": [p.to_json() for p in exc.problems]}
    result.update(began=began, ended=time.time())
    out_file.write_text(json.dumps(result))
    connection.close()
    """
)


def run_together(tmp_path, consortium_slug: str, specs: list[dict]) -> list[dict]:
    """Run one proposal per spec, each in its own process, released at once."""
    start_file = tmp_path / "start"
    env = child_env()
    outs = [tmp_path / f"result{i}.json" for i in range(len(specs))]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(i),
                str(start_file),
                str(outs[i]),
                json.dumps(spec),
                consortium_slug,
            ],
            cwd=ROOT,
            env=env,
        )
        for i, spec in enumerate(specs)
    ]
    try:
        release_together(start_file, children)
        assert [c.wait(timeout=60) for c in children] == [0] * len(specs)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    return [json.loads(out.read_text()) for out in outs]


def live_epsilon(institution_id: int, delta: float) -> float:
    events = []
    for text in live_reservations([institution_id]).values_list("events_text", flat=True):
        events.extend(PrivacyEvent.from_json(e) for e in json.loads(text))
    return epsilon_spent(events, delta=delta)


SCENARIOS = {
    # name: (participants of each job, the institution both contend for)
    "same_institution": ([[A], [A]], A),
    "overlapping_jobs": ([[A, B], [B]], B),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("attempt", range(3))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_simultaneous_proposals_cannot_both_pass_one_cap(cast, tmp_path, scenario, attempt):
    version = agreement_in_force(cast)
    offer_datasets(cast)
    cap, delta = float(version.epsilon_cap), float(version.delta)
    groups, contested = SCENARIOS[scenario]
    specs = [make_spec(participants=p, min_participants=1, **COSTLY) for p in groups]
    # Each job fits alone, both together do not.
    alone = epsilon_spent([PrivacyEvent("gaussian", {"noise_multiplier": 3.0}, 20)], delta=delta)
    both = epsilon_spent([PrivacyEvent("gaussian", {"noise_multiplier": 3.0}, 40)], delta=delta)
    assert alone <= cap < both

    results = run_together(tmp_path, cast.consortium.slug, specs)

    # The two proposals really ran at the same time (each began before the other ended).
    assert max(r["began"] for r in results) < min(r["ended"] for r in results), results
    winners = [r for r in results if r["ok"]]
    losers = [r for r in results if not r["ok"]]
    assert len(winners) == 1 and len(losers) == 1, results
    assert {(p["term"], p["institution"]) for p in losers[0]["problems"]} == {("budget", contested)}
    assert "exceeds its cap" in losers[0]["problems"][0]["message"]
    job = TrainingJob.objects.get()
    assert job.pk == winners[0]["job_id"]
    assert job.state == JobState.AWAITING_APPROVAL
    for institution in (cast.hospital_a, cast.hospital_b):
        assert live_epsilon(institution.pk, delta) <= cap
    contested_id = {A: cast.hospital_a.pk, B: cast.hospital_b.pk}[contested]
    assert live_epsilon(contested_id, delta) == alone
    assert PrivacyReservation.objects.filter(institution_id=contested_id).count() == 1
    assert LedgerEntry.objects.filter(event=ledger_events.JOB_PROPOSED).count() == 1
    assert LedgerEntry.objects.filter(event=ledger_events.JOB_PROPOSAL_REFUSED).count() == 1
    result = verify_chain()
    assert result.ok, result.summary()
