"""A deterministic, pickle-free container for named tensors (model states and updates).

Never ``torch.load`` bytes that crossed the network: it unpickles, and unpickling runs code.
Updates and global models travel as `safetensors <https://github.com/huggingface/safetensors>`_
files instead, a format with no code in it, audited, and read by every tensor library (anyone
can open a stored model or update with ``safetensors.torch.load``)::

    header length                8 bytes, unsigned little-endian
    header                       JSON (UTF-8): {name: {"dtype", "shape", "data_offsets"}},
                                 padded with spaces to a multiple of 8 bytes
    data                         the raw little-endian bytes of each tensor, C-contiguous,
                                 back to back; data_offsets = [begin, end) in this section

The stored digest of a file is a content address recorded in the ledger, so the bytes must
depend on the tensors alone. :func:`pack_tensors` writes them itself rather than through the
library's writer, whose choices (order, padding) belong to a release: tensors in order of
element size (largest first, so each tensor is aligned for readers that map the file), then
:data:`_ORDER` within a size, then name; the header's entries in that order with their keys
as above, no spaces, no ``__metadata__``. Those are the reference writer's choices too, so
today ``safetensors.torch.save`` gives the very same bytes (tests/fl/test_fl_serialization.py). The
same dict, whatever its key order, device or memory layout, always packs to the same bytes,
so :func:`state_dict_digest` is a content address.

:func:`unpack_tensors` reads safetensors and the engine's earlier format, ``FLT1`` (artifacts
stored before the change: their digests were taken over those bytes and still verify). It
tells them apart by the first four bytes, ``b"FLT1"``: a safetensors file starting so would
declare a header of over 800 MB, beyond safetensors' 100 MB limit. It checks every field
itself first (so that the message says what is wrong, and the dtype allowlist and shape
limits hold), then lets the safetensors library, the audited parser, build the tensors; any
refusal of either is a :class:`MalformedTensorFile` (a ``ValueError``). Allowed dtypes:
float32, float64, float16, bfloat16, int64, int32 and bool. The old layout was::

    b"FLT1"                      4 bytes, magic
    header length                8 bytes, unsigned little-endian
    header                       canonical JSON: {name: {"dtype", "shape", "offset", "length"}},
                                 keys sorted, no spaces, dtypes by torch name ("float32")
    data                         each tensor's bytes in sorted name order, back to back
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import safetensors
import torch

__all__ = [
    "DTYPES",
    "LEGACY_MAGIC",
    "MAX_HEADER_BYTES",
    "MalformedTensorFile",
    "pack_tensors",
    "sha256_hex",
    "state_dict_digest",
    "state_to_cpu_float",
    "unpack_tensors",
]

#: The first bytes of a file in the engine's earlier format (read, never written).
LEGACY_MAGIC = b"FLT1"
#: safetensors' own limit on the header (the library refuses larger ones).
MAX_HEADER_BYTES = 100_000_000
_LEGACY_PREAMBLE = len(LEGACY_MAGIC) + 8
_MAX_NDIM = 32
_MAX_DIM = 2**48
_METADATA = "__metadata__"
#: The library's parser (its stub leaves it untyped): ``[(name, {"dtype", "shape", "data"})]``
#: with ``data`` a fresh bytearray.
_deserialize: Callable[[bytes], list[tuple[str, dict[str, Any]]]] = safetensors.deserialize

#: Name in an FLT1 header -> (torch dtype, bytes per element); the allowlist of both formats.
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
#: The same dtypes under their safetensors names.
_SAFETENSORS_NAMES = {
    "float32": "F32",
    "float64": "F64",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "bool": "BOOL",
}
_FROM_SAFETENSORS = {st: name for name, st in _SAFETENSORS_NAMES.items()}
#: Within one element size, the order of the data section (the reference writer's: I64 before
#: F64, F32 before I32, BF16 before F16).
_ORDER = {
    "int64": 0,
    "float64": 1,
    "float32": 2,
    "int32": 3,
    "bfloat16": 4,
    "float16": 5,
    "bool": 6,
}


class MalformedTensorFile(ValueError):
    """The bytes are not a valid tensor container; the message says why."""


def _check_byteorder() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RuntimeError("the tensor container needs a little-endian machine")


# --- Writing ---------------------------------------------------------------------------------


def _raw_view(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    """The tensor's bytes, C-contiguous on the CPU, without a copy when they already are (the
    one copy is ``bytes.join`` in :func:`pack_tensors`)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _check_entry(name: object, tensor: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be strings, got {name!r}")
    if name == _METADATA:
        raise ValueError(f"{_METADATA!r} is reserved by safetensors and cannot name a tensor")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"tensor name {name!r} is not valid UTF-8 text") from None
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name!r} is a {tensor.layout} tensor; only dense tensors pack")
    if tensor.dtype not in _NAMES:
        raise TypeError(
            f"{name!r} has dtype {tensor.dtype}, which does not pack ({', '.join(DTYPES)})"
        )
    return _NAMES[tensor.dtype]


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise ``{name: tensor}`` as safetensors; equal dicts give equal bytes (see the module
    docstring for the order that makes them so)."""
    _check_byteorder()
    if not isinstance(tensors, Mapping):
        raise TypeError(f"pack_tensors needs a dict of tensors, got {type(tensors).__name__}")
    kinds = {name: _check_entry(name, tensor) for name, tensor in tensors.items()}
    order = sorted(kinds, key=lambda n: (-DTYPES[kinds[n]][1], _ORDER[kinds[n]], n))
    header: dict[str, dict[str, Any]] = {}  # in data order: json keeps insertion order
    chunks: list[Any] = []
    offset = 0
    for name in order:
        tensor = tensors[name]
        raw = _raw_view(tensor)
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[kinds[name]],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        chunks.append(raw)
        offset += raw.nbytes
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return b"".join([len(head).to_bytes(8, "little"), head, *chunks])


# --- Reading ---------------------------------------------------------------------------------


def _bad(message: str) -> MalformedTensorFile:
    return MalformedTensorFile(f"malformed tensor file: {message}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object with a key twice means different things to different readers: refuse it."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _bad(f"the header names {key!r} twice")
        out[key] = value
    return out


def _load_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except MalformedTensorFile:
        raise
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, giant numbers
        raise _bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(f"header must be a JSON object of tensors, got {type(header).__name__}")
    return header


def _check_shape(name: str, shape: object) -> list[int]:
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(_is_count(d) and d <= _MAX_DIM for d in shape)
    ):
        raise _bad(f"entry {name!r} has an invalid shape {shape!r}")
    return shape


def _check_span(
    name: str, dtype: str, shape: list[int], offset: int, length: int, size: int
) -> None:
    expected = math.prod(shape) * DTYPES[dtype][1]
    if length != expected:
        raise _bad(
            f"entry {name!r}: length {length} does not match shape {shape} of {dtype} "
            f"({expected} bytes)"
        )
    if offset + length > size:
        raise _bad(
            f"entry {name!r}: bytes {offset}..{offset + length} are out of range "
            f"(the data section has {size} bytes)"
        )


_Entry = tuple[str, list[int], int, int]  # dtype (FLT1 name), shape, offset, length


def _legacy_entry(name: str, raw: object, size: int) -> _Entry:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "offset", "length"}:
        raise _bad(f"entry {name!r} must have exactly dtype, shape, offset and length")
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _bad(f"entry {name!r} has unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    shape = _check_shape(name, raw["shape"])
    offset, length = raw["offset"], raw["length"]
    if not _is_count(offset) or not _is_count(length):
        raise _bad(f"entry {name!r}: offset and length must be non-negative integers")
    _check_span(name, dtype, shape, offset, length, size)
    return dtype, shape, offset, length


def _safetensors_entry(name: str, raw: object, size: int) -> _Entry:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise _bad(f"entry {name!r} must have exactly dtype, shape and data_offsets")
    st_dtype = raw["dtype"]
    if not isinstance(st_dtype, str) or st_dtype not in _FROM_SAFETENSORS:
        allowed = ", ".join(_FROM_SAFETENSORS)
        raise _bad(f"entry {name!r} has dtype {st_dtype!r}, which is not allowed ({allowed})")
    dtype = _FROM_SAFETENSORS[st_dtype]
    shape = _check_shape(name, raw["shape"])
    offsets = raw["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise _bad(f"entry {name!r}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise _bad(f"entry {name!r}: data_offsets [{begin}, {end}] end before they begin")
    _check_span(name, dtype, shape, begin, end - begin, size)
    return dtype, shape, begin, end - begin


def _check_layout(entries: dict[str, _Entry], size: int) -> None:
    """The tensors tile the data section exactly: no overlap, no gap, nothing after."""
    end = 0
    for name, (_, _, offset, length) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        if length == 0:
            continue
        if offset < end:
            raise _bad(f"entry {name!r} at byte {offset} overlaps the previous tensor")
        if offset > end:
            raise _bad(f"bytes {end}..{offset} of the data section belong to no tensor")
        end = offset + length
    if end < size:
        raise _bad(f"trailing garbage: {size - end} bytes after the last tensor")


def _tensor(name: str, dtype: str, shape: list[int], chunk: bytearray) -> torch.Tensor:
    torch_dtype = DTYPES[dtype][0]
    if not chunk:
        return torch.empty(shape, dtype=torch_dtype)
    if dtype == "bool" and chunk.translate(None, b"\x00\x01"):
        raise _bad(f"bool entry {name!r} holds bytes other than 0 and 1")
    return torch.frombuffer(chunk, dtype=torch_dtype).reshape(shape)


def _unpack_legacy(data: bytes) -> dict[str, torch.Tensor]:
    if len(data) < _LEGACY_PREAMBLE:
        raise _bad(
            f"truncated: {len(data)} bytes, shorter than the {_LEGACY_PREAMBLE}-byte preamble"
        )
    head_len = int.from_bytes(data[4:_LEGACY_PREAMBLE], "little")
    if head_len > len(data) - _LEGACY_PREAMBLE:
        raise _bad(
            f"truncated: the header claims {head_len} bytes but only "
            f"{len(data) - _LEGACY_PREAMBLE} follow the preamble"
        )
    head_end = _LEGACY_PREAMBLE + head_len
    header = _load_header(data[_LEGACY_PREAMBLE:head_end])
    payload = memoryview(data)[head_end:]
    entries = {name: _legacy_entry(name, raw, len(payload)) for name, raw in header.items()}
    _check_layout(entries, len(payload))
    out: dict[str, torch.Tensor] = {}
    for name in sorted(entries):
        dtype, shape, offset, length = entries[name]
        out[name] = _tensor(name, dtype, shape, bytearray(payload[offset : offset + length]))
    return out


def _unpack_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    if len(data) < 8:
        raise _bad(f"truncated: {len(data)} bytes, shorter than safetensors' 8-byte header length")
    head_len = int.from_bytes(data[:8], "little")
    if head_len > MAX_HEADER_BYTES:
        raise _bad(
            f"not a safetensors (nor an FLT1) file: its header length {head_len} is over "
            f"safetensors' limit of {MAX_HEADER_BYTES} bytes"
        )
    if head_len > len(data) - 8:
        raise _bad(
            f"truncated: the header claims {head_len} bytes but only {len(data) - 8} follow "
            "the header length"
        )
    if data[8:9] != b"{":
        raise _bad("not a safetensors (nor an FLT1) file: the header does not start with '{'")
    header = _load_header(data[8 : 8 + head_len])
    metadata = header.pop(_METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(f"{_METADATA} must be a JSON object of strings")
    size = len(data) - 8 - head_len
    entries = {name: _safetensors_entry(name, raw, size) for name, raw in header.items()}
    _check_layout(entries, size)

    # Every field checked: now the audited parser builds the tensors (one copy each, into a
    # writable bytearray that the tensor keeps).
    try:
        parsed = dict(_deserialize(data))
    except safetensors.SafetensorError as exc:
        raise _bad(f"the safetensors library refused it ({exc})") from None
    if set(parsed) != set(entries):  # pragma: no cover - both parsers read the same header
        raise _bad("the safetensors library read other tensors than the header names")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(entries):
        dtype, shape, _, _ = entries[name]
        chunk = parsed[name]["data"]
        out[name] = _tensor(name, dtype, shape, chunk)
    return out


def unpack_tensors(data: bytes, *, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Parse a safetensors file (or an FLT1 one, stored before) into fresh, writable CPU tensors
    keyed in name order, checking every field.

    Raises :class:`MalformedTensorFile` for: more than ``max_bytes`` bytes, bytes that are
    neither format, truncated data, a header that is not a JSON object or names a tensor twice,
    a dtype outside the allowlist, a shape of over 32 dimensions or 2**48 elements a side, a
    length that does not match the shape, offsets out of range, overlapping tensors,
    unreferenced bytes between tensors, trailing garbage, and bool tensors holding bytes other
    than 0 and 1. Non-finite floats are read as they are (the update intake refuses them).
    """
    _check_byteorder()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"unpack_tensors needs bytes, got {type(data).__name__}")
    data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise _bad(f"{len(data)} bytes is over the limit of max_bytes={max_bytes}")
    if data[: len(LEGACY_MAGIC)] == LEGACY_MAGIC:
        return _unpack_legacy(data)
    return _unpack_safetensors(data)


# --- Digests and copies ----------------------------------------------------------------------


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
