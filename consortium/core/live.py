"""Websockets that keep open pages current: the base consumer (the pages' own consumers are in
:mod:`training.web.consumers`).

A page opens one socket for what it shows (a consortium, a job). The consumer:

* authenticates the user from the session (Channels' ``AuthMiddlewareStack``) and applies the
  SAME permission rule as the page, read afresh from the database; a refused socket is closed
  before the handshake completes (the browser sees HTTP 403), so an outsider learns nothing;
* joins the channel group that :func:`audit.ledger.chain.append_entry` wakes after each commit
  (:mod:`audit.ledger.live`), and also polls the ledger head every ``LIVE_POLL_SECONDS``, so an
  entry
  committed by another process reaches the page even on the in-memory layer of the embedded
  default, and a lost wake-up costs at most one poll interval;
* on each change reads the new ledger entries by sequence number (nothing is skipped or sent
  twice) and the page's state, re-checking the permission each time: a member removed while the
  page is open is disconnected (code 4403) at the next change.

Messages are JSON: ``{"type": "state", "head": seq, "entries": [...], "state": {...}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone

from audit.ledger.selectors import consortium_entries_after, current_head_seq
from audit.ledger.words import entry_sentence
from audit.models import LedgerEntry
from consortium.core.session_timeout import session_is_current

#: Close code for "not allowed" (4000-4999 are the application's; 4403 mirrors HTTP 403).
FORBIDDEN = 4403
#: Close code for "your session has ended" (idle or too old, ``consortium.core.session_timeout``):
#: the page reloads, and the reload lands on the sign-in page.
SIGNED_OUT = 4401

#: At most this many entries per message; a page that fell further behind gets the newest.
MAX_ENTRIES = 50


def entry_json(entry: LedgerEntry, names: dict[str, str] | None = None) -> dict:
    """One entry for a live page: its code and, in words, what happened (``words``) and when,
    in the server's time zone with the zone named (``time_text``), as the server-rendered rows
    say it (a browser's own zone would make the same page show two clocks)."""
    names = names or {}
    try:
        payload = json.loads(entry.payload_text)
    except (TypeError, ValueError):
        payload = {}
    slug = entry.institution_slug or None
    local = timezone.localtime(entry.created_at)
    return {
        "seq": entry.seq,
        "event": entry.event,
        "words": entry_sentence(
            entry.event,
            payload,
            institution=names.get(slug, slug) if slug else None,
            name_of=lambda s: names.get(s, s),
        ),
        "time": entry.created_at.isoformat(),
        "time_text": local.strftime("%H:%M:%S ") + (local.tzname() or ""),
        "actor": entry.actor_repr,
        "institution": entry.institution_slug,
        "institution_name": names.get(slug, slug) if slug else "",
        "hash": entry.entry_hash,
    }


class LedgerLiveConsumer(AsyncJsonWebsocketConsumer):
    """Base: subclasses say what the socket is about, who may see it, and what to send."""

    def load_target(self):
        """The object the page is about, from the URL (``None`` if it does not exist)."""
        raise NotImplementedError

    def allowed(self, user, target) -> bool:
        raise NotImplementedError

    def groups_of(self, target) -> list[str]:
        raise NotImplementedError

    def relevant(self, entry: LedgerEntry, target) -> bool:
        raise NotImplementedError

    def shows_entries(self, user, target) -> bool:
        """Whether the page lists ledger entries to this user (else only its state)."""
        return True

    def state_of(self, target) -> dict:
        raise NotImplementedError

    def institution_names(self, target) -> dict[str, str]:
        """The page's institutions by slug, to name them in the entries' words."""
        return {}

    def consortium_slug_of(self, target) -> str:
        raise NotImplementedError

    def entries_query(self, target, since: int):
        """The page's consortium's entries after ``since`` (the (consortium, seq) index)."""
        return consortium_entries_after(self.consortium_slug_of(target), since)

    # --- Synchronous parts, run in a thread ---------------------------------------------------

    def _user(self):
        """The user, read afresh: a session may outlive a role, and grants are cached on the
        user object. ``None`` too once the session has ended (idle or too old): the socket is
        not activity, so it neither keeps the session alive nor outlives it."""
        scoped = self.scope.get("user")
        if scoped is None or not scoped.is_authenticated:
            return None
        # A user put in the scope without a session (a test's router) has no session to end.
        if "session" in self.scope and not session_is_current(self.scope["session"].session_key):
            self.signed_out = True
            return None
        return get_user_model().objects.filter(pk=scoped.pk, is_active=True).first()

    def _authorize(self):
        user = self._user()
        target = self.load_target()
        if user is None or target is None or not self.allowed(user, target):
            return None
        self.with_entries = self.shows_entries(user, target)
        return target

    def _collect(self, since: int, *, initial: bool):
        """``(head, entries, state)`` since ``since``, or ``None`` when no longer allowed."""
        target = self._authorize()
        if target is None:
            return None
        head = current_head_seq()
        if head <= since and not initial:
            return head, [], None
        rows = list(self.entries_query(target, since).order_by("-seq")[: MAX_ENTRIES * 4])
        names = self.institution_names(target) if rows else {}
        entries = [entry_json(e, names) for e in reversed(rows) if self.relevant(e, target)]
        if not entries and not initial:
            return head, [], None
        shown = entries[-MAX_ENTRIES:] if self.with_entries else []
        return head, shown, self.state_of(target)

    # --- The socket -----------------------------------------------------------------------------

    async def connect(self):
        self.poller = None
        self.signed_out = False
        self.target = await database_sync_to_async(self._authorize)()
        if self.target is None:
            if self.signed_out:
                # Accepted, then closed with the code that makes the page reload (onto the
                # sign-in page): a refused handshake would only make it retry.
                await self.accept()
                await self.close(code=SIGNED_OUT)
                return
            await self.close(code=FORBIDDEN)
            return
        self.joined = self.groups_of(self.target)
        for group in self.joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        self.wake = asyncio.Event()
        self.since = await database_sync_to_async(current_head_seq)()
        await self.refresh(initial=True)
        self.poller = asyncio.create_task(self._poll())

    async def disconnect(self, code):
        if getattr(self, "poller", None) is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        for group in getattr(self, "joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        """The page may ask for a fresh state (``{"type": "refresh"}``), e.g. after a reconnect."""
        if isinstance(content, dict) and content.get("type") == "refresh":
            await self.refresh(initial=True)

    async def ledger_appended(self, message):
        """Wake-up from :func:`audit.ledger.live.announce` (another process's commit)."""
        self.wake.set()

    async def _poll(self):
        interval = float(getattr(settings, "LIVE_POLL_SECONDS", 1.0))
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=interval)
            self.wake.clear()
            await self.refresh(initial=False)

    async def refresh(self, *, initial: bool):
        since = self.since
        result = await database_sync_to_async(self._collect)(since, initial=initial)
        if result is None:
            await self.close(code=SIGNED_OUT if self.signed_out else FORBIDDEN)
            return
        head, entries, state = result
        self.since = max(self.since, head)
        if state is None:
            return
        await self.send_json({"type": "state", "head": head, "entries": entries, "state": state})
