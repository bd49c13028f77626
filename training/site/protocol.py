"""The site protocol: what a site worker and the central server must agree on to talk.

One constant for both sides. The central server serves the site API under
:data:`SITE_API_PATH` (``/api/site/v1/``) and refuses a request whose
:data:`PROTOCOL_HEADER` does not name a protocol it speaks (:data:`SUPPORTED_PROTOCOLS`); the
worker sends :data:`SITE_PROTOCOL` on every request. The version changes when a request or an
answer changes in a way the other side's current release would misread (a field that
changes meaning, a check added to the upload, a new required header); the URL's version
segment changes with it, so an old worker gets a 404 at the old path and a refusal that says
what to upgrade at the new one, never a half-understood answer.

It lives here, in the worker's package, because the worker must not import the server
(.importlinter, ``site-worker``) while the server (``training.rounds``) may import the
worker's package.
"""

from __future__ import annotations

import base64
import binascii
import json
from importlib import metadata

__all__ = [
    "LEDGER_CHECKPOINT_HEADER",
    "LEDGER_SINCE_PARAMETER",
    "LEDGER_WITNESS_HEADER",
    "PROTOCOL_HEADER",
    "SITE_API_PATH",
    "SITE_API_SEGMENT",
    "SITE_PROTOCOL",
    "SUPPORTED_PROTOCOLS",
    "decode_ledger_header",
    "encode_ledger_header",
    "protocol_refusal",
    "worker_version",
]

#: The site protocol this release speaks (the worker sends it; the server expects it).
SITE_PROTOCOL = 1
#: The protocols this release's server accepts from a worker.
SUPPORTED_PROTOCOLS = frozenset({SITE_PROTOCOL})
#: The request header in which a worker states its protocol.
PROTOCOL_HEADER = "X-Site-Protocol"
#: The site API's path under the API root (``/api/``), included once by ``training.api_urls``.
SITE_API_SEGMENT = f"site/v{SITE_PROTOCOL}/"
#: The site API's path from the server's root, as the worker's client calls it.
SITE_API_PATH = "/api/" + SITE_API_SEGMENT

#: The round model request's query parameter asking for the ledger's checkpoint alongside the
#: model: the size of the last checkpoint the site saw (a training task's check of the ledger
#: then costs no request of its own; ``training.site.ledger_witness``).
LEDGER_SINCE_PARAMETER = "ledger_since"
#: The round model answer's header carrying what ``GET ledger/checkpoint/?since=`` answers.
LEDGER_CHECKPOINT_HEADER = "X-Ledger-Checkpoint"
#: The upload's header carrying the site's cosignature, as ``POST ledger/checkpoint/witness/``
#: takes it; the upload's answer says what became of it (``ledger_witness``).
LEDGER_WITNESS_HEADER = "X-Ledger-Witness"

_DISTRIBUTION = "fl-consortium"


def encode_ledger_header(value: dict) -> str:
    """A JSON object as a header value: compact JSON in standard base64 (the proof's hashes
    and the PEM key hold nothing a header could not, but the note's newlines would break it)."""
    text = json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def decode_ledger_header(raw: str) -> dict:
    """:func:`encode_ledger_header`'s inverse; ``ValueError`` saying what is wrong with a value
    that is not base64 of a JSON object."""
    try:
        value = json.loads(base64.b64decode(raw.strip(), validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not base64 of JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def protocol_refusal(sent: str | None) -> str | None:
    """Why a request stating protocol ``sent`` (the header's raw value, None when absent) is
    refused, saying which side to upgrade; None when it is accepted."""
    speaks = ", ".join(str(v) for v in sorted(SUPPORTED_PROTOCOLS))
    value = (sent or "").strip()
    if not value:
        return (
            f"The request does not state its site protocol ({PROTOCOL_HEADER} header). This "
            f"server speaks site protocol {speaks}: run a site worker release that speaks it "
            "(it sends the header on every request)."
        )
    if not value.isdigit():
        return (
            f"{PROTOCOL_HEADER} must be a whole number, not {value[:20]!r}. This server speaks "
            f"site protocol {speaks}."
        )
    number = int(value)
    if number in SUPPORTED_PROTOCOLS:
        return None
    if number < min(SUPPORTED_PROTOCOLS):
        return (
            f"This site worker speaks site protocol {number}; this server speaks site protocol "
            f"{speaks}. Upgrade the site worker to a release that speaks site protocol {speaks}."
        )
    return (
        f"This site worker speaks site protocol {number}, newer than this server's ({speaks}). "
        "Upgrade the central server, or run a site worker release that speaks site protocol "
        f"{speaks}."
    )


def worker_version() -> str:
    """This release's version (the installed distribution's), as the heartbeat reports it."""
    try:
        return metadata.version(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
