"""A deterministic, pickle-free container for named tensors (model states and updates).

Never ``torch.load`` bytes that crossed the network: it unpickles, and unpickling runs code.
Updates and global models travel in this format instead::

    b"FLT1"                      4 bytes, magic
    header length                8 bytes, unsigned little-endian
    header                       canonical JSON (UTF-8): {name: {"dtype", "shape", "offset",
                                 "length"}}, keys sorted, no spaces
    data                         the raw little-endian bytes of each tensor, C-contiguous, in
                                 sorted name order, back to back

``offset`` counts from the start of the data section. The same dict (whatever its key order,
device or memory layout) always packs to the same bytes, so :func:`state_dict_digest` is a
content address. :func:`unpack_tensors` checks everything before it builds a tensor and raises
:class:`MalformedTensorFile` (a ``ValueError``) saying what is wrong. Allowed dtypes:
float32, float64, float16, bfloat16, int64, int32 and bool.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "MAGIC",
    "MalformedTensorFile",
    "pack_tensors",
    "sha256_hex",
    "state_dict_digest",
    "state_to_cpu_float",
    "unpack_tensors",
]

MAGIC = b"FLT1"
_PREAMBLE = len(MAGIC) + 8
_MAX_NDIM = 32
_MAX_DIM = 2**48

#: Name in the header -> (torch dtype, bytes per element).
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 4),
    "float64": (torch.float64, 8),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
    "int64": (torch.int64, 8),
    "int32": (torch.int32, 4),
    "bool": (torch.bool, 1),
}
_NAMES = {dtype: name for name, (dtype, _) in DTYPES.items()}


class MalformedTensorFile(ValueError):
    """The bytes are not a valid tensor container; the message says why."""


def _check_byteorder() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RuntimeError("the tensor container needs a little-endian machine")


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise ``{name: tensor}``; equal dicts give equal bytes (see the module docstring)."""
    _check_byteorder()
    if not isinstance(tensors, Mapping):
        raise TypeError(f"pack_tensors needs a dict of tensors, got {type(tensors).__name__}")
    header: dict[str, dict[str, Any]] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.layout != torch.strided:
            raise TypeError(f"{name!r} is a {tensor.layout} tensor; only dense tensors pack")
        if tensor.dtype not in _NAMES:
            allowed = ", ".join(DTYPES)
            raise TypeError(f"{name!r} has dtype {tensor.dtype}, which does not pack ({allowed})")
        raw = _raw_bytes(tensor)
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "offset": offset,
            "length": len(raw),
        }
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return b"".join([MAGIC, len(head).to_bytes(8, "little"), head, *chunks])


def _bad(message: str) -> MalformedTensorFile:
    return MalformedTensorFile(f"malformed tensor file: {message}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, raw: object, data_len: int) -> tuple[str, list[int], int, int]:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "offset", "length"}:
        raise _bad(f"entry {name!r} must have exactly dtype, shape, offset and length")
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _bad(f"entry {name!r} has unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    shape = raw["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(_is_count(d) and d <= _MAX_DIM for d in shape)
    ):
        raise _bad(f"entry {name!r} has an invalid shape {shape!r}")
    offset, length = raw["offset"], raw["length"]
    if not _is_count(offset) or not _is_count(length):
        raise _bad(f"entry {name!r}: offset and length must be non-negative integers")
    expected = math.prod(shape) * DTYPES[dtype][1]
    if length != expected:
        raise _bad(
            f"entry {name!r}: length {length} does not match shape {shape} of {dtype} "
            f"({expected} bytes)"
        )
    if offset + length > data_len:
        raise _bad(
            f"entry {name!r}: bytes {offset}..{offset + length} are out of range "
            f"(the data section has {data_len} bytes)"
        )
    return dtype, shape, offset, length


def unpack_tensors(data: bytes, *, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Parse :func:`pack_tensors` output into fresh CPU tensors, checking every field.

    Raises :class:`MalformedTensorFile` for: more than ``max_bytes`` bytes, wrong magic,
    truncated data, a header that is not a JSON object, an unknown dtype, a length that does not
    match the shape, offsets out of range, overlapping tensors, unreferenced bytes between
    tensors, trailing garbage, and bool tensors holding bytes other than 0 and 1.
    """
    _check_byteorder()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"unpack_tensors needs bytes, got {type(data).__name__}")
    data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise _bad(f"{len(data)} bytes is over the limit of max_bytes={max_bytes}")
    if len(data) < _PREAMBLE:
        if not MAGIC.startswith(data[: len(MAGIC)]):
            raise _bad(f"wrong magic {data[:4]!r} (expected {MAGIC!r})")
        raise _bad(f"truncated: {len(data)} bytes, shorter than the {_PREAMBLE}-byte preamble")
    if data[:4] != MAGIC:
        raise _bad(f"wrong magic {data[:4]!r} (expected {MAGIC!r})")
    head_len = int.from_bytes(data[4:_PREAMBLE], "little")
    if head_len > len(data) - _PREAMBLE:
        raise _bad(
            f"truncated: the header claims {head_len} bytes but only "
            f"{len(data) - _PREAMBLE} follow the preamble"
        )
    head_end = _PREAMBLE + head_len
    try:
        header = json.loads(data[_PREAMBLE:head_end].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, giant numbers
        raise _bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(f"header must be a JSON object of tensors, got {type(header).__name__}")
    payload = memoryview(data)[head_end:]
    entries = {name: _entry(name, raw, len(payload)) for name, raw in header.items()}

    end = 0
    for name, (_, _, offset, length) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        if length == 0:
            continue
        if offset < end:
            raise _bad(f"entry {name!r} at byte {offset} overlaps the previous tensor")
        if offset > end:
            raise _bad(f"bytes {end}..{offset} of the data section belong to no tensor")
        end = offset + length
    if end < len(payload):
        raise _bad(f"trailing garbage: {len(payload) - end} bytes after the last tensor")

    out: dict[str, torch.Tensor] = {}
    for name in sorted(entries):
        dtype, shape, offset, length = entries[name]
        torch_dtype = DTYPES[dtype][0]
        if length == 0:
            out[name] = torch.empty(shape, dtype=torch_dtype)
            continue
        chunk = bytearray(payload[offset : offset + length])
        if dtype == "bool" and chunk.translate(None, b"\x00\x01"):
            raise _bad(f"bool entry {name!r} holds bytes other than 0 and 1")
        out[name] = torch.frombuffer(chunk, dtype=torch_dtype).reshape(shape)
    return out


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of ``data``: the content address of an artifact."""
    return hashlib.sha256(data).hexdigest()


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of ``pack_tensors(state)``."""
    return sha256_hex(pack_tensors(state))


def state_to_cpu_float(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``state`` with floating-point entries as float32.

    Non-floating entries (``num_batches_tracked`` and the like) are copied unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        out[name] = tensor.clone().contiguous()
    return out
