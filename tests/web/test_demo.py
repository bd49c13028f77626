"""``manage.py demo``: the seeded consortium runs a real job through real processes.

The end-to-end test runs ``manage.py demo --no-serve --rounds 2`` as a subprocess on a fresh
SQLite file, with its own broker folder, artifact folder and demo folder (``DEMO_VAR_DIR``), so
it writes nothing into the project's ``var/``. On the embedded default the broker is kombu's
filesystem transport in that private folder; when the suite runs with
``CELERY_BROKER_URL=redis://...`` the demo uses the same Redis server but its own database
number (``DEMO_TEST_REDIS_DB``, default 13), flushed first, so its ``central`` and
``site.<slug>`` queues never meet another test's.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command

from consortium.governance.models import Consortium
from tests.support.child_processes import demo_env
from training.demo.scenario import JOBS, demo_spec
from training.demo.seed import SITE_SLUGS
from training.demo.sites import CREDENTIAL_LABEL, ensure_site_credentials
from training.jobs.proposals import job_propose
from training.models import SiteCredential

BASE_DIR = Path(settings.BASE_DIR)


def _processes_with(marker: str) -> list[str]:
    """Processes whose environment holds ``marker`` (Linux: /proc), i.e. the demo's children."""
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            if marker.encode() in environ:
                found.append(f"{entry.name}: {(entry / 'cmdline').read_bytes()[:200]!r}")
        except OSError:
            continue
    return found


@pytest.mark.worker
def test_demo_runs_a_job_to_completion_on_real_processes(tmp_path):
    var = tmp_path / "demo"
    env = demo_env(tmp_path, database_url=f"sqlite:///{tmp_path / 'demo.sqlite3'}", var=var)
    manage = [sys.executable, str(BASE_DIR / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], env=env, cwd=BASE_DIR, check=True, timeout=120)

    started = time.monotonic()
    done = subprocess.run(
        [*manage, "demo", "--no-serve", "--rounds", "2", "--timeout", "150"],
        env=env,
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    took = time.monotonic() - started
    out = done.stdout + done.stderr
    logs = "\n".join(
        f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((var / "logs").glob("*.log"))
    )
    assert done.returncode == 0, out + logs
    # Before approval every hospital's worker audited its own update and reported figures.
    for slug in SITE_SLUGS:
        assert re.search(
            rf"privacy audit of {slug}: With this pipeline \(40% of the update shared\) an "
            r"attacker rebuilt the features of a record with a median relative error of \d",
            out,
        ), out
    assert re.search(r"Round 2/2 closed .*4/4 updates accepted", out), out
    final = re.search(r"Final model [0-9a-f]{16}…: validation accuracy ([01]\.\d{3})", out)
    assert final, out
    # The model really learns under the agreement's DP-SGD: the majority class alone scores
    # 0.63 on this validation set, and the demo's two rounds reach about 0.91-0.94.
    assert float(final.group(1)) >= 0.8, out
    # Every round scored, by the scoring worker (queue "scoring"), not the coordinator.
    assert "Contribution scores recorded for 2 of 2 rounds." in out, out + logs
    scoring = (var / "logs" / "scoring-worker.log").read_text(errors="replace")
    assert scoring.count("Task training.round_score[") >= 4, scoring  # received, succeeded
    central = (var / "logs" / "central-worker.log").read_text(errors="replace")
    assert "Task training.round_score[" not in central, central
    assert re.search(r"Ledger intact: \d+ entries, head hash [0-9a-f]{64}", out), out
    assert "Demo finished" in out
    # The site workers never reached for a database (theirs points at a missing folder).
    for slug in SITE_SLUGS:
        log = (var / "logs" / f"site-{slug}.log").read_text(errors="replace")
        assert "succeeded in" in log, log
        assert "OperationalError" not in log and "Database access" not in log, log
        for name in ("signing-key.pem", "token"):
            mode = stat.S_IMODE((var / "sites" / slug / name).stat().st_mode)
            assert mode == 0o600, (slug, name, oct(mode))
    # Every process the demo started has stopped: no orphaned pool child or beat.
    deadline = time.monotonic() + 10
    while (left := _processes_with(f"DEMO_VAR_DIR={var}")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    print(f"demo --no-serve --rounds 2: {took:.1f} s")


@pytest.mark.django_db
def test_site_credentials_are_reused_and_renewed(tmp_path):
    call_command("seed_demo", stdout=StringIO())
    institution = Consortium.objects.get(slug="demo").institutions.get(slug="barts")
    first = ensure_site_credentials(institution, tmp_path / "barts")
    assert first.created
    again = ensure_site_credentials(institution, tmp_path / "barts")
    assert not again.created and again.token == first.token
    assert SiteCredential.objects.filter(institution=institution).count() == 1

    # The ledger checkpoint its worker saw is kept while the credentials are ...
    seen = first.data_root / ".fl-state" / "ledger.json"
    seen.parent.mkdir(parents=True)
    seen.write_text("{}")
    ensure_site_credentials(institution, tmp_path / "barts")
    assert seen.exists()
    (tmp_path / "barts" / "token").unlink()  # the token is lost: a new one, the old revoked
    renewed = ensure_site_credentials(institution, tmp_path / "barts")
    assert renewed.created and renewed.token != first.token
    assert not seen.exists()  # ... and forgotten with them (a new centre, as far as it knows)
    live = SiteCredential.objects.filter(institution=institution, revoked_at__isnull=True)
    assert [c.label for c in live] == [CREDENTIAL_LABEL]
    assert stat.S_IMODE((tmp_path / "barts" / "token").stat().st_mode) == 0o600


@pytest.mark.django_db
@pytest.mark.parametrize("dataset", sorted(JOBS))
def test_the_demo_job_fits_the_seeded_agreement(dataset):
    """The default five rounds fit the cap (ε 8 at δ 1e-5) for every bundled data set."""
    from django.contrib.auth import get_user_model

    call_command("seed_demo", stdout=StringIO())
    job = job_propose(
        acting_user=get_user_model().objects.get(username="admin"),
        consortium=Consortium.objects.get(slug="demo"),
        title=JOBS[dataset]["title"],
        spec=demo_spec(dataset, 5),
    )
    epsilons = [r.epsilon for r in job.reservations.all()]
    assert len(epsilons) == 4 and max(epsilons) < 8
