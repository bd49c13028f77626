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
``SITE_HEARTBEAT_SECONDS`` (how often the worker reports that it is online, default 30).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.site.protocol import PROTOCOL_HEADER, SITE_API_PATH, SITE_PROTOCOL

__all__ = [
    "DEFAULT_HEARTBEAT_SECONDS",
    "CentralClient",
    "CentralError",
    "RoundModel",
    "WorkerConfig",
    "WorkerConfigError",
    "tls_context",
]


class WorkerConfigError(RuntimeError):
    """The worker's environment is incomplete or wrong."""


class CentralError(RuntimeError):
    """The central API answered with an error. ``status`` is the HTTP status (0: no answer);
    ``tls`` is true when there was no answer because the server's certificate did not
    verify."""

    def __init__(self, message: str, *, status: int = 0, body: Any = None, tls: bool = False):
        super().__init__(message)
        self.status = status
        self.body = body
        self.tls = tls


#: How often a worker reports that it is online, unless ``SITE_HEARTBEAT_SECONDS`` says.
DEFAULT_HEARTBEAT_SECONDS = 30.0
MIN_HEARTBEAT_SECONDS = 5.0
MAX_HEARTBEAT_SECONDS = 3600.0


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
        )

    def state_dir(self, job_id: int) -> Path:
        return self.data_root / ".fl-state" / str(int(job_id))


@dataclass(frozen=True)
class RoundModel:
    """The model a site must train from in a round, as the central server sent it."""

    data: bytes
    digest: str  # the X-Content-SHA256 header: the start model's digest
    spec_digest: str  # the X-Spec-Digest header: the job's spec digest


class CentralClient:
    """The central site API over urllib, authenticated as the site (``Authorization: Site``),
    stating its protocol (``X-Site-Protocol``), over TLS verified against ``SITE_CA_BUNDLE``
    when it is set (else the system's certificate authorities)."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.base = config.central_url + SITE_API_PATH
        self._context = tls_context(config.ca_bundle) if config.ca_bundle else None

    def _request(self, method: str, path: str, *, body: bytes | None = None, headers=None):
        sent = {
            "Authorization": f"Site {self.config.token}",
            PROTOCOL_HEADER: str(SITE_PROTOCOL),
            **(headers or {}),
        }
        request = urllib.request.Request(  # noqa: S310 - the URL's scheme is checked in from_env
            self.base + path, data=body, method=method, headers=sent
        )
        try:
            with urllib.request.urlopen(  # noqa: S310 - the URL's scheme is checked in from_env
                request, timeout=self.config.timeout, context=self._context
            ) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            data = exc.read()
            try:
                detail = json.loads(data)
            except ValueError:
                detail = data[:500].decode("utf-8", "replace")
            raise CentralError(
                f"{method} {path}: HTTP {exc.code}: {detail}", status=exc.code, body=detail
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, ssl.SSLError) as exc:
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
            raise CentralError(f"{method} {path}: no answer from {self.base} ({exc})") from None

    def whoami(self) -> dict:
        """The site, credential and registered public key the token belongs to."""
        _status, _headers, data = self._request("GET", "whoami/")
        return json.loads(data)

    def datasets(self) -> list[dict]:
        """The data sets this site registered (key, modality, input_shape, n_classes,
        num_records), to check them against the files under DATA_ROOT."""
        _status, _headers, data = self._request("GET", "datasets/")
        return json.loads(data)

    def heartbeat(self, report: dict) -> dict:
        """Tell the central server this worker is online (see training.site.heartbeat)."""
        _status, _headers, data = self._request(
            "POST",
            "heartbeat/",
            body=json.dumps(report).encode("utf-8"),
            headers={"Content-Type": "application/json"},
        )
        return json.loads(data)

    def job(self, job_id: int) -> dict:
        _status, _headers, data = self._request("GET", f"jobs/{int(job_id)}/")
        return json.loads(data)

    def model(self, job_id: int, digest: str) -> bytes:
        _status, _headers, data = self._request("GET", f"jobs/{int(job_id)}/models/{digest}/")
        return data

    def round_model(self, job_id: int, round_index: int) -> RoundModel:
        """The model to train from in the round; CentralError (409, with a ``code`` in its
        body) when the round does not ask this site for an update now."""
        _status, headers, data = self._request(
            "GET", f"jobs/{int(job_id)}/rounds/{int(round_index)}/model/"
        )
        headers = {name.lower(): value for name, value in headers.items()}
        return RoundModel(
            data=data,
            digest=headers.get("x-content-sha256", ""),
            spec_digest=headers.get("x-spec-digest", ""),
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
    ) -> tuple[int, dict]:
        status, _headers, body = self._request(
            "POST",
            f"jobs/{int(job_id)}/rounds/{int(round_index)}/update/",
            body=data,
            headers={
                "Content-Type": "application/octet-stream",
                "X-Update-Digest": digest,
                "X-Update-Signature": signature,
                "X-Update-Samples": str(int(samples)),
                "X-Update-Metrics": json.dumps(metrics, allow_nan=False),
                "X-Update-Privacy-Events": json.dumps(privacy_events, allow_nan=False),
                "X-Update-Pipeline": json.dumps(pipeline, allow_nan=False),
            },
        )
        return status, json.loads(body)

    def evaluation_request(self, job_id: int, round_index: int) -> dict:
        """The models this site is asked to evaluate after a round (``{"models": [digest,
        ...], "deadline": ...}``); CentralError (409, with a ``code``) when nothing is asked
        of it now (already reported, evaluation closed, not asked)."""
        _status, _headers, data = self._request(
            "GET", f"jobs/{int(job_id)}/rounds/{int(round_index)}/evaluation/"
        )
        return json.loads(data)

    def upload_evaluation(
        self, job_id: int, round_index: int, *, report: str, signature: str
    ) -> tuple[int, dict]:
        """Post this site's signed evaluation report of a round's models."""
        status, _headers, body = self._request(
            "POST",
            f"jobs/{int(job_id)}/rounds/{int(round_index)}/evaluation/",
            body=json.dumps({"report": report, "signature": signature}).encode("utf-8"),
            headers={"Content-Type": "application/json"},
        )
        return status, json.loads(body)
