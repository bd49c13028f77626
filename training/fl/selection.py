"""Exact order statistics of the update's scores, and the top-k selection built on them.

The top-k threshold of ``partial_sharing`` (and of svt's random subset) and the percentile of
``percentile_clipping`` are exact order statistics of the scores (``|value|`` on shared
coordinates, ``-1`` elsewhere), found without sorting or partitioning the whole update: the
quantiles of a sample of :data:`BRACKET_SAMPLE` scores bracket the rank asked for, one chunked
scan (:func:`_bands`) counts the scores below the bracket and gathers the ~2% inside it, and a
partition of those gives the exact value. If the bracket misses (about 1e-5 per call, or on
adversarial data), everything is partitioned in place instead: the result never depends on the
sample, only the time does. The decisions this serves are listed in :mod:`training.fl.filters`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from training.fl import kernels
from training.fl.params import NOT_ON_UPDATE
from training.fl.pipeline_state import Band, PipelineState

__all__ = [
    "BRACKET_SAMPLE",
    "BRACKET_SIGMAS",
    "EXACT_BELOW",
    "keep_top_lazily",
    "percentile",
    "select_top",
]

#: Below this many scores, order statistics come from one in-place partition of a copy.
EXACT_BELOW = 1 << 18
#: Scores sampled (with replacement) to bracket the ranks asked for.
BRACKET_SAMPLE = 1 << 16
#: Half-width of the bracket, in binomial standard deviations of the sample count (plus 2).
BRACKET_SIGMAS = 4.5  # a miss costs one full partition; a wider bracket costs every call

_EMPTY_VALUES = np.zeros(1, dtype=np.float32)


def _scores(st: PipelineState, source: np.ndarray, at: np.ndarray | slice) -> np.ndarray:
    """Scores of ``source`` at ``at``: ``|value|``, and -1 where the coordinate is unshared."""
    s: np.ndarray = np.abs(source[at])
    if st.floor > 0 and source is st.array:  # the threshold is on the values, not on keys
        s[s < st.floor] = -1.0
    if st.maskb is not None:
        s[st.mask[at] == 0] = -1.0
    return s


def _sorted_sample(st: PipelineState, source: np.ndarray) -> np.ndarray:
    """BRACKET_SAMPLE scores drawn uniformly with replacement, sorted."""
    picks = torch.randint(0, source.size, (BRACKET_SAMPLE,), generator=st.generator).numpy()
    return np.sort(_scores(st, source, picks))


def _bands(
    st: PipelineState, source: np.ndarray, ranges: list[tuple[int, int]], sample: np.ndarray
) -> list[Band | None]:
    """Bracket one or two ascending rank ranges ``(r_min, r_max)`` of the scores with
    ``sample``'s quantiles, in one scan.

    Floyd and Rivest's idea ("Expected time bounds for selection", 1975): the sampled scores'
    quantiles around ``r / n`` enclose the rank-``r`` score unless the sample count below it is
    more than BRACKET_SIGMAS binomial standard deviations off (probability about 7e-6); then one
    compiled scan (:func:`training.fl.kernels.band_scan`) counts the scores below each bracket
    and gathers the few inside (about 2% of them per bracket). A bracket that missed comes back
    as None (the caller then partitions everything): the answer never depends on the sample,
    only the time does. With two ranges, the second band's sums cover the scores between the
    two brackets only. Everything gathered lands in workspace buffers (fresh memory is slow to
    touch here).
    """
    n = source.size
    s = sample.size

    def edge(r: int, side: int) -> float:
        p = (r + 0.5) / n
        j = p * s + side * (BRACKET_SIGMAS * math.sqrt(s * p * (1.0 - p)) + 2.0)
        j = math.floor(j) if side < 0 else math.ceil(j)
        if j < 0:
            return -math.inf
        if j >= s:
            return math.inf
        return float(sample[j])

    brackets = [(edge(r_min, -1), edge(r_max, 1)) for r_min, r_max in ranges]
    (lo1, hi1), (lo2, hi2) = brackets[0], brackets[-1]
    sum_lo = hi1 if len(brackets) == 2 else -0.5
    # Unshared values are 0, so above a positive bracket the mask changes nothing: not reading
    # it saves a tenth of the scan's memory traffic.
    has_mask = st.maskb is not None and not (lo1 > 0 and source is st.array)
    mask = st.mask
    floor = st.floor if source is st.array else 0.0
    idx, scores = _band_buffers(st)

    def scan(start: int, end: int) -> tuple[int, int, np.int64, np.int64, np.int64, float, float]:
        inside, ge1, ge2, above2, sumsq, l1 = kernels.band_scan(
            source, mask, has_mask, floor, lo1, hi1, lo2, hi2, sum_lo, start, end,
            idx[start:end], scores[start:end],
        )  # fmt: skip
        return start, inside, ge1, ge2, above2, sumsq, l1

    parts = kernels.run_chunks(scan, n)
    segments = [(p[0], p[1]) for p in parts]
    total = sum(c for _, c in segments)
    union = st.ws.get("band_union", total).numpy()
    if total:
        np.concatenate([scores[a : a + c] for a, c in segments], out=union)
    if len(ranges) == 1:
        places = [(0, total)]
    else:  # the union in sorted order: the first band's scores, then from lo2 on the second's
        above_lo2 = int(np.count_nonzero(union >= lo2))
        places = [(0, int(np.count_nonzero(union <= hi1))), (total - above_lo2, above_lo2)]
    out: list[Band | None] = []
    for k, ((r_min, r_max), (lo, hi), (offset, size)) in enumerate(
        zip(ranges, brackets, places, strict=True)
    ):
        chunk_ge = np.array([p[2 + k] for p in parts], dtype=np.int64)
        below = n - int(chunk_ge.sum())
        band = Band(lo, hi, below, chunk_ge, union, offset, size, segments)
        out.append(None if below > r_min or r_max >= below + size else band)
    if out[-1] is not None:
        out[-1].above = int(sum(p[4] for p in parts))
        out[-1].sumsq_below = sum(p[5] for p in parts)
        out[-1].l1_below = sum(p[6] for p in parts)
    return out


def _band_buffers(st: PipelineState) -> tuple[np.ndarray, np.ndarray]:
    """Where a scan gathers each chunk's positions and scores (each chunk at its own start)."""
    positions = torch.int32 if st.n < 2**31 else torch.int64
    return (
        st.ws.get("band_idx", st.n, positions).numpy(),
        st.ws.get("band_scores", st.n).numpy(),
    )


def _positions_of(st: PipelineState, band: Band, score: float) -> np.ndarray:
    """The positions of ``band``'s scores equal to ``score`` (from the latest scan)."""
    idx, scores = _band_buffers(st)
    return kernels.concat(
        (idx[a : a + c][scores[a : a + c] == score] for a, c in band.segments), np.int64
    ).astype(np.int64)


def _below_per_chunk(st: PipelineState, band: Band, score: float) -> np.ndarray:
    """Per chunk, how many of ``band``'s gathered scores are below ``score``."""
    scores = _band_buffers(st)[1]
    return np.array(
        [np.count_nonzero(scores[a : a + c] < score) for a, c in band.segments], dtype=np.int64
    )


def _order_stats(
    st: PipelineState, source: np.ndarray, ranks: list[int], sample: np.ndarray | None = None
) -> tuple[list[float], Band | None]:
    """The exact scores at ascending ``ranks`` (sorted, 0-based), and the band they came from
    (None when they came from a full partition).

    ``sample``: a :func:`_sorted_sample` of these very scores, if one was drawn already.
    """
    n = source.size
    if n >= EXACT_BELOW:
        if sample is None:
            sample = _sorted_sample(st, source)
        band = _bands(st, source, [(ranks[0], ranks[-1])], sample)[0]
        if band is not None:
            return _pick(st, band, ranks), band
    arr = st.ws.get("part", n).numpy()
    arr[...] = _scores(st, source, slice(None))
    return _select_in_place(arr, ranks), None


def _pick(st: PipelineState, band: Band, ranks: list[int]) -> list[float]:
    """The scores at ascending ``ranks`` from the band that brackets them, from a copy (of the
    band's own scores only, when the gathered scores hold another band too)."""
    values = band.values
    first = band.offset + ranks[0] - band.below
    if band.offset > 0:  # a second band: its scores are all above the first band's
        values = values[values >= band.lo]
        first -= band.offset
    picked = st.ws.get("pick", values.size).numpy()
    picked[...] = values
    return _select_in_place(picked, [first + r - ranks[0] for r in ranks])


def _select_in_place(arr: np.ndarray, ranks: list[int]) -> list[float]:
    """The values at ascending ``ranks`` of ``arr`` (reordered): one partition at the first,
    then the rest among the values after it (the next rank is their minimum). numpy's
    multi-kth partition is several times slower; and after a partition at ``k`` only
    ``arr[k]`` is known: ``arr[k + 1]`` is *not* the next order statistic."""
    first = ranks[0]
    arr.partition(first)
    out = [float(arr[first])]
    for r in ranks[1:]:
        step = r - first
        if step == 0:
            out.append(out[0])
        elif step == 1:
            out.append(float(arr[first + 1 :].min()))
        else:
            tail = arr[first + 1 :]
            tail.partition(step - 1)
            out.append(float(tail[step - 1]))
    return out


def _random_subset(st: PipelineState, candidates: np.ndarray, count: int) -> np.ndarray:
    chosen: np.ndarray = candidates[
        torch.randperm(candidates.size, generator=st.generator)[:count].numpy()
    ]
    return chosen


def keep_top_lazily(st: PipelineState, k: int) -> bool:
    """Share the ``k`` largest ``|values|`` by recording the threshold (``st.floor``) instead of
    writing a mask: the pass that writes the values later applies it. Ties at the threshold are
    broken uniformly at random by zeroing the surplus (then below the floor). Returns False,
    changing nothing, where this does not apply (small updates, a bracket miss, a threshold of
    0); the caller then takes :func:`select_top`.

    Look-ahead: when the next filter is ``percentile_clipping``, the ranks it will ask are
    known now (the shared set will be the top ``k``), so the same scan brackets them too and
    the clip needs no scan of its own (``st.prepared``).
    """
    n = st.n
    if n < EXACT_BELOW or k == 0:
        return False
    r = n - k
    ranges = [(r, r)]
    coming = next((f for f in st.upcoming if f["filter"] not in NOT_ON_UPDATE), None)
    clip_ranks = None
    if coming is not None and coming["filter"] == "percentile_clipping":
        clip_ranks = _percentile_ranks(k, coming["percentile"], r)[0]
        ranges.append((clip_ranks[0], clip_ranks[-1]))
    sample = _sorted_sample(st, st.array)
    bands = _bands(st, st.array, ranges, sample)
    band = bands[0]
    if band is None:
        return False
    kth = _pick(st, band, [r])[0]
    if kth <= 0:
        return False
    chunk_counts = band.chunk_ge - _below_per_chunk(st, band, kth)
    surplus = int(chunk_counts.sum()) - k
    if surplus > 0:
        drop = _random_subset(st, _positions_of(st, band, kth), surplus)
        st.array[drop] = 0.0
        chunk_counts -= np.bincount(kernels.chunk_of(drop, st.n), minlength=chunk_counts.size)
    st.floor, st.shared, st.chunk_counts = kth, k, chunk_counts
    st.touched()
    st.ranked = (n - k, sample)  # the shared |values| are exactly the top k scores
    ahead = bands[-1] if clip_ranks is not None else None
    if ahead is not None and clip_ranks is not None and band.hi < ahead.lo:
        # Every score from the second bracket up is shared and unchanged, so its band holds
        # for the ranks after the selection; its sums cover the scores between the brackets,
        # and the first band's kept scores (less the dropped ties, each equal to kth) join them.
        sumsq, l1 = kernels.band_sums(band.values, kth, band.hi, math.inf)
        ahead.sumsq_below += sumsq - max(surplus, 0) * kth * kth
        ahead.l1_below += l1 - max(surplus, 0) * kth
        st.prepared[tuple(clip_ranks)] = ahead
    return True


def select_top(
    st: PipelineState, source: np.ndarray, k: int, *, unshare: bool
) -> tuple[torch.Tensor, float | None, list[int]]:
    """A bool mask of exactly ``k`` coordinates of highest score (ties broken at random).

    Scores are ``|source|`` on shared coordinates (unshared ones are never chosen). With
    ``unshare`` the values outside the mask are set to 0 in the same pass (the caller then
    makes it the shared set). Returns the mask, the ``k``-th largest score (None when ``k`` is
    0) and how many were chosen in each :func:`kernels.chunk_size` chunk.
    """
    n = st.n
    mask = st.new_bool_buffer()
    if k == 0:
        if unshare:
            st.values.zero_()
        return mask.zero_(), None, [0] * len(kernels.chunk_starts(n))
    found, band = _order_stats(st, source, [n - k])  # rank of the k-th largest
    kth = found[0]
    has_mask, in_mask, out_mask = st.maskb is not None, st.mask, mask.view(torch.uint8).numpy()
    values = st.array if unshare else _EMPTY_VALUES
    counts = kernels.run_chunks(
        lambda s, e: kernels.keep_at_least(
            source, in_mask, has_mask, kth, values, out_mask, unshare, s, e
        ),
        n,
    )
    surplus = sum(counts) - k
    if surplus > 0:  # ties at the boundary: drop the surplus uniformly at random
        if band is not None:
            tied = _positions_of(st, band, kth)
        else:
            tied = np.flatnonzero(_scores(st, source, slice(None)) == kth)
        drop = _random_subset(st, tied, surplus)
        out_mask[drop] = 0
        if unshare:
            st.array[drop] = 0.0
        counts = (
            np.asarray(counts) - np.bincount(kernels.chunk_of(drop, n), minlength=len(counts))
        ).tolist()
    return mask, kth, counts


def _percentile_ranks(m: int, percentile: float, offset: int) -> tuple[list[int], float]:
    """The ascending ranks whose scores give the ``percentile`` of ``m`` shared scores that
    start at rank ``offset`` (numpy's "linear" method), and the interpolation weight."""
    pos = percentile / 100.0 * (m - 1)
    lo = math.floor(pos)
    interpolate = pos > lo and lo + 1 < m
    ranks = [offset + lo, offset + lo + 1] if interpolate else [offset + lo]
    return ranks, pos - lo


def percentile(st: PipelineState, percentile: float) -> tuple[float, Band | None]:
    """The exact ``percentile`` of the shared ``|values|`` (numpy's "linear" method), and the
    band it was found in (if any)."""
    if st.clip != math.inf:
        st.finish()  # a pending clip changes the scores
    offset, sample = st.ranked or (st.n - st.shared, None)
    ranks, weight = _percentile_ranks(st.shared, percentile, offset)
    band = st.prepared.get(tuple(ranks))
    if band is not None:
        found = _pick(st, band, ranks)
    else:
        found, band = _order_stats(st, st.array, ranks, sample)
    a = found[0]
    b = found[-1]
    return float(np.float32(a + (b - a) * weight)), band
