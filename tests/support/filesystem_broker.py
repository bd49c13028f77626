"""The embedded default's broker for the fault suite (tests/faults/): kombu's filesystem
transport in a folder of the cluster's own, with the interface of
:class:`tests.support.redis_server.RedisServer` that the suite's cluster uses.

There is no broker process on the embedded default: every process that sends or consumes
reads and writes the same folders, so nothing can be killed and :meth:`FilesystemBroker.kill`
refuses, saying so (the fault suite runs the broker scenarios on Redis only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["FilesystemBroker"]


@dataclass
class FilesystemBroker:
    """The folders of one cluster's broker (``CELERY_DATA_DIR``, read by consortium.settings)."""

    folder: Path
    #: How often a site worker looks for a message (``EMBEDDED_BROKER_POLL_SECONDS``).
    poll_seconds: float = 0.05
    kind = "filesystem"

    def url(self, db: int = 0) -> str:
        return "filesystem://"

    def env(self) -> dict[str, str]:
        """What a process of the cluster needs to reach this broker (no channel layer URL: the
        embedded default's layer is in-memory, one per process)."""
        return {
            "CELERY_BROKER_URL": self.url(),
            "CELERY_DATA_DIR": str(self.folder),
            "EMBEDDED_BROKER_POLL_SECONDS": str(self.poll_seconds),
        }

    def transport_options(self) -> dict:
        """The options consortium.settings builds from ``CELERY_DATA_DIR``, for this process's
        Celery app."""
        return {
            "data_folder_in": str(self.folder / "out"),
            "data_folder_out": str(self.folder / "out"),
            "processed_folder": str(self.folder / "processed"),
            "control_folder": str(self.folder / "control"),
            "store_processed": False,
            "polling_interval": self.poll_seconds,
        }

    def start(self) -> None:
        for name in ("out", "processed", "control"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)

    def running(self) -> bool:
        return (self.folder / "out").is_dir()

    def kill(self) -> None:
        raise NotImplementedError(
            "the embedded default's broker is a folder, not a process: there is nothing to kill"
        )

    def stop(self) -> None:
        """Nothing runs; the folder stays for the logs' sake until the test's tmp_path goes."""

    def purge(self, queue: str) -> int:
        """Drop every message waiting in ``queue``; the number dropped."""
        from kombu import Connection, Exchange, Queue

        with Connection(self.url(), transport_options=self.transport_options()) as conn:
            channel = conn.default_channel
            Queue(queue, Exchange(queue), routing_key=queue)(channel).declare()
            return channel.queue_purge(queue) or 0

    def tail(self, chars: int = 2000) -> str:
        waiting = sorted(p.name for p in (self.folder / "out").glob("*"))
        return f"{len(waiting)} message files waiting in {self.folder / 'out'}"[:chars]
