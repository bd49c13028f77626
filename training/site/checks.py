"""What a site worker checks before it takes a task (``run_site_worker --check``, and at every
start): each check says in one line what it found, so that a hospital's IT learns what is
wrong from the worker itself, not from a round that times out.

1. ``central`` -- ``CENTRAL_URL`` answers, and over ``https`` its certificate verifies
   (against ``SITE_CA_BUNDLE`` when set, else the system's authorities);
2. ``protocol`` -- the server speaks this worker's site protocol (``training.site.protocol``);
3. ``token`` -- ``SITE_TOKEN`` is a live credential of the site ``SITE_SLUG`` names (whoami);
4. ``signing key`` -- ``SITE_SIGNING_KEY`` is the private half of the public key registered
   for that credential (else every update would be rejected as forged);
5. ``ledger`` -- the centre's newest ledger checkpoint verifies with the key the worker
   trusts (``CENTRAL_LEDGER_PUBLIC_KEY``, or the one pinned on first use) and extends the last
   one this site saw: what every task checks first (``training.site.ledger_witness``), so a
   wrong key is found here rather than by every task refusing. Nothing is saved on site;
6. ``broker`` -- the broker account can consume the site's queue ``site.<slug>``
   (``training.site.broker.check_site_queue_access``). The embedded broker
   (``CELERY_BROKER_URL`` unset or ``filesystem://``) only reaches processes on the same
   machine: with a ``CENTRAL_URL`` that is not local it fails, naming the variable to set;
7. ``data`` -- every data set the site registered is under ``DATA_ROOT``, with the registered
   modality and input shape, labels within the registered classes and at least the
   registered number of records.

A check that cannot run because an earlier one failed is *skipped*, saying which. No check
writes anything on site, nor anything central but what any read of the ledger's checkpoint
does (the centre signs a checkpoint of its newest entries when it has none yet). The data
check loads each data set with the engine's loader (``training.fl.data``), which imports
torch: it is imported inside :func:`check_data` only, and ``run_site_worker`` runs the checks
at start in a subprocess, so the worker's parent process still never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from training.queues import site_queue
from training.site.broker import check_site_queue_access, site_username
from training.site.client import CentralClient, CentralError, WorkerConfig
from training.site.ledger_witness import LedgerRefused, preview_ledger_check
from training.site.protocol import SITE_API_PATH, SITE_PROTOCOL

__all__ = [
    "Check",
    "check_broker",
    "check_data",
    "check_ledger_trust",
    "check_signing_key",
    "embedded_broker",
    "is_local_url",
    "run_checks",
    "wait_for_central",
]

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``status`` is ``ok``, ``failed`` or ``skipped``."""

    name: str
    status: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def line(self) -> str:
        mark = {OK: "ok  ", FAILED: "FAIL", SKIPPED: "skip"}[self.status]
        return f"[{mark}] {self.name}: {self.message}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Check:
        return cls(name=data["name"], status=data["status"], message=data["message"])


def is_local_url(url: str) -> bool:
    """Whether ``url``'s host is this machine (loopback)."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    return host in _LOCAL_HOSTS or host.startswith("127.")


def embedded_broker(broker_url: str | None) -> bool:
    """Whether the broker is the embedded one (files on this machine) or in-process."""
    url = (broker_url or "").strip().lower()
    return not url or url.startswith(("filesystem://", "memory://"))


# --- Central server, protocol, token ------------------------------------------------------------


def _central_checks(client: CentralClient, config: WorkerConfig) -> tuple[list[Check], dict | None]:
    """``central``, ``protocol`` and ``token`` from one whoami request; its answer when all
    three passed."""
    url = config.central_url
    if url.startswith("https://"):
        tls = (
            f"TLS verified against SITE_CA_BUNDLE={config.ca_bundle}"
            if config.ca_bundle
            else "TLS verified against the system's certificate authorities"
        )
    else:
        tls = "plain HTTP, no TLS" + (
            "" if is_local_url(url) else " (use https:// off this machine)"
        )
    try:
        whoami = client.whoami()
    except CentralError as exc:
        if exc.status == 0:
            return [
                Check("central", FAILED, str(exc)),
                Check("protocol", SKIPPED, "the central server did not answer"),
                Check("token", SKIPPED, "the central server did not answer"),
            ], None
        answered = Check("central", OK, f"{url} answers ({tls})")
        detail = exc.body.get("detail", exc.body) if isinstance(exc.body, dict) else exc.body
        if exc.status == 404:
            return [
                Check(
                    "central",
                    FAILED,
                    f"{url} answers, but has no site API at {SITE_API_PATH} (HTTP 404): is "
                    "CENTRAL_URL the consortium server's address, and does it run a release "
                    f"that speaks site protocol {SITE_PROTOCOL}?",
                ),
                Check("protocol", SKIPPED, "no site API found"),
                Check("token", SKIPPED, "no site API found"),
            ], None
        if exc.status == 426:
            return [
                answered,
                Check("protocol", FAILED, str(detail)),
                Check("token", SKIPPED, "the server does not speak this worker's protocol"),
            ], None
        speaks = Check("protocol", OK, f"the server speaks site protocol {SITE_PROTOCOL}")
        if exc.status == 401:
            return [answered, speaks, Check("token", FAILED, f"SITE_TOKEN refused: {detail}")], None
        return [
            answered,
            speaks,
            Check("token", FAILED, f"whoami answered HTTP {exc.status}: {detail}"),
        ], None
    answered = Check("central", OK, f"{url} answers ({tls})")
    speaks = Check("protocol", OK, f"the server speaks site protocol {SITE_PROTOCOL}")
    site = whoami.get("institution")
    if site != config.site_slug:
        return [
            answered,
            speaks,
            Check(
                "token",
                FAILED,
                f"SITE_TOKEN belongs to site {site!r}, but SITE_SLUG is {config.site_slug!r}: "
                "use this site's own token, or the slug of the site the token was made for",
            ),
        ], None
    return [
        answered,
        speaks,
        Check(
            "token",
            OK,
            f"site {site} ({whoami.get('institution_name', '')}), credential "
            f"'{whoami.get('credential')}' ({whoami.get('token_prefix')}…)",
        ),
    ], whoami


def wait_for_central(client: CentralClient, *, limit: float, every: float = 1.0, say=None) -> bool:
    """Wait until the central server answers at all (any HTTP answer, a refusal included, or a
    certificate that does not verify), for at most ``limit`` seconds; whether it did.

    A worker started with its central server (a machine's boot, the demo) must not fail its
    start-up checks because the server is a few seconds slower to listen. Only *no answer* is
    waited on: a wrong URL, token or certificate is reported by the checks at once. ``say``
    is told once that the worker is waiting."""
    deadline = time.monotonic() + limit
    told = False
    while True:
        try:
            client.whoami()
            return True
        except CentralError as exc:
            if exc.status or exc.tls:
                return True
            if time.monotonic() >= deadline:
                return False
            if say and not told:
                say(f"waiting up to {limit:.0f} s for the central server to answer ({exc})")
                told = True
        time.sleep(every)


# --- Signing key ---------------------------------------------------------------------------------


def _raw_public(pem: bytes | str, *, private: bool) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    data = pem.encode("ascii") if isinstance(pem, str) else pem
    if private:
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"it is a {type(key).__name__}, not an Ed25519 key")
        public = key.public_key()
    else:
        public = serialization.load_pem_public_key(data)
        if not isinstance(public, Ed25519PublicKey):
            raise ValueError(f"it is a {type(public).__name__}, not an Ed25519 key")
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_signing_key(key_path: Path, registered_pem: str) -> Check:
    """Whether the private key at ``key_path`` is the one whose public key was registered."""
    try:
        mine = _raw_public(key_path.read_bytes(), private=True)
    except (OSError, ValueError, TypeError) as exc:
        return Check(
            "signing key",
            FAILED,
            f"SITE_SIGNING_KEY={key_path} is not a usable Ed25519 private key (PEM, PKCS#8, "
            f"unencrypted): {exc}",
        )
    try:
        registered = _raw_public(registered_pem, private=False)
    except (ValueError, TypeError) as exc:
        return Check("signing key", FAILED, f"the registered public key is not usable: {exc}")
    if mine != registered:
        return Check(
            "signing key",
            FAILED,
            f"SITE_SIGNING_KEY={key_path} is not the private key of the public key registered "
            f"for this credential (raw key SHA-256 {_short(mine)} here, {_short(registered)} "
            "registered): every update would be rejected. Use the matching private key, or "
            "create new worker credentials with this key's public key.",
        )
    return Check(
        "signing key",
        OK,
        f"SITE_SIGNING_KEY matches the registered public key (raw key SHA-256 {_short(mine)})",
    )


def _short(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


# --- Broker --------------------------------------------------------------------------------------


def check_broker(config: WorkerConfig, broker_url: str | None) -> Check:
    """Whether this worker can consume its queue on ``broker_url`` (see the module docstring)."""
    if embedded_broker(broker_url):
        if not is_local_url(config.central_url):
            return Check(
                "broker",
                FAILED,
                "CELERY_BROKER_URL is not set, so this worker would wait on the embedded "
                "broker (files on this machine) while CENTRAL_URL "
                f"({config.central_url}) is another machine: no task would ever reach it. "
                "Set CELERY_BROKER_URL to the consortium's broker with this site's account "
                f"(e.g. amqp://{site_username(config.site_slug)}:<password>@broker-host:5672/"
                "<vhost>).",
            )
        return Check(
            "broker",
            OK,
            "the embedded broker (files on this machine, beside the local central server)",
        )
    try:
        check_site_queue_access(broker_url, config.site_slug)
    except Exception as exc:  # any failure is the check's answer, said plainly
        return Check("broker", FAILED, str(exc) or type(exc).__name__)
    parts = urllib.parse.urlsplit(broker_url or "")
    where = f"{parts.hostname or 'localhost'}{f':{parts.port}' if parts.port else ''}"
    return Check(
        "broker",
        OK,
        f"user {parts.username or '(none)'!r} can consume {site_queue(config.site_slug)} "
        f"on {parts.scheme}://{where}",
    )


# --- Data ----------------------------------------------------------------------------------------


def check_data(config: WorkerConfig, registered: list[dict], *, loader: Callable | None = None):
    """One check per registered data set: present under DATA_ROOT, with the registered
    modality and shape, labels within the registered classes and at least the registered
    records. ``loader`` is ``training.fl.data.load_site_data`` unless given."""
    if loader is None:
        from training.fl.data import load_site_data as loader  # torch: see the module docstring
    if not registered:
        return [Check("data", OK, "the site registered no data set: nothing to find")]
    checks = []
    for entry in registered:
        key = entry["key"]
        name = f"data {key}"
        try:
            data = loader(data_root=config.data_root, dataset_key=key, site_slug=config.site_slug)
        except (ValueError, OSError) as exc:
            checks.append(Check(name, FAILED, f"not loadable from {config.data_root}: {exc}"))
            continue
        problems = []
        if entry.get("modality") and data.modality != entry["modality"]:
            problems.append(f"it is {data.modality} data, registered as {entry['modality']}")
        if list(data.input_shape) != list(entry.get("input_shape") or []):
            problems.append(
                f"one input has shape {list(data.input_shape)}, registered "
                f"{list(entry.get('input_shape') or [])}"
            )
        if entry.get("n_classes") and data.n_classes > int(entry["n_classes"]):
            problems.append(
                f"its labels go up to {data.n_classes - 1}, beyond the registered "
                f"{entry['n_classes']} classes"
            )
        if data.num_records < int(entry.get("num_records") or 0):
            problems.append(
                f"{data.num_records} records, fewer than the {entry['num_records']} registered"
            )
        where = data.source or str(config.data_root)
        if problems:
            checks.append(Check(name, FAILED, f"{where}: " + "; ".join(problems)))
        else:
            checks.append(
                Check(
                    name,
                    OK,
                    f"{data.num_records} records (registered {entry.get('num_records')}), "
                    f"shape {list(data.input_shape)}, {data.modality}, in {where}",
                )
            )
    return checks


def check_ledger_trust(
    client: CentralClient, config: WorkerConfig, *, environ: dict | None = None
) -> Check:
    """``ledger``: :func:`training.site.ledger_witness.preview_ledger_check`, as a check."""
    try:
        found = preview_ledger_check(client, config, environ=environ)
    except LedgerRefused as exc:
        return Check("ledger", FAILED, f"every task would be refused: {exc}")
    except CentralError as exc:
        return Check("ledger", FAILED, f"the centre's ledger checkpoint: {exc}")
    return Check("ledger", OK, found)


# --- All of them ---------------------------------------------------------------------------------


def run_checks(
    config: WorkerConfig,
    *,
    broker_url: str | None,
    client: CentralClient | None = None,
    loader: Callable | None = None,
) -> list[Check]:
    """Every check, in order (see the module docstring)."""
    client = client or CentralClient(config)
    checks, whoami = _central_checks(client, config)
    if whoami is None:
        checks.append(Check("signing key", SKIPPED, "needs the credential (token check)"))
        checks.append(Check("ledger", SKIPPED, "needs the credential (token check)"))
    else:
        checks.append(check_signing_key(config.signing_key_path, whoami.get("public_key", "")))
        checks.append(check_ledger_trust(client, config))

    checks.append(check_broker(config, broker_url))
    if whoami is None:
        checks.append(Check("data", SKIPPED, "needs the site's registered data sets (token)"))
    else:
        try:
            registered = client.datasets()
        except CentralError as exc:
            checks.append(Check("data", FAILED, f"the registered data sets: {exc}"))
        else:
            checks.extend(check_data(config, registered, loader=loader))
    return checks


def checks_json(checks: list[Check], **extra) -> str:
    """The checks as one JSON line (``run_site_worker --check --json``)."""
    return json.dumps({"checks": [c.to_json() for c in checks], **extra}, sort_keys=True)
