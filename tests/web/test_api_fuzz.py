"""The API fuzzed against its own OpenAPI schema, as each role, on a live server.

Schemathesis reads ``/api/schema/`` from a running Daphne and sends each of the schema's
operations generated requests, valid and invalid, as one role at a time: the signed-in roles
of the demo consortium (each with a personal API token), a hospital's site worker (its site
token) and nobody at all. Every check it has runs (``--checks all``; the few operations whose
rules a JSON schema cannot state are named, with the reason, in ``schemathesis.toml``), and
each role's run must end with no failure: no server error, every status, content type and
body as the schema declares them, malformed input refused, what the schema allows accepted,
nothing reachable without credentials.

The server's data is the demo consortium after one real job (``manage.py demo --no-serve
--rounds 1``: rounds, updates, models, ledger entries, site credentials), on a database of its
own of the kind the suite runs on (a SQLite file, or a PostgreSQL database beside the test
database). The roles run from the least to the most able to change things (the consortium
administrator's run withdraws, cancels and removes what it may), the caller without
credentials last.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings

from tests.support.child_processes import demo_env, fresh_database_url, redis_url_on_db
from training.demo.processes import free_port, server_argv

pytestmark = pytest.mark.worker

ROOT = Path(settings.BASE_DIR)
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
#: The live server's channel layer, when the suite runs on Redis (one no other test uses).
FUZZ_REDIS_DB = 9
#: The site whose worker the fuzzer poses as (its token is the demo's, in the demo folder).
SITE = "st-thomas"

#: (role, the demo account whose token it uses; "site" for the site worker, None for nobody),
#: from the least able to change things to the most, nobody last.
ROLES = [
    ("member-of-nothing", "visitor"),
    ("researcher", "researcher"),
    ("auditor", "auditor"),
    ("approver", "approver-st-thomas"),
    ("data-steward", "steward-st-thomas"),
    ("institution-admin", "itadmin-st-thomas"),
    ("site-worker", "site"),
    ("consortium-admin", "admin"),
    ("anonymous", None),
]


@dataclass
class LiveAPI:
    url: str
    tokens: dict[str, str]
    tmp: Path
    server_log: Path

    @property
    def schema(self) -> Path:
        """The schema as the server serves it to anyone, saved once: a site token is no
        credential for ``/api/schema/`` (the site API's tokens open the site API only)."""
        return self.tmp / "schema.json"


@pytest.fixture(scope="module")
def live_api(tmp_path_factory):
    if not SCHEMATHESIS.exists():
        pytest.fail(f"schemathesis is not installed beside {sys.executable} (the dev extra)")
    tmp = tmp_path_factory.mktemp("fuzz")
    var = tmp / "demo"
    env = demo_env(tmp, database_url=fresh_database_url(tmp, "fuzz"), var=var)
    if settings.CHANNEL_LAYER_URL:
        env["CHANNEL_LAYER_URL"] = redis_url_on_db(settings.CHANNEL_LAYER_URL, FUZZ_REDIS_DB)
    manage = [sys.executable, str(ROOT / "manage.py")]

    def run(*args: str, timeout: int = 180) -> str:
        done = subprocess.run(
            [*manage, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"manage.py {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    run("migrate", "-v0")
    run("demo", "--no-serve", "--rounds", "1", "--timeout", "240", timeout=300)
    tokens = {}
    for _role, account in ROLES:
        if account and account != "site":
            out = run("create_api_token", "--user", account, "--scope", "act", "--days", "1")
            tokens[account] = out.strip().splitlines()[-1]
    tokens["site"] = (var / "sites" / SITE / "token").read_text().strip()

    port = free_port()
    server_log = tmp / "server.log"
    with server_log.open("w") as log:
        server = subprocess.Popen(
            server_argv(port), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{url}/api/schema/?format=json", server, server_log)
        api = LiveAPI(url=url, tokens=tokens, tmp=tmp, server_log=server_log)
        with urllib.request.urlopen(f"{url}/api/schema/?format=json") as response:  # noqa: S310
            api.schema.write_bytes(response.read())
        yield api
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def _wait_for(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - ours
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"the server did not answer {url}:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize(("role", "account"), ROLES, ids=[role for role, _ in ROLES])
def test_the_api_holds_to_its_schema_for(live_api, role, account):
    argv = [
        str(SCHEMATHESIS),
        "--config-file",
        str(ROOT / "schemathesis.toml"),
        "run",
        str(live_api.schema),
        "--url",
        live_api.url,
        "--checks",
        "all",
        # One worker: with two, Hypothesis builds strategies in two threads, and CPython 3.11's
        # ast.parse (which it calls to describe a filter) is not thread-safe ("SystemError: AST
        # constructor recursion depth mismatch", seen in CI). Two cost 34 s a role, one 37 s.
        "--workers",
        "1",
        "--no-color",
        "--report",
        "junit",
        "--report-junit-path",
        str(live_api.tmp / f"{role}.xml"),
    ]
    if account is not None:
        argv += ["--header", f"Authorization: Bearer {live_api.tokens[account]}"]
    done = subprocess.run(argv, cwd=live_api.tmp, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    report = out[out.find("FAILURES") - 40 :] if "FAILURES" in out else out[-6000:]
    assert done.returncode == 0, f"schemathesis as {role}:\n{report[:20000]}"
    tested = re.search(r"Tested: (\d+)", out)
    # Every operation of the schema was sent requests (none skipped for want of a schema).
    assert tested and int(tested.group(1)) >= 55, out[-3000:]
    assert "Server error" not in out


def test_a_form_body_the_server_cannot_parse_is_answered_by_the_api(live_api):
    """Twisted, under Daphne, once answered an unreadable multipart body itself: a bare 400
    with no content type (consortium.daphne_requests). Now Django answers, as the schema says."""
    request = urllib.request.Request(
        f"{live_api.url}/api/validation-sets/",
        data=b"--x--\r\n",
        method="POST",
        headers={
            "Authorization": f"Bearer {live_api.tokens['admin']}",
            "Content-Type": "multipart/form-data; boundary=x",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)  # noqa: S310 - ours
    assert refused.value.code == 400
    assert refused.value.headers["Content-Type"] == "application/json"
    assert "institution" in json.loads(refused.value.read())
    assert refused.value.headers["Content-Security-Policy"]
