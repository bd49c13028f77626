"""How long, since when and whose, in plain words: what the job page, the dashboard's services
panel and the absence notices say of a worker or a service.

One module for the words so that a worker reads the same everywhere ("offline for 4 min (last
heard 09:12 UTC)"): the page a researcher watches, the panel an operator watches and the
message the proposer is sent. Times are UTC, the platform's clock (the pages say so).
"""

from __future__ import annotations

import datetime as dt

from training.rounds.heartbeats import SiteWorkers

__all__ = ["clock", "duration_words", "possessive", "worker_state_words"]


def duration_words(value: dt.timedelta | float) -> str:
    """``40 s``, ``4 min``, ``2 h 5 min``, ``3 days``: rounded to what a person reads."""
    seconds = value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{int(seconds)} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{round(hours / 24)} days"


def clock(moment: dt.datetime, *, now: dt.datetime | None = None) -> str:
    """``09:12 UTC`` today, ``2026-12-04 09:12 UTC`` on another day."""
    moment = moment.astimezone(dt.UTC)
    if now is not None and moment.date() == now.astimezone(dt.UTC).date():
        return f"{moment:%H:%M} UTC"
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def possessive(name: str) -> str:
    """``Barts'``, ``St Thomas'``, ``Hospital A's``."""
    if name.endswith(("'", "’")):
        return name
    return f"{name}'" if name.endswith(("s", "S")) else f"{name}'s"


def worker_state_words(workers: SiteWorkers | None, *, now: dt.datetime) -> str:
    """The site's worker as one clause: ``its worker is offline for 4 min (last heard 09:12
    UTC)``, ``its worker is online``, ``its worker has never connected``, ``it has no worker
    credentials``."""
    if workers is None or not workers.workers:
        return "it has no worker credentials, so no worker can connect for it"
    latest = workers.latest
    if workers.online:
        return f"its worker is online (last heard {clock(latest.last_seen_at, now=now)})"
    if not latest.seen:
        return "its worker has never connected"
    return (
        f"its worker is offline for {duration_words(now - latest.last_seen_at)} "
        f"(last heard {clock(latest.last_seen_at, now=now)})"
    )
