"""Sign-in lockout by account and by address, and the client's address behind a trusted proxy.

django-axes, as shipped, locks by address only, and with one limit. Behind the reverse proxy every
request came from the proxy (or, with Daphne's ``--proxy-headers``, from whatever the client wrote
in ``X-Forwarded-For``), and behind a hospital's NAT a whole hospital shares one address: ten bad
passwords from anyone there locked out everyone, while guesses at one account spread over many
addresses were never limited. So failures are counted twice (``AXES_LOCKOUT_PARAMETERS =
["username", "ip_address"]``):

- per account, from any address: ``AXES_FAILURE_LIMIT`` failures lock the account, wherever the
  guesses come from;
- per client address, for any account: ``AXES_ADDRESS_FAILURE_LIMIT`` failures lock the address
  (one source trying a few passwords on many accounts). This limit is higher, so that the
  ordinary mistakes of many people behind one NAT do not lock them all out.

Both locks end ``AXES_COOLOFF_TIME`` after the failures that caused them; failures while locked
are not counted (``AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False``), so nobody can keep
someone else's account locked by guessing on, and a reset by email lifts the account's lock
(:func:`clear_account_lock`). A successful sign-in clears only that account's failures from that
address: clearing everything its address or account had (axes' default) would let anyone with an
account of their own wipe the count of their guesses at someone else's.

The client's address is ``REMOTE_ADDR``, unless the peer is one of ``TRUSTED_PROXIES``: then it is
the nearest address in ``X-Forwarded-For`` that is not a trusted proxy, read from the right (the
entries on the left are whatever the client chose to send).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

from axes.handlers.database import AxesDatabaseHandler
from axes.helpers import get_client_username, get_cool_off
from axes.models import AccessAttempt
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone

__all__ = [
    "AccountAndAddressHandler",
    "Lock",
    "clear_account_lock",
    "client_ip_address",
    "current_lock",
    "lockout_response",
    "parse_networks",
]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: list[str] | tuple[str, ...]) -> tuple[_Network, ...]:
    """``TRUSTED_PROXIES`` as networks (an address is a network of one). Raises ``ValueError``
    naming the entry that is neither, so settings can refuse it at start-up."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address or network (e.g. 127.0.0.1 or 10.0.0.0/8)"
            ) from None
    return tuple(networks)


@lru_cache(maxsize=8)
def _trusted(values: tuple[str, ...]) -> tuple[_Network, ...]:
    return parse_networks(values)


def _address(text: str) -> _Address | None:
    """An address as a proxy writes it (``1.2.3.4``, ``1.2.3.4:5678``, ``[2001:db8::1]:443``),
    or ``None`` for anything else. IPv4 written as IPv6 (``::ffff:1.2.3.4``) is read as IPv4, so
    one client is counted once however the hop before us wrote it."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def client_ip_address(request: HttpRequest) -> str | None:
    """``AXES_CLIENT_IP_CALLABLE``: the address failures are counted against.

    ``X-Forwarded-For`` is read only when the peer is a trusted proxy, and then from the right:
    each trusted proxy appends the address it was reached from, so the first untrusted address
    from the right is the client's; what stands left of it was written by the client and is
    ignored. With no trusted proxies (the default) the header is never read.
    """
    peer = request.META.get("REMOTE_ADDR")
    trusted = _trusted(tuple(getattr(settings, "TRUSTED_PROXIES", ())))
    current = _address(peer) if peer else None
    if current is None or not trusted:
        return peer
    if not any(current in network for network in trusted):
        return str(current)
    hops = request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            # Not an address: a trusted proxy never writes this, so stop at the last address
            # one of them vouched for.
            break
        current = address
        if not any(current in network for network in trusted):
            break
    return str(current)


def _limits() -> dict[str, int]:
    account = int(settings.AXES_FAILURE_LIMIT)
    return {
        "username": account,
        "ip_address": int(getattr(settings, "AXES_ADDRESS_FAILURE_LIMIT", account)),
    }


@dataclass(frozen=True)
class Lock:
    """What is locked (``"account"`` or ``"address"``) and when it opens again."""

    kind: str
    until: datetime


def _attempts(parameter: str, value: str | None, now: datetime, cool_off: timedelta | None):
    attempts = AccessAttempt.objects.filter(**{parameter: value})
    if cool_off is not None:
        attempts = attempts.filter(attempt_time__gte=now - cool_off)
    return attempts


def _failures(parameter: str, value: str | None, now: datetime, cool_off: timedelta | None) -> int:
    rows = _attempts(parameter, value, now, cool_off).values_list("failures_since_start", flat=True)
    return sum(rows)


def _opens_at(
    parameter: str, value: str | None, limit: int, now: datetime, cool_off: timedelta
) -> datetime | None:
    """When the count for ``value`` falls under ``limit``, or ``None`` if it is under already.

    Each stored row holds the failures of one account from one address, dated by the latest;
    a row stops counting ``cool_off`` after that date. So the lock opens when enough of the
    oldest rows have aged out to bring the count under the limit.
    """
    rows = list(
        _attempts(parameter, value, now, cool_off)
        .order_by("attempt_time")
        .values_list("attempt_time", "failures_since_start")
    )
    total = sum(failures for _, failures in rows)
    if total < limit:
        return None
    for attempt_time, failures in rows:
        total -= failures
        if total < limit:
            return attempt_time + cool_off
    return rows[-1][0] + cool_off  # not reached: a limit is at least 1


def current_lock(request: HttpRequest, credentials: dict | None = None) -> Lock | None:
    """The lock that refuses this sign-in, the account's first, or ``None``."""
    cool_off = get_cool_off(request)
    if cool_off is None:
        return None
    now = getattr(request, "axes_attempt_time", None) or timezone.now()
    values = {
        "username": get_client_username(request, credentials),
        "ip_address": getattr(request, "axes_ip_address", None) or client_ip_address(request),
    }
    limits = _limits()
    for parameter, kind in (("username", "account"), ("ip_address", "address")):
        if values[parameter] is None:
            continue
        opens = _opens_at(parameter, values[parameter], limits[parameter], now, cool_off)
        if opens is not None:
            return Lock(kind=kind, until=opens)
    return None


class AccountAndAddressHandler(AxesDatabaseHandler):
    """``AXES_HANDLER``: axes' database handler with a limit per lockout parameter.

    axes compares one count with one limit (``AXES_FAILURE_LIMIT``), for every parameter. Here
    the address's count is scaled to the account's limit before the comparison, so each
    parameter reaches "locked" at its own limit: ``floor(n * account / address) >= account``
    exactly when ``n >= address``.
    """

    def get_failures(self, request, credentials: dict | None = None) -> int:
        cool_off = get_cool_off(request)
        now = getattr(request, "axes_attempt_time", None) or timezone.now()
        limits = _limits()
        username = get_client_username(request, credentials)
        account = _failures("username", username, now, cool_off) if username is not None else 0
        by_address = _failures("ip_address", request.axes_ip_address, now, cool_off)
        scaled = math.floor(by_address * limits["username"] / limits["ip_address"])
        return max(account, scaled)

    def reset_user_attempts(self, request, credentials: dict | None = None) -> int:
        """On a successful sign-in: forget this account's failures from this address only."""
        username = get_client_username(request, credentials)
        count, _ = AccessAttempt.objects.filter(
            username=username, ip_address=request.axes_ip_address
        ).delete()
        return count


def clear_account_lock(username: str) -> int:
    """Forget the failures counted against ``username`` (after its owner reset the password by
    email, which proves more than a password would). Returns the rows removed."""
    count, _ = AccessAttempt.objects.filter(username=username).delete()
    return count


def _wants_json(request: HttpRequest) -> bool:
    accept = request.headers.get("Accept", "")
    return request.headers.get("X-Requested-With") == "XMLHttpRequest" or (
        "application/json" in accept and "text/html" not in accept
    )


def lockout_response(
    request: HttpRequest, original_response=None, credentials: dict | None = None
) -> HttpResponse:
    """``AXES_LOCKOUT_CALLABLE``: a 429 that says what is locked and until when, as a page or,
    for a client that asks for JSON, as JSON; ``Retry-After`` carries the seconds to wait."""
    lock = current_lock(request, credentials)
    now = timezone.now()
    status = settings.AXES_HTTP_RESPONSE_CODE
    if lock is None:
        # Refused by the backend a moment before the count aged out: say so without a time.
        lock = Lock(kind="account", until=now)
    wait = max(0, math.ceil((lock.until - now).total_seconds()))
    what = "this account" if lock.kind == "account" else "sign-ins from your network address"
    detail = (
        f"Too many failed sign-ins: {what} is locked until "
        f"{timezone.localtime(lock.until):%Y-%m-%d %H:%M %Z}."
    )
    if _wants_json(request):
        response: HttpResponse = JsonResponse(
            {
                "detail": detail,
                "code": "locked_out",
                "locked": lock.kind,
                "until": lock.until.isoformat(),
                "retry_after_seconds": wait,
            },
            status=status,
        )
    else:
        response = render(
            request,
            "registration/locked_out.html",
            {"lock": lock, "wait_minutes": math.ceil(wait / 60)},
            status=status,
        )
    response["Retry-After"] = str(wait)
    return response
