"""A cheap surrogate of every coalition's value, for contribution estimator 3 (no Django).

Sampled Shapley at a third of the coalitions errs by 0.26-0.35 of the round's change at 6 sites
and 0.06-0.11 at 8-10 when coalitions are valued by accuracy on real FedAvg rounds
(``benchmarks/science/shapley_on_training.py``, docs/science.md). Estimator 3
(:mod:`training.fl.contribution`) takes a control variate: a surrogate ``u(S)`` of every
coalition's value whose Shapley value is computed exactly, so the real evaluations only have to
estimate the Shapley value of the residual ``v − u``, which is small. This module makes ``u``.

Why it is cheap: with the plain or the zero-filled mean, a coalition's model is
``θ_S = θ_0 + Σ_{i∈S} w_i Δ_i / W_S`` (``Δ_i`` site ``i``'s shared change, zero where its mask
left a coordinate out, ``w_i`` its records, ``W_S`` the coalition's total), so
``θ_S = θ_N + Σ_i c_i(S) Δ_i`` with ``c_i(S) = w_i [i∈S] / W_S − w_i / W_N``: every coalition
lies in the n-dimensional span of the updates around the round's model ``θ_N`` (for ∅,
``c_i = −w_i / W_N`` gives the input model). The validation logits are taken to second order in
``c``: ``F(c) ≈ F(0) + Σ_i c_i J_i + ½ Σ_ij c_i c_j H_ij``, where ``J_i`` and ``H_ij`` are the
first and second directional derivatives of the logits along the updates (forward mode,
``jacfwd``: ``n`` first and ``n(n+1)/2`` distinct second derivatives, each a few forward passes
over the validation set, all directions of a batch of records in one vectorised pass), and each
coalition is valued from its surrogate logits exactly as :func:`training.fl.evaluate.evaluate`
values real ones (accuracy, or minus the mean cross-entropy). For 12 sites that is 90
derivatives against 4,096 coalition models: measured for the registry's CNN on 500 images of
28 x 28, the surrogate took 0.15 of the time of evaluating every coalition, and 360 MiB.

Out of its reach (``None``, and the scorer uses estimator 2): segmentation (a logit per pixel
and coalition would not fit), the cyclic topology (coalitions are sums, not means), more than
:data:`~training.fl.contribution.SURROGATE_MAX_PLAYERS` sites, and the mask-aware mean with any
coordinate a site did not share (each coordinate then has its own denominator, and the
coalitions leave the span).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacfwd

from training.fl.contribution import SURROGATE_MAX_PLAYERS
from training.fl.evaluate import NEG_LOSS


class CoalitionUtility(Protocol):
    """What the surrogate reads of :class:`training.fl.coalition.CoalitionUtility` (named here
    rather than imported: that module calls this one)."""

    modality: str
    combine: str
    zero_filled: bool
    metric: str
    sites: tuple[str, ...]
    base: dict[str, torch.Tensor]
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor

    @property
    def updates(
        self,
    ) -> Mapping[
        str, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None, float]
    ]: ...

    def state_of(self, coalition: frozenset[str]) -> dict[str, torch.Tensor]: ...


__all__ = ["quadratic_surrogate", "surrogate_out_of_reach"]

#: Validation records per pass of the derivatives: at most this many, and fewer for large
#: records or many sites (a pass carries all n² second directions at once, each with its own
#: activations) ...
RECORDS_PER_BATCH = 256
#: ... so that one pass holds about this many input numbers over all its directions (about
#: 200 MB of activations for the registry's CNN on 28 x 28 images).
INPUT_NUMBERS_PER_PASS = 1 << 20
#: Coalitions per contraction of the derivatives into logits.
COALITIONS_PER_CHUNK = 512


def surrogate_out_of_reach(utility: CoalitionUtility) -> str:
    """Why :func:`quadratic_surrogate` cannot serve this round, or ``""`` when it can."""
    if utility.modality == "segmentation":
        return "segmentation models are scored without a surrogate"
    if utility.combine != "mean":
        return "cyclic rounds add their deltas, so coalitions do not lie around the round's model"
    if len(utility.sites) > SURROGATE_MAX_PLAYERS:
        return f"more than {SURROGATE_MAX_PLAYERS} sites"
    if not utility.zero_filled:
        floating = {n for n, t in utility.base.items() if t.is_floating_point()}
        for site, (delta, mask, _weight) in utility.updates.items():
            if set(delta) != floating:
                return f"{site} shared only some tensors (mask-aware mean)"
            if mask and any(not bool(m.all()) for m in mask.values()):
                return f"{site} shared part of its update (mask-aware mean)"
    return ""


def _coefficients(weights: list[float]) -> torch.Tensor:
    """``c_i(S)`` for every coalition ``S`` (rows, by bit mask) and site ``i`` (columns)."""
    n = len(weights)
    w = torch.tensor(weights, dtype=torch.float64)
    members = (torch.arange(2**n).unsqueeze(1) >> torch.arange(n)) & 1  # [2^n, n]
    inside = members.to(torch.float64) * w
    totals = inside.sum(1, keepdim=True)
    share = torch.where(totals > 0, inside / totals.clamp_min(1e-300), torch.zeros_like(inside))
    return share - w / w.sum()


def _directions(utility: CoalitionUtility, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """Each site's shared change over the floating tensors (zero where it shared nothing)."""
    out = []
    for site in utility.sites:
        delta, mask, _weight = utility.updates[site]
        mask = mask or {}
        direction = {}
        for name in names:
            template = utility.base[name]
            d = delta.get(name)
            if d is None:
                direction[name] = torch.zeros_like(template)
                continue
            d = d.to(template.dtype).to(template.device)
            if name in mask:
                d = torch.where(mask[name].to(template.device), d, torch.zeros_like(d))
            direction[name] = d
        out.append(direction)
    return out


def quadratic_surrogate(utility: CoalitionUtility) -> list[float] | None:
    """Every coalition's surrogate value, indexed by bit mask over the sorted sites (the layout
    :func:`training.fl.contribution.surrogate_index` reads), or ``None`` when out of reach
    (:func:`surrogate_out_of_reach`)."""
    if surrogate_out_of_reach(utility):
        return None
    model = utility.model
    sites = utility.sites
    n = len(sites)
    full = {k: t.detach().clone() for k, t in utility.state_of(frozenset(sites)).items()}
    names = [k for k, t in full.items() if t.is_floating_point()]
    constants = {k: t for k, t in full.items() if not t.is_floating_point()}
    primals = {k: full[k] for k in names}
    directions = _directions(utility, names)
    # [n, *shape] per tensor, where the model's weights are (a site may evaluate on a GPU).
    stacked = {k: torch.stack([d[k] for d in directions]).to(full[k].device) for k in names}
    coeffs = _coefficients([utility.updates[s][2] for s in sites]).to(torch.float32)
    # ½ Σ_ij c_i c_j H_ij over i <= j only (H is symmetric): the off-diagonal terms twice.
    upper_i, upper_j = torch.triu_indices(n, n)
    halves = torch.where(upper_i == upper_j, 0.5, 1.0)
    pairs = coeffs[:, upper_i] * coeffs[:, upper_j] * halves  # [2^n, n(n+1)/2]
    device = next(iter(primals.values())).device
    coeffs, pairs = coeffs.to(device), pairs.to(device)
    by_loss = utility.metric == NEG_LOSS
    totals = torch.zeros(2**n, dtype=torch.float64, device=device)

    record_size = max(1, utility.x[0].numel()) if len(utility.x) else 1
    batch = max(1, min(RECORDS_PER_BATCH, INPUT_NUMBERS_PER_PASS // (record_size * n * n)))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(utility.x), batch):
            xb = utility.x[start : start + batch].to(device, torch.float32)
            yb = utility.y[start : start + batch].to(device, torch.int64)

            def logits(c: torch.Tensor, xb: torch.Tensor = xb) -> torch.Tensor:
                params = {k: primals[k] + torch.einsum("i,i...->...", c, stacked[k]) for k in names}
                out: torch.Tensor = functional_call(model, {**params, **constants}, (xb,))
                return out

            with torch.no_grad():
                zero = torch.zeros(n, device=device)
                z0 = logits(zero)
                first = jacfwd(logits)(zero).movedim(-1, 0)  # [n, B, K]
                # [n, n, B, K], every second direction in one vectorised pass.
                second = jacfwd(jacfwd(logits))(zero).movedim(-1, 0).movedim(-1, 0)
            flat_first = first.reshape(n, -1)
            flat_second = second[upper_i, upper_j].reshape(len(upper_i), -1)
            for lo in range(0, 2**n, COALITIONS_PER_CHUNK):
                hi = min(lo + COALITIONS_PER_CHUNK, 2**n)
                z = (
                    z0.reshape(1, -1) + coeffs[lo:hi] @ flat_first + pairs[lo:hi] @ flat_second
                ).reshape(hi - lo, *z0.shape)
                if by_loss:
                    ce = F.cross_entropy(
                        z.reshape(-1, z.shape[-1]), yb.repeat(hi - lo), reduction="none"
                    )
                    totals[lo:hi] += ce.reshape(hi - lo, -1).sum(1).double()
                else:
                    totals[lo:hi] += (z.argmax(-1) == yb).sum(1).double()
    finally:
        model.train(was_training)
    values = totals / len(utility.y)
    return (-values if by_loss else values).tolist()
