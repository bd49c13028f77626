"""Run the production layout of docs/deploy/ for real (tests/deploy/): the systemd units' commands
with their environment files, nginx with the shipped proxy configuration, and an HTTPS client
that trusts only the deployment's own certificate authority.

Nothing here invents a command: :func:`unit_commands` reads ``ExecStartPre=``/``ExecStart=`` from
the unit files and only moves the installation's paths (``/srv/...``) into the test's folder and
this checkout, and its port to a free one; :func:`read_env_file` reads the environment files,
and the test overrides only the values the files mark ``CHANGE-ME`` or name as this machine's
(hosts, paths, ports).
"""

from __future__ import annotations

import base64
import http.cookiejar
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from training.demo.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "docs" / "deploy"
VENV_BIN = Path(sys.executable).parent

__all__ = [
    "DEPLOY",
    "HTTPS",
    "Processes",
    "free_port",
    "nginx_config",
    "read_env_file",
    "unit_commands",
]


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (systemd's EnvironmentFile format: no quoting, ``#`` comments)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def unit_commands(
    unit: Path, *, paths: dict[str, str], port: int | None = None, env: dict[str, str] | None = None
) -> list[list[str]]:
    """The unit's ``ExecStartPre=`` then ``ExecStart=`` commands, as argument lists, with the
    installation's paths replaced (longest first), systemd's ``%H`` expanded, and ``${NAME}``
    replaced by ``env``'s value, as systemd does from the unit's EnvironmentFile."""
    commands = []
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() not in ("ExecStartPre", "ExecStart"):
            continue
        for old in sorted(paths, key=len, reverse=True):
            value = value.replace(old, paths[old])
        value = value.replace("%H", socket.gethostname()).replace("%%", "%")
        value = re.sub(r"\$\{(\w+)\}", lambda m: shlex.quote((env or {})[m.group(1)]), value)
        argv = shlex.split(value)
        if port is not None and "--port" in argv:  # Daphne
            argv[argv.index("--port") + 1] = str(port)
        bind = argv.index("--bind") + 1 if "--bind" in argv else None
        if port is not None and bind is not None and ":" in argv[bind]:  # gunicorn's host:port
            argv[bind] = f"{argv[bind].rpartition(':')[0]}:{port}"
        commands.append(argv)
    return commands


def nginx_config(
    folder: Path,
    *,
    https_port: int,
    http_port: int,
    upstream_port: int,
    site_api_port: int,
    cert: Path,
    key: Path,
) -> Path:
    """A whole nginx.conf for an unprivileged nginx under ``folder`` that includes the shipped
    site configuration with this machine's ports (``upstream_port``: the web server's,
    ``site_api_port``: the site API server's), certificate and name."""
    site = (DEPLOY / "nginx" / "consortium.conf").read_text()
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    for shipped, port in (("8000", upstream_port), ("8001", site_api_port)):
        assert f"server 127.0.0.1:{shipped};" in site, f"the shipped upstream on {shipped}"
        site = site.replace(f"server 127.0.0.1:{shipped};", f"server 127.0.0.1:{port};")
    site = site.replace("/etc/ssl/consortium/fullchain.pem", str(cert))
    site = site.replace("/etc/ssl/consortium/privkey.pem", str(key))
    site = site.replace("consortium.example.org", "localhost")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "consortium.conf").write_text(site)
    for sub in ("client", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = folder / "nginx.conf"
    conf.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\n"
        f"error_log {folder}/logs/error.log warn;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"  access_log {folder}/logs/access.log;\n"
        f"  client_body_temp_path {folder}/client;\n  proxy_temp_path {folder}/proxy;\n"
        f"  fastcgi_temp_path {folder}/fastcgi;\n  uwsgi_temp_path {folder}/uwsgi;\n"
        f"  scgi_temp_path {folder}/scgi;\n"
        f"  include {folder}/consortium.conf;\n"
        "}\n"
    )
    return conf


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )


@dataclass
class Processes:
    """Child processes with their logs; all stopped (SIGTERM, then SIGKILL) by :meth:`stop`."""

    logs: Path
    running: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(  # noqa: S603 - the units' own commands
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.running[name] = process
        return process

    def run(self, name: str, argv: list[str], env: dict[str, str], *, timeout=600) -> str:
        """Run a command to its end; its output, or AssertionError with it when it fails."""
        done = subprocess.run(  # noqa: S603
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / f"{name}.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, (
            f"{name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.running.items() if p.poll() is not None}
        assert not dead, f"processes died: {dead}\n{self.tails()}"

    def tails(self, lines: int = 40) -> str:
        out = []
        for name in self.running:
            path = self.logs / f"{name}.log"
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.running.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


class HTTPSError(AssertionError):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


class HTTPS:
    """A client of the deployment through its proxy: TLS verified against ``ca`` only, with
    cookies (for the pages' forms) or a personal API token (for the API: ``Bearer``)."""

    def __init__(self, base: str, ca: Path, *, token: str | None = None):
        self.base = base.rstrip("/")
        context = ssl.create_default_context(cafile=str(ca))
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context),
            urllib.request.HTTPCookieProcessor(self.jar),
        )
        self.token = token

    def request(self, method: str, path: str, *, data=None, form=None, headers=None):
        url = path if path.startswith("http") else self.base + path
        headers = dict(headers or {})
        body = None
        if data is not None:
            body = json.dumps(data).encode()
            headers["Content-Type"] = "application/json"
        elif form is not None:
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            headers["Referer"] = url
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with self.opener.open(request, timeout=60) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            raise HTTPSError(exc.code, exc.read().decode("utf-8", "replace")) from None

    def json(self, method: str, path: str, data=None):
        _status, text = self.request(method, path, data=data)
        return json.loads(text)

    def csrf(self) -> str:
        return next(c.value for c in self.jar if c.name == "csrftoken")

    def submit_form(self, path: str, fields: dict[str, str]) -> str:
        """GET a page with a form, then POST ``fields`` with its CSRF token; the final page."""
        _status, page = self.request("GET", path)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert token, f"no form on {path}:\n{page[:1000]}"
        _status, answer = self.request(
            "POST", path, form={"csrfmiddlewaretoken": token.group(1), **fields}
        )
        return answer


def wait_until(what: str, probe, *, timeout: float, every: float = 1.0, processes=None):
    """Call ``probe`` until it returns a true value (which is returned)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if processes is not None:
            processes.check_alive()
        try:
            value = probe()
        except (OSError, HTTPSError, AssertionError, ValueError) as exc:
            last, value = exc, None
        if value:
            return value
        time.sleep(every)
    tails = processes.tails() if processes is not None else ""
    raise AssertionError(f"timed out waiting for {what} (last: {last})\n{tails}")


def totp_code(secret: str, *, steps_ahead: int = 0) -> str:
    """The code an authenticator app shows for the base32 ``secret`` (RFC 6238: 30-second steps,
    six digits), ``steps_ahead`` steps from now: django-otp takes a code once, and one step
    either side of the server's clock."""
    from django_otp.oath import TOTP

    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    totp = TOTP(key)
    totp.time = time.time() + 30 * steps_ahead
    return f"{totp.token():06d}"


def enrol_second_factor(browser: HTTPS) -> str:
    """Set up an authenticator app for the person signed in on ``browser``, through the pages
    (the secret read off the setup page, a code computed from it, the backup codes shown);
    the session is then verified. Returns the secret."""
    _status, page = browser.request("GET", "/account/two-factor/setup/")
    found = re.search(r'<pre class="mono" id="totp-secret">([A-Z2-7]+)</pre>', page)
    assert found, f"no authenticator secret on the setup page:\n{page[:2000]}"
    secret = found.group(1)
    done = browser.submit_form("/account/two-factor/setup/", {"code": totp_code(secret)})
    assert "Your backup codes" in done, done[:2000]
    assert len(re.findall(r"<li>[a-z0-9]+</li>", done)) == 10, done[:2000]
    return secret


def verified_act_token(browser: HTTPS, name: str = "deploy test") -> str:
    """A personal ``act`` API token made on the API tokens page by ``browser``'s session, which
    must have verified its second factor: only such a token may sign, approve, export or mint
    credentials where ``TWO_FACTOR_REQUIRED`` (``manage.py create_api_token`` makes tokens
    that may not)."""
    page = browser.submit_form("/accounts/api-tokens/", {"name": name, "scope": "act", "days": "7"})
    found = re.search(r'<pre class="mono" id="api-token-secret">(flp_[^<]+)</pre>', page)
    assert found, f"no API token on the page:\n{page[:2000]}"
    return found.group(1)
