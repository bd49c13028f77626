"""Canonical JSON: one byte string per value, so a hash over it is reproducible.

Sorted keys, no insignificant whitespace, UTF-8, no NaN or infinity. Decimals and
datetimes must be converted by the caller (to strings) so nothing depends on a
float's repr or a timezone's formatting.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def sha256_hex(text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()
