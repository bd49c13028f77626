"""A throwaway ``redis-server`` of the test's own, on a free port, that the test can stop, kill
with SIGKILL and start again *empty* (no RDB snapshot, no append-only file): the broker outage of
the fault suite (tests/faults/). The machine's own Redis (port 6379, the channel layer and broker
of the PostgreSQL pass) is never touched.

:func:`redis_binary` finds the server; :func:`require_redis_binary` skips the test when it is
absent, or fails it when ``FAULTS_REQUIRED`` is set (``.ci/run`` sets it in its PostgreSQL
pass), the way the ``rabbitmq`` and ``deploy`` tests do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from training.demo.processes import free_port

__all__ = ["RedisServer", "faults_required", "redis_binary", "require_redis_binary"]


def faults_required() -> bool:
    """Whether a missing service fails the fault suite instead of skipping it."""
    return bool(os.environ.get("FAULTS_REQUIRED"))


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).is_file()),
        None,
    )


def require_redis_binary() -> str:
    """The server's path; skips (or, under ``FAULTS_REQUIRED``, fails) the test without one."""
    binary = redis_binary()
    if binary is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if faults_required():
            pytest.fail(f"FAULTS_REQUIRED is set but {reason}")
        pytest.skip(reason)
    return binary


def _answers(port: int) -> bool:
    """Whether a Redis on ``port`` answers PING (raw protocol: no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One ``redis-server`` on 127.0.0.1:``port`` with nothing persisted, logging to ``log``.

    The port stays the same across :meth:`kill` and :meth:`start`, so clients configured with
    :meth:`url` reconnect to the new, empty server."""

    folder: Path
    binary: str = field(default_factory=require_redis_binary)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0
    kind = "redis"

    @property
    def log(self) -> Path:
        return self.folder / f"redis-{self.port}.log"

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def env(self) -> dict[str, str]:
        """What a process of the fault suite's cluster needs: the broker on db 0, the channel
        layer on db 1."""
        return {"CELERY_BROKER_URL": self.url(0), "CHANNEL_LAYER_URL": self.url(1)}

    def transport_options(self) -> dict:
        return {"visibility_timeout": 3600}

    def purge(self, queue: str) -> int:
        """Drop every message waiting in ``queue`` (a list of that name on db 0)."""
        import redis as redis_client

        with contextlib.closing(redis_client.Redis.from_url(self.url(0))) as client:
            return int(client.delete(queue))

    def start(self, timeout: float = 10.0) -> None:
        """Start an empty server and wait until it answers."""
        assert not self.running(), "already running"
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
            "--logfile",
            str(self.log),
        ]
        self.process = subprocess.Popen(  # noqa: S603 - the machine's redis-server
            argv, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not _answers(self.port):
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not answer:\n{self.tail()}")
            time.sleep(0.05)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: every message and binding it held is gone, nothing is written."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        """SIGTERM (no snapshot is saved: ``--save ''``), SIGKILL after 5 s."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None

    def restart_empty(self, *, down_for: float = 0.0) -> None:
        """Kill the server, stay down ``down_for`` seconds, start an empty one on the same port."""
        self.kill()
        time.sleep(down_for)
        self.start()

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
