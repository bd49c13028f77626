"""The site privacy pipeline: filters applied to a model update before it leaves the hospital.

:func:`apply_pipeline` takes a local update ``delta`` (parameter name -> float32 tensor, the
difference between the locally trained model and the global model it started from) and the job's
``privacy_pipeline`` (the normalised spec's list of ``{"filter": name, **params}``), and returns a
:class:`FilteredUpdate`: the values to send, which coordinates are shared, and the privacy events
spent. Plain PyTorch and numpy; no Django.

Decisions (each one tested in ``tests/test_fl_filters.py``):

* **Order.** Filters run in the pipeline's order, except ``exclude_layers``, which is applied first
  wherever it stands: an excluded layer is never shared, so it must not weigh in any fraction,
  percentile or norm of what is shared. ``dp_sgd`` acts during local training
  (``training.fl.local``) and is skipped here.
* **What "shared" means.** Every coordinate is shared or not. Excluded layers are *removed* from the
  output (their names are absent). Inside the remaining tensors, ``partial_sharing`` and ``svt``
  unshare coordinates: the output carries a boolean ``mask`` per tensor and unshared values are set
  to 0 (never sent as data; the mask tells the server not to average them in). Later filters act on
  shared coordinates only: clipping and norms see zeros elsewhere, noise is added to shared
  coordinates only.
* **Fractions are global, not per tensor.** ``partial_sharing`` keeps exactly
  ``round(fraction * m)`` (Python's ``round``) of the ``m`` coordinates still shared, counted over
  the whole update, so top-k picks the largest ``|values|`` wherever they are, and a chain of
  fractions multiplies, as :func:`training.spec.shared_fraction` assumes. Ties at the top-k boundary
  and the random strategy's keys are broken uniformly at random.
* **Percentile.** ``percentile_clipping`` clips to ``±q``, where ``q`` is the exact ``p``-th
  percentile of ``|values|`` over the shared coordinates, with numpy's default ``"linear"``
  interpolation (equal to ``torch.quantile`` where that works), for any size: ``torch.quantile``
  refuses more than 2^24 elements.
* **Exact order statistics, fast.** The top-k threshold and the percentile are exact order
  statistics found without sorting or partitioning the whole update (:func:`_band`): the
  quantiles of a sample of 65,536 scores bracket the rank asked for, one chunked scan counts the
  scores below the bracket and gathers the ~2% inside it, and a partition of those gives the exact
  value. If the bracket misses (about 1e-9 per call, or on adversarial data), everything is
  partitioned in place instead: the result never depends on the sample, only the time does.
  After a top-k ``partial_sharing`` the scores and their sample are reused for the percentile.
* **Clipping margin.** L1 and L2 clips scale by ``bound / norm * (1 - 2**-20)`` so that the bound
  holds after float32 rounding (a DP guarantee needs the bound to hold, not almost hold).
* **Noise.** Gaussian noise is Box-Muller, Laplace noise the inverse CDF, both on 24-bit
  uniforms (as torch's own float samplers; Gaussian tails end at 5.77 std, Laplace tails at about
  16.6 b) made from AES-128-CTR keystream (``cryptography``/OpenSSL, AES-NI), in chunks of
  :data:`NOISE_CHUNK` values on a small thread pool, with numpy's vectorised float32 log, sqrt,
  sin and cos. The AES key is 128 bits drawn from the caller's ``generator``; chunk ``i`` uses
  counter block ``i * 2**64``, so results depend only on the generator, not on the thread count.
  This is about 3x faster than torch's single-threaded Mersenne Twister sampler and, unlike it,
  its output does not reveal the generator state. Like every textbook floating-point sampler it
  is not hardened against the floating-point attacks of Mironov (2012), and the noise is only as
  unpredictable as ``generator``'s seed: seed it from ``os.urandom``/``secrets`` in production
  (the site worker does).
* **Sparse vector technique** (``svt``), after Lyu, Su and Li, "Understanding the Sparse Vector
  Technique for Differential Privacy" (2017), Algorithm 1, as used for FL updates by Li et al.
  (NVIDIA/KCL, 2019). ``gamma = SVT_GAMMA_FACTOR * threshold`` (twice the threshold) bounds every
  value: the update is clipped to ``[-gamma, gamma]`` and the query for coordinate ``i`` is
  ``|v_i|`` in ``[0, gamma]``, of sensitivity ``gamma`` (a site's whole update against none, the
  convention of the other filters here). Each *pass* is a fresh ε-DP run that may select up to the
  ``c`` coordinates still missing, over the coordinates not selected yet: selection gets ε/2, split
  as Lyu's ε1 = ε/4 for the threshold noise ``Lap(gamma / ε1)`` and ε2 = ε/4 for the query noise
  ``Lap(2 c gamma / ε2)``; release gets ε/2: the pass's selected values receive
  ``Lap(c gamma / (ε/2))`` and are clipped to ``[-gamma, gamma]`` again (post-processing).
  Scanning in a uniformly random order and stopping at the ``c``-th positive is carried out as
  "all noisy tests at once, then a uniformly random ``c``-subset of the positives", which has
  exactly the same output distribution, so the same privacy, without a permutation of every
  coordinate. No coordinate is tested again once selected, so none is selected twice. The event is
  ``pure_epsilon`` with ε × passes actually run (the accountant projects ε × ``max_passes``).
  Note that ``c`` grows with the update, so on a large model the query noise dwarfs ``gamma`` and
  selection is close to uniform: that is the price of update-level pure DP, not a bug.

Performance: everything runs on one flat float32 copy of the shared parameters, in place, and every
large scratch buffer comes from a :class:`Workspace`; clipping, noise and masking are fused where
one torch call can do it (``noise + factor * values``, then the mask). Costs, and what did not
help, are in docs/performance.md, "Privacy filters". Pass one workspace per site worker to reuse
the buffers across rounds: the returned tensors are then views into the workspace and are
overwritten by the next call with it (serialise the update first). Without a workspace each call
allocates its own.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from training.spec import _MISSING, FILTER_PARAMS, _LayerList

__all__ = [
    "BRACKET_SAMPLE",
    "BRACKET_SIGMAS",
    "EXACT_BELOW",
    "NOISE_CHUNK",
    "SVT_GAMMA_FACTOR",
    "UPDATE_FILTERS",
    "FilteredUpdate",
    "Workspace",
    "apply_pipeline",
    "gaussian_noise_",
    "laplace_noise_",
    "svt_gamma",
    "uniform_keys_",
    "validate_filter",
]

#: Filters that act on the update here; ``dp_sgd`` acts during local training instead.
UPDATE_FILTERS = (
    "exclude_layers",
    "partial_sharing",
    "percentile_clipping",
    "laplace_noise",
    "gaussian_noise",
    "svt",
)
#: ``gamma`` (the SVT value bound) is this multiple of the job's ``threshold``.
SVT_GAMMA_FACTOR = 2.0
#: Values per noise task (its keystream and Box-Muller scratch stay in the core's L2 cache).
NOISE_CHUNK = 1 << 18
_CLIP_MARGIN = 1.0 - 2.0**-20
# Largest float32 strictly inside (-1, 1): keeps log1p(-|u|) finite.
_U_MAX = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


@dataclass
class FilteredUpdate:
    """What a site sends after its privacy pipeline.

    ``delta``: the shared tensors (excluded layers are absent; unshared coordinates hold 0).
    ``mask``: per tensor, True where the coordinate is shared; None when every coordinate of every
    tensor in ``delta`` is shared. ``events``: privacy events as
    :meth:`training.accounting.PrivacyEvent.to_json` dicts, ``count`` 1 each (one round).
    ``shared_fraction``: coordinates shared / coordinates of the whole input update.
    ``notes``: what each filter did (thresholds, norms, passes), for the round's record.
    """

    delta: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor] | None
    events: list[dict]
    shared_fraction: float
    notes: dict = field(default_factory=dict)


class Workspace:
    """Named flat scratch buffers, grown on demand and reused between calls (not thread-safe)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self._buffers[name] = buf
        return buf[:n]


# --- parameter validation ------------------------------------------------------------------


def validate_filter(spec: Mapping) -> dict:
    """One pipeline entry checked with the spec's own rules, defaults filled in.

    Raises ``ValueError`` naming the filter and the parameter.
    """
    if not isinstance(spec, Mapping) or "filter" not in spec:
        raise ValueError(f"a privacy filter must be an object with a 'filter' key, got {spec!r}")
    name = spec["filter"]
    if name not in FILTER_PARAMS:
        raise ValueError(f"unknown privacy filter {name!r}; known: {', '.join(FILTER_PARAMS)}")
    params = FILTER_PARAMS[name]
    unknown = sorted(str(k) for k in spec if k != "filter" and k not in params)
    if unknown:
        raise ValueError(
            f"{name}: unknown parameter {', '.join(unknown)} (allowed: {', '.join(params)})"
        )
    out: dict[str, Any] = {"filter": name}
    for key, field_spec in params.items():
        if key not in spec:
            if field_spec.default is _MISSING:
                raise ValueError(f"{name}.{key}: required")
            out[key] = field_spec.default
            continue
        value = spec[key]
        if isinstance(field_spec, _LayerList):
            ok = (
                isinstance(value, list | tuple)
                and value
                and all(isinstance(v, str) and v.strip() for v in value)
            )
            if not ok:
                raise ValueError(f"{name}.{key}: must be a non-empty list of layer names")
            out[key] = list(value)
            continue
        converted = field_spec.convert(value)
        if converted is None:
            raise ValueError(f"{name}.{key}: {field_spec.message()}, got {value!r}")
        out[key] = converted
    return out


def svt_gamma(threshold: float) -> float:
    """The value bound ``gamma`` that :func:`apply_pipeline` uses for an svt ``threshold``."""
    return SVT_GAMMA_FACTOR * float(threshold)


# --- noise ---------------------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(1, torch.get_num_threads()), thread_name_prefix="fl-noise"
            )
        return _pool


def _keystream_chunks(
    out: torch.Tensor,
    generator: torch.Generator,
    fill: Callable[[np.ndarray, np.ndarray], None],
    *,
    extra_words: int = 0,
) -> None:
    """Run ``fill(chunk, words)`` over NOISE_CHUNK-sized chunks of flat float32 ``out``, where
    ``words`` are ``chunk.size + extra_words`` uint32 words of AES-128-CTR keystream (Box-Muller
    needs an even number of fresh words for an odd-sized chunk).

    The key is 128 bits drawn from ``generator``; chunk ``i`` uses counter block ``i * 2**64``, so
    the words depend only on the generator and the position, not on the thread count. AES-CTR
    (OpenSSL through ``cryptography``, with AES-NI) makes random words several times faster than
    torch's Mersenne Twister, releases the GIL, and is unpredictable without the key.
    """
    n = out.numel()
    if n == 0:
        return
    key = b"".join(
        int(w).to_bytes(8, "little")
        for w in torch.randint(0, 2**63 - 1, (2,), generator=generator, dtype=torch.int64)
    )
    flat = out.numpy()

    def work(start: int) -> None:
        end = min(start + NOISE_CHUNK, n)
        words = _thread_scratch("words", end - start + extra_words, np.uint32)
        counter = (start // NOISE_CHUNK).to_bytes(8, "big") + bytes(8)
        encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        encryptor.update_into(_zero_bytes(words.nbytes), memoryview(words).cast("B"))
        fill(flat[start:end], words)

    list(_executor().map(work, range(0, n, NOISE_CHUNK)))


_zeros = b""
_local = threading.local()


def _thread_scratch(name: str, size: int, dtype: type) -> np.ndarray:
    """A per-thread reused buffer: fresh memory is slow to touch here (3 GB/s against ~17)."""
    buf = getattr(_local, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(max(size, NOISE_CHUNK), dtype=dtype)
        setattr(_local, name, buf)
    return buf[:size]


def _zero_bytes(size: int) -> memoryview:
    global _zeros
    if len(_zeros) < size:
        _zeros = bytes(max(size, 4 * NOISE_CHUNK + 16))
    return memoryview(_zeros)[:size]


def _unit_interval(words: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``(j + 1) / 2**24`` for the low 24 bits ``j`` of each word: uniform on (0, 1], exactly
    representable in float32 (so ``log`` is finite and at most 0)."""
    np.bitwise_and(words, 0xFFFFFF, out=words)
    np.add(words, 1, out=words)
    out[...] = words  # at most 2**24: exact in float32
    out *= np.float32(2.0**-24)
    return out


def gaussian_noise_(out: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fill flat float32 ``out`` with N(0, std²) draws (Box-Muller on AES-CTR words).

    Box and Muller (1958): for U1 on (0, 1] and U2 uniform, ``sqrt(-2 ln U1) cos(2 pi U2)`` and
    ``... sin(...)`` are independent standard normals. Uniforms have 24 bits, as in torch's own
    float sampler, so the tails end at 5.77 std. numpy's float32 log/sin/cos are vectorised
    (AVX-512 here); each chunk's work stays in cache.
    """

    def fill(chunk: np.ndarray, words: np.ndarray) -> None:
        m = chunk.size
        h = (m + 1) // 2
        radius = _thread_scratch("radius", h, np.float32)
        angle = _thread_scratch("angle", h, np.float32)
        _unit_interval(words[:h], radius)
        np.log(radius, out=radius)
        radius *= np.float32(-2.0)
        np.maximum(radius, 0.0, out=radius)  # -2 ln u >= 0 (guards a -0.0 from log(1))
        np.sqrt(radius, out=radius)
        radius *= np.float32(std)
        # Fresh words for every angle: with an odd m the chunk has one word more (extra_words),
        # never a reuse of a radius word, which would tie that draw's angle to a radius.
        _unit_interval(words[h : 2 * h], angle)
        angle *= np.float32(2.0 * math.pi)
        np.cos(angle, out=chunk[:h])
        chunk[:h] *= radius
        rest = m - h
        np.sin(angle[:rest], out=chunk[h:])
        chunk[h:] *= radius[:rest]

    if out.numel():
        _keystream_chunks(out, generator, fill, extra_words=1)
    return out


def uniform_keys_(out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill flat float32 ``out`` with uniform draws on (0, 1] (24 bits, from AES-CTR words)."""
    if out.numel():
        _keystream_chunks(out, generator, lambda chunk, words: _unit_interval(words, chunk))
    return out


def laplace_noise_(out: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Fill flat float32 ``out`` with Laplace(0, scale) draws (inverse CDF on AES-CTR words).

    ``|X| = -scale * ln U`` with U uniform on (0, 1] (24 bits: tails end at about 16.6 scale),
    and the sign from the word's top bit, set exactly by flipping the float's sign bit.
    """

    def fill(chunk: np.ndarray, words: np.ndarray) -> None:
        signs = np.bitwise_and(words, np.uint32(0x80000000))
        _unit_interval(words, chunk)
        np.log(chunk, out=chunk)
        chunk *= np.float32(-scale)
        bits = chunk.view(np.uint32)
        np.bitwise_xor(bits, signs, out=bits)

    if out.numel():
        _keystream_chunks(out, generator, fill)
    return out


def _laplace_scalar(scale: float, generator: torch.Generator) -> float:
    u = float(torch.empty(1).uniform_(-1.0, 1.0, generator=generator).clamp_(-_U_MAX, _U_MAX))
    return -scale * math.copysign(1.0, u) * math.log1p(-abs(u)) if u else 0.0


# --- the state the filters share -----------------------------------------------------------


class _State:
    """The flat update and its shared set while the pipeline runs.

    Invariant: ``values`` is 0 wherever ``maskf`` is 0. ``maskf`` (float32 0/1, None = all
    shared) is float so that masking is one vectorised multiply; ``maskb`` is the same set as
    bool when a filter produced it that way (None otherwise: built at the end). ``ranked``, while
    the values are unchanged, is ``(scores, offset)``: a flat tensor whose ascending order
    statistics from rank ``offset`` on are exactly the shared coordinates' ``|values|`` (plus a
    sorted sample of those scores, when one was drawn).
    """

    def __init__(self, values: torch.Tensor, ws: Workspace, generator: torch.Generator):
        self.values = values
        self.n = values.numel()
        self.ws = ws
        self.generator = generator
        self.maskf: torch.Tensor | None = None
        self.maskb: torch.Tensor | None = None
        self.shared = self.n
        self.ranked: tuple[torch.Tensor, int, np.ndarray | None] | None = None
        self._mask_slot = 0
        self._bool_slot = 0

    def new_mask_buffer(self) -> torch.Tensor:
        # Two mask buffers alternate, so the current mask can be read while the next is built.
        self._mask_slot ^= 1
        return self.ws.get(f"mask{self._mask_slot}", self.n)

    def new_bool_buffer(self) -> torch.Tensor:
        self._bool_slot ^= 1
        return self.ws.get(f"maskb{self._bool_slot}", self.n, torch.bool)

    def scores_with_unshared_at(self, scores: torch.Tensor, fill: float) -> torch.Tensor:
        """``scores`` (float, >= 0) with unshared coordinates set to ``fill`` (< 0), exactly."""
        if self.maskf is not None:
            _fill_outside(scores, self.maskf, fill, self.ws.get("tmp", self.n))
        return scores

    def apply_mask(self, maskb: torch.Tensor, count: int) -> None:
        """Unshare every coordinate where the bool ``maskb`` is False."""
        maskf = self.new_mask_buffer()
        _bool_to_float(maskb, maskf)
        self.values.mul_(maskf)
        self.maskf, self.maskb = maskf, maskb
        self.shared = count
        self.ranked = None

    def touched(self) -> None:
        self.ranked = None


def _bool_to_float(maskb: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # Through uint8: torch converts uint8 to float with vectorised code, bool one by one (4x).
    return out.copy_(maskb.view(torch.uint8))


def _fill_outside(
    scores: torch.Tensor, maskf: torch.Tensor, fill: float, tmp: torch.Tensor
) -> torch.Tensor:
    """Set ``scores`` to ``fill`` where ``maskf`` is 0, leaving the rest bit-for-bit unchanged."""
    scores.mul_(maskf)
    torch.sub(maskf, 1.0, out=tmp).mul_(-fill)
    return scores.add_(tmp)  # kept: s + 0 (exact); others: 0 + fill


# --- exact order statistics ----------------------------------------------------------------

#: Below this many scores, order statistics come from one in-place partition of a copy.
EXACT_BELOW = 1 << 18
#: Scores sampled (with replacement) to bracket the ranks asked for.
BRACKET_SAMPLE = 1 << 16
#: Half-width of the bracket, in binomial standard deviations of the sample count (plus 2).
BRACKET_SIGMAS = 6.0
#: Scores per task of the bracket's scan.
SCAN_CHUNK = 1 << 20


@dataclass
class _Band:
    """The scores in a bracket ``[lo, hi]`` (``values``, at positions ``idx``); ``below`` scores
    are smaller than ``lo`` and ``count_ge`` are at least ``lo``."""

    below: int
    count_ge: int
    idx: np.ndarray
    values: np.ndarray


def _sorted_sample(st: _State, scores: torch.Tensor) -> np.ndarray:
    """BRACKET_SAMPLE scores drawn uniformly with replacement, sorted."""
    picks = torch.randint(0, scores.numel(), (BRACKET_SAMPLE,), generator=st.generator)
    return np.sort(scores[picks].numpy())


def _band(
    st: _State,
    scores: torch.Tensor,
    r_min: int,
    r_max: int,
    ge_out: torch.Tensor,
    sample: np.ndarray,
) -> _Band | None:
    """Bracket the ascending ranks ``r_min..r_max`` of ``scores`` with ``sample``'s quantiles.

    Floyd and Rivest's idea ("Expected time bounds for selection", 1975): the sampled scores'
    quantiles around ``r / n`` enclose the rank-``r`` score unless the sample count below it is
    more than BRACKET_SIGMAS binomial standard deviations off (probability about 1e-9); then one
    scan counts the scores below the bracket and gathers the few inside it (about 2% of them).
    Returns None when the bracket missed (the caller then partitions everything): the answer
    never depends on the sample, only the time does. ``ge_out`` receives ``scores >= lo``.

    The scan runs in chunks on the thread pool with numpy (which releases the GIL): its compares
    beat torch's here, and ``flatnonzero``, the costliest step, is single-threaded otherwise.
    """
    n = scores.numel()
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

    lo, hi = edge(r_min, -1), edge(r_max, 1)
    values, ge = scores.numpy(), ge_out.numpy()
    inside = st.ws.get("band", n, torch.bool).numpy()

    def scan(start: int) -> tuple[int, np.ndarray, np.ndarray]:
        end = min(start + SCAN_CHUNK, n)
        seg, seg_ge, seg_in = values[start:end], ge[start:end], inside[start:end]
        np.greater_equal(seg, lo, out=seg_ge)
        np.less_equal(seg, hi, out=seg_in)
        np.logical_and(seg_in, seg_ge, out=seg_in)
        idx = np.flatnonzero(seg_in)
        return int(np.count_nonzero(seg_ge)), idx + start, seg[idx]

    parts = list(_executor().map(scan, range(0, n, SCAN_CHUNK)))
    count_ge = sum(p[0] for p in parts)
    below = n - count_ge
    idx = np.concatenate([p[1] for p in parts])
    if below > r_min or r_max >= below + idx.size:
        return None
    return _Band(below, count_ge, idx, np.concatenate([p[2] for p in parts]))


def _order_stats(
    st: _State, scores: torch.Tensor, ranks: list[int], sample: np.ndarray | None = None
) -> list[float]:
    """The exact values at ascending ``ranks`` (sorted, 0-based) of flat ``scores``.

    ``sample``: a :func:`_sorted_sample` of these very scores, if one was drawn already.
    """
    n = scores.numel()
    if n >= EXACT_BELOW:
        if sample is None:
            sample = _sorted_sample(st, scores)
        ge = st.ws.get("ge", n, torch.bool)
        band = _band(st, scores, ranks[0], ranks[-1], ge, sample)
        if band is not None:
            local = [r - band.below for r in ranks]
            band.values.partition(local)  # a fresh copy, small
            return [float(band.values[r]) for r in local]
    part = st.ws.get("part", n, scores.dtype)
    part.copy_(scores)
    arr = part.numpy()
    arr.partition(ranks[0])  # one kth: numpy's multi-kth partition is several times slower
    out = [float(arr[ranks[0]])]
    for r in ranks[1:]:
        out.append(float(arr[r]) if r == ranks[0] else float(arr[ranks[0] + 1 : r + 1].min()))
    return out


def _select_top(
    st: _State, scores: torch.Tensor, k: int
) -> tuple[torch.Tensor, float | None, np.ndarray | None]:
    """A bool mask of exactly ``k`` coordinates of highest score (ties broken at random).

    ``scores`` must be below every candidate's score where a coordinate may not be chosen.
    Returns the mask, the ``k``-th largest score (None when ``k`` is 0) and the sorted sample
    of ``scores`` drawn on the way (None if none was).
    """
    n = st.n
    mask = st.new_bool_buffer()
    if k == 0:
        return mask.zero_(), None, None
    r = n - k  # ascending rank of the k-th largest
    sample = _sorted_sample(st, scores) if n >= EXACT_BELOW else None
    band = _band(st, scores, r, r, mask, sample) if sample is not None else None
    if band is not None:
        local = r - band.below
        picked = band.values.copy()
        picked.partition(local)
        kth = float(picked[local])
        # mask is scores >= lo; inside the band, keep only scores >= kth.
        low = band.values < kth
        mask[torch.from_numpy(band.idx[low])] = False
        count = band.count_ge - int(np.count_nonzero(low))
        tied = lambda: torch.from_numpy(band.idx[band.values == kth])  # noqa: E731
    else:
        kth = _order_stats(st, scores, [r], sample)[0]
        torch.ge(scores, kth, out=mask)
        count = int(torch.count_nonzero(mask))  # on bool: ~30x faster than on float
        tied = lambda: torch.nonzero(scores == kth).flatten()  # noqa: E731
    if count > k:  # ties at the boundary: drop the surplus uniformly at random
        candidates = tied()
        drop = candidates[torch.randperm(candidates.numel(), generator=st.generator)[: count - k]]
        mask[drop] = False
    return mask, kth, sample


# --- the filters ---------------------------------------------------------------------------


def _partial_sharing(st: _State, f: dict, notes: dict) -> None:
    m = st.shared
    k = round(f["fraction"] * m)
    notes.update(strategy=f["strategy"], candidates=m, kept=k)
    if k >= m:
        return
    if f["strategy"] == "topk":
        scores = torch.abs(st.values, out=st.ws.get("abs", st.n))
        st.scores_with_unshared_at(scores, -1.0)
        mask, kth, sample = _select_top(st, scores, k)
        notes["threshold"] = kth
        st.apply_mask(mask, k)
        # The shared |values| are exactly the top k scores; the sample is still theirs.
        st.ranked = (scores, st.n - k, sample)
    else:
        keys = st.ws.get("keys", st.n)
        uniform_keys_(keys, st.generator)
        st.scores_with_unshared_at(keys, -1.0)
        mask = _select_top(st, keys, k)[0]
        st.apply_mask(mask, k)


def _ranked(st: _State) -> tuple[torch.Tensor, int, np.ndarray | None]:
    """``(scores, offset, sample)``: ascending order statistics of ``scores`` from ``offset`` on
    are the shared ``|values|``; ``sample``, if not None, is a sorted sample of ``scores``."""
    if st.ranked is None:
        scores = torch.abs(st.values, out=st.ws.get("abs", st.n))
        # Unshared coordinates rank first (-1 < every |v|): the shared ones are the top block.
        st.ranked = (st.scores_with_unshared_at(scores, -1.0), st.n - st.shared, None)
    return st.ranked


def _percentile(st: _State, percentile: float) -> float:
    """The exact ``percentile`` of the shared ``|values|`` (numpy's "linear" method)."""
    scores, offset, sample = _ranked(st)
    m = st.shared
    pos = percentile / 100.0 * (m - 1)
    lo = math.floor(pos)
    interpolate = pos > lo and lo + 1 < m
    ranks = [offset + lo, offset + lo + 1] if interpolate else [offset + lo]
    found = _order_stats(st, scores, ranks, sample)
    a = found[0]
    b = found[1] if interpolate else a
    return float(np.float32(a + (b - a) * (pos - lo)))


def _percentile_clipping(st: _State, f: dict, notes: dict) -> None:
    if st.shared == 0:
        notes.update(clip_value=None)
        return
    q = _percentile(st, f["percentile"])
    st.values.clamp_(-q, q)
    st.touched()
    notes.update(clip_value=q)


def _clip_scale(st: _State, bound: float, ord_: int) -> tuple[float, float, float]:
    """``(norm, clipped norm, factor)``: multiplying by ``factor`` clips the update to ``bound``."""
    if ord_ == 1:
        tmp = torch.abs(st.values, out=st.ws.get("tmp", st.n))
        norm = float(tmp.sum())
    else:
        norm = float(torch.linalg.vector_norm(st.values))
    # float32 reductions (float64 ones cost ~30 passes: mixed-dtype kernels are not vectorised);
    # their relative error, ~1e-7, is covered by _CLIP_MARGIN.
    factor = bound / norm * _CLIP_MARGIN if norm > bound else 1.0
    return norm, min(norm, bound), factor


def _clip_and_add_noise(st: _State, factor: float, noise: torch.Tensor | None) -> None:
    """``values = factor * values + noise`` on shared coordinates (0 elsewhere), fused."""
    if noise is None:
        if factor != 1.0:
            st.values.mul_(factor)
    else:
        torch.add(noise, st.values, alpha=factor, out=st.values)
        if st.maskf is not None:
            st.values.mul_(st.maskf)
    st.touched()


def _laplace_noise(st: _State, f: dict, notes: dict) -> list[dict]:
    eps, sens = f["epsilon"], f["sensitivity"]
    before, after, factor = _clip_scale(st, sens, 1)
    scale = sens / eps
    noise = None
    if st.shared:
        noise = st.ws.get("noise", st.n)
        laplace_noise_(noise, scale, st.generator)
    _clip_and_add_noise(st, factor, noise)
    notes.update(l1_before=before, l1_clipped=after, scale=scale)
    return [_event("laplace", {"epsilon": eps}, "laplace_noise")]


def _gaussian_noise(st: _State, f: dict, notes: dict) -> list[dict]:
    z, clip = f["noise_multiplier"], f["clip_norm"]
    before, after, factor = _clip_scale(st, clip, 2)
    std = z * clip
    noise = None
    if st.shared:
        noise = gaussian_noise_(st.ws.get("noise", st.n), std, st.generator)
    _clip_and_add_noise(st, factor, noise)
    notes.update(l2_before=before, l2_clipped=after, std=std)
    return [_event("gaussian", {"noise_multiplier": z}, "gaussian_noise")]


def _svt(st: _State, f: dict, notes: dict) -> list[dict]:
    eps, threshold = f["epsilon"], f["threshold"]
    gamma = svt_gamma(threshold)
    ws, n = st.ws, st.n
    target = round(f["fraction"] * st.shared)
    st.values.clamp_(-gamma, gamma)
    # candidates: shared and not selected yet (float 0/1); selected: chosen so far.
    candidates = ws.get("svt_cand", n)
    if st.maskf is None:
        candidates.fill_(1.0)
    else:
        candidates.copy_(st.maskf)
    selected = ws.get("svt_sel", n).zero_()
    noise, scratch = ws.get("noise", n), ws.get("scratch", n)
    chosen, passes, per_pass = 0, 0, []
    eps_threshold = eps_queries = eps / 4.0
    eps_release = eps / 2.0
    while chosen < target and passes < f["max_passes"]:
        passes += 1
        c = target - chosen
        noisy_threshold = threshold + _laplace_scalar(gamma / eps_threshold, st.generator)
        # Noisy queries |v_i| + Lap(2 c gamma / eps2) against the noisy threshold.
        laplace_noise_(noise, 2.0 * c * gamma / eps_queries, st.generator)
        noise.add_(torch.abs(st.values, out=scratch))
        positives = st.new_mask_buffer()
        hits = torch.ge(noise, noisy_threshold, out=ws.get("bool", n, torch.bool))
        positives.copy_(hits).mul_(candidates)
        found = int(torch.count_nonzero(hits.copy_(positives)))
        if found > c:
            # First c positives of a uniformly random scan order == a uniform c-subset of them.
            keys = ws.get("keys", n)
            uniform_keys_(keys, st.generator)
            _fill_outside(keys, positives, -1.0, ws.get("tmp", n))
            _bool_to_float(_select_top(st, keys, c)[0], positives)
            found = c
        if found:
            # Release this pass's values with Lap(c gamma / eps3), then clip (post-processing).
            laplace_noise_(noise, c * gamma / eps_release, st.generator)
            noise.mul_(positives)
            st.values.add_(noise).clamp_(-gamma, gamma)
            selected.add_(positives)
            candidates.sub_(positives)
        chosen += found
        per_pass.append(found)
    st.values.mul_(selected)
    mask = st.new_mask_buffer()
    mask.copy_(selected)
    st.maskf, st.maskb, st.shared = mask, None, chosen
    st.touched()
    notes.update(gamma=gamma, target=target, selected=chosen, passes=passes, per_pass=per_pass)
    return [_event("pure_epsilon", {"epsilon": eps * passes}, "svt")]


def _event(mechanism: str, params: dict, source: str) -> dict:
    params = {k: float(v) for k, v in params.items()}
    return {"mechanism": mechanism, "params": params, "count": 1, "source": source}


_FILTERS: dict[str, Callable[[_State, dict, dict], list[dict] | None]] = {
    "partial_sharing": _partial_sharing,
    "percentile_clipping": _percentile_clipping,
    "laplace_noise": _laplace_noise,
    "gaussian_noise": _gaussian_noise,
    "svt": _svt,
}


# --- the pipeline --------------------------------------------------------------------------


def _excluded(names: list[str], filters: list[dict]) -> set[str]:
    out: set[str] = set()
    for f in filters:
        if f["filter"] != "exclude_layers":
            continue
        for prefix in f["layers"]:
            hits = {name for name in names if name.startswith(prefix)}
            if not hits:
                raise ValueError(
                    f"exclude_layers: no parameter name starts with {prefix!r}; refusing to share "
                    "an update whose exclusions match nothing (a typo would leak the layer)"
                )
            out |= hits
    return out


def apply_pipeline(
    delta: Mapping[str, torch.Tensor],
    pipeline: list[dict],
    *,
    generator: torch.Generator,
    workspace: Workspace | None = None,
) -> FilteredUpdate:
    """Apply the job's privacy pipeline to a site's update (see the module docstring).

    ``delta`` is not modified. Raises ``ValueError`` for a bad filter or parameter, a non-float
    tensor, or an ``exclude_layers`` prefix that matches no parameter.
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError("apply_pipeline needs a torch.Generator for its noise")
    if not isinstance(pipeline, list | tuple):
        raise ValueError(f"a privacy pipeline must be a list of filters, got {pipeline!r}")
    filters = [validate_filter(f) for f in pipeline]
    names = list(delta)
    for name in names:
        t = delta[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"update tensor {name!r} must be a floating-point torch.Tensor")
    excluded = _excluded(names, filters)
    kept = [name for name in names if name not in excluded]
    total = sum(delta[name].numel() for name in names)
    n = sum(delta[name].numel() for name in kept)

    ws = workspace if workspace is not None else Workspace()
    values = ws.get("values", n)
    if kept:
        torch.cat([delta[name].detach().reshape(-1).float() for name in kept], out=values)
    st = _State(values, ws, generator)

    events: list[dict] = []
    steps: list[dict] = []
    for f in filters:
        name = f["filter"]
        if name == "exclude_layers":
            steps.append({"filter": name, "excluded": sorted(excluded)})
            continue
        if name == "dp_sgd":
            steps.append({"filter": name, "applied": "during local training"})
            continue
        step: dict[str, Any] = {"filter": name}
        events.extend(_FILTERS[name](st, f, step) or [])
        step["shared_after"] = st.shared
        steps.append(step)

    out: dict[str, torch.Tensor] = {}
    mask_out: dict[str, torch.Tensor] | None = None
    if st.maskf is not None:
        maskb = st.maskb
        if maskb is None:
            maskb = torch.ne(st.maskf, 0.0, out=ws.get("mask_bool", n, torch.bool))
        mask_out = {}
    offset = 0
    for name in kept:
        shape, size = delta[name].shape, delta[name].numel()
        out[name] = values[offset : offset + size].view(shape)
        if mask_out is not None:
            mask_out[name] = maskb[offset : offset + size].view(shape)
        offset += size
    notes = {"total": total, "shared": st.shared, "excluded": sorted(excluded), "steps": steps}
    return FilteredUpdate(
        delta=out,
        mask=mask_out,
        events=events,
        shared_fraction=(st.shared / total) if total else 0.0,
        notes=notes,
    )
