"""Compiled loops for the engine's hot paths: the masked FedAvg add and the privacy pipeline.

Why compiled: every eager torch or numpy call reads and writes its whole operand, so a filter that
needs "compare, count, gather, mask, clip, scale, add noise" pays one memory pass per verb. On a
10-million-value update a pass costs about as much as the whole aggregation of that update, and
the benchmarks' targets (docs/performance.md, "Aggregation" and "Privacy filters") leave room for
only a few passes. Each kernel here does in one pass what took three to six eager calls.

numba (a well-kept LLVM-based compiler for numeric Python, part of the ``worker`` extra) compiles
them on first use and caches the machine code beside this file (``cache=True``), so a site worker
pays the compilation once per installation, not once per process. Every kernel is
``nogil=True`` and works on a ``[start, end)`` slice of flat arrays: the callers split the work
into chunks on a small thread pool (:func:`run_chunks`), which both uses the cores and keeps the
results independent of the thread count. No kernel allocates memory proportional to its input.

Conventions: a *mask* is a flat ``uint8`` array (a bool tensor's bytes), 1 where the coordinate
is shared; ``has_mask`` False means every coordinate is shared (the mask argument is then
ignored: pass any uint8 array). A *score* is ``|value|`` for a shared coordinate and ``-1`` for
an unshared one, so unshared coordinates rank below every shared one.

Hand-written (docs/architecture.md, section 7): no library fuses these particular steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from numba import njit

__all__ = [
    "CHUNK",
    "band_scan",
    "band_sums",
    "box_muller_radius",
    "box_muller_uniforms",
    "box_muller_wide_uniforms",
    "laplace_magnitudes",
    "laplace_wide_uniforms",
    "chunk_of",
    "chunk_size",
    "chunk_starts",
    "executor",
    "finish_values",
    "keep_at_least",
    "masked_accumulate",
    "run_chunks",
    "shared_norms",
]

#: Coordinates per task on the pool. Large on purpose: each task's dispatch takes the GIL, and on
#: a 16-thread pool 64 tasks of 160k values made the masked FedAvg add twice as slow as 10 tasks
#: of 1M (hand-offs between sixteen threads waiting for the GIL).
CHUNK = 1 << 20

_T = TypeVar("_T")

#: Flat float32 values (an update, scores, noise draws).
Floats = npt.NDArray[np.float32]
#: A flat mask: a bool tensor's bytes, 1 where the coordinate is shared.
MaskBytes = npt.NDArray[np.uint8]
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    """The engine's one thread pool (sized to torch's intra-op threads), shared by the kernels
    and the noise sampler so two pools never compete for the cores."""
    global _pool
    with _pool_lock:
        if _pool is None:
            import torch  # lazy: CUDA must not initialise before a worker forks

            _pool = ThreadPoolExecutor(
                max_workers=max(1, torch.get_num_threads()), thread_name_prefix="fl-kernel"
            )
        return _pool


def chunk_size(n: int) -> int:
    """Coordinates per task for an array of ``n`` (:data:`CHUNK`). Every pass over the same
    array uses the same chunks, so per-chunk counts from one pass line up with the next."""
    return CHUNK


def chunk_starts(n: int) -> range:
    return range(0, n, chunk_size(n))


def chunk_of(positions: npt.NDArray[np.integer[Any]], n: int) -> npt.NDArray[np.integer[Any]]:
    """The chunk index of each position in an array of ``n``."""
    return positions // chunk_size(n)


def run_chunks(work: Callable[[int, int], _T], n: int) -> list[_T]:
    """``[work(start, end) for each chunk]``, on the pool when there is more than one chunk."""
    size = chunk_size(n)
    starts = range(0, n, size)
    if len(starts) <= 1:
        return [work(s, min(s + size, n)) for s in starts]
    return list(executor().map(lambda s: work(s, min(s + size, n)), starts))


def concat(parts: Iterable[npt.NDArray[Any]], dtype: type[np.generic]) -> npt.NDArray[Any]:
    parts = list(parts)
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


# Writing the loops: every kernel first slices its ``[start, end)`` views and loops over
# ``range(view.size)``; a loop over ``range(start, end)`` indexing the full array is several times
# slower, because numba must then allow for negative (wrap-around) indices and LLVM no longer
# vectorises it. Data-dependent choices are written as selects, not branches (a 40/60 branch
# mispredicts constantly); the one rare branch left (gathering the band) tests a single
# comparison first.

#: Values per block of the band scan: its vectorised counting loop and its gathering loop both
#: read the block while it is in the L1 cache.
SCAN_BLOCK = 4096
_FASTMATH = {"reassoc", "contract"}  # lets LLVM vectorise the float64 sums


# --- aggregation ---------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def masked_accumulate(
    acc: npt.NDArray[np.floating[Any]],
    coord: npt.NDArray[np.floating[Any]],
    value: Floats,
    mask: MaskBytes,
    weight: np.floating[Any],
    start: int,
    end: int,
) -> None:  # pragma: no cover - jitted
    """``acc += weight * mask * value`` and ``coord += weight * mask`` over ``[start, end)``.

    One pass over the five arrays instead of torch's convert-mask, add, multiply-add.
    """
    a, c, v, m = acc[start:end], coord[start:end], value[start:end], mask[start:end]
    w = weight  # pass it in the accumulator's dtype (numpy scalar) to keep the loop in it
    for i in range(a.size):
        mw = w * m[i]
        a[i] += mw * v[i]
        c[i] += mw


# --- order statistics ------------------------------------------------------------------------


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _block_stats(
    v: Floats,
    m: MaskBytes,
    has_mask: bool,
    floor: np.float32,
    lo1: np.float32,
    hi1: np.float32,
    lo2: np.float32,
    hi2: np.float32,
    sum_lo: np.float32,
    flags: MaskBytes,
) -> tuple[np.int64, np.int64, np.int64, float, float]:  # pragma: no cover
    """Counts and sums for one block, and ``flags[i] = 1`` where the score is in either
    bracket: branch-free, so LLVM vectorises it."""
    # int64 counters, as numba makes of a plain 0 (same machine code): typed so, a bool adds up
    # to an int64 in the checker's view too.
    ge1 = np.int64(0)
    ge2 = np.int64(0)
    above2 = np.int64(0)
    sumsq = 0.0
    l1 = 0.0
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for i in range(v.size):
        s: np.float32 = abs(v[i])
        s = s if s >= floor else -one
        if has_mask:
            keep = np.float32(m[i] != 0)
            s = s * keep + (keep - one)  # -1 where unshared
        ge1 += s >= lo1
        ge2 += s >= lo2
        above2 += s > hi2
        flags[i] = ((s >= lo1) & (s <= hi1)) | ((s >= lo2) & (s <= hi2))
        t = np.float64(s if (s > sum_lo) & (s < lo2) else zero)
        sumsq += t * t
        l1 += t
    return ge1, ge2, above2, sumsq, l1


@njit(nogil=True, cache=True)
def _block_gather(
    v: Floats,
    m: MaskBytes,
    has_mask: bool,
    floor: np.float32,
    flags: MaskBytes,
    base: int,
    idx_out: npt.NDArray[np.signedinteger[Any]],
    score_out: Floats,
    inside: int,
) -> int:  # pragma: no cover - jitted
    """Append the flagged scores of one block, eight flags at a time: most eight-byte words of
    flags are zero (the band holds a few percent of the scores), and skipping them is one
    well-predicted comparison. The output arrays need room for ``inside + v.size`` entries."""
    words = flags.view(np.uint64)
    for w in range(words.size):
        if words[w] == 0:
            continue
        for i in range(8 * w, min(8 * w + 8, v.size)):
            s = abs(v[i])
            if s < floor or (has_mask and m[i] == 0):
                s = np.float32(-1.0)
            # Written whatever the flag, kept only if flagged: no branch to mispredict.
            idx_out[inside] = base + i
            score_out[inside] = s
            inside += flags[i]
    return inside


@njit(nogil=True, cache=True)
def band_scan(
    values: Floats,
    mask: MaskBytes,
    has_mask: bool,
    floor: float,
    lo1: float,
    hi1: float,
    lo2: float,
    hi2: float,
    sum_lo: float,
    start: int,
    end: int,
    idx_out: npt.NDArray[np.signedinteger[Any]],
    score_out: Floats,
) -> tuple[int, np.int64, np.int64, np.int64, float, float]:  # pragma: no cover - jitted
    """Count the scores of ``values[start:end]`` against two brackets ``[lo1, hi1]`` and
    ``[lo2, hi2]`` (``lo1 <= lo2``, ``hi1 <= hi2``; pass the same one twice for one), and
    gather those inside either.

    Coordinates with ``|value| < floor`` count as unshared (see :func:`finish_values`). Writes
    the positions and scores of the gathered ones, in position order, to the front of
    ``idx_out``/``score_out`` (each at least ``end - start`` long) and returns
    ``(inside, count_ge_lo1, count_ge_lo2, count_above_hi2, sumsq, l1)``: the number
    gathered, the scores at least ``lo1``, at least ``lo2``, above ``hi2``, and the sum of
    squares and of the scores strictly between ``sum_lo`` and ``lo2``. The sums let a clip to
    a bound inside the second bracket know the clipped norm without another pass.
    """
    v = values[start:end]
    m = mask[start:end] if has_mask else mask[:1]
    floor32 = np.float32(floor)
    # Every score is at least -1, and float32 cannot hold an infinite edge's neighbours.
    lo1_32, lo2_32 = np.float32(max(lo1, -1.0)), np.float32(max(lo2, -1.0))
    hi1_32, hi2_32 = np.float32(min(hi1, 3.0e38)), np.float32(min(hi2, 3.0e38))
    sum_lo32 = np.float32(sum_lo)
    flags = np.zeros(SCAN_BLOCK, dtype=np.uint8)  # whole words: the tail stays 0
    inside = 0
    ge1 = np.int64(0)
    ge2 = np.int64(0)
    above2 = np.int64(0)
    sumsq = 0.0
    l1 = 0.0
    for b in range(0, v.size, SCAN_BLOCK):
        e = min(b + SCAN_BLOCK, v.size)
        vb = v[b:e]
        mb = m[b:e] if has_mask else m
        if e - b < SCAN_BLOCK:
            flags[:] = 0
        g1, g2, a2, sq, a1 = _block_stats(
            vb, mb, has_mask, floor32, lo1_32, hi1_32, lo2_32, hi2_32, sum_lo32, flags
        )
        ge1 += g1
        ge2 += g2
        above2 += a2
        sumsq += sq
        l1 += a1
        inside = _block_gather(
            vb, mb, has_mask, floor32, flags, start + b, idx_out, score_out, inside
        )
    return inside, ge1, ge2, above2, sumsq, l1


@njit(nogil=True, cache=True)
def keep_at_least(
    scores: Floats,
    mask: MaskBytes,
    has_mask: bool,
    kth: float,
    values: Floats,
    mask_out: MaskBytes,
    unshare: bool,
    start: int,
    end: int,
) -> int:  # pragma: no cover - jitted
    """Mark the coordinates whose score is at least ``kth``; returns how many.

    The score is ``|scores[i]|`` (``-1`` where ``mask`` says unshared). Writes ``mask_out``
    (uint8) and, with ``unshare``, sets ``values`` to 0 where a coordinate is not marked.
    ``scores`` may be ``values`` itself (top-k) or separate keys (random selection).
    """
    sc, out = scores[start:end], mask_out[start:end]
    m = mask[start:end] if has_mask else mask[:1]
    vals = values[start:end] if unshare else values[:1]
    k32 = np.float32(kth)
    kept = 0
    for i in range(sc.size):
        keep = abs(sc[i]) >= k32
        if has_mask:
            keep = keep & (m[i] != 0)
        out[i] = keep
        kept += keep
        if unshare:
            vals[i] = vals[i] * np.float32(keep)
    return kept


# --- norms and the final pass ------------------------------------------------------------------


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def shared_norms(
    values: Floats, floor: float, clip: float, start: int, end: int
) -> tuple[float, float]:  # pragma: no cover - jitted
    """``(sum of squares, sum of absolute values)`` of ``values[start:end]`` clipped to
    ``[-clip, clip]`` (pass ``inf`` for none), counting only ``|value| >= floor``. Unshared
    coordinates hold 0, so they add 0."""
    v = values[start:end]
    f = np.float32(floor)
    c = np.float32(min(clip, 3.0e38))
    sumsq = 0.0
    l1 = 0.0
    for i in range(v.size):
        s = abs(v[i])
        t = np.float64(min(s, c) if s >= f else np.float32(0.0))
        sumsq += t * t
        l1 += t
    return sumsq, l1


@njit(nogil=True, cache=True)
def finish_values(
    values: Floats,
    mask: MaskBytes,
    has_mask: bool,
    floor: float,
    clip: float,
    factor: float,
    noise: Floats,
    noise_at: int,
    mask_out: MaskBytes,
    start: int,
    end: int,
) -> int:  # pragma: no cover - jitted
    """``values = factor * clip(values) + noise`` on shared coordinates, 0 elsewhere, in place.

    A coordinate is shared where ``mask`` says so and ``|value| >= floor``: a top-k selection
    only records its threshold as ``floor``, and this pass, which writes the values anyway,
    applies it. With ``floor > 0`` the resulting shared set is written to ``mask_out`` (uint8,
    may be ``mask`` itself). ``clip`` bounds ``|values|`` first (``inf``: no bound). ``noise``
    is compact: one draw per shared coordinate, in order, this chunk's first at
    ``noise[noise_at]``, plus one spare slot at the end (read, never used, after the last
    shared coordinate). Pass an empty ``noise`` for none. Returns the index after this chunk's
    last draw.
    """
    v = values[start:end]
    m = mask[start:end] if has_mask else mask[:1]
    selects = floor > 0
    out = mask_out[start:end] if selects else mask_out[:1]
    fl = np.float32(floor)
    f = np.float32(factor)
    c = np.float32(min(clip, 3.0e38))
    with_noise = noise.size > 0
    j = noise_at
    if not has_mask and not selects:
        if with_noise:
            z = noise[noise_at : noise_at + v.size]
            for i in range(v.size):
                v[i] = min(max(v[i], -c), c) * f + z[i]
            return j + v.size
        for i in range(v.size):
            v[i] = min(max(v[i], -c), c) * f
        return j
    # The common cases written out: LLVM does not unswitch the general loop below.
    if selects and not has_mask and not with_noise:  # top-k (and a clip), no noise
        for i in range(v.size):
            x = v[i]
            keep = abs(x) >= fl
            out[i] = keep
            v[i] = min(max(x, -c), c) * f if keep else np.float32(0.0)
        return j
    if selects and with_noise and not has_mask:  # top-k, clip, noise: the common pipeline
        for i in range(v.size):
            x = v[i]
            keep = abs(x) >= fl
            out[i] = keep
            x = min(max(x, -c), c) * f + noise[j]
            j += keep
            v[i] = x if keep else np.float32(0.0)
        return j
    for i in range(v.size):
        x = v[i]
        keep = abs(x) >= fl
        if has_mask:
            keep = keep & (m[i] != 0)
        if selects:
            out[i] = keep
        x = min(max(x, -c), c) * f
        if with_noise:
            x += noise[j]
            j += keep
        v[i] = x if keep else np.float32(0.0)
    return j


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def band_sums(
    scores: Floats, lo: float, hi: float, clip: float
) -> tuple[float, float]:  # pragma: no cover - jitted
    """``(sum of squares, sum)`` of ``min(score, clip)`` over the scores in ``[lo, hi]``
    (scores as gathered by :func:`band_scan`: ``-1`` marks an unshared coordinate)."""
    sumsq = 0.0
    total = 0.0
    lo32 = np.float32(max(lo, -1.0))
    hi32 = np.float32(min(hi, 3.0e38))
    c = np.float32(min(clip, 3.0e38))
    for i in range(scores.size):
        s = scores[i]
        t = np.float64(min(s, c) if (s >= lo32) & (s <= hi32) else np.float32(0.0))
        sumsq += t * t
        total += t
    return sumsq, total


# --- Box-Muller around numpy's vectorised log, cos and sin ------------------------------------


@njit(nogil=True, cache=True)
def box_muller_uniforms(
    words: npt.NDArray[np.uint32], radius: Floats, angle: Floats
) -> None:  # pragma: no cover - jitted
    """From ``radius.size + angle.size`` words: ``radius = u`` and ``angle = 2 pi u'``, with
    ``u = (j + 1) / 2**24`` for a word's low 24 bits ``j`` (uniform on (0, 1], exact in
    float32, so ``log(u)`` is finite and at most 0)."""
    scale = np.float32(2.0**-24)
    turn = np.float32(2.0 * np.pi)
    h = radius.size
    for i in range(h):
        radius[i] = np.float32(np.int32(words[i] & 0xFFFFFF) + 1) * scale
    for i in range(angle.size):
        angle[i] = np.float32(np.int32(words[h + i] & 0xFFFFFF) + 1) * scale * turn


@njit(nogil=True, cache=True)
def box_muller_radius(log_u: Floats, std: float) -> None:  # pragma: no cover - jitted
    """In place: ``std * sqrt(-2 log u)`` from ``log u`` (a ``-0.0`` from ``log(1)`` gives 0)."""
    s = np.float32(std)
    for i in range(log_u.size):
        log_u[i] = np.sqrt(max(log_u[i] * np.float32(-2.0), np.float32(0.0))) * s


# --- Wide uniforms: 63 or 64 bits where the tail is decided (training.fl.noise) ---------------


@njit(nogil=True, cache=True)
def box_muller_wide_uniforms(
    words: npt.NDArray[np.uint32], u: Floats, angle: Floats
) -> int:  # pragma: no cover - jitted
    """From ``3 * u.size`` words (``2 * u.size`` for the radii, then one per angle, with
    ``angle.size <= u.size``): ``u = (w + 0.5) / 2**64`` for the 64-bit ``w`` of words ``2i,
    2i + 1`` (rounded to float32, which keeps 24 bits of it down to 1.5 * 2**-64), and ``angle =
    2 pi (j + 1) / 2**24`` as before. A ``w`` of 0 (probability 2**-64) leaves ``u = 0`` for the
    caller to extend with fresh words (:func:`training.fl.noise._wide_logs`); returns how many."""
    scale = 2.0**-64
    turn = np.float32(2.0 * np.pi)
    fscale = np.float32(2.0**-24)
    h = u.size
    zeros = 0
    for i in range(h):
        w = (np.uint64(words[2 * i]) << np.uint64(32)) | np.uint64(words[2 * i + 1])
        zeros += w == 0
        u[i] = np.float32((np.float64(w) + 0.5) * scale) if w else np.float32(0.0)
    for i in range(angle.size):
        angle[i] = np.float32(np.int32(words[2 * h + i] & 0xFFFFFF) + 1) * fscale * turn
    return zeros


@njit(nogil=True, cache=True)
def laplace_wide_uniforms(words: npt.NDArray[np.uint32], u: Floats) -> int:  # pragma: no cover
    """From ``2 * u.size`` words: ``u = (w + 0.5) / 2**63`` (float32) for the low 63 bits ``w``
    of words ``2i, 2i + 1`` (word ``2i``'s top bit is the sign, read by
    :func:`laplace_magnitudes`); a ``w`` of 0 leaves ``u = 0`` for the caller to extend.
    Returns how many."""
    scale = 2.0**-63
    zeros = 0
    for i in range(u.size):
        w = (np.uint64(words[2 * i] & 0x7FFFFFFF) << np.uint64(32)) | np.uint64(words[2 * i + 1])
        zeros += w == 0
        u[i] = np.float32((np.float64(w) + 0.5) * scale) if w else np.float32(0.0)
    return zeros


@njit(nogil=True, cache=True)
def laplace_magnitudes(
    words: npt.NDArray[np.uint32], log_u: Floats, scale: float, out: Floats
) -> None:  # pragma: no cover - jitted
    """``out = ±(-scale * log u)`` in float32 (``out`` may be ``log_u``), the sign from the top
    bit of word ``2i``."""
    s = np.float32(-scale)
    for i in range(out.size):
        x = log_u[i] * s
        out[i] = -x if words[2 * i] & np.uint32(0x80000000) else x
