"""Server-side aggregation: streaming, mask-aware FedAvg, and the cyclic visiting order.

:class:`StreamingFedAvg` folds site updates in one at a time into preallocated buffers, so memory
is one model-sized sum (plus a per-coordinate weight buffer only for tensors that some site shared
partially) whatever the number of sites: updates are never stacked. A site's update is
``(delta, mask, weight)`` as produced by :func:`training.fl.filters.apply_pipeline`: tensors absent
from ``delta`` were not shared by that site (excluded layers), and where ``mask`` is False the
coordinate was not shared. The result is, per coordinate, the weighted mean over the sites that
shared it, and 0 (no change to the global model) where nobody did.

Zero-filled averaging (``zero_filled=True``; the spec's ``"aggregation": "zero_filled_mean"``):
the average of the seed's tooling, kept so that the two can be compared. Every site's unshared
coordinates (masked out, or in a tensor it left out) count as zeros, and each coordinate's mean
divides by the total weight of every site folded in: a coordinate one site of four shared moves
by a quarter of that site's change, where the mask-aware mean moves it by all of it. It needs no
per-coordinate weight buffer.

AGGREGATIONS names the two (``masked_mean`` is the default).

Accumulation is float32 by default: the benchmark (docs/performance.md, "Aggregation") measured a
float64 accumulator fed float32 updates at many times the cost (torch's mixed-dtype add is not
vectorised), and for weights that are sample counts the float32 sum of 50 sites differs from a
float64 reference by about 1e-7 relative. Pass ``dtype=torch.float64`` to trade speed for it.

Cyclic topology (:func:`cyclic_order`): instead of averaging, the model visits the sites one after
the other within a round, each training on the previous site's result. The coordinator calls
``cyclic_order(participants, round_index)`` at the start of each round and dispatches local
training to ``order[0]``; when that site's (filtered, signed) update arrives it applies it with
:func:`apply_update` and dispatches to the next site, and the round's model is the one after the
last site. The starting site rotates every round, so no site is always last (the last site's data
weighs most in the round's model).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from training.fl import kernels

__all__ = [
    "AGGREGATIONS",
    "MASKED_MEAN",
    "ZERO_FILLED_MEAN",
    "StreamingFedAvg",
    "apply_update",
    "cyclic_order",
    "fedavg",
]

MASKED_MEAN = "masked_mean"
ZERO_FILLED_MEAN = "zero_filled_mean"
#: How FedAvg averages partial updates (``training.jobs.spec`` keeps the same names).
AGGREGATIONS = (MASKED_MEAN, ZERO_FILLED_MEAN)


class StreamingFedAvg:
    """Weighted, mask-aware federated averaging into preallocated buffers.

    ``template`` gives the parameter names and shapes (e.g. the global model's float state).
    Per tensor it keeps a running sum of ``weight * delta``, a scalar total weight of the sites that
    shared the whole tensor, and, created on the first masked update of that tensor, a
    per-coordinate total weight of the sites that shared part of it. With ``zero_filled`` it
    keeps only the sums and the total weight of every site (module docstring).
    """

    def __init__(
        self,
        template: Mapping[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        zero_filled: bool = False,
    ):
        if not template:
            raise ValueError("StreamingFedAvg needs a non-empty template")
        if not dtype.is_floating_point:
            raise ValueError(f"accumulator dtype must be floating point, got {dtype}")
        self.dtype = dtype
        self.zero_filled = bool(zero_filled)
        self._weight = 0.0  # every site's weight, the zero-filled mean's denominator
        self._shapes = {name: tuple(t.shape) for name, t in template.items()}
        # zeros() touches the memory now, so the first add does not pay for fresh pages.
        self._sum = {name: torch.zeros(shape, dtype=dtype) for name, shape in self._shapes.items()}
        self._full = dict.fromkeys(self._shapes, 0.0)
        self._coord: dict[str, torch.Tensor] = {}
        self.sites = 0

    def reset(self) -> None:
        """Forget every update, keeping the buffers (reuse across rounds)."""
        for t in self._sum.values():
            t.zero_()
        for t in self._coord.values():
            t.zero_()
        self._full = dict.fromkeys(self._shapes, 0.0)
        self._weight = 0.0
        self.sites = 0

    def _add_masked(
        self, name: str, value: torch.Tensor, mask: torch.Tensor, weight: float
    ) -> None:
        """``sum += w * mask * value`` and ``coord += w * mask`` in one compiled pass
        (:func:`training.fl.kernels.masked_accumulate`), chunked on the kernel thread pool.

        Eager torch needs three calls (convert the mask to float, add it, multiply-add the
        value) and so reads the update and the sums several times; the fused loop reads the
        update, the mask bytes and both sums once (docs/performance.md, "Aggregation").
        """
        acc = self._sum[name].view(-1)
        coord = self._coord.get(name)
        if coord is None:
            coord = self._coord[name] = torch.zeros(self._shapes[name], dtype=self.dtype)
        flat_mask = mask.reshape(-1)
        if flat_mask.dtype == torch.bool:
            flat_mask = flat_mask.view(torch.uint8)
        elif flat_mask.dtype != torch.uint8:
            flat_mask = (flat_mask != 0).view(torch.uint8)
        flat_value = value.detach().reshape(-1)
        if flat_value.dtype != torch.float32:
            flat_value = flat_value.float()
        a, c = acc.numpy(), coord.view(-1).numpy()
        v, m = flat_value.contiguous().numpy(), flat_mask.contiguous().numpy()
        w = a.dtype.type(weight)
        kernels.run_chunks(lambda s, e: kernels.masked_accumulate(a, c, v, m, w, s, e), a.size)

    def add(
        self,
        delta: Mapping[str, torch.Tensor],
        mask: Mapping[str, torch.Tensor] | None = None,
        weight: float = 1.0,
    ) -> None:
        """Fold in one site's update; ``mask`` None (or a missing entry) means fully shared."""
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"weight must be a number, got {weight!r}")
        weight = float(weight)
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight must be positive and finite, got {weight!r}")
        for name, value in delta.items():
            if name not in self._shapes:
                raise ValueError(f"update has parameter {name!r}, which the model does not")
            if tuple(value.shape) != self._shapes[name]:
                raise ValueError(
                    f"update tensor {name!r} has shape {tuple(value.shape)}, "
                    f"expected {self._shapes[name]}"
                )
            m = mask.get(name) if mask is not None else None
            if m is not None and tuple(m.shape) != self._shapes[name]:
                raise ValueError(f"mask of {name!r} has shape {tuple(m.shape)}, expected the same")
        if mask is not None:
            stray = set(mask) - set(delta)
            if stray:
                raise ValueError(f"mask for tensors not in the update: {', '.join(sorted(stray))}")
        for name, value in delta.items():
            m = mask.get(name) if mask is not None else None
            acc = self._sum[name]
            if m is None:
                acc.add_(value, alpha=weight)
                self._full[name] += weight
                continue
            if self.zero_filled:
                acc.add_(torch.where(m.bool(), value.detach(), 0.0).to(acc.dtype), alpha=weight)
                continue
            self._add_masked(name, value, m, weight)
        self._weight += weight
        self.sites += 1

    def result(self) -> dict[str, torch.Tensor]:
        """Per-coordinate weighted mean (float32); 0 where no site shared the coordinate.

        Zero-filled: the weighted sum over the total weight of every site folded in."""
        out: dict[str, torch.Tensor] = {}
        if self.zero_filled:
            for name, acc in self._sum.items():
                mean = acc / self._weight if self._weight > 0 else torch.zeros_like(acc)
                out[name] = mean.to(torch.float32)
            return out
        for name, acc in self._sum.items():
            full = self._full[name]
            coord = self._coord.get(name)
            if coord is None:
                mean = acc / full if full > 0 else torch.zeros_like(acc)
            else:
                total = coord + full
                # Nobody shared it: the sum there is exactly 0 (0 * value), so 0 / 1 = 0.
                total.masked_fill_(total == 0, 1.0)
                mean = torch.div(acc, total, out=total)
            out[name] = mean.to(torch.float32)
        return out


def fedavg(
    updates: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None, float]],
    *,
    template: Mapping[str, torch.Tensor] | None = None,
    zero_filled: bool = False,
) -> dict[str, torch.Tensor]:
    """Weighted mask-aware (or, with ``zero_filled``, zero-filled) mean of ``(delta, mask,
    weight)`` updates (see StreamingFedAvg).

    Without ``template`` the names and shapes come from the updates themselves (then the updates
    are read twice, so pass a sequence).
    """
    if template is None:
        updates = list(updates)
        template = {}
        for delta, _mask, _weight in updates:
            for name, value in delta.items():
                template.setdefault(name, value)
        if not template:
            raise ValueError("fedavg needs at least one update with a tensor")
    agg = StreamingFedAvg(template, zero_filled=zero_filled)
    for delta, mask, weight in updates:
        agg.add(delta, mask, weight)
    if agg.sites == 0:
        raise ValueError("fedavg needs at least one update")
    return agg.result()


def apply_update(
    global_state: Mapping[str, torch.Tensor], avg_delta: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The new global state: ``state + delta`` for floating tensors with a delta.

    Tensors without a delta, and non-float buffers (e.g. BatchNorm's ``num_batches_tracked``), are
    copied unchanged. A delta for a name the state lacks, or of another shape, is a ``ValueError``.
    """
    stray = set(avg_delta) - set(global_state)
    if stray:
        raise ValueError(
            f"delta for parameters the model does not have: {', '.join(sorted(stray))}"
        )
    new: dict[str, torch.Tensor] = {}
    for name, value in global_state.items():
        d = avg_delta.get(name)
        if d is None or not value.is_floating_point():
            new[name] = value.clone()
            continue
        if d.shape != value.shape:
            raise ValueError(
                f"delta for {name!r} has shape {tuple(d.shape)}, expected {tuple(value.shape)}"
            )
        new[name] = value + d.to(value.dtype)
    return new


def cyclic_order(site_slugs: Sequence[str], round_index: int) -> list[str]:
    """The order in which the model visits the sites in round ``round_index`` (0-based).

    Sites are sorted, then rotated by ``round_index``: round 0 starts at the first slug, round 1 at
    the second, and so on, wrapping around.
    """
    slugs = sorted(site_slugs)
    if not slugs:
        raise ValueError("cyclic_order needs at least one site")
    if len(set(slugs)) != len(slugs):
        raise ValueError("cyclic_order: duplicate site slugs")
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"round_index must be a non-negative integer, got {round_index!r}")
    start = round_index % len(slugs)
    return slugs[start:] + slugs[:start]
