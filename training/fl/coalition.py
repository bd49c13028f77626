"""Coalition values for contribution scoring: the validation metric of the model a set of sites'
shared updates would have made (no Django).

:class:`CoalitionUtility` is the utility :mod:`training.fl.contribution` scores over. It is built
once per round from the round's input model and the updates actually shared (the accepted
``delta/`` and ``mask/`` tensors, after the sites' filters), and then evaluates any coalition
without loading anything again: the updates are held once, one aggregation buffer
(:class:`~training.fl.aggregate.StreamingFedAvg`, reset between coalitions) and one model (its
state overwritten in place) are reused for every coalition, and the validation set is held as
given.

How a coalition's model is made depends on the topology:

* ``mean`` (fedavg): the mask-aware, sample-weighted FedAvg of the coalition's updates applied to
  the input model, exactly as the coordinator aggregates a round, so the full set's value is the
  round model's validation metric.
* ``sum`` (cyclic): the coalition's masked deltas added to the input model. In a cyclic round
  each site's delta is relative to the previous site's result and the round's model is the input
  model plus every accepted delta, so the full set again gives the round's model. A coalition
  keeps its members' deltas as they were computed (later sites trained on a model that already
  held earlier sites' work): retraining without a site is what a central scorer cannot do, and
  this attributes to each site the change it actually handed on.

The empty coalition is the input model.

What a coalition's model is worth (``value``, the spec's ``contribution.value``):

* ``metric`` (the default): the task's validation metric, Dice for segmentation, else accuracy;
* ``loss``: minus the validation loss under the job's training loss (``loss``, see
  :mod:`training.fl.evaluate`), so that higher is still better. Accuracy on a small validation
  set moves in steps of one record; the loss moves with every change of the model, so it can
  tell apart coalitions whose metric ties. It is reported under :data:`~training.fl.evaluate.
  NEG_LOSS`, the name the ledger's ``contribution.scored`` entry records as its ``metric``, and
  sites evaluating the coalitions report the same figure, so the values recompute from their
  reports as the metric's do.

``zero_filled`` makes the ``mean`` the zero-filled average (:class:`~training.fl.aggregate.
StreamingFedAvg`), for jobs that aggregate that way, so that the full set still gives the
round's model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from training.fl.aggregate import StreamingFedAvg
from training.fl.evaluate import DEFAULT_LOSS, NEG_LOSS, check_loss, evaluate

__all__ = ["COMBINES", "VALUES", "CoalitionUtility", "metric_for"]

COMBINES = ("mean", "sum")
#: What a coalition is valued by (module docstring); ``training.jobs.spec`` keeps the names.
VALUES = ("metric", "loss")


def metric_for(modality: str, value: str = "metric") -> str:
    """The figure a coalition is valued by: Dice for segmentation, else accuracy; or, with
    ``value="loss"``, :data:`~training.fl.evaluate.NEG_LOSS` (minus the validation loss)."""
    if value == "loss":
        return NEG_LOSS
    if value != "metric":
        raise ValueError(f"a coalition is valued by one of {VALUES}, not {value!r}")
    return "dice" if modality == "segmentation" else "accuracy"


class CoalitionUtility:
    """``v(S)``: the validation metric of the model coalition ``S`` makes from the input model.

    ``updates`` maps a site id to ``(delta, mask, weight)`` (``mask`` None or empty: fully
    shared). ``model`` is any module of the job's architecture: its weights are overwritten.
    ``value``, ``loss`` and ``zero_filled``: see the module docstring.
    """

    def __init__(
        self,
        *,
        base_state: Mapping[str, torch.Tensor],
        updates: Mapping[
            str,
            tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None, float],
        ],
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        modality: str,
        combine: str = "mean",
        value: str = "metric",
        loss: str = DEFAULT_LOSS,
        zero_filled: bool = False,
    ):
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if not updates:
            raise ValueError("a coalition utility needs at least one update")
        self.combine = combine
        self.zero_filled = bool(zero_filled)
        self.modality = modality
        self.metric = metric_for(modality, value)
        self.loss = check_loss(loss, modality)
        self.base = {n: t.detach() for n, t in base_state.items()}
        self.model = model
        self.x, self.y = x, y
        model.load_state_dict(self.base)
        self._work = model.state_dict()  # shares storage with the model: written in place
        self.sites = tuple(sorted(updates))
        floating = {n: t for n, t in self.base.items() if t.is_floating_point()}
        if combine == "mean":
            self._updates = {
                s: (delta, mask or None, float(weight))
                for s, (delta, mask, weight) in updates.items()
            }
            self._avg = StreamingFedAvg(floating, zero_filled=zero_filled)
        else:
            # Masked once here: the coordinator's cyclic step applies only shared coordinates.
            self._masked = {}
            for site, (delta, mask, _weight) in updates.items():
                mask = mask or {}
                self._masked[site] = {
                    n: torch.where(mask[n], d, torch.zeros_like(d)) if n in mask else d
                    for n, d in delta.items()
                }
            names = {n for d in self._masked.values() for n in d}
            self._sum = {n: torch.zeros_like(floating[n]) for n in sorted(names)}

    def _delta(self, coalition: frozenset[str]) -> dict[str, torch.Tensor]:
        members = sorted(coalition)
        if self.combine == "mean":
            self._avg.reset()
            for site in members:
                delta, mask, weight = self._updates[site]
                self._avg.add(delta, mask, weight)
            return self._avg.result()
        for buffer in self._sum.values():
            buffer.zero_()
        for site in members:
            for name, d in self._masked[site].items():
                self._sum[name].add_(d)
        return self._sum

    def state_of(self, coalition: Iterable[str]) -> dict[str, torch.Tensor]:
        """Load coalition's model into ``self.model`` and return its (live) state."""
        coalition = frozenset(coalition)
        unknown = coalition - set(self.sites)
        if unknown:
            raise ValueError(f"no update from {', '.join(sorted(unknown))}")
        delta = self._delta(coalition) if coalition else {}
        with torch.no_grad():
            for name, target in self._work.items():
                target.copy_(self.base[name])
                d = delta.get(name)
                if d is not None and target.is_floating_point():
                    target.add_(d.to(target.dtype))
        return self._work

    @property
    def updates(
        self,
    ) -> Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None, float]]:
        """The round's shared updates, ``site -> (delta, mask or None, weight)`` (``mean``)."""
        if self.combine != "mean":
            raise ValueError("a cyclic round's utility keeps its deltas summed, not as updates")
        return self._updates

    def surrogate(self) -> list[float] | None:
        """Every coalition's surrogate value for contribution estimator 3, or ``None`` where
        the surrogate cannot serve (:mod:`training.fl.coalition_surrogate`)."""
        from training.fl.coalition_surrogate import quadratic_surrogate

        return quadratic_surrogate(self)

    @property
    def resolution(self) -> float:
        """The smallest step the value can move: one record of the validation set for
        accuracy (``1 / len(y)``), 0 (no fixed step) for Dice and the loss. The sampled
        contribution estimator never counts a move below it (``training.fl.contribution``)."""
        if self.metric == "accuracy" and len(self.y):
            return 1.0 / len(self.y)
        return 0.0

    def __call__(self, coalition: Iterable[str]) -> float:
        self.state_of(coalition)
        metrics = evaluate(
            self.model,
            self.x,
            self.y,
            modality=self.modality,
            loss=self.loss,
            negative_loss=self.metric == NEG_LOSS,
        )
        return float(metrics[self.metric])
