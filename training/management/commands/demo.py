"""``manage.py demo``: the whole platform on one machine, a real job running through it.

What it does, in order (docs/architecture.md, section 2, the embedded default; the same code runs
the
distributed layout when ``DATABASE_URL``, ``CELERY_BROKER_URL`` and ``CHANNEL_LAYER_URL`` are set):

1. seeds the demo consortium (``seed_demo``: four hospitals, an agreement in force) and makes
   sure every hospital has site-worker credentials: an Ed25519 key under
   ``<var>/sites/<slug>/signing-key.pem`` and a token under ``<var>/sites/<slug>/token`` (both
   0600), registered through :func:`training.rounds.credentials.site_credential_create` by
   the hospital's data steward. They are reused while the files and an active credential
   match, so a second run changes nothing;
2. starts the central web server (Daphne) as a subprocess, on ``--port`` or, with
   ``--no-serve``, on a free port of 127.0.0.1 (the site workers upload through the REST API,
   so the server runs either way), and waits for ``/health/?scope=web`` (the web tier; the
   coordinator, started beside it, beats a few seconds later);
3. starts one central Celery worker with beat (queue ``central``: the coordinator), the scoring
   worker (queue ``scoring``: contribution scores, off the rounds' critical path) and one site
   worker per hospital (``manage.py run_site_worker``, queue ``site.<slug>``). A site worker
   gets a ``DATABASE_URL`` that points into a folder that does not exist: it must not need the
   database, and any query would fail its round;
4. proposes a job as the administrator (:func:`training.jobs.proposals.job_propose`), which asks
   every hospital's site worker for a privacy audit of its own update (the workers attack it
   and report figures, signed); once every audit is in, prints them in the approvers' words
   and has each hospital's approver approve the job
   (:func:`training.jobs.approvals.approval_decide`); the last approval queues
   ``training.job_start`` on ``central``;
5. follows the job round by round and prints the final metrics, how many rounds the scoring
   worker scored (waiting a little for the last), the number of ledger entries and the
   verified ledger head. With ``--no-serve`` it then stops everything and exits 0 (or
   non-zero, saying why, when the job fails, a process dies or ``--timeout`` passes); otherwise
   it prints the logins and keeps serving until Ctrl-C or SIGTERM.

Every subprocess runs in its own process group (so a worker's pool children and beat stop with
it) and logs to ``<var>/logs/<name>.log``. ``<var>`` is ``--var-dir``, else ``$DEMO_VAR_DIR``,
else ``var/demo`` in the project folder.

The scenario itself (the seed, the sites' credentials, the processes, the job) is in
:mod:`training.demo`; this command runs it and reports, as it happens.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import time
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from audit.ledger.chain import verify_chain
from audit.ledger.selectors import entry_count
from consortium.governance.models import Consortium
from training.demo.processes import (
    Supervisor,
    central_worker_argv,
    demo_env,
    demo_site_url,
    free_port,
    http_ok,
    port_free,
    scoring_worker_argv,
    server_argv,
    site_worker_argv,
    site_worker_env,
)
from training.demo.scenario import (
    JOBS,
    NOISE_MULTIPLIER,
    approve_demo_job,
    audit_in_words,
    audits_reported,
    cancel_leftovers,
    propose_demo_job,
)
from training.demo.seed import DEMO_SLUG, SITE_SLUGS
from training.demo.sites import SiteFiles, ensure_site_credentials
from training.jobs.compliance import ComplianceError
from training.jobs.selectors import job_rounds_unscored
from training.models import TERMINAL_STATES, JobState, Round, SiteUpdate, TrainingJob

#: How long the demo waits, once the job has ended, for the scoring worker's last scores.
SCORES_WAIT_SECONDS = 60.0


class Stop(Exception):
    """SIGTERM: stop like Ctrl-C does."""


class DemoFailed(CommandError):
    pass


def _fmt_metrics(metrics: dict) -> str:
    parts = []
    for key, label, digits in (
        ("validation_accuracy", "validation accuracy", 3),
        ("validation_dice", "validation Dice", 3),
        ("validation_loss", "loss", 4),
    ):
        value = metrics.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} {value:.{digits}f}")
    if not parts and metrics.get("validation"):
        parts.append(str(metrics["validation"]))
    return ", ".join(parts) or "no validation metrics"


# --- The command ----------------------------------------------------------------------------


class Command(BaseCommand):
    help = (
        "Run the demo: seed the consortium, start the server, the coordinator, the scoring "
        "worker and one site worker per hospital, and run an approved federated job through "
        "them."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--no-serve",
            action="store_true",
            help="Run the job to completion, print the result and stop (no dashboard).",
        )
        parser.add_argument("--rounds", type=int, default=5, help="Rounds (default 5).")
        parser.add_argument(
            "--no-job",
            action="store_true",
            help="Start the consortium, the server, the coordinator and the site workers, but "
            "propose no job: propose one in the browser as admin and approve it as each "
            "hospital's approver (the browser tests drive it this way).",
        )
        parser.add_argument("--port", type=int, default=8000, help="Dashboard port (default 8000).")
        parser.add_argument(
            "--dataset", choices=sorted(JOBS), default="breast-cancer", help="Bundled data set."
        )
        parser.add_argument(
            "--noise-multiplier",
            type=float,
            default=NOISE_MULTIPLIER,
            help="DP-SGD noise multiplier of the sites' privacy pipeline (default 2.5; lower "
            "learns more and spends more of the ε cap).",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=600.0,
            help="Seconds the job may take, startup included (default 600).",
        )
        parser.add_argument(
            "--var-dir",
            default=os.environ.get("DEMO_VAR_DIR") or str(Path(settings.BASE_DIR) / "var" / "demo"),
            help="Folder for the sites' keys, tokens and data and the logs "
            "(default $DEMO_VAR_DIR or var/demo).",
        )

    # Output goes straight out, even into a pipe: the demo is watched as it runs.
    def say(self, text: str = "", style=None) -> None:
        self.stdout.write(style(text) if style else text)
        self.stdout.flush()

    def handle(self, *args, **options):
        if options["rounds"] < 1:
            raise CommandError("--rounds must be at least 1")
        if options["no_job"] and options["no_serve"]:
            raise CommandError("--no-job needs the dashboard: it cannot be used with --no-serve")
        self.serve = not options["no_serve"]
        self.var = Path(options["var_dir"]).resolve()
        self.started = time.monotonic()
        self.deadline = self.started + options["timeout"]
        port = options["port"]
        if self.serve and not port_free(port):
            raise CommandError(
                f"127.0.0.1:{port} is in use (another demo or server?); pass --port or stop it"
            )

        # The notifications (proposal, approvals) go to files, not into the demo's output;
        # the server's and the coordinator's go to their logs.
        mail_dir = self.var / "mail"
        mail_dir.mkdir(parents=True, exist_ok=True)
        settings.EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
        settings.EMAIL_FILE_PATH = str(mail_dir)

        # kombu warns, on every connection to filesystem://, that it has no host name.
        logging.getLogger("kombu.connection").setLevel(logging.ERROR)
        call_command("seed_demo", stdout=io.StringIO())  # its logins are printed later
        consortium = Consortium.objects.get(slug=DEMO_SLUG)
        sites = []
        for slug in SITE_SLUGS:
            institution = consortium.institutions.get(slug=slug)
            sites.append(ensure_site_credentials(institution, self.var / "sites" / slug))
        created = [s.slug for s in sites if s.created]
        self.say(
            f"Demo consortium ready: {len(sites)} hospitals; site credentials "
            + (f"created for {', '.join(created)}" if created else "reused")
            + f" (under {self.var / 'sites'})."
        )
        for job_id in cancel_leftovers(consortium):
            self.say(f"Cancelled job #{job_id} left unfinished by an earlier demo run.")

        log_dir = self.var / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.sup = Supervisor(log_dir)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        # Ctrl-C stops the demo even where SIGINT was ignored when it started (a shell's
        # background job): Python then never installs its KeyboardInterrupt handler.
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupted = False
        try:
            self._run(consortium, sites, port if self.serve else free_port(), options)
        except (KeyboardInterrupt, Stop):
            interrupted = True
        finally:
            # A second Ctrl-C must not cut the clean-up short and leave orphans behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if self.sup.children:
                self.say("Stopping the server and the workers…")
            self.sup.stop_all()
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
        if interrupted:
            self.say("Stopped.")
            if not self.serve:
                raise CommandError("interrupted")

    def _on_sigterm(self, signum, frame):
        raise Stop()

    # --- the run ---

    def _run(self, consortium, sites: list[SiteFiles], port: int, options) -> None:
        # The server and the site workers meet on 127.0.0.1:<port>; every link (the mail the
        # demo, the server and the coordinator send, the dashboard printed here) names SITE_URL,
        # which follows the port unless the environment sets it.
        local = f"http://127.0.0.1:{port}"
        url = demo_site_url(port)
        settings.SITE_URL = url
        env = demo_env(url)

        self.say(f"Starting the central server on {local} …")
        server = self.sup.start("server", server_argv(port), env)
        self.say("Starting the coordinator (Celery worker with beat, queue central) …")
        central = self.sup.start("central-worker", central_worker_argv(self.var), env)
        self.say("Starting the scoring worker (Celery, queue scoring) …")
        scoring = self.sup.start("scoring-worker", scoring_worker_argv(), env)
        workers = []
        for site in sites:
            self.say(f"Starting the site worker of {site.slug} (queue site.{site.slug}) …")
            workers.append(
                self.sup.start(
                    f"site-{site.slug}",
                    site_worker_argv(),
                    site_worker_env(env, site, central_url=local, var=self.var),
                )
            )

        self._wait(
            "the central server",
            lambda: http_ok(local + "/health/?scope=web"),
            limit=90,
        )
        self._wait(
            "the workers",
            lambda: all(" ready." in c.tail(100_000) for c in [central, scoring, *workers]),
            limit=120,
        )
        self.say(
            f"Server, coordinator, scoring worker and {len(workers)} site workers up "
            f"({time.monotonic() - self.started:.1f} s). Logs: {self.sup.log_dir}"
        )

        if options["no_job"]:
            self.say("")
            self.say(self._seed_logins())
            self.say(
                f"Dashboard: {url}/ — no job proposed: sign in as admin to propose one; "
                "press Ctrl-C to stop",
                self.style.SUCCESS,
            )
            self._serve_forever(server)
            return
        job = self._propose_and_approve(consortium, options)
        if self.serve:
            self.say("")
            self.say(self._seed_logins())
            self.say(
                f"Dashboard: {url}/ — the job is running; press Ctrl-C to stop",
                self.style.SUCCESS,
            )
            self.say(
                f"Job page: {url}/consortia/{consortium.slug}/jobs/{job.pk}/ (sign in as admin)"
            )
            self.say("")
        ok = self._follow(job, options)
        if not self.serve:
            if not ok:
                raise DemoFailed("the demo job did not complete (see above)")
            self.say(f"Demo finished in {time.monotonic() - self.started:.1f} s.")
            return
        self.say(
            f"The server and the workers keep running: {url}/ — press Ctrl-C to stop.",
            self.style.SUCCESS,
        )
        self._serve_forever(server)

    def _serve_forever(self, server) -> None:
        while True:
            time.sleep(1.0)
            self._check_children(fatal=False)
            if not server.alive():
                raise DemoFailed(f"the central server exited:\n{server.tail()}")

    def _seed_logins(self) -> str:
        out = io.StringIO()
        call_command("seed_demo", stdout=out)
        lines = out.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("Logins")), 0)
        return "\n".join(lines[start:])

    def _check_children(self, *, fatal: bool) -> None:
        for child in self.sup.children:
            for line in child.new_errors():
                self.stderr.write(f"[{child.name}] {line[:400]}")
        for child in self.sup.dead():
            if child.reported_dead:
                continue
            child.reported_dead = True
            message = (
                f"{child.name} exited with status {child.proc.returncode} "
                f"(log {child.log}):\n{child.tail()}"
            )
            if fatal:
                raise DemoFailed(message)
            self.stderr.write(f"Warning: {message}")

    def _wait(self, what: str, ready, *, limit: float) -> None:
        deadline = min(time.monotonic() + limit, self.deadline)
        while time.monotonic() < deadline:
            if ready():
                return
            self._check_children(fatal=True)
            time.sleep(0.2)
        logs = "\n".join(f"--- {c.name} ---\n{c.tail(1500)}" for c in self.sup.children)
        raise DemoFailed(f"timed out waiting for {what}\n{logs}")

    def _propose_and_approve(self, consortium, options) -> TrainingJob:
        dataset, rounds = options["dataset"], options["rounds"]
        try:
            job = propose_demo_job(
                consortium,
                dataset=dataset,
                rounds=rounds,
                noise_multiplier=options["noise_multiplier"],
            )
        except ValidationError as exc:
            raise DemoFailed(f"the demo job is not valid: {'; '.join(exc.messages)}") from None
        except ComplianceError as exc:
            raise DemoFailed(
                f"the demo job was refused: {exc}. Earlier runs spend the hospitals' privacy "
                "budgets (ε cap 8 at δ 1e-5); start from a fresh database (delete db.sqlite3, "
                "or set DATABASE_URL) or ask for fewer --rounds."
            ) from None
        epsilon = max((r.epsilon for r in job.reservations.all()), default=0.0)
        self.say(
            f"Job #{job.pk} “{job.title}” proposed by admin: {dataset}, "
            f"{JOBS[dataset]['model']['name']}, {rounds} rounds, 4 hospitals, DP-SGD noise ×"
            f"{options['noise_multiplier']:g}; projected ε {epsilon:.2f} per hospital "
            f"(cap 8 at δ 1e-5)."
        )
        self.say("Each hospital's site worker audits its own update under this pipeline …")
        audits: list = []

        def reported() -> bool:
            audits[:] = audits_reported(job) or []
            return bool(audits)

        self._wait("the hospitals' privacy audits", reported, limit=300)
        for audit in audits:
            self.say(f"  privacy audit of {audit.institution.slug}: {audit_in_words(audit)}")
        for slug in approve_demo_job(job, consortium):
            self.say(f"  approved by approver-{slug}")
        job.refresh_from_db()
        self.say(f"Job #{job.pk} is {job.get_state_display().lower()}; the coordinator starts it.")
        return job

    def _follow(self, job: TrainingJob, options) -> bool:
        """Print each round as it closes; True when the job completed."""
        reported: set[tuple[int, str]] = set()
        rounds = options["rounds"]
        while True:
            job.refresh_from_db()
            for rnd in Round.objects.filter(job=job).select_related("global_model_out"):
                key = (rnd.index, rnd.state)
                if key in reported:
                    continue
                if rnd.state == Round.State.OPEN:
                    reported.add(key)
                    sent = rnd.updates.count()
                    self.say(f"Round {rnd.index}/{rounds} open: sent to {sent} hospitals")
                elif rnd.state == Round.State.CLOSED:
                    reported.add(key)
                    accepted = rnd.updates.filter(status=SiteUpdate.Status.ACCEPTED).count()
                    total = rnd.updates.count()
                    took = (rnd.closed_at - rnd.opened_at).total_seconds() if rnd.closed_at else 0
                    metrics = rnd.global_model_out.metrics if rnd.global_model_out else {}
                    self.say(
                        f"Round {rnd.index}/{rounds} closed in {took:.1f} s: "
                        f"{accepted}/{total} updates accepted, {_fmt_metrics(metrics)}"
                    )
                elif rnd.state == Round.State.FAILED:
                    reported.add(key)
                    self.say(f"Round {rnd.index}/{rounds} failed: {rnd.failure_reason}")
            if job.state in TERMINAL_STATES:
                return self._report(job)
            self._check_children(fatal=not self.serve)
            if time.monotonic() > self.deadline:
                message = (
                    f"timed out after {options['timeout']:.0f} s: job #{job.pk} is "
                    f"{job.get_state_display().lower()}"
                )
                if not self.serve:
                    logs = "\n".join(f"--- {c.name} ---\n{c.tail(1500)}" for c in self.sup.children)
                    raise DemoFailed(f"{message}\n{logs}")
                self.stderr.write(f"Warning: {message}; still serving.")
                return False
            time.sleep(0.3)

    def _report(self, job: TrainingJob) -> bool:
        final = job.global_models.order_by("-round_index").first()
        self._scores(job)
        result = verify_chain()
        entries = entry_count()
        if job.state == JobState.COMPLETED:
            self.say(
                f"Job #{job.pk} completed: {final.round_index} rounds in "
                f"{time.monotonic() - self.started:.1f} s.",
                self.style.SUCCESS,
            )
            self.say(f"Final model {final.digest[:16]}…: {_fmt_metrics(final.metrics)}")
        else:
            self.say(
                f"Job #{job.pk} {job.get_state_display().lower()}: {job.end_reason}",
                self.style.ERROR,
            )
        if result.ok:
            self.say(
                f"Ledger intact: {entries} entries, head hash {result.head_hash}",
                self.style.SUCCESS,
            )
        else:
            self.say(
                f"Ledger BROKEN at entry #{result.first_bad_seq}: {result.reason}",
                self.style.ERROR,
            )
        return job.state == JobState.COMPLETED and result.ok

    def _scores(self, job: TrainingJob, wait: float = SCORES_WAIT_SECONDS) -> None:
        """Say how many closed rounds the scoring worker has recorded, after waiting up to
        ``wait`` seconds for the last (it scores after the round closed, apart from it)."""
        closed = job.rounds.filter(state=Round.State.CLOSED).count()
        deadline = min(time.monotonic() + wait, self.deadline)
        while (unscored := job_rounds_unscored(job.pk)) and time.monotonic() < deadline:
            self._check_children(fatal=False)
            time.sleep(0.3)
        if unscored:
            self.stderr.write(
                f"Warning: round(s) {', '.join(map(str, unscored))} not scored yet; the "
                "scoring worker (log scoring-worker.log) or, later, the periodic pass will."
            )
        else:
            self.say(f"Contribution scores recorded for {closed} of {closed} rounds.")
