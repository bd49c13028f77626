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

import logging

log = logging.getLogger(__name__)

#: The message type consumers receive; Channels maps it to their ``ledger_appended`` method.
APPENDED = "ledger.appended"


def consortium_group(slug: str) -> str:
    return f"live.consortium.{slug}"


def job_group(job_id: int) -> str:
    return f"live.job.{int(job_id)}"


def groups_for(consortium_slug: str, job_id) -> list[str]:
    groups = [consortium_group(consortium_slug)] if consortium_slug else []
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        groups.append(job_group(job_id))
    return groups


def announce(groups: list[str], seq: int) -> None:
    """Send the wake-up to ``groups``; log and carry on if the channel layer fails."""
    if not groups:
        return
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    try:
        layer = get_channel_layer()
        if layer is None:
            return
        message = {"type": APPENDED, "seq": seq}
        for group in groups:
            async_to_sync(layer.group_send)(group, message)
    except Exception as exc:  # the ledger write has committed; the pages will poll instead
        log.warning("live update for ledger entry #%s not sent: %s", seq, exc)
