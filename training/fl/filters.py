"""The site privacy pipeline: filters applied to a model update before it leaves the hospital.

:func:`apply_pipeline` takes a local update ``delta`` (parameter name -> float32 tensor, the
difference between the locally trained model and the global model it started from) and the job's
``privacy_pipeline`` (the normalised spec's list of ``{"filter": name, **params}``), and returns a
:class:`FilteredUpdate`: the values to send, which coordinates are shared, and the privacy events
spent. Plain PyTorch and numpy; no Django.

Decisions (each one tested in ``tests/fl/test_fl_filters.py``):

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
  fractions multiplies, as :func:`training.jobs.spec.shared_fraction` assumes. Ties at the top-k
  boundary
  and the random strategy's keys are broken uniformly at random.
* **Percentile.** ``percentile_clipping`` clips to ``±q``, where ``q`` is the exact ``p``-th
  percentile of ``|values|`` over the shared coordinates, with numpy's default ``"linear"``
  interpolation (equal to ``torch.quantile`` where that works), for any size: ``torch.quantile``
  refuses more than 2^24 elements.
* **Exact order statistics, fast.** The top-k threshold and the percentile are exact order
  statistics found without sorting or partitioning the whole update (:func:`_bands`): the
  quantiles of a sample of 65,536 scores bracket the rank asked for, one chunked scan counts the
  scores below the bracket and gathers the ~2% inside it, and a partition of those gives the exact
  value. If the bracket misses (about 1e-5 per call, or on adversarial data), everything is
  partitioned in place instead: the result never depends on the sample, only the time does.
  A top-k ``partial_sharing`` followed by ``percentile_clipping`` brackets both ranks in the same
  scan (the percentile's ranks are known once ``k`` is), which also sums what the clipped norm
  needs.
* **Clipping margin.** L1 and L2 clips scale by ``bound / norm * (1 - 2**-20)`` so that the bound
  holds after float32 rounding (a DP guarantee needs the bound to hold, not almost hold).
* **Noise.** Gaussian noise is Box-Muller, Laplace noise the inverse CDF, both on 24-bit
  uniforms (as torch's own float samplers; Gaussian tails end at 5.77 std, Laplace tails at about
  16.6 b) made from AES-128-CTR keystream (``cryptography``/OpenSSL, AES-NI), in chunks of
  :data:`NOISE_CHUNK` values on a small thread pool, with numpy's vectorised float32 log, sin
  and cos. Noise is drawn only for the shared coordinates, one draw each in order. The AES key
  is 128 bits drawn from the caller's ``generator``; chunk ``i`` uses counter block
  ``i * 2**64``, so results depend only on the generator, not on the thread count.
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
large scratch buffer comes from a :class:`Workspace`. The loops over the whole update are
compiled (:mod:`training.fl.kernels`), and as few as possible: a top-k records its threshold and a
percentile clip its bound instead of writing the values (:class:`_State`), and the one pass that
writes them anyway (with the noise, or at the end) applies both; the clipped norm comes from the
selection's scan. Costs, and what did not help, are in docs/performance.md, "Privacy filters".
Pass one workspace per site worker to reuse the buffers across rounds: the returned tensors are
then views into the workspace and are overwritten by the next call with it (serialise the update
first). Without a workspace each call allocates its own.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from training.fl import kernels
from training.jobs.spec import _MISSING, FILTER_PARAMS, _LayerList

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
#: Pipeline entries that do not act on the update here.
_NOT_ON_UPDATE = ("exclude_layers", "dp_sgd")
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
    :meth:`training.jobs.accounting.PrivacyEvent.to_json` dicts, ``count`` 1 each (one round).
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

    list(kernels._executor().map(work, range(0, n, NOISE_CHUNK)))


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
    (AVX-512 here), and the compiled steps around them (kernels.box_muller_*) make the rest
    one pass each; each chunk's work stays in cache.
    """

    def fill(chunk: np.ndarray, words: np.ndarray) -> None:
        m = chunk.size
        h = (m + 1) // 2
        radius = _thread_scratch("radius", h, np.float32)
        angle = _thread_scratch("angle", h, np.float32)
        # Fresh words for every angle: with an odd m the chunk has one word more (extra_words),
        # never a reuse of a radius word, which would tie that draw's angle to a radius.
        kernels.box_muller_uniforms(words[: 2 * h], radius, angle)
        np.log(radius, out=radius)
        kernels.box_muller_radius(radius, std)
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

_NO_MASK = np.zeros(1, dtype=np.uint8)


class _State:
    """The flat update and its shared set while the pipeline runs.

    The shared set is the coordinates where ``maskb`` (bool, None = all) is True *and*
    ``|values| >= floor``: a top-k selection records its threshold as ``floor`` instead of
    writing a mask, and the values the filters mean are ``clip(values, ±clip)`` on shared
    coordinates: a percentile clip is only recorded too. Both are applied by the next pass that
    writes the values anyway (noise, or the end of the pipeline): :meth:`finish`. Invariant:
    ``values`` is 0 wherever ``maskb`` is False (and below ``floor`` it is not shared, whatever
    it holds). ``chunk_counts``, when known, is the number of shared coordinates in each
    :func:`kernels.chunk_size` chunk. ``norms`` caches ``(L2², L1)`` of the meant values while
    known. ``ranked``, while the meant values are unchanged, is ``(offset, sample)``: the
    scores' ascending order statistics from rank ``offset`` on are exactly the shared
    ``|values|``, and ``sample`` is a sorted sample of scores with the same order statistics
    from that rank on (drawn before a top-k, still valid after it).
    """

    def __init__(self, values: torch.Tensor, ws: Workspace, generator: torch.Generator):
        self.values = values
        self.array = values.numpy()
        self.n = values.numel()
        self.ws = ws
        self.generator = generator
        self.maskb: torch.Tensor | None = None
        self.shared = self.n
        self.floor = 0.0
        self.clip = math.inf
        self.chunk_counts: np.ndarray | None = None
        self.norms: tuple[float, float] | None = None
        self.ranked: tuple[int, np.ndarray | None] | None = None
        #: Bands found ahead for the ranks a coming percentile will ask (see _keep_top_lazily).
        self.prepared: dict[tuple[int, ...], _Band] = {}
        #: The filters after the one running (for the look-ahead).
        self.upcoming: list[dict] = []
        self._bool_slot = 0

    @property
    def mask(self) -> np.ndarray:
        """``maskb`` as uint8 for the kernels (a dummy when it is None)."""
        return _NO_MASK if self.maskb is None else self.maskb.view(torch.uint8).numpy()

    def new_bool_buffer(self) -> torch.Tensor:
        # Two buffers alternate, so the current mask can be read while the next is built.
        self._bool_slot ^= 1
        return self.ws.get(f"maskb{self._bool_slot}", self.n, torch.bool)

    def set_mask(self, maskb: torch.Tensor, count: int, chunk_counts: list | None = None) -> None:
        """The shared set is now ``maskb`` (``values`` already 0 outside it)."""
        self.maskb, self.shared, self.floor = maskb, count, 0.0
        self.chunk_counts = None if chunk_counts is None else np.asarray(chunk_counts)
        self.touched()

    def touched(self) -> None:
        self.norms = None
        self.ranked = None
        self.prepared = {}

    def finish(self, factor: float = 1.0, noise: np.ndarray | None = None) -> None:
        """Write ``factor * clip(values) + noise`` on shared coordinates, 0 elsewhere, and the
        shared set as a mask if a top-k left only its threshold: one pass.

        ``noise`` holds one draw per shared coordinate, in order, plus a spare slot (None: no
        noise).
        """
        pending = self.floor > 0 or self.clip != math.inf
        if noise is None and factor == 1.0 and not pending:
            return
        has_mask, mask = self.maskb is not None, self.mask
        mask_out = self.new_bool_buffer() if self.floor > 0 else self.maskb
        out = _NO_MASK if mask_out is None else mask_out.view(torch.uint8).numpy()
        draws = _EMPTY if noise is None else noise
        starts = kernels.chunk_starts(self.n)
        firsts = [0] * len(starts)
        if noise is not None:  # where each chunk's draws begin
            if has_mask or self.floor > 0:
                counts = self.shared_per_chunk()
                firsts = np.concatenate(([0], np.cumsum(counts)[:-1])).tolist()
            else:
                firsts = list(starts)
        first_of = dict(zip(starts, firsts, strict=True))
        floor, clip, array = self.floor, self.clip, self.array
        kernels.run_chunks(
            lambda s, e: kernels.finish_values(
                array, mask, has_mask, floor, clip, factor, draws, first_of[s], out, s, e
            ),
            self.n,
        )
        norms = self.norms
        self.maskb, self.floor, self.clip = mask_out, 0.0, math.inf
        self.touched()
        if noise is None and factor == 1.0:
            self.norms = norms  # the clipped values are what the norms were of

    def shared_per_chunk(self) -> np.ndarray:
        if self.chunk_counts is None:
            if self.floor > 0:
                raise AssertionError("a pending top-k threshold always knows its chunk counts")
            mask = self.mask
            self.chunk_counts = np.asarray(
                kernels.run_chunks(lambda s, e: int(np.count_nonzero(mask[s:e])), self.n)
            )
        return self.chunk_counts

    def current_norms(self) -> tuple[float, float]:
        """``(L2, L1)`` of the meant values (clipped, shared only)."""
        if self.norms is None:
            floor, clip, array = self.floor, self.clip, self.array
            parts = kernels.run_chunks(
                lambda s, e: kernels.shared_norms(array, floor, clip, s, e), self.n
            )
            self.norms = (sum(p[0] for p in parts), sum(p[1] for p in parts))
        sumsq, l1 = self.norms
        return math.sqrt(sumsq), l1


_EMPTY = np.empty(0, dtype=np.float32)


# --- exact order statistics ----------------------------------------------------------------

#: Below this many scores, order statistics come from one in-place partition of a copy.
EXACT_BELOW = 1 << 18
#: Scores sampled (with replacement) to bracket the ranks asked for.
BRACKET_SAMPLE = 1 << 16
#: Half-width of the bracket, in binomial standard deviations of the sample count (plus 2).
BRACKET_SIGMAS = 4.5  # a miss costs one full partition; a wider bracket costs every call


@dataclass
class _Band:
    """The scores in a bracket ``[lo, hi]``: the ``size`` values of ``values`` that come after
    its ``offset`` smallest (``values`` may hold a second band's scores too, all above or all
    below this one's). ``below`` scores are smaller than ``lo``; per
    :func:`kernels.chunk_size` chunk, ``chunk_ge`` are at least ``lo``. For the last bracket
    of a scan, ``above`` scores exceed ``hi`` and ``sumsq_below``/``l1_below`` sum the shared
    scores below ``lo`` (for a second bracket: only those above the first one, see
    :func:`_bands`). ``segments`` are ``(start, count)`` of each chunk's gathered scores and
    positions in the workspace: valid until the next scan (:func:`_positions_of`)."""

    lo: float
    hi: float
    below: int
    chunk_ge: np.ndarray
    values: np.ndarray
    offset: int
    size: int
    segments: list[tuple[int, int]]
    above: int = 0
    sumsq_below: float = 0.0
    l1_below: float = 0.0


def _scores(st: _State, source: np.ndarray, at: np.ndarray | slice) -> np.ndarray:
    """Scores of ``source`` at ``at``: ``|value|``, and -1 where the coordinate is unshared."""
    s = np.abs(source[at])
    if st.floor > 0 and source is st.array:  # the threshold is on the values, not on keys
        s[s < st.floor] = -1.0
    if st.maskb is not None:
        s[st.mask[at] == 0] = -1.0
    return s


def _sorted_sample(st: _State, source: np.ndarray) -> np.ndarray:
    """BRACKET_SAMPLE scores drawn uniformly with replacement, sorted."""
    picks = torch.randint(0, source.size, (BRACKET_SAMPLE,), generator=st.generator).numpy()
    return np.sort(_scores(st, source, picks))


def _bands(
    st: _State, source: np.ndarray, ranges: list[tuple[int, int]], sample: np.ndarray
) -> list[_Band | None]:
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

    def scan(start: int, end: int) -> tuple:
        inside, *counts = kernels.band_scan(
            source, mask, has_mask, floor, lo1, hi1, lo2, hi2, sum_lo, start, end,
            idx[start:end], scores[start:end],
        )  # fmt: skip
        return start, inside, *counts

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
    out: list[_Band | None] = []
    for k, ((r_min, r_max), (lo, hi), (offset, size)) in enumerate(
        zip(ranges, brackets, places, strict=True)
    ):
        chunk_ge = np.array([p[2 + k] for p in parts], dtype=np.int64)
        below = n - int(chunk_ge.sum())
        band = _Band(lo, hi, below, chunk_ge, union, offset, size, segments)
        out.append(None if below > r_min or r_max >= below + size else band)
    if out[-1] is not None:
        out[-1].above = sum(p[4] for p in parts)
        out[-1].sumsq_below = sum(p[5] for p in parts)
        out[-1].l1_below = sum(p[6] for p in parts)
    return out


def _band_buffers(st: _State) -> tuple[np.ndarray, np.ndarray]:
    """Where a scan gathers each chunk's positions and scores (each chunk at its own start)."""
    positions = torch.int32 if st.n < 2**31 else torch.int64
    return (
        st.ws.get("band_idx", st.n, positions).numpy(),
        st.ws.get("band_scores", st.n).numpy(),
    )


def _positions_of(st: _State, band: _Band, score: float) -> np.ndarray:
    """The positions of ``band``'s scores equal to ``score`` (from the latest scan)."""
    idx, scores = _band_buffers(st)
    return kernels.concat(
        (idx[a : a + c][scores[a : a + c] == score] for a, c in band.segments), np.int64
    ).astype(np.int64)


def _below_per_chunk(st: _State, band: _Band, score: float) -> np.ndarray:
    """Per chunk, how many of ``band``'s gathered scores are below ``score``."""
    scores = _band_buffers(st)[1]
    return np.array(
        [np.count_nonzero(scores[a : a + c] < score) for a, c in band.segments], dtype=np.int64
    )


def _order_stats(
    st: _State, source: np.ndarray, ranks: list[int], sample: np.ndarray | None = None
) -> tuple[list[float], _Band | None]:
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


def _pick(st: _State, band: _Band, ranks: list[int]) -> list[float]:
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


def _random_subset(st: _State, candidates: np.ndarray, count: int) -> np.ndarray:
    return candidates[torch.randperm(candidates.size, generator=st.generator)[:count].numpy()]


def _keep_top_lazily(st: _State, k: int) -> bool:
    """Share the ``k`` largest ``|values|`` by recording the threshold (``st.floor``) instead of
    writing a mask: the pass that writes the values later applies it. Ties at the threshold are
    broken uniformly at random by zeroing the surplus (then below the floor). Returns False,
    changing nothing, where this does not apply (small updates, a bracket miss, a threshold of
    0); the caller then takes :func:`_select_top`.

    Look-ahead: when the next filter is ``percentile_clipping``, the ranks it will ask are
    known now (the shared set will be the top ``k``), so the same scan brackets them too and
    the clip needs no scan of its own (``st.prepared``).
    """
    n = st.n
    if n < EXACT_BELOW or k == 0:
        return False
    r = n - k
    ranges = [(r, r)]
    coming = next((f for f in st.upcoming if f["filter"] not in _NOT_ON_UPDATE), None)
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
    if ahead is not None and band.hi < ahead.lo:
        # Every score from the second bracket up is shared and unchanged, so its band holds
        # for the ranks after the selection; its sums cover the scores between the brackets,
        # and the first band's kept scores (less the dropped ties, each equal to kth) join them.
        sumsq, l1 = kernels.band_sums(band.values, kth, band.hi, math.inf)
        ahead.sumsq_below += sumsq - max(surplus, 0) * kth * kth
        ahead.l1_below += l1 - max(surplus, 0) * kth
        st.prepared[tuple(clip_ranks)] = ahead
    return True


def _select_top(
    st: _State, source: np.ndarray, k: int, *, unshare: bool
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


_EMPTY_VALUES = np.zeros(1, dtype=np.float32)


# --- the filters ---------------------------------------------------------------------------


def _partial_sharing(st: _State, f: dict, notes: dict) -> None:
    m = st.shared
    k = round(f["fraction"] * m)
    notes.update(strategy=f["strategy"], candidates=m, kept=k)
    if k >= m:
        return
    if st.clip != math.inf:
        st.finish()  # a pending clip changes the scores
    if f["strategy"] == "topk":
        if _keep_top_lazily(st, k):
            notes["threshold"] = st.floor
            return
        mask, kth, counts = _select_top(st, st.array, k, unshare=True)
        notes["threshold"] = kth
        st.set_mask(mask, k, counts)
    else:
        st.finish()  # the keys need the shared set as a mask
        keys = st.ws.get("keys", st.n)
        uniform_keys_(keys, st.generator)
        mask, _kth, counts = _select_top(st, keys.numpy(), k, unshare=True)
        st.set_mask(mask, k, counts)


def _percentile_ranks(m: int, percentile: float, offset: int) -> tuple[list[int], float]:
    """The ascending ranks whose scores give the ``percentile`` of ``m`` shared scores that
    start at rank ``offset`` (numpy's "linear" method), and the interpolation weight."""
    pos = percentile / 100.0 * (m - 1)
    lo = math.floor(pos)
    interpolate = pos > lo and lo + 1 < m
    ranks = [offset + lo, offset + lo + 1] if interpolate else [offset + lo]
    return ranks, pos - lo


def _percentile(st: _State, percentile: float) -> tuple[float, _Band | None]:
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


def _percentile_clipping(st: _State, f: dict, notes: dict) -> None:
    if st.shared == 0:
        notes.update(clip_value=None)
        return
    q, band = _percentile(st, f["percentile"])
    st.clip = q  # applied by the next pass that writes the values (State.finish)
    st.touched()
    if band is not None:
        # The clipped norms without another pass: scores below the band are below q, those
        # above it are clipped to q, and the band's own are known.
        sumsq, l1 = kernels.band_sums(band.values, max(band.lo, 0.0), band.hi, q)
        st.norms = (
            band.sumsq_below + sumsq + band.above * q * q,
            band.l1_below + l1 + band.above * q,
        )
    notes.update(clip_value=q)


def _clip_scale(st: _State, bound: float, ord_: int) -> tuple[float, float, float]:
    """``(norm, clipped norm, factor)``: multiplying by ``factor`` clips the update to ``bound``."""
    l2, l1 = st.current_norms()
    norm = l1 if ord_ == 1 else l2
    # Norms are float64 sums of float32 values; the margin covers float32 rounding of the result.
    factor = bound / norm * _CLIP_MARGIN if norm > bound else 1.0
    return norm, min(norm, bound), factor


def _draws(st: _State, fill: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray | None:
    """One fresh noise draw per shared coordinate (compact), or None when nothing is shared."""
    if not st.shared:
        return None
    draws = st.ws.get("noise", st.shared + 1)  # a spare slot: see kernels.finish_values
    fill(draws[: st.shared])
    draws[st.shared] = 0.0
    return draws.numpy()


def _laplace_noise(st: _State, f: dict, notes: dict) -> list[dict]:
    eps, sens = f["epsilon"], f["sensitivity"]
    before, after, factor = _clip_scale(st, sens, 1)
    scale = sens / eps
    noise = _draws(st, lambda out: laplace_noise_(out, scale, st.generator))
    st.finish(factor, noise)
    notes.update(l1_before=before, l1_clipped=after, scale=scale)
    return [_event("laplace", {"epsilon": eps}, "laplace_noise")]


def _gaussian_noise(st: _State, f: dict, notes: dict) -> list[dict]:
    z, clip = f["noise_multiplier"], f["clip_norm"]
    before, after, factor = _clip_scale(st, clip, 2)
    std = z * clip
    noise = _draws(st, lambda out: gaussian_noise_(out, std, st.generator))
    st.finish(factor, noise)
    notes.update(l2_before=before, l2_clipped=after, std=std)
    return [_event("gaussian", {"noise_multiplier": z}, "gaussian_noise")]


def _svt(st: _State, f: dict, notes: dict) -> list[dict]:
    eps, threshold = f["epsilon"], f["threshold"]
    gamma = svt_gamma(threshold)
    ws, n = st.ws, st.n
    target = round(f["fraction"] * st.shared)
    st.finish()
    st.values.clamp_(-gamma, gamma)
    # candidates: shared and not selected yet (float 0/1); selected: chosen so far.
    candidates = ws.get("svt_cand", n)
    if st.maskb is None:
        candidates.fill_(1.0)
    else:
        _bool_to_float(st.maskb, candidates)
    # From here the candidates carry the shared set; the selections below see every
    # coordinate as shared, and the final mask is set at the end.
    st.maskb = None
    selected = ws.get("svt_sel", n).zero_()
    noise, scratch = ws.get("noise", n), ws.get("scratch", n)
    positives = ws.get("svt_pos", n)
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
        hits = torch.ge(noise, noisy_threshold, out=ws.get("bool", n, torch.bool))
        _bool_to_float(hits, positives).mul_(candidates)
        found = int(torch.count_nonzero(hits.copy_(positives)))
        if found > c:
            # First c positives of a uniformly random scan order == a uniform c-subset of them.
            keys = ws.get("keys", n)
            uniform_keys_(keys, st.generator)
            keys.mul_(positives)  # 0 outside the positives: never among the top c (keys > 0)
            _bool_to_float(_select_top(st, keys.numpy(), c, unshare=False)[0], positives)
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
    st.set_mask(torch.ne(selected, 0.0, out=st.new_bool_buffer()), chosen)
    notes.update(gamma=gamma, target=target, selected=chosen, passes=passes, per_pass=per_pass)
    return [_event("pure_epsilon", {"epsilon": eps * passes}, "svt")]


def _bool_to_float(maskb: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # Through uint8: torch converts uint8 to float with vectorised code, bool one by one (4x).
    return out.copy_(maskb.view(torch.uint8))


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
    for i, f in enumerate(filters):
        st.upcoming = filters[i + 1 :]
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

    st.finish()  # a clip still pending
    out: dict[str, torch.Tensor] = {}
    mask_out: dict[str, torch.Tensor] | None = None if st.maskb is None else {}
    offset = 0
    for name in kept:
        shape, size = delta[name].shape, delta[name].numel()
        out[name] = values[offset : offset + size].view(shape)
        if mask_out is not None:
            mask_out[name] = st.maskb[offset : offset + size].view(shape)
        offset += size
    notes = {"total": total, "shared": st.shared, "excluded": sorted(excluded), "steps": steps}
    return FilteredUpdate(
        delta=out,
        mask=mask_out,
        events=events,
        shared_fraction=(st.shared / total) if total else 0.0,
        notes=notes,
    )
