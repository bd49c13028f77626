"""Tell open dashboard pages that the ledger moved.

Every governance act and every step of a round is a ledger entry, so "something changed on this
job" is "an entry about this job was committed". :func:`append_entry` schedules
:func:`announce` for after the commit; it sends a tiny wake-up message (the new sequence number,
nothing else) to the channel groups of the entry's consortium and, when the payload names one,
its job. The pages' consumers then read what changed from the database, applying the page's own
permission rule, so a message on the channel layer never carries data a listener may not see.

The wake-up is best effort by design: a channel layer that is down, or one that does not reach
across processes (the in-memory layer of the embedded default, where the coordinator is another
process), must never fail or slow a governance write. The consumers therefore also poll the
ledger's head every ``LIVE_POLL_SECONDS`` and catch up by sequence number, which makes delivery
complete and ordered whatever the layer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from typing import cast

from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer, InMemoryChannelLayer, get_channel_layer

log = logging.getLogger(__name__)

#: The message type consumers receive; Channels maps it to their ``ledger_appended`` method.
APPENDED = "ledger.appended"


def consortium_group(slug: str) -> str:
    return f"live.consortium.{slug}"


def job_group(job_id: int) -> str:
    return f"live.job.{int(job_id)}"


def groups_for(consortium_slug: str, job_id: object) -> list[str]:
    groups = [consortium_group(consortium_slug)] if consortium_slug else []
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        groups.append(job_group(job_id))
    return groups


def announce(groups: list[str], seq: int) -> None:
    """Wake the pages listening to ``groups``, without slowing the commit that called it.

    On the in-memory layer (the embedded default) only consumers of this very process can hear,
    so it sends only to groups that have one here (a dictionary lookup otherwise: appending stays
    as fast as without live pages). On a layer that crosses processes (Redis), a send is a round
    trip: it is handed to a background thread that sends with its own event loop, coalescing a
    burst to the newest sequence number per group. Either way a failure is logged, never raised.
    """
    if not groups:
        return
    try:
        layer = get_channel_layer()
        if layer is None:
            return
        if isinstance(layer, InMemoryChannelLayer):
            listened = [g for g in groups if layer.groups.get(g)]
            if listened:
                async_to_sync(_send)(layer, dict.fromkeys(listened, seq))
            return
        _sender.submit(groups, seq)
    except Exception as exc:  # the ledger write has committed; the pages will poll instead
        log.warning("live update for ledger entry #%s not sent: %s", seq, exc)


async def _send(layer: BaseChannelLayer, latest: dict[str, int]) -> None:
    for group, seq in latest.items():
        await layer.group_send(group, {"type": APPENDED, "seq": seq})


#: What the background sender is handed: the groups to wake and the entry's sequence number.
_WakeUp = tuple[tuple[str, ...], int]


class _BackgroundSender:
    """One daemon thread per process (started lazily, again after a fork) that sends wake-ups."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_WakeUp] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def submit(self, groups: list[str], seq: int) -> None:
        with self._lock:
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                if self._pid != os.getpid():
                    self._queue = queue.SimpleQueue()  # a forked child's copy is not ours
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, args=(self._queue,), name="ledger-live-wakeups", daemon=True
                )
                self._thread.start()
            self._queue.put((tuple(groups), seq))

    @staticmethod
    def _run(work: queue.SimpleQueue[_WakeUp]) -> None:
        loop = asyncio.new_event_loop()
        while True:
            groups, seq = work.get()
            latest = dict.fromkeys(groups, seq)
            while True:  # coalesce what piled up meanwhile
                try:
                    more, newer = work.get_nowait()
                except queue.Empty:
                    break
                for group in more:
                    latest[group] = max(latest.get(group, 0), newer)
            try:
                # A layer: submit() is only reached once announce() found one, and the
                # settings do not change (were it None, the send fails here and is logged).
                layer = cast(BaseChannelLayer, get_channel_layer())
                loop.run_until_complete(_send(layer, latest))
            except Exception as exc:
                log.warning("live updates up to ledger entry #%s not sent: %s", seq, exc)


_sender = _BackgroundSender()
