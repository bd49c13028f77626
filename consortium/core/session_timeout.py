"""Sessions that end: after ``SESSION_IDLE_MINUTES`` without activity, and
``SESSION_MAX_AGE_HOURS`` after sign-in whatever happens.

Django's own session age is counted from the last save, so with nothing else a session lives
as long as someone keeps using it, and with ``SESSION_SAVE_EVERY_REQUEST`` an open live page
(which refreshes itself) would keep a forgotten browser signed in forever. So the session
carries two times of its own, written by :class:`SessionTimeoutMiddleware`: when the person
signed in, and when they last did something, at most once a minute (a write per request would
cost a database write per click for nothing).

What counts as activity: a request the person made (a page, a form, the budget preview they
trigger by editing the form). What does not: a live page's own refresh (the htmx request it
sends after a ledger change, marked with the ``X-Background-Refresh`` header) and its
websocket, which the browser keeps open on its own. Both still end with the session: the
refresh is answered with a redirect to the sign-in page, and the live consumers close the socket
(code 4401) at their next poll (:func:`session_is_current`, used by ``consortium.core.live``),
so the page reloads onto the sign-in page instead of going on showing the consortium's data to
whoever sits at the screen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import import_module
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import logout, user_logged_in
from django.contrib.auth.views import redirect_to_login
from django.dispatch import receiver
from django.http import HttpResponse

__all__ = [
    "BACKGROUND_HEADER",
    "SessionTimeoutMiddleware",
    "expiry_reason",
    "session_is_current",
]

#: Session keys: when the person signed in, and when they last did something (epoch seconds).
SIGNED_IN_AT = "_signed_in_at"
LAST_ACTIVITY_AT = "_last_activity_at"
#: The last-activity time is written at most this often (seconds).
ACTIVITY_RESOLUTION = 60
#: The header a page's automatic refresh sends (templates/training/_job_live.html).
BACKGROUND_HEADER = "X-Background-Refresh"


def expiry_reason(session, now: float | None = None) -> str | None:
    """Why ``session`` (a mapping) has ended, in words, or ``None`` while it is current."""
    now = time.time() if now is None else now
    idle = settings.SESSION_IDLE_MINUTES * 60
    most = settings.SESSION_MAX_AGE_HOURS * 3600
    last = session.get(LAST_ACTIVITY_AT)
    started = session.get(SIGNED_IN_AT)
    if idle and isinstance(last, (int, float)) and now - last > idle:
        minutes = settings.SESSION_IDLE_MINUTES
        return f"You were signed out after {minutes} minutes without activity."
    if most and isinstance(started, (int, float)) and now - started > most:
        hours = f"{settings.SESSION_MAX_AGE_HOURS:g}"
        return f"You were signed out: a session lasts at most {hours} hours. Please sign in again."
    return None


def session_is_current(session_key: str | None) -> bool:
    """Whether the stored session ``session_key`` still exists and has not ended, read afresh
    from the session store (a websocket's scope holds the copy read when it connected)."""
    if not session_key:
        return False
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key=session_key)
    if not store.exists(session_key):
        return False
    return expiry_reason(store.load()) is None


@receiver(user_logged_in, dispatch_uid="consortium.session_timeout.signed_in")
def _note_sign_in(sender, request, user, **kwargs) -> None:
    """A sign-in starts both clocks afresh (``login()`` keeps a session's data when the same
    person signs in again, which would otherwise carry the old sign-in time)."""
    session = getattr(request, "session", None)
    if session is not None:
        now = time.time()
        session[SIGNED_IN_AT] = now
        session[LAST_ACTIVITY_AT] = now


def _is_background(request) -> bool:
    return request.headers.get(BACKGROUND_HEADER) == "1"


class SessionTimeoutMiddleware:
    """Signs out an ended session before the view runs, and records activity (the module)."""

    def __init__(self, get_response: Callable):
        self.get_response = get_response

    def __call__(self, request):
        now = time.time()
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            reason = expiry_reason(request.session, now)
            if reason is not None:
                logout(request)  # flushes the session: a new, anonymous one
                messages.info(request, reason)
                if request.headers.get("HX-Request") == "true":
                    # htmx would swap the sign-in page into a section: send the page there.
                    return self._htmx_to_login(request)
        response = self.get_response(request)
        user = getattr(request, "user", None)  # the view may have signed someone in or out
        if user is not None and user.is_authenticated:
            session = request.session
            if not isinstance(session.get(SIGNED_IN_AT), (int, float)):
                session[SIGNED_IN_AT] = now
                session[LAST_ACTIVITY_AT] = now
            elif not _is_background(request):
                last = session.get(LAST_ACTIVITY_AT)
                if not isinstance(last, (int, float)) or now - last >= ACTIVITY_RESOLUTION:
                    session[LAST_ACTIVITY_AT] = now
        return response

    @staticmethod
    def _htmx_to_login(request) -> HttpResponse:
        current = request.headers.get("HX-Current-URL", "")
        parts = urlsplit(current)
        next_path = (parts.path + (f"?{parts.query}" if parts.query else "")) or "/"
        response = HttpResponse(status=204)
        response["HX-Redirect"] = redirect_to_login(next_path).url
        return response
