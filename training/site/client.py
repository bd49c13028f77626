"""The site worker's client of the central site API (``/api/site/``), and its configuration.

A site worker holds no central database credentials (docs/architecture.md, section 2): everything
it knows
of a job it asks the central server, authenticated as its site (``Authorization: Site
<token>``), with urllib from the standard library. What it does with the answers (checking
them against its task, training, uploading) is :mod:`training.site.worker`.

Configuration (environment): ``SITE_SLUG``, ``CENTRAL_URL``, ``SITE_TOKEN``,
``SITE_SIGNING_KEY`` (path to the PEM private key), ``DATA_ROOT`` and, optionally,
``CENTRAL_TIMEOUT`` (seconds).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CentralClient",
    "CentralError",
    "RoundModel",
    "WorkerConfig",
    "WorkerConfigError",
]


class WorkerConfigError(RuntimeError):
    """The worker's environment is incomplete or wrong."""


class CentralError(RuntimeError):
    """The central API answered with an error. ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, *, status: int = 0, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class WorkerConfig:
    site_slug: str
    central_url: str
    token: str
    signing_key_path: Path
    data_root: Path
    timeout: float = 60.0

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
        return cls(
            site_slug=env["SITE_SLUG"].strip(),
            central_url=url,
            token=env["SITE_TOKEN"].strip(),
            signing_key_path=key,
            data_root=root,
            timeout=float(env.get("CENTRAL_TIMEOUT", 60)),
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
    """The central site API over urllib, authenticated as the site (``Authorization: Site``)."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.base = config.central_url + "/api/site/"

    def _request(self, method: str, path: str, *, body: bytes | None = None, headers=None):
        request = urllib.request.Request(  # noqa: S310 - the URL's scheme is checked in from_env
            self.base + path,
            data=body,
            method=method,
            headers={"Authorization": f"Site {self.config.token}", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:  # noqa: S310
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
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise CentralError(f"{method} {path}: no answer from {self.base} ({exc})") from None

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
