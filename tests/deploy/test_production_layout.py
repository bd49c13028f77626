"""The production layout of docs/deploy/, run for real: a consortium set up from nothing.

The central processes (web server, coordinator, scoring worker, beat) start with the commands and
the environment file of their systemd units, behind nginx with the shipped proxy configuration and a
certificate from a private CA; three site workers start with theirs, each with its own broker
account on this machine's RabbitMQ, its own data root holding its own CSV data, no database setting
at all, and the CA given through ``SITE_CA_BUNDLE``. An operator starts the consortium with its
first administrator, who adds the hospitals and invites their people with the management commands
(each site's data steward creates its worker's credentials); people accept their invitations in the
pages and act through the API (the approvers, who sign and approve, first set up a second factor in
the pages and make their API tokens in that verified session, as production requires; a token from
``create_api_token`` is refused the signature); the job runs two rounds with evaluation at the
sites; the ledger verifies and the auditors' contribution report scores every site and verifies. And
no site's broker account can touch another site's queue or the coordinator's.

Marked ``deploy``: it needs PostgreSQL (the server ``DATABASE_URL`` names: the test makes a
database of its own there), RabbitMQ with ``rabbitmqctl``, Redis (the channel layer) and nginx.
Skipped, saying which is missing, unless ``DEPLOY_REQUIRED`` is set (``.ci/run`` sets it in its
PostgreSQL pass): then it fails.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import socket
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest

from tests.support import rabbitmq
from tests.support.deployment import (
    DEPLOY,
    HTTPS,
    VENV_BIN,
    HTTPSError,
    Processes,
    enrol_second_factor,
    free_port,
    nginx_binary,
    nginx_config,
    read_env_file,
    unit_commands,
    verified_act_token,
    wait_until,
)
from tests.support.tls import make_tls_files
from training.fl.data import demo_split
from training.fl.signing import generate_keypair

pytestmark = [pytest.mark.deploy]

KEY = "patient-records"  # not a bundled set: the consortium holds no copy of it
SITES = ("north-general", "south-royal", "east-childrens")
PASSWORD = "deploy-test-" + secrets.token_hex(6)


def _missing() -> str | None:
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        return "runs in the PostgreSQL pass (DATABASE_URL names no PostgreSQL server)"
    reason = rabbitmq.unavailable()
    if reason:
        return reason
    if nginx_binary() is None:
        return "nginx is not installed (apt-get install nginx-light)"
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    except OSError:
        return "no Redis answers at 127.0.0.1:6379 (the channel layer)"
    return None


@pytest.fixture
def requirements():
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("DEPLOY_REQUIRED"):
        pytest.fail(f"DEPLOY_REQUIRED is set but {reason}")
    pytest.skip(reason)


def _base_env() -> dict[str, str]:
    """What a service manager gives a unit besides its EnvironmentFile: no project setting."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "NUMBA_CACHE_DIR")
    return {k: os.environ[k] for k in keep if k in os.environ}


@pytest.fixture
def database(requirements):
    """A database of the test's own on the PostgreSQL server DATABASE_URL names, owned by an
    owner role of its own, with an application role beside it (README, "The database's two
    roles"): the URLs of both, the owner's first."""
    import psycopg2

    admin = urllib.parse.urlsplit(os.environ["DATABASE_URL"])
    name = f"fl_deploy_{uuid.uuid4().hex[:10]}"
    owner, app = f"{name}_owner", f"{name}_app"
    connect = dict(
        host=admin.hostname,
        port=admin.port or 5432,
        user=admin.username or "postgres",
        password=admin.password or None,
        dbname="postgres",
    )
    conn = psycopg2.connect(**connect)
    conn.autocommit = True
    with conn.cursor() as cursor:
        for role in (owner, app):
            cursor.execute(f'CREATE ROLE "{role}" LOGIN')
        cursor.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')

    def url(role: str) -> str:
        netloc = f"{role}@{admin.hostname}:{admin.port or 5432}"
        return urllib.parse.urlunsplit(admin._replace(netloc=netloc, path="/" + name))

    try:
        yield url(owner), url(app)
    finally:
        with conn.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for role in (owner, app):
                cursor.execute(f'DROP ROLE IF EXISTS "{role}"')
        conn.close()


@pytest.fixture
def vhost(requirements):
    """A RabbitMQ virtual host of the test's own, with the coordinator's account on it."""
    v = rabbitmq.Vhost()
    central = f"fl-central-{uuid.uuid4().hex[:6]}"
    password = secrets.token_hex(12)
    rabbitmq.rabbitmqctl("add_user", central, stdin=password + "\n")
    v.users.append(central)
    rabbitmq.rabbitmqctl("set_permissions", "-p", v.name, central, ".*", ".*", ".*")
    v.central = v.url(central, password)
    try:
        yield v
    finally:
        v.remove()


def _write_csv(path, data) -> None:
    features = data.x_train.shape[1]
    lines = [",".join([f"f{i}" for i in range(features)] + ["label"])]
    for x, y in zip(data.x_train.tolist(), data.y_train.tolist(), strict=True):
        lines.append(",".join([repr(v) for v in x] + [str(int(y))]))
    path.write_text("\n".join(lines) + "\n")


def test_a_consortium_set_up_from_nothing_trains_on_its_own_data(
    tmp_path, database, vhost, requirements
):
    processes = Processes(logs=tmp_path / "logs")
    try:
        _run(tmp_path, database, vhost, processes)
    except BaseException:
        print(processes.tails(80))  # noqa: T201 - the processes' logs, for whoever reads CI
        raise
    finally:
        processes.stop()


def _run(tmp_path, database, vhost, processes: Processes) -> None:
    tls = make_tls_files(tmp_path / "tls")
    https_port, http_port, web_port, site_api_port = (free_port() for _ in range(4))
    site_url = f"https://localhost:{https_port}"

    # --- The central server: central.env with this machine's values -------------------------
    central = read_env_file(DEPLOY / "central.env")
    assert [k for k, v in central.items() if "CHANGE-ME" in v] == [
        "DJANGO_SECRET_KEY",
        "DATABASE_URL",
        "DATABASE_OWNER_URL",
        "CELERY_BROKER_URL",
        "EMAIL_URL",
    ]
    central.update(
        DJANGO_SECRET_KEY=secrets.token_urlsafe(48),
        DJANGO_ALLOWED_HOSTS="localhost",
        DJANGO_CSRF_TRUSTED_ORIGINS=site_url,
        SITE_URL=site_url,
        DATABASE_OWNER_URL=database[0],
        DATABASE_URL=database[1],
        CELERY_BROKER_URL=vhost.central,
        CHANNEL_LAYER_URL="redis://127.0.0.1:6379/13",
        ARTIFACT_ROOT=str(tmp_path / "artifacts"),
        STATIC_ROOT=str(tmp_path / "static"),
        # django-environ reads filemail:///x as the relative path x: four slashes, absolute.
        EMAIL_URL=f"filemail:///{tmp_path / 'mail'}",
        FL_REDISPATCH_AFTER_SECONDS="60",
        # The centre's checkpoint key, made as docs/deploy says (generate_site_key).
        LEDGER_SIGNING_KEY=str(tmp_path / "ledger-signing-key.pem"),
    )
    (tmp_path / "ledger-signing-key.pem").write_bytes(generate_keypair()[0])
    central_env = {**_base_env(), **central}
    paths = {
        "/srv/consortium/venv/bin/": f"{VENV_BIN}/",
        "/srv/consortium/celerybeat-schedule": str(tmp_path / "celerybeat-schedule"),
        "/srv/fl-site/venv/bin/python": sys.executable,
    }
    units = DEPLOY / "systemd"
    web = unit_commands(units / "fl-web.service", paths=paths, port=web_port, env=central)
    *pre, web_start = web
    for i, argv in enumerate(pre):  # migrate and grant_app_role as the owner, collectstatic
        processes.run(f"web-pre-{i}", argv, central_env)
    processes.start("web", web_start, central_env)
    # The site API's own server (after fl-web's migrations, as its unit says).
    (site_api,) = unit_commands(units / "fl-site-api.service", paths=paths, port=site_api_port)
    processes.start("site-api", site_api, central_env)
    (coordinator,) = unit_commands(units / "fl-coordinator.service", paths=paths)
    processes.start("coordinator", coordinator, central_env)
    # Contribution scores: the "every round scored" check below rests on this unit alone.
    (scoring,) = unit_commands(units / "fl-scoring.service", paths=paths)
    processes.start("scoring", scoring, central_env)
    (beat,) = unit_commands(units / "fl-beat.service", paths=paths)
    processes.start("beat", beat, central_env)
    conf = nginx_config(
        tmp_path / "nginx",
        https_port=https_port,
        http_port=http_port,
        upstream_port=web_port,
        site_api_port=site_api_port,
        cert=tls.cert,
        key=tls.key,
    )
    processes.start("nginx", [nginx_binary(), "-c", str(conf), "-p", str(conf.parent)], {})
    anonymous = HTTPS(site_url, tls.ca)
    wait_until(
        "the server's health check through nginx",
        lambda: anonymous.request("GET", "/health/?scope=web")[0] == 200,
        timeout=120,
        processes=processes,
    )

    def manage(name, *args) -> str:
        return processes.run(name, [sys.executable, "manage.py", *args], central_env)

    # --- The operator bootstraps the consortium with the commands --------------------------
    manage(
        "createsuperuser",
        "createsuperuser",
        "--noinput",
        "--username",
        "operator",
        "--email",
        "operator@example.org",
    )
    said = manage(
        "create-consortium",
        "create_consortium",
        "--slug",
        "thames",
        "--name",
        "Thames Consortium",
        "--admin-email",
        "admin@example.org",
        "--actor",
        "operator",
    )
    invitations = {"admin": _link(said, site_url)}

    def accept(username, link) -> HTTPS:
        """``username`` accepts the invitation ``link`` in the pages (through nginx, TLS
        verified); the returned client is their signed-in session."""
        browser = HTTPS(site_url, tls.ca)
        page = browser.submit_form(
            urllib.parse.urlsplit(link).path,
            {
                "username": username,
                "full_name": username.replace("-", " ").title(),
                "password": PASSWORD,
                "password_confirm": PASSWORD,
            },
        )
        assert "Welcome: you are now" in page, page[:2000]
        return browser

    # The operator acts for no consortium: its first administrator, once in, adds the hospitals
    # and invites their people (a superuser holds no membership, so no right inside one).
    accept("admin", invitations["admin"])
    for slug in SITES:
        manage("add-institution", "add_institution", "--consortium", "thames", "--slug", slug,
               "--name", slug.replace("-", " ").title(), "--actor", "admin")  # fmt: skip
        for role in ("approver", "data_steward"):
            said = manage(
                f"invite-{slug}-{role}",
                "invite_member",
                "--consortium",
                "thames",
                "--institution",
                slug,
                "--email",
                f"{role}@{slug}.example.org",
                "--role",
                role,
                "--actor",
                "admin",
            )
            invitations[f"{role}-{slug}"] = _link(said, site_url)

    # --- People accept their invitations in the pages (through nginx, TLS verified) --------
    sessions = {
        username: accept(username, link)
        for username, link in invitations.items()
        if username != "admin"
    }

    # The API takes a personal token, never a password: each person's, made by the command ...
    def api_token(name: str) -> str:
        said = manage(f"api-token-{name}", "create_api_token", "--user", name, "--scope", "act",
                      "--days", "1", "--name", "deploy test")  # fmt: skip
        return said.strip()

    # ... except the approvers': production requires a second factor to sign and to approve
    # (TWO_FACTOR_REQUIRED), so each sets up an authenticator app in the pages and makes their
    # token in that verified session; the command's tokens carry no second factor.
    approvers = [name for name in invitations if name.startswith("approver-")]
    for name in approvers:
        enrol_second_factor(sessions[name])
    cli_tokens = {name: api_token(name) for name in invitations if name not in approvers}
    tokens = {**cli_tokens, **{name: verified_act_token(sessions[name]) for name in approvers}}
    api = {name: HTTPS(site_url, tls.ca, token=tokens[name]) for name in invitations}
    # A token from the command cannot sign: the refusal says what is missing.
    cli_approver = HTTPS(site_url, tls.ca, token=api_token(approvers[0]))
    # Every invitation was also mailed (the production mail backend, not the console).
    mailed = "".join(p.read_text() for p in (tmp_path / "mail").iterdir())
    assert all(link in mailed for link in invitations.values())

    # --- The agreement, signed by every hospital ------------------------------------------
    today = dt.date.today()
    agreement = api["admin"].json(
        "POST",
        "/api/agreements/",
        {
            "consortium": "thames",
            "title": "Thames data-use agreement",
            "purpose": "Train a classifier on each hospital's own patient records.",
            "permitted_model_families": ["linear", "mlp"],
            "max_shared_fraction": "1",
            "required_dp_mechanism": "none",
            "epsilon_cap": "8",
            "delta": "0.00001",
            "valid_from": (today - dt.timedelta(days=1)).isoformat(),
            "valid_until": (today + dt.timedelta(days=365)).isoformat(),
            "text": "The parties share model updates only, never patient data.",
        },
    )
    version = agreement["versions"][0]
    published = api["admin"].json("POST", f"/api/agreement-versions/{version['id']}/publish/")
    try:
        cli_approver.json(
            "POST",
            f"/api/agreement-versions/{version['id']}/sign/",
            {
                "institution": approvers[0].removeprefix("approver-"),
                "typed_name": "Approver",
                "confirmed": True,
                "content_digest": published["content_digest"],
            },
        )
    except HTTPSError as refused:
        assert refused.status == 403 and "second_factor_required" in refused.body, refused
    else:
        raise AssertionError("an approver's token from create_api_token signed an agreement")
    for slug in SITES:
        api[f"approver-{slug}"].json(
            "POST",
            f"/api/agreement-versions/{version['id']}/sign/",
            {
                "institution": slug,
                "typed_name": f"Approver {slug}".replace("-", " ").title(),
                "confirmed": True,
                "content_digest": published["content_digest"],
            },
        )

    # --- Each site: its data, key, credentials, broker account, worker ---------------------
    shares = demo_split("breast-cancer", SITES)
    site = read_env_file(DEPLOY / "site.env")
    assert [k for k, v in site.items() if "CHANGE-ME" in v] == [
        "SITE_TOKEN",
        "CELERY_BROKER_URL",
    ]
    assert not any(k.startswith("DATABASE") for k in site)
    broker_urls = {}
    for slug in SITES:
        root = tmp_path / "sites" / slug
        (root / "data").mkdir(parents=True)
        _write_csv(root / "data" / f"{KEY}.csv", shares[slug])
        key_path = root / "signing-key.pem"
        public = processes.run(
            f"key-{slug}",
            [sys.executable, "manage.py", "generate_site_key", "--out", str(key_path)],
            {**_base_env()},
        )
        pem = re.search(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", public, re.S)
        assert pem, public
        (root / "public.pem").write_text(pem.group(0) + "\n")
        token = manage(
            f"credentials-{slug}",
            "create_site_credentials",
            "--institution",
            slug,
            "--public-key",
            str(root / "public.pem"),
            "--actor",
            # The site's own data steward: not the operator, not the consortium's admin.
            f"data_steward-{slug}",
        ).strip()
        assert token.startswith("fls_"), token
        said = manage(
            f"broker-{slug}",
            "site_broker_account",
            "--slug",
            slug,
            "--apply",
            "--vhost",
            vhost.name,
        )
        broker_urls[slug] = re.search(r"amqp://\S+", said).group(0)
        vhost.users.append(f"site-{slug}")
        # The data steward registers the data set the site holds.
        api[f"data_steward-{slug}"].json(
            "POST",
            "/api/datasets/",
            {
                "institution": slug,
                "key": KEY,
                "description": "Patient records: 30 features, malignant or not.",
                "modality": "tabular",
                "num_records": shares[slug].num_records,
                "input_shape": [30],
                "n_classes": 2,
            },
        )
        env = {
            **_base_env(),
            **site,
            "SITE_SLUG": slug,
            "CENTRAL_URL": site_url,
            "SITE_TOKEN": token,
            "SITE_SIGNING_KEY": str(key_path),
            "DATA_ROOT": str(root / "data"),
            "CELERY_BROKER_URL": broker_urls[slug],
            "SITE_CA_BUNDLE": str(tls.ca),
        }
        (start,) = unit_commands(units / "fl-site-worker.service", paths=paths)
        processes.start(f"site-{slug}", start, env)

    # --- No site's account touches another's queue or the coordinator's -------------------
    _assert_isolated(broker_urls, vhost)

    # --- The job: proposed, approved by every hospital, run ------------------------------
    job = api["admin"].json(
        "POST",
        "/api/jobs/",
        {
            "consortium": "thames",
            "title": "Malignancy classifier on the hospitals' own records",
            "spec": {
                "purpose": "classification",
                "participants": list(SITES),
                "dataset_key": KEY,
                "model": {"name": "logistic_regression", "params": {}},
                "rounds": 2,
                "local_epochs": 1,
                "batch_size": 32,
                "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
                "privacy_pipeline": [],
                "round_timeout_seconds": 300,
            },
        },
    )
    assert job["state"] == "awaiting_approval", job
    assert "evaluation" not in job["spec"]  # the default for a set the centre has no copy of
    for slug in SITES:
        api[f"approver-{slug}"].json(
            "POST",
            f"/api/jobs/{job['id']}/decide/",
            {
                "institution": slug,
                "decision": "approved",
                "reason": "",
                "spec_digest": job["spec_digest"],
                "agreement_version": job["agreement_version"],
            },
        )

    def finished():
        state = api["admin"].json("GET", f"/api/jobs/{job['id']}/")["state"]
        assert state not in ("failed", "cancelled", "expired"), state
        return state == "completed"

    wait_until("the job to complete", finished, timeout=600, every=2, processes=processes)

    # --- Metrics per round, scores for every site, a ledger and a report that verify ------
    report = tmp_path / "report.json"

    def facts():
        said = manage("facts", "shell", "--no-imports", "-c", _FACTS.format(job=job["id"]))
        found = json.loads(said.strip().splitlines()[-1])
        return found if sorted(found["job_scored"]) == sorted(SITES) else None

    facts = wait_until("every round to be scored", facts, timeout=300, every=3, processes=processes)
    manage("export", "export_contributions", "--job", str(job["id"]), "--format", "json",
           "--output", str(report))  # fmt: skip
    assert [r["index"] for r in facts["rounds"]] == [1, 2]
    for round_ in facts["rounds"]:
        assert 0.5 <= round_["metrics"]["validation_accuracy"] <= 1.0, round_
        assert round_["metrics"]["validation_sites"] == len(SITES)
    assert len(facts["scored"]) == 2
    for entry in facts["scored"]:
        assert entry["evaluated_at"] == "sites" and entry["missing"] == []
        assert sorted(entry["scores"]) == sorted(SITES)
    assert sorted(facts["job_scored"]) == sorted(SITES)
    # Scored by fl-scoring.service (each round twice: asked the sites, then scored), never by
    # the coordinator.
    scored_by = {
        name: (processes.logs / f"{name}.log")
        .read_text(errors="replace")
        .count("Task training.round_score[")
        for name in ("scoring", "coordinator")
    }
    assert scored_by["scoring"] >= 4 and scored_by["coordinator"] == 0, scored_by
    # ... at a lower CPU priority than the rounds (SCORING_WORKER_NICENESS), the coordinator not.
    assert _niceness(processes.running["scoring"].pid) == 10
    assert _niceness(processes.running["coordinator"].pid) == 0
    autogroup = Path(f"/proc/{processes.running['scoring'].pid}/autogroup")
    if autogroup.exists():  # the kernel ranks sessions first: the worker's session is lowered
        assert autogroup.read_text().split()[-1] == "10"
    # The sites' requests went through nginx to the site API's own server (fl-site-api.service):
    # each site's model of each round with the ledger's checkpoint alongside (its check before
    # it trains), its update (with its witness of that checkpoint), and the checks of the
    # evaluation tasks, which ask for the checkpoint with requests of their own and post a
    # witness only of a checkpoint the centre does not already hold the site's cosignature of.
    served = (processes.logs / "site-api.log").read_text(errors="replace")
    uploads = re.findall(
        rf'"POST /api/site/v1/jobs/{job["id"]}/rounds/\d+/update/ [^"]*" 201', served
    )
    assert len(uploads) == 2 * len(SITES), served[-3000:]
    models = re.findall(
        rf'"GET /api/site/v1/jobs/{job["id"]}/rounds/\d+/model/\?ledger_since=\d+ [^"]*" 200',
        served,
    )
    assert len(models) == 2 * len(SITES), served[-3000:]
    checks = served.count('"GET /api/site/v1/ledger/checkpoint/?since=')
    assert checks >= 2 * len(SITES), served[-3000:]
    assert served.count('"POST /api/site/v1/ledger/checkpoint/witness/') <= checks
    assert "intact" in manage("verify-ledger", "verify_ledger")
    verified = manage("verify-report", "verify_report", str(report))
    assert "matches the ledger" in verified, verified
    assert "valued at the sites recompute from 6 signed evaluation report(s)" in verified
    # Every worker reported itself online, as its site's page shows the administrator.
    admin = HTTPS(site_url, tls.ca)
    signed_in = admin.submit_form("/accounts/login/", {"username": "admin", "password": PASSWORD})
    assert "Sign in" not in signed_in.split("</title>")[0], signed_in[:1000]
    for slug in SITES:
        _status, page = admin.request("GET", f"/consortia/thames/institutions/{slug}/")
        assert re.search(r">\s*online<", page), page[:3000]
    # The live pages' websockets pass the proxy (upgraded, the session cookie forwarded).
    assert _websocket_status(admin, https_port, tls.ca, "/ws/consortia/thames/") == 101
    # The whole probe passes through the proxy: the coordinator beats, beat ticks, the outbox
    # is empty (every message the job needed went out).
    # (Anonymous: the status and the failing checks' names only, no detail.)
    status, body = anonymous.request("GET", "/health/")
    assert status == 200, body
    assert json.loads(body) == {"status": "ok", "failing": []}


_FACTS = """
import json
from audit.models import LedgerEntry
from training.models import GlobalModel
def payloads(event):
    rows = LedgerEntry.objects.filter(event=event).order_by("seq")
    return [p for p in (json.loads(e.payload_text) for e in rows) if p.get("job_id") == {job}]
models = GlobalModel.objects.filter(job_id={job}, round_index__gte=1).order_by("round_index")
print(json.dumps({{
    "rounds": [{{"index": m.round_index, "metrics": m.metrics}} for m in models],
    "scored": payloads("contribution.scored"),
    "job_scored": (payloads("contribution.job_scored") or [{{}}])[-1].get("scores", {{}}),
}}))
"""


def _niceness(pid: int) -> int:
    """A process's nice value, from /proc (field 19 of stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[16])


def _websocket_status(client: HTTPS, port: int, ca, path: str) -> int:
    """The status of a websocket handshake through nginx, as the signed-in ``client``."""
    import base64
    import ssl

    cookies = "; ".join(f"{c.name}={c.value}" for c in client.jar)
    context = ssl.create_default_context(cafile=str(ca))
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: https://localhost:{port}\r\nCookie: {cookies}\r\n\r\n"
    )
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls_socket,
    ):
        tls_socket.sendall(request.encode())
        status_line = tls_socket.recv(4096).split(b"\r\n", 1)[0].decode()
    return int(status_line.split()[1])


def _link(said: str, site_url: str) -> str:
    match = re.search(re.escape(site_url) + r"/\S+", said)
    assert match, f"no link on {site_url} in:\n{said}"
    return match.group(0)


def _assert_isolated(broker_urls: dict[str, str], vhost) -> None:
    """Site A's account reads its own queue, is refused another site's, and cannot publish to
    ``central`` (waits for the workers to declare their queues first)."""
    import amqp
    import kombu

    a, b = SITES[0], SITES[1]
    wait_until(
        "the site workers' queues",
        lambda: {f"site.{a}", f"site.{b}", "central"} <= vhost.names("queues"),
        timeout=180,
        every=2,
    )
    with kombu.Connection(broker_urls[a]) as conn:
        conn.channel().queue_declare(f"site.{a}", passive=True)
        with pytest.raises(amqp.exceptions.AccessRefused):
            conn.channel().basic_get(f"site.{b}")
        with pytest.raises(amqp.exceptions.AccessRefused):
            conn.channel().basic_consume(f"site.{b}", callback=print)
        with pytest.raises(amqp.exceptions.AccessRefused):
            conn.channel().basic_publish_confirm(
                amqp.Message(b"{}"), exchange="central", routing_key="central", timeout=10
            )
