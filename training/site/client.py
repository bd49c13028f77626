"""The site worker's client of the central site API (``/api/site/v1/``), and its configuration.

A site worker holds no central database credentials (docs/architecture.md, section 2): everything
it knows
of a job it asks the central server, authenticated as its site (``Authorization: Site
<token>``), with urllib from the standard library, and states the site protocol it speaks
on every request (``X-Site-Protocol``, :mod:`training.site.protocol`): a server that speaks
another refuses it (426) with a message saying which side to upgrade. What it does with the
answers (checking them against its task, training, uploading) is :mod:`training.site.worker`.

Configuration (environment): ``SITE_SLUG``, ``CENTRAL_URL``, ``SITE_TOKEN``,
``SITE_SIGNING_KEY`` (path to the PEM private key), ``DATA_ROOT`` and, optionally,
``CENTRAL_TIMEOUT`` (seconds), ``SITE_CA_BUNDLE`` (a PEM file of the certificate
authorities to trust for an ``https`` ``CENTRAL_URL``, e.g. a hospital's or consortium's
private CA; set, it replaces the system's trust store for the central server) and
``SITE_HEARTBEAT_SECONDS`` (how often the worker reports that it is online, default 30) and
``CENTRAL_RETRY_SECONDS`` (how long a request of a task is retried, default 120; 0: never).

Retries. A web server restarting for a few seconds must not cost a site its round (issue 13:
a 5 s restart failed 3 of 4 uploads, each recovered only by the coordinator's re-dispatch).
A task's requests (the job, a model, the round's model, the upload, the evaluation request
and report) are retried when there was *no answer* (connection refused or reset, a timeout)
or the answer says "not now" (HTTP 502, 503, 504 from a proxy in front of a restarting
server, 429), with exponential back-off and full jitter (a random delay between 0 and
``RETRY_BASE_SECONDS`` doubled per attempt, capped at ``RETRY_MAX_SECONDS``; a
``Retry-After`` header of a 429 or 503 is honoured instead), for at most
``CENTRAL_RETRY_SECONDS`` in all and never past a ``deadline`` the caller passes (the round's
or the evaluation's). Every other answer is an answer and is raised at once: a 409 says there
is nothing to do, a 400 or 401 is a refusal that a retry would only repeat, and a certificate
that does not verify will not verify in a second. The uploads may be retried because they
are idempotent on the server: an identical re-upload is answered 200 ``duplicate``. When the
budget is spent the last :class:`CentralError` is raised, with its status and body, so the
callers' handling is the same as without retries. The checks' and the heartbeat's requests
(``whoami``, ``datasets``, ``heartbeat``) are not retried here: their callers loop already
(:func:`training.site.checks.wait_for_central`, the heartbeat's next beat) and a check must
say at once that the server does not answer. The privacy audit's request and report
(``.../jobs/<id>/audit/``) are a task's requests like the evaluation's, and retried alike, as
are the ledger's checkpoint and the site's witness of it (``ledger/checkpoint/...``).

Why one module: the client is one class over one request path (authentication, protocol,
TLS, retries), and each endpoint is a few lines on it; the configuration it reads is beside it.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from training.site.protocol import (
    LEDGER_CHECKPOINT_HEADER,
    LEDGER_SINCE_PARAMETER,
    LEDGER_WITNESS_HEADER,
    PROTOCOL_HEADER,
    SITE_API_PATH,
    SITE_PROTOCOL,
    encode_ledger_header,
)

__all__ = [
    "DEFAULT_HEARTBEAT_SECONDS",
    "DEFAULT_RETRY_SECONDS",
    "RETRY_BASE_SECONDS",
    "RETRY_MAX_SECONDS",
    "RETRY_STATUSES",
    "CentralClient",
    "CentralError",
    "RoundModel",
    "WorkerConfig",
    "WorkerConfigError",
    "retryable",
    "tls_context",
]

log = logging.getLogger(__name__)


class WorkerConfigError(RuntimeError):
    """The worker's environment is incomplete or wrong."""


class CentralError(RuntimeError):
    """The central API answered with an error. ``status`` is the HTTP status (0: no answer);
    ``tls`` is true when there was no answer because the server's certificate did not
    verify."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        body: Any = None,
        tls: bool = False,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.body = body
        self.tls = tls
        #: Seconds the server asked to wait (its ``Retry-After`` header), when it said.
        self.retry_after = retry_after


#: How often a worker reports that it is online, unless ``SITE_HEARTBEAT_SECONDS`` says.
DEFAULT_HEARTBEAT_SECONDS = 30.0
MIN_HEARTBEAT_SECONDS = 5.0
MAX_HEARTBEAT_SECONDS = 3600.0

#: How long, in all, a task's request is retried unless ``CENTRAL_RETRY_SECONDS`` says (0: never).
DEFAULT_RETRY_SECONDS = 120.0
MAX_RETRY_SECONDS = 3600.0
#: The first retry's delay is drawn between 0 and this; it doubles per attempt (full jitter)...
RETRY_BASE_SECONDS = 0.5
#: ... up to this.
RETRY_MAX_SECONDS = 15.0
#: The answers that say "not now" rather than "no": a proxy in front of a server that is
#: restarting (502, 503, 504) or a server asking the client to slow down (429).
RETRY_STATUSES = frozenset({429, 502, 503, 504})


def retryable(exc: CentralError) -> bool:
    """Whether a request that failed with ``exc`` may go through if sent again: no answer at
    all (but not a certificate that does not verify), or one of :data:`RETRY_STATUSES`."""
    if exc.status == 0:
        return not exc.tls
    return exc.status in RETRY_STATUSES


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (a number of seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


#: When a task's request stops being retried: epoch seconds (``time.time()``), an aware
#: datetime or its ISO 8601 text (the site API's deadlines); None: only the retry budget.
Deadline = float | datetime | str | None


def _seconds_left(deadline: Deadline) -> float | None:
    """Seconds from now to ``deadline``: epoch seconds (``time.time()``), an aware datetime or
    its ISO 8601 text (as the site API writes deadlines); None for no deadline."""
    if deadline is None:
        return None
    if isinstance(deadline, str):
        deadline = datetime.fromisoformat(deadline.replace("Z", "+00:00"))
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None:
            raise ValueError(f"a deadline needs a time zone, not {deadline.isoformat()}")
        deadline = deadline.timestamp()
    return float(deadline) - time.time()


def _seconds(env, name: str, default: float, *, minimum: float, maximum: float | None = None):
    raw = (env.get(name) or "").strip()
    if not raw:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        raise WorkerConfigError(f"{name} must be a number of seconds, not {raw!r}") from None
    if not minimum <= value <= (maximum if maximum is not None else float("inf")):
        bounds = f"between {minimum:g} and {maximum:g}" if maximum else f"at least {minimum:g}"
        raise WorkerConfigError(f"{name} must be {bounds} seconds, not {raw}")
    return value


def tls_context(ca_bundle: Path) -> ssl.SSLContext:
    """A client TLS context that trusts exactly the certificates in ``ca_bundle`` (PEM), with
    the hostname checked; :class:`WorkerConfigError` saying what is wrong with the file."""
    if not ca_bundle.is_file():
        raise WorkerConfigError(f"SITE_CA_BUNDLE: no file at {ca_bundle}")
    if not os.access(ca_bundle, os.R_OK):
        raise WorkerConfigError(f"SITE_CA_BUNDLE: {ca_bundle} is not readable by this user")
    try:
        return ssl.create_default_context(cafile=str(ca_bundle))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise WorkerConfigError(
            f"SITE_CA_BUNDLE: {ca_bundle} holds no usable PEM certificate ({exc})"
        ) from None


@dataclass(frozen=True)
class WorkerConfig:
    site_slug: str
    central_url: str
    token: str
    signing_key_path: Path
    data_root: Path
    timeout: float = 60.0
    ca_bundle: Path | None = None
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    retry_seconds: float = DEFAULT_RETRY_SECONDS

    ENV = ("SITE_SLUG", "CENTRAL_URL", "SITE_TOKEN", "SITE_SIGNING_KEY", "DATA_ROOT")

    @classmethod
    def from_env(cls, environ: dict | None = None) -> WorkerConfig:
        env = os.environ if environ is None else environ
        missing = [name for name in cls.ENV if not (env.get(name) or "").strip()]
        if missing:
            raise WorkerConfigError(
                f"the site worker needs {', '.join(missing)} in its environment "
                f"({', '.join(cls.ENV)})"
            )
        url = env["CENTRAL_URL"].strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise WorkerConfigError(f"CENTRAL_URL must be an http(s) URL, got {url!r}")
        key = Path(env["SITE_SIGNING_KEY"].strip())
        if not key.is_file():
            raise WorkerConfigError(f"SITE_SIGNING_KEY: no key file at {key}")
        root = Path(env["DATA_ROOT"].strip())
        if not root.is_dir():
            raise WorkerConfigError(f"DATA_ROOT: {root} is not a folder")
        ca_bundle = (env.get("SITE_CA_BUNDLE") or "").strip()
        if ca_bundle:
            tls_context(Path(ca_bundle))  # a missing or unreadable bundle is said here, at start
        return cls(
            site_slug=env["SITE_SLUG"].strip(),
            central_url=url,
            token=env["SITE_TOKEN"].strip(),
            signing_key_path=key,
            data_root=root,
            timeout=_seconds(env, "CENTRAL_TIMEOUT", 60, minimum=1),
            ca_bundle=Path(ca_bundle) if ca_bundle else None,
            heartbeat_seconds=_seconds(
                env,
                "SITE_HEARTBEAT_SECONDS",
                DEFAULT_HEARTBEAT_SECONDS,
                minimum=MIN_HEARTBEAT_SECONDS,
                maximum=MAX_HEARTBEAT_SECONDS,
            ),
            retry_seconds=_seconds(
                env,
                "CENTRAL_RETRY_SECONDS",
                DEFAULT_RETRY_SECONDS,
                minimum=0,
                maximum=MAX_RETRY_SECONDS,
            ),
        )

    def state_dir(self, job_id: int) -> Path:
        return self.data_root / ".fl-state" / str(int(job_id))


@dataclass(frozen=True)
class RoundModel:
    """The model a site must train from in a round, as the central server sent it."""

    data: bytes
    digest: str  # the X-Content-SHA256 header: the start model's digest
    spec_digest: str  # the X-Spec-Digest header: the job's spec digest
    #: The X-Ledger-Checkpoint header, as sent (asked with ``ledger_since``; None when the
    #: centre sent none: an older centre, which the worker then asks separately).
    ledger_header: str | None = None


class CentralClient:
    """The central site API over urllib, authenticated as the site (``Authorization: Site``),
    stating its protocol (``X-Site-Protocol``), over TLS verified against ``SITE_CA_BUNDLE``
    when it is set (else the system's certificate authorities); a task's requests retried
    (module docstring, "Retries").

    ``retry_seconds`` (else the configuration's), ``base_delay``, ``max_delay``, ``sleep`` and
    ``rng`` are there for tests and callers that need other retry timings."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        retry_seconds: float | None = None,
        base_delay: float = RETRY_BASE_SECONDS,
        max_delay: float = RETRY_MAX_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.config = config
        self.base = config.central_url + SITE_API_PATH
        self._context = tls_context(config.ca_bundle) if config.ca_bundle else None
        self.retry_seconds = float(config.retry_seconds if retry_seconds is None else retry_seconds)
        self.base_delay = float(base_delay)
        self.max_delay = float(max_delay)
        self._sleep = sleep
        # Seeded from the OS: workers restarted together must not retry in step.
        self._rng = rng or random.SystemRandom()

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers=None,
        retry: bool = True,
        deadline: Deadline = None,
    ):
        """One request, sent again while it fails with a :func:`retryable` error, for at most
        ``retry_seconds`` and never past ``deadline``; the last :class:`CentralError` else.
        Every attempt sends the same headers and body."""
        sent = {
            "Authorization": f"Site {self.config.token}",
            PROTOCOL_HEADER: str(SITE_PROTOCOL),
            **(headers or {}),
        }
        budget = self.retry_seconds if retry else 0.0
        left = _seconds_left(deadline)
        if left is not None:
            budget = min(budget, left)
        give_up = time.monotonic() + budget
        attempt = 0
        while True:
            try:
                answer = self._send(method, path, body, sent)
            except CentralError as exc:
                if not retryable(exc):
                    raise
                remaining = give_up - time.monotonic()
                # A jittered delay past the budget is cut short for a last try at its end; a
                # Retry-After past it says the server will not be back in time.
                jittered = self._rng.uniform(
                    0.0, min(self.max_delay, self.base_delay * 2.0**attempt)
                )
                delay = exc.retry_after if exc.retry_after is not None else min(jittered, remaining)
                if remaining <= 0 or delay > remaining:
                    if attempt:
                        log.warning(
                            "%s %s: giving up after %d retr%s (%s)",
                            method,
                            path,
                            attempt,
                            "y" if attempt == 1 else "ies",
                            exc,
                        )
                    raise
                attempt += 1
                log.warning(
                    "%s %s failed (%s); retry %d in %.2f s (%.0f s of retries left)",
                    method,
                    path,
                    exc,
                    attempt,
                    delay,
                    remaining,
                )
                self._sleep(delay)
                continue
            if attempt:
                log.info("%s %s: went through at retry %d", method, path, attempt)
            return answer

    def _send(self, method: str, path: str, body: bytes | None, sent: dict):
        """One attempt: (status, headers, body), or :class:`CentralError`."""
        request = urllib.request.Request(  # noqa: S310 - the URL's scheme is checked in from_env
            self.base + path, data=body, method=method, headers=sent
        )
        try:
            with urllib.request.urlopen(  # noqa: S310 - the URL's scheme is checked in from_env
                request, timeout=self.config.timeout, context=self._context
            ) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            try:
                data = exc.read()
            except (OSError, http.client.HTTPException):
                data = b""
            try:
                detail = json.loads(data)
            except ValueError:
                detail = data[:500].decode("utf-8", "replace")
            raise CentralError(
                f"{method} {path}: HTTP {exc.code}: {detail}",
                status=exc.code,
                body=detail,
                retry_after=_retry_after(exc.headers.get("Retry-After") if exc.headers else None),
            ) from None
        except (
            urllib.error.URLError,
            TimeoutError,
            ConnectionError,
            ssl.SSLError,
            http.client.HTTPException,
        ) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                trusted = (
                    f"the CA bundle SITE_CA_BUNDLE={self.config.ca_bundle}"
                    if self.config.ca_bundle
                    else "the system's certificate authorities (set SITE_CA_BUNDLE to the PEM "
                    "file of a private CA)"
                )
                raise CentralError(
                    f"{method} {path}: the TLS certificate of {self.config.central_url} does "
                    f"not verify against {trusted}: {reason.verify_message or reason}",
                    tls=True,
                ) from None
            raise CentralError(
                f"{method} {path}: no answer from {self.base} ({str(exc) or repr(exc)})"
            ) from None

    def whoami(self) -> dict:
        """The site, credential and registered public key the token belongs to."""
        _status, _headers, data = self._request("GET", "whoami/", retry=False)
        return json.loads(data)

    def datasets(self) -> list[dict]:
        """The data sets this site registered (key, modality, input_shape, n_classes,
        num_records), to check them against the files under DATA_ROOT."""
        _status, _headers, data = self._request("GET", "datasets/", retry=False)
        return json.loads(data)

    def heartbeat(self, report: dict) -> dict:
        """Tell the central server this worker is online (see training.site.heartbeat)."""
        _status, _headers, data = self._request(
            "POST",
            "heartbeat/",
            body=json.dumps(report).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            retry=False,  # the next beat is the retry
        )
        return json.loads(data)

    def job(self, job_id: int, *, deadline: Deadline = None) -> dict:
        _status, _headers, data = self._request("GET", f"jobs/{int(job_id)}/", deadline=deadline)
        return json.loads(data)

    def model(self, job_id: int, digest: str, *, deadline: Deadline = None) -> bytes:
        _status, _headers, data = self._request(
            "GET", f"jobs/{int(job_id)}/models/{digest}/", deadline=deadline
        )
        return data

    def round_model(
        self,
        job_id: int,
        round_index: int,
        *,
        ledger_since: int | None = None,
        deadline: Deadline = None,
    ) -> RoundModel:
        """The model to train from in the round; CentralError (409, with a ``code`` in its
        body) when the round does not ask this site for an update now. With
        ``ledger_since`` (the size of the last ledger checkpoint this site saw), the answer
        also carries the ledger's newest checkpoint and its proof from that size, as
        :meth:`ledger_checkpoint` answers (and CentralError as it refuses)."""
        path = f"jobs/{int(job_id)}/rounds/{int(round_index)}/model/"
        if ledger_since is not None:
            path += f"?{LEDGER_SINCE_PARAMETER}={int(ledger_since)}"
        _status, headers, data = self._request("GET", path, deadline=deadline)
        headers = {name.lower(): value for name, value in headers.items()}
        return RoundModel(
            data=data,
            digest=headers.get("x-content-sha256", ""),
            spec_digest=headers.get("x-spec-digest", ""),
            ledger_header=headers.get(LEDGER_CHECKPOINT_HEADER.lower()),
        )

    def upload(
        self,
        job_id: int,
        round_index: int,
        *,
        data: bytes,
        digest: str,
        signature: str,
        samples: int,
        metrics: dict,
        privacy_events: list,
        pipeline: list,
        witness: dict | None = None,
        deadline: Deadline = None,
    ) -> tuple[int, dict]:
        """Post this site's signed update of a round; sent again as it is when it did not go
        through (the server answers an identical re-upload 200 ``duplicate``). ``witness``:
        the site's cosignature of the ledger checkpoint it checked (the body
        :meth:`ledger_witness` posts), carried in the same request; the answer's
        ``ledger_witness`` says what became of it."""
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Update-Digest": digest,
            "X-Update-Signature": signature,
            "X-Update-Samples": str(int(samples)),
            "X-Update-Metrics": json.dumps(metrics, allow_nan=False),
            "X-Update-Privacy-Events": json.dumps(privacy_events, allow_nan=False),
            "X-Update-Pipeline": json.dumps(pipeline, allow_nan=False),
        }
        if witness is not None:
            headers[LEDGER_WITNESS_HEADER] = encode_ledger_header(witness)
        status, _headers, body = self._request(
            "POST",
            f"jobs/{int(job_id)}/rounds/{int(round_index)}/update/",
            body=data,
            headers=headers,
            deadline=deadline,
        )
        return status, json.loads(body)

    def evaluation_request(
        self, job_id: int, round_index: int, *, deadline: Deadline = None
    ) -> dict:
        """The models this site is asked to evaluate after a round (``{"models": [digest,
        ...], "deadline": ...}``); CentralError (409, with a ``code``) when nothing is asked
        of it now (already reported, evaluation closed, not asked)."""
        _status, _headers, data = self._request(
            "GET", f"jobs/{int(job_id)}/rounds/{int(round_index)}/evaluation/", deadline=deadline
        )
        return json.loads(data)

    def upload_evaluation(
        self,
        job_id: int,
        round_index: int,
        *,
        report: str,
        signature: str,
        deadline: Deadline = None,
    ) -> tuple[int, dict]:
        """Post this site's signed evaluation report of a round's models."""
        status, _headers, body = self._request(
            "POST",
            f"jobs/{int(job_id)}/rounds/{int(round_index)}/evaluation/",
            body=json.dumps({"report": report, "signature": signature}).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            deadline=deadline,
        )
        return status, json.loads(body)

    def audit_request(self, job_id: int, *, deadline: Deadline = None) -> dict:
        """The privacy audit asked of this site before the job's approval (``{"job", "site",
        "spec_digest", "records", "seed"}``); CentralError (409, with a ``code``) when none
        is asked of it now (not asked, already reported, the job no longer awaits approval)."""
        _status, _headers, data = self._request(
            "GET", f"jobs/{int(job_id)}/audit/", deadline=deadline
        )
        return json.loads(data)

    def upload_audit(
        self, job_id: int, *, report: str, signature: str, deadline: Deadline = None
    ) -> tuple[int, dict]:
        """Post this site's signed privacy audit report of a proposed job (figures only); sent
        again as it is when it did not go through (the server answers the same report 200)."""
        status, _headers, body = self._request(
            "POST",
            f"jobs/{int(job_id)}/audit/",
            body=json.dumps({"report": report, "signature": signature}).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            deadline=deadline,
        )
        return status, json.loads(body)

    def ledger_checkpoint(self, since: int, *, deadline: Deadline = None) -> dict:
        """The ledger's newest signed checkpoint with a consistency proof from the tree of
        ``since`` entries (``{"checkpoint", "consistency_proof", "since", "public_key"}``);
        CentralError (400 ``since_ahead``, 409 ``ledger_rewritten``) when the centre's ledger
        does not extend it (:mod:`training.site.ledger_witness`)."""
        _status, _headers, data = self._request(
            "GET", f"ledger/checkpoint/?since={int(since)}", deadline=deadline
        )
        return json.loads(data)

    def ledger_witness(self, body: dict, *, deadline: Deadline = None) -> tuple[int, dict]:
        """Post this site's cosignature of a checkpoint it checked; sent again as it is when it
        did not go through (the server answers the same site's second witness 200)."""
        status, _headers, data = self._request(
            "POST",
            "ledger/checkpoint/witness/",
            body=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            deadline=deadline,
        )
        return status, json.loads(data)
