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
  interpolation (equal to ``torch.quantile`` where that works). It is computed by
  ``numpy.ndarray.partition`` (introselect, O(n)) on a reused scratch buffer, for any size:
  ``torch.quantile`` refuses more than 2^24 elements and ``torch.kthvalue`` costs about 100
  aggregation passes on 10M values, while the in-place partition costs about 8 to 10 (see
  docs/performance.md, "Privacy filters"). After a top-k ``partial_sharing`` the partitioned top-k
  block is reused, so only the shared values are partitioned again.
* **Clipping margin.** L1 and L2 clips scale by ``bound / norm * (1 - 2**-20)`` so that the bound
  holds after float32 rounding (a DP guarantee needs the bound to hold, not almost hold).
* **Noise.** Drawn in chunks of :data:`NOISE_CHUNK` values, each from its own ``torch.Generator``
  seeded by a draw from the caller's ``generator``, on a small thread pool (torch's CPU samplers are
  single-threaded). Results depend only on the caller's generator, not on the thread count. The
  Laplace sampler is the inverse CDF on float32 uniforms (tails end at about 16.6 b); like every
  textbook floating-point sampler it is not hardened against the floating-point attacks of
  Mironov (2012), and torch's Mersenne Twister is not a cryptographic generator: seed
  ``generator`` from ``os.urandom`` in production.
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
large scratch buffer comes from a :class:`Workspace`. Pass one workspace per site worker to reuse
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

from training.spec import _MISSING, FILTER_PARAMS, _LayerList

__all__ = [
    "NOISE_CHUNK",
    "SVT_GAMMA_FACTOR",
    "UPDATE_FILTERS",
    "FilteredUpdate",
    "Workspace",
    "apply_pipeline",
    "svt_gamma",
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
#: Values drawn per noise generator (one chunk per thread task).
NOISE_CHUNK = 1 << 20
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


def _chunked(out: torch.Tensor, generator: torch.Generator, fill: Callable) -> None:
    """Run ``fill(chunk, chunk_generator, i)`` over NOISE_CHUNK-sized chunks of ``out``."""
    n = out.numel()
    if n == 0:
        return
    chunks = math.ceil(n / NOISE_CHUNK)
    seeds = torch.randint(0, 2**62, (chunks,), generator=generator, dtype=torch.int64).tolist()

    def work(i: int) -> None:
        g = torch.Generator()
        g.manual_seed(seeds[i])
        fill(out[i * NOISE_CHUNK : (i + 1) * NOISE_CHUNK], g, i)

    if chunks == 1:
        work(0)
    else:
        list(_executor().map(work, range(chunks)))


def gaussian_noise_(out: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fill flat ``out`` with N(0, std²) draws."""
    _chunked(out, generator, lambda c, g, _i: c.normal_(0.0, std, generator=g))
    return out


def laplace_noise_(
    out: torch.Tensor, scale: float, generator: torch.Generator, scratch: torch.Tensor
) -> torch.Tensor:
    """Fill flat ``out`` with Laplace(0, scale) draws (``scratch``: same size, clobbered)."""

    def fill(c: torch.Tensor, g: torch.Generator, i: int) -> None:
        s = scratch[i * NOISE_CHUNK : i * NOISE_CHUNK + c.numel()]
        c.uniform_(-1.0, 1.0, generator=g).clamp_(-_U_MAX, _U_MAX)
        torch.sign(c, out=s)
        # Inverse CDF: -b * sign(u) * log(1 - |u|), u uniform on (-1, 1).
        c.abs_().neg_().log1p_().mul_(s).mul_(-scale)

    _chunked(out, generator, fill)
    return out


def _laplace_scalar(scale: float, generator: torch.Generator) -> float:
    u = float(torch.empty(1).uniform_(-1.0, 1.0, generator=generator).clamp_(-_U_MAX, _U_MAX))
    return -scale * math.copysign(1.0, u) * math.log1p(-abs(u)) if u else 0.0


# --- the state the filters share -----------------------------------------------------------


class _State:
    """The flat update and its shared set while the pipeline runs.

    Invariant: ``values`` is 0 wherever ``maskf`` is 0. ``maskf`` (float32 0/1, None = all
    shared) is float so that masking is one vectorised multiply. ``shared_abs`` caches a numpy
    array holding exactly the multiset of ``|values|`` of the shared coordinates (in any order)
    while the values are unchanged.
    """

    def __init__(self, values: torch.Tensor, ws: Workspace, generator: torch.Generator):
        self.values = values
        self.n = values.numel()
        self.ws = ws
        self.generator = generator
        self.maskf: torch.Tensor | None = None
        self.shared = self.n
        self.shared_abs: np.ndarray | None = None
        self._mask_slot = 0

    def new_mask_buffer(self) -> torch.Tensor:
        # Two mask buffers alternate, so the current mask can be read while the next is built.
        self._mask_slot ^= 1
        return self.ws.get(f"mask{self._mask_slot}", self.n)

    def scores_with_unshared_at(self, scores: torch.Tensor, fill: float) -> torch.Tensor:
        """``scores`` (float, >= 0) with unshared coordinates set to ``fill`` (< 0), exactly."""
        if self.maskf is not None:
            _fill_outside(scores, self.maskf, fill, self.ws.get("tmp", self.n))
        return scores

    def apply_mask(self, maskf: torch.Tensor, count: int) -> None:
        self.values.mul_(maskf)
        self.maskf = maskf
        self.shared = count
        self.shared_abs = None

    def touched(self) -> None:
        self.shared_abs = None


def _fill_outside(
    scores: torch.Tensor, maskf: torch.Tensor, fill: float, tmp: torch.Tensor
) -> torch.Tensor:
    """Set ``scores`` to ``fill`` where ``maskf`` is 0, leaving the rest bit-for-bit unchanged."""
    scores.mul_(maskf)
    torch.sub(maskf, 1.0, out=tmp).mul_(-fill)
    return scores.add_(tmp)  # kept: s + 0 (exact); others: 0 + fill


def _select_top(st: _State, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, np.ndarray]:
    """A float 0/1 mask of exactly ``k`` coordinates of highest score (ties broken at random).

    ``scores`` must be below every candidate's score where a coordinate may not be chosen.
    Returns the mask and the partitioned numpy scratch whose last ``k`` entries are the chosen
    scores.
    """
    n = st.n
    if k == 0:
        return st.new_mask_buffer().zero_(), np.empty(0, dtype=np.float32)
    part = st.ws.get("part", n, scores.dtype)
    part.copy_(scores)
    arr = part.numpy()
    j = n - k
    arr.partition(j)
    kth = arr[j].item()
    mask = st.new_mask_buffer()
    chosen = torch.ge(scores, kth, out=st.ws.get("bool", n, torch.bool))
    count = int(torch.count_nonzero(chosen))  # on bool: ~30x faster than on float
    mask.copy_(chosen)
    if count > k:  # ties at the boundary: drop the surplus uniformly at random
        tied = torch.nonzero(scores == kth).flatten()
        drop = tied[torch.randperm(tied.numel(), generator=st.generator)[: count - k]]
        mask[drop] = 0.0
    return mask, arr[j:]


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
        mask, top = _select_top(st, scores, k)
        notes["threshold"] = float(top[0]) if k else None
        st.apply_mask(mask, k)
        st.shared_abs = top  # exactly the |values| kept
    else:
        keys = st.ws.get("keys", st.n)
        _chunked(keys, st.generator, lambda c, g, _i: c.uniform_(0.0, 1.0, generator=g))
        st.scores_with_unshared_at(keys, -1.0)
        mask, _ = _select_top(st, keys, k)
        st.apply_mask(mask, k)


def _shared_abs(st: _State) -> np.ndarray:
    """A numpy array with exactly the shared coordinates' ``|values|`` (scratch, any order)."""
    if st.shared_abs is not None:
        return st.shared_abs
    part = st.ws.get("part", st.n)
    torch.abs(st.values, out=part)
    if st.maskf is None:
        return part.numpy()
    st.scores_with_unshared_at(part, -1.0)
    # Unshared coordinates sort first (-1 < every |v|): the shared ones are the top block.
    arr = part.numpy()
    j = st.n - st.shared
    if j > 0:
        arr.partition(j - 1)
    return arr[j:]


def _percentile_of(arr: np.ndarray, percentile: float) -> float:
    """The exact ``percentile`` of ``arr`` (numpy "linear" method), by in-place partition."""
    m = arr.size
    pos = percentile / 100.0 * (m - 1)
    lo = math.floor(pos)
    arr.partition(lo)  # one kth: numpy's multi-kth partition is several times slower
    a = float(arr[lo])
    b = float(arr[lo + 1 :].min()) if pos > lo and lo + 1 < m else a
    value = a + (b - a) * (pos - lo)
    return float(np.float32(value))


def _percentile_clipping(st: _State, f: dict, notes: dict) -> None:
    if st.shared == 0:
        notes.update(clip_value=None)
        return
    q = _percentile_of(_shared_abs(st), f["percentile"])
    st.values.clamp_(-q, q)
    st.touched()
    notes.update(clip_value=q)


def _clip_norm(st: _State, bound: float, ord_: int) -> tuple[float, float]:
    if ord_ == 1:
        tmp = torch.abs(st.values, out=st.ws.get("tmp", st.n))
        norm = float(tmp.sum())
    else:
        norm = float(torch.linalg.vector_norm(st.values))
    # float32 reductions (float64 ones cost ~30 passes: mixed-dtype kernels are not vectorised);
    # their relative error, ~1e-7, is covered by _CLIP_MARGIN.
    if norm > bound:
        st.values.mul_(bound / norm * _CLIP_MARGIN)
        st.touched()
    return norm, min(norm, bound)


def _add_noise(st: _State, noise: torch.Tensor) -> None:
    if st.maskf is not None:
        noise.mul_(st.maskf)
    st.values.add_(noise)
    st.touched()


def _laplace_noise(st: _State, f: dict, notes: dict) -> list[dict]:
    eps, sens = f["epsilon"], f["sensitivity"]
    before, after = _clip_norm(st, sens, 1)
    scale = sens / eps
    if st.shared:
        noise = st.ws.get("noise", st.n)
        laplace_noise_(noise, scale, st.generator, st.ws.get("scratch", st.n))
        _add_noise(st, noise)
    notes.update(l1_before=before, l1_clipped=after, scale=scale)
    return [_event("laplace", {"epsilon": eps}, "laplace_noise")]


def _gaussian_noise(st: _State, f: dict, notes: dict) -> list[dict]:
    z, clip = f["noise_multiplier"], f["clip_norm"]
    before, after = _clip_norm(st, clip, 2)
    std = z * clip
    if st.shared:
        noise = gaussian_noise_(st.ws.get("noise", st.n), std, st.generator)
        _add_noise(st, noise)
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
        laplace_noise_(noise, 2.0 * c * gamma / eps_queries, st.generator, scratch)
        noise.add_(torch.abs(st.values, out=scratch))
        positives = st.new_mask_buffer()
        hits = torch.ge(noise, noisy_threshold, out=ws.get("bool", n, torch.bool))
        positives.copy_(hits).mul_(candidates)
        found = int(torch.count_nonzero(hits.copy_(positives)))
        if found > c:
            # First c positives of a uniformly random scan order == a uniform c-subset of them.
            keys = ws.get("keys", n)
            _chunked(keys, st.generator, lambda ch, g, _i: ch.uniform_(0.0, 1.0, generator=g))
            _fill_outside(keys, positives, -1.0, ws.get("tmp", n))
            positives.copy_(_select_top(st, keys, c)[0])
            found = c
        if found:
            # Release this pass's values with Lap(c gamma / eps3), then clip (post-processing).
            laplace_noise_(noise, c * gamma / eps_release, st.generator, scratch)
            noise.mul_(positives)
            st.values.add_(noise).clamp_(-gamma, gamma)
            selected.add_(positives)
            candidates.sub_(positives)
        chosen += found
        per_pass.append(found)
    st.values.mul_(selected)
    mask = st.new_mask_buffer()
    mask.copy_(selected)
    st.maskf, st.shared = mask, chosen
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
        maskb = ws.get("mask_bool", n, torch.bool)
        maskb.copy_(st.maskf)
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
