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
  statistics found without sorting or partitioning the whole update (:mod:`training.fl.selection`):
  the quantiles of a sample of 65,536 scores bracket the rank asked for, one chunked scan counts the
  scores below the bracket and gathers the ~2% inside it, and a partition of those gives the exact
  value. If the bracket misses (about 1e-5 per call, or on adversarial data), everything is
  partitioned in place instead: the result never depends on the sample, only the time does. A top-k
  ``partial_sharing`` followed by ``percentile_clipping`` brackets both ranks in the same scan (the
  percentile's ranks are known once ``k`` is), which also sums what the clipped norm needs.
* **Clipping margin.** L1 and L2 clips scale by ``bound / norm * (1 - 2**-20)`` so that the bound
  holds after float32 rounding (a DP guarantee needs the bound to hold, not almost hold).
* **Noise.** Gaussian noise is Box-Muller, Laplace noise the inverse CDF, the uniform that decides
  the tail "wide" (64 or 63 bits in float64, extended geometrically: tails to 37.7 std and 743 b,
  the rest accounted in δ; see :mod:`training.fl.noise`), made from AES-128-CTR keystream
  (``cryptography``/OpenSSL, AES-NI), in chunks of :data:`training.fl.noise.NOISE_CHUNK` values
  on a small thread pool, with numpy's vectorised float64 log and float32 sin and cos. Noise is
  drawn only for the shared coordinates, one draw each in order.
  The AES key is 128 bits drawn from the caller's ``generator``; chunk ``i`` uses counter block
  ``i * 2**64``, so results depend only on the generator, not on the thread count. This is about 3x
  faster than torch's single-threaded Mersenne Twister sampler and, unlike it, its output does not
  reveal the generator state. Like every textbook floating-point sampler it is not hardened against
  the floating-point attacks of Mironov (2012), and the noise is only as unpredictable as
  ``generator``'s seed: seed it from ``os.urandom``/``secrets`` in production (the site worker
  does).
* **Laplace noise** (``laplace_noise``) clips the update to L1 norm ``sensitivity`` (with
  the margin above) and adds ``Lap(sensitivity / ε)`` to every shared coordinate: the L1 clip is
  the fixed bound the guarantee rests on (a site's whole update against none). The optional
  ``clip`` first clamps every shared coordinate to ``[-clip, clip]``, so that no single
  coordinate, whatever the relative ``percentile_clipping`` before it let through, takes the
  whole L1 budget; ``clip`` may not exceed ``sensitivity`` (validated). When
  ``clip * shared coordinates <= sensitivity`` the L1 clip never binds and the noise is
  calibrated to the per-coordinate bound alone. The clamp is recorded like a percentile clip
  (the smaller bound wins) and applied in the pass that adds the noise: no extra pass.
* **Sparse vector technique** (``svt``), after Lyu, Su and Li, "Understanding the Sparse Vector
  Technique for Differential Privacy" (2017), Algorithm 1, as used for FL updates by Li et al.
  (NVIDIA/KCL, 2019). ``gamma`` (the parameter ``bound``; ``SVT_GAMMA_FACTOR * threshold``,
  twice the threshold, when left out, and never below ``threshold``) bounds every value: the
  update is clipped to ``[-gamma, gamma]`` and the query for coordinate ``i`` is ``|v_i|`` in
  ``[0, gamma]``, of sensitivity ``gamma`` (a site's whole update against none, the convention
  of the other filters here). ``threshold`` must be above 0 (validated here and in the spec): at
  0 the default bound would clip every value to 0 while ε is spent. Each *pass* is a fresh ε-DP
  run that may select up to the ``c`` coordinates still missing, over the coordinates not
  selected yet. Its ε is split by two parameters: ``selection_share`` ``s`` (default 0.5) goes to
  the selection, split by ``threshold_share`` ``t`` (default 0.5, Lyu's ε1 = ε2) into
  ε1 = ε s t for the threshold noise ``Lap(gamma / ε1)`` and ε2 = ε s (1 - t) for the query
  noise ``Lap(2 c gamma / ε2)``; the release gets ε3 = ε (1 - s): the pass's selected values
  receive ``Lap(c gamma / ε3)`` and are clipped to ``[-gamma, gamma]`` again
  (post-processing). ε1 + ε2 + ε3 = ε whatever the split, so the accountant's pure ε per pass
  holds; the defaults give ε/4, ε/4 and ε/2 exactly (the same draws as before the split was a
  parameter). Scanning in a uniformly random order and stopping at the ``c``-th positive is
  carried out as "all noisy tests at once, then a uniformly random ``c``-subset of the
  positives", which has exactly the same output distribution, so the same privacy, without a
  permutation of every coordinate. No coordinate is tested again once selected, so none is
  selected twice. Passes stop as soon as the selection is complete (``round(fraction * m)``
  selected, or no coordinate left to select), so a pass that could select nothing is neither
  run nor charged. The event is ``pure_epsilon`` with ε × passes actually run (the accountant
  projects ε × ``max_passes``). Note that ``c`` grows with the update, so on a large model the
  query noise dwarfs ``gamma`` and selection is close to uniform: that is the price of
  update-level pure DP, not a bug. For the same reason ``fraction`` 1.0 does not share
  everything: each pass selects about the half of the remaining coordinates whose noisy query
  passes the noisy threshold, so ``max_passes`` passes leave about ``2**-max_passes`` of them
  unshared (measured: 87% to 99.5% shared), and every pass run is charged.

Performance: everything runs on one flat float32 copy of the shared parameters, in place, and every
large scratch buffer comes from a :class:`~training.fl.pipeline_state.Workspace`. The loops over the
whole update are compiled (:mod:`training.fl.kernels`), and as few as possible: a top-k records its
threshold and a percentile clip its bound instead of writing the values
(:class:`~training.fl.pipeline_state.PipelineState`), and the one pass that writes them anyway (with
the noise, or at the end) applies both; the clipped norm comes from the selection's scan. Costs, and
what did not help, are in docs/performance.md, "Privacy filters". Pass one workspace per site worker
to reuse the buffers across rounds: the returned tensors are then views into the workspace and are
overwritten by the next call with it (serialise the update first). Without a workspace each call
allocates its own.

The pipeline is five modules, each with one job: this one (the filters and :func:`apply_pipeline`,
which drives them), :mod:`training.fl.params` (each filter's parameters, and
:func:`~training.fl.params.validate_filter`), :mod:`training.fl.pipeline_state` (the flat update,
its shared set and the scratch buffers), :mod:`training.fl.selection` (exact order statistics and
top-k) and :mod:`training.fl.noise` (the samplers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from training.fl import kernels
from training.fl.noise import gaussian_noise_, laplace_noise_, laplace_scalar, uniform_keys_
from training.fl.params import SVT_BOUND_FACTOR, validate_filter
from training.fl.pipeline_state import PipelineState, Workspace
from training.fl.selection import keep_top_lazily, percentile, select_top

__all__ = [
    "SVT_GAMMA_FACTOR",
    "FilteredUpdate",
    "apply_pipeline",
    "svt_budget",
    "svt_gamma",
]

#: ``gamma`` (the SVT value bound) is this multiple of the job's ``threshold`` unless the
#: filter's ``bound`` says otherwise (:data:`training.fl.params.SVT_BOUND_FACTOR`).
SVT_GAMMA_FACTOR = SVT_BOUND_FACTOR
_CLIP_MARGIN = 1.0 - 2.0**-20


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
    events: list[dict[str, Any]]
    shared_fraction: float
    notes: dict[str, Any] = field(default_factory=dict)


def svt_gamma(threshold: float, bound: float | None = None) -> float:
    """The value bound ``gamma`` that :func:`apply_pipeline` uses for an svt ``threshold``
    (and its ``bound``, when given)."""
    return float(bound) if bound is not None else SVT_GAMMA_FACTOR * float(threshold)


def svt_budget(
    epsilon: float, selection_share: float, threshold_share: float
) -> tuple[float, float, float]:
    """``(ε1, ε2, ε3)``: one svt pass's ε for the threshold noise, the query noise and the
    release; they add up to ``epsilon`` (the module docstring)."""
    selection = epsilon * selection_share
    return selection * threshold_share, selection * (1.0 - threshold_share), epsilon - selection


# --- the filters ---------------------------------------------------------------------------


def _partial_sharing(st: PipelineState, f: dict[str, Any], notes: dict[str, Any]) -> None:
    m = st.shared
    k = round(f["fraction"] * m)
    notes.update(strategy=f["strategy"], candidates=m, kept=k)
    if k >= m:
        return
    if st.clip != math.inf:
        st.finish()  # a pending clip changes the scores
    if f["strategy"] == "topk":
        if keep_top_lazily(st, k):
            notes["threshold"] = st.floor
            return
        mask, kth, counts = select_top(st, st.array, k, unshare=True)
        notes["threshold"] = kth
        st.set_mask(mask, k, counts)
    else:
        st.finish()  # the keys need the shared set as a mask
        keys = st.ws.get("keys", st.n)
        uniform_keys_(keys, st.generator)
        mask, _kth, counts = select_top(st, keys.numpy(), k, unshare=True)
        st.set_mask(mask, k, counts)


def _percentile_clipping(st: PipelineState, f: dict[str, Any], notes: dict[str, Any]) -> None:
    if st.shared == 0:
        notes.update(clip_value=None)
        return
    q, band = percentile(st, f["percentile"])
    st.clip = q  # applied by the next pass that writes the values (PipelineState.finish)
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


def _clip_scale(st: PipelineState, bound: float, ord_: int) -> tuple[float, float, float]:
    """``(norm, clipped norm, factor)``: multiplying by ``factor`` clips the update to ``bound``."""
    l2, l1 = st.current_norms()
    norm = l1 if ord_ == 1 else l2
    # Norms are float64 sums of float32 values; the margin covers float32 rounding of the result.
    factor = bound / norm * _CLIP_MARGIN if norm > bound else 1.0
    return norm, min(norm, bound), factor


def _draws(st: PipelineState, fill: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray | None:
    """One fresh noise draw per shared coordinate (compact), or None when nothing is shared."""
    if not st.shared:
        return None
    draws = st.ws.get("noise", st.shared + 1)  # a spare slot: see kernels.finish_values
    fill(draws[: st.shared])
    draws[st.shared] = 0.0
    return draws.numpy()


def _laplace_noise(
    st: PipelineState, f: dict[str, Any], notes: dict[str, Any]
) -> list[dict[str, Any]]:
    eps, sens, clip = f["epsilon"], f["sensitivity"], f.get("clip")
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"laplace_noise.clip: must be greater than 0, got {clip!r}")
        if clip < st.clip:
            # Recorded like a percentile clip: the pass below clamps, scales and adds noise.
            st.clip = float(clip)
            st.touched()
        notes.update(clip=float(clip), l1_bound_of_clip=float(clip) * st.shared)
    before, after, factor = _clip_scale(st, sens, 1)
    scale = sens / eps
    noise = _draws(st, lambda out: laplace_noise_(out, scale, st.generator))
    st.finish(factor, noise)
    notes.update(l1_before=before, l1_clipped=after, scale=scale)
    return [_event("laplace", {"epsilon": eps}, "laplace_noise")]


def _gaussian_noise(
    st: PipelineState, f: dict[str, Any], notes: dict[str, Any]
) -> list[dict[str, Any]]:
    z, clip = f["noise_multiplier"], f["clip_norm"]
    before, after, factor = _clip_scale(st, clip, 2)
    std = z * clip
    noise = _draws(st, lambda out: gaussian_noise_(out, std, st.generator))
    st.finish(factor, noise)
    notes.update(l2_before=before, l2_clipped=after, std=std)
    return [_event("gaussian", {"noise_multiplier": z}, "gaussian_noise")]


def _svt(st: PipelineState, f: dict[str, Any], notes: dict[str, Any]) -> list[dict[str, Any]]:
    eps, threshold = f["epsilon"], f["threshold"]
    gamma = svt_gamma(threshold, f.get("bound"))
    if not (threshold > 0 and gamma >= threshold):
        # validate_filter refuses both; a direct caller must not get zeros marked as shared.
        raise ValueError(
            f"svt.threshold: must be greater than 0 and at most the bound, got threshold "
            f"{threshold!r} and bound {gamma!r}"
        )
    eps_threshold, eps_queries, eps_release = svt_budget(
        eps, f.get("selection_share", 0.5), f.get("threshold_share", 0.5)
    )
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
    left = st.shared  # coordinates that may still be selected
    # Complete once the quota is met or nothing is left to select: no pass runs (or is
    # charged) past that.
    while chosen < target and left > 0 and passes < f["max_passes"]:
        passes += 1
        c = target - chosen
        noisy_threshold = threshold + laplace_scalar(gamma / eps_threshold, st.generator)
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
            _bool_to_float(select_top(st, keys.numpy(), c, unshare=False)[0], positives)
            found = c
        if found:
            # Release this pass's values with Lap(c gamma / eps3), then clip (post-processing).
            laplace_noise_(noise, c * gamma / eps_release, st.generator)
            noise.mul_(positives)
            st.values.add_(noise).clamp_(-gamma, gamma)
            selected.add_(positives)
            candidates.sub_(positives)
        chosen += found
        left -= found
        per_pass.append(found)
    st.values.mul_(selected)
    st.set_mask(torch.ne(selected, 0.0, out=st.new_bool_buffer()), chosen)
    notes.update(
        gamma=gamma,
        epsilon_split=[eps_threshold, eps_queries, eps_release],
        target=target,
        selected=chosen,
        passes=passes,
        per_pass=per_pass,
    )
    return [_event("pure_epsilon", {"epsilon": eps * passes}, "svt")]


def _bool_to_float(maskb: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # Through uint8: torch converts uint8 to float with vectorised code, bool one by one (4x).
    return out.copy_(maskb.view(torch.uint8))


def _event(mechanism: str, params: dict[str, float], source: str) -> dict[str, Any]:
    params = {k: float(v) for k, v in params.items()}
    return {"mechanism": mechanism, "params": params, "count": 1, "source": source}


_FILTERS: dict[
    str, Callable[[PipelineState, dict[str, Any], dict[str, Any]], list[dict[str, Any]] | None]
] = {
    "partial_sharing": _partial_sharing,
    "percentile_clipping": _percentile_clipping,
    "laplace_noise": _laplace_noise,
    "gaussian_noise": _gaussian_noise,
    "svt": _svt,
}


# --- the pipeline --------------------------------------------------------------------------


def _excluded(names: list[str], filters: list[dict[str, Any]]) -> set[str]:
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
    pipeline: list[dict[str, Any]],
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
    st = PipelineState(values, ws, generator)

    events: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
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
    maskb = st.maskb  # None: every coordinate of what is sent is shared
    mask_out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in kept:
        shape, size = delta[name].shape, delta[name].numel()
        out[name] = values[offset : offset + size].view(shape)
        if maskb is not None:
            mask_out[name] = maskb[offset : offset + size].view(shape)
        offset += size
    notes = {"total": total, "shared": st.shared, "excluded": sorted(excluded), "steps": steps}
    return FilteredUpdate(
        delta=out,
        mask=None if maskb is None else mask_out,
        events=events,
        shared_fraction=(st.shared / total) if total else 0.0,
        notes=notes,
    )
