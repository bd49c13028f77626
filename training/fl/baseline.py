"""The centralised baseline: one model trained on every site's records pooled (no Django).

Federated learning is judged against the model one party holding all the data would train: the
seed's experiments compare FedAvg, cyclic and partial sharing with it. :func:`train_centralised`
pools the sites' :class:`~training.fl.data.SiteData` (:func:`pool_site_data`) and trains on the
pool with :func:`training.fl.local.train_local` itself, so the optimizer, the loss, the seed and
DP-SGD mean exactly what they mean at a site; only the data differ. It then evaluates the model
on a validation set when one is given (:func:`training.fl.evaluate.evaluate`, with the same
loss).

:func:`baseline_settings` reads a job spec's training settings (a plain mapping: the engine
imports nothing of the project) for a baseline that matches the job: ``epochs`` is the job's
``rounds × local_epochs``, so every record is seen as often as in a FedAvg job where every site
trains every round. Momentum restart has no meaning here (one uninterrupted training run); the
optimizer keeps its state throughout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.fl.data import SiteData
from training.fl.evaluate import DEFAULT_LOSS, evaluate
from training.fl.local import train_local

__all__ = ["BaselineResult", "baseline_settings", "pool_site_data", "train_centralised"]


@dataclass
class BaselineResult:
    """What :func:`train_centralised` produced: the trained float state (CPU, float32), the
    pooled record count, the training metrics of :func:`~training.fl.local.train_local`, and
    the validation metrics (None without a validation set)."""

    state: dict[str, torch.Tensor]
    samples: int
    metrics: dict[str, float | None]
    validation: dict[str, float] | None


def pool_site_data(sites: Sequence[SiteData] | Mapping[str, SiteData]) -> SiteData:
    """The union of the sites' training records, in order (a mapping's sites by sorted key).

    The sites must agree on modality and input shape; ``n_classes`` is the largest of theirs.
    """
    items = [sites[key] for key in sorted(sites)] if isinstance(sites, Mapping) else list(sites)
    if not items:
        raise ValueError("a centralised baseline needs at least one site's data")
    first = items[0]
    for data in items[1:]:
        if data.modality != first.modality:
            raise ValueError(f"cannot pool {first.modality} data with {data.modality} data")
        if list(data.input_shape) != list(first.input_shape):
            raise ValueError(
                f"cannot pool inputs of shape {list(first.input_shape)} with "
                f"{list(data.input_shape)}"
            )
    x = torch.cat([d.x_train for d in items])
    y = torch.cat([d.y_train for d in items])
    sources = [d.source for d in items if d.source]
    return SiteData(
        x_train=x,
        y_train=y,
        num_records=sum(d.num_records for d in items),
        modality=first.modality,
        input_shape=list(first.input_shape),
        n_classes=max(d.n_classes for d in items),
        source="pooled: " + ", ".join(sources) if sources else "pooled",
    )


def baseline_settings(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`train_centralised` matching a job spec (module
    docstring): ``epochs``, ``batch_size``, ``optimizer``, ``loss`` and ``dp_sgd``."""
    dp_sgd = next(
        (f for f in spec.get("privacy_pipeline") or [] if f.get("filter") == "dp_sgd"), None
    )
    return {
        "epochs": int(spec["rounds"]) * int(spec.get("local_epochs", 1)),
        "batch_size": int(spec.get("batch_size", 32)),
        "optimizer": dict(spec["optimizer"]),
        "loss": str(spec.get("loss") or DEFAULT_LOSS),
        "dp_sgd": dict(dp_sgd) if dp_sgd is not None else None,
    }


def train_centralised(
    model: nn.Module,
    sites: Sequence[SiteData] | Mapping[str, SiteData],
    *,
    epochs: int,
    batch_size: int,
    optimizer: Mapping[str, Any],
    loss: str = DEFAULT_LOSS,
    dp_sgd: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
    dp_seed: int | None = None,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> BaselineResult:
    """Train ``model`` (in place) on the pooled records of ``sites`` and evaluate it.

    The arguments mean what they mean to :func:`~training.fl.local.train_local`; ``validation``
    is ``(x, y)`` to evaluate the trained model on.
    """
    pooled = pool_site_data(sites)
    result = train_local(
        model,
        pooled,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        momentum_restart=True,  # one uninterrupted run: there is nothing to restart
        dp_sgd=dp_sgd,
        seed=seed,
        device=device,
        dp_seed=dp_seed,
        loss=loss,
    )
    scores = None
    if validation is not None:
        x, y = validation
        scores = evaluate(model, x, y, modality=pooled.modality, loss=loss)
    state = {
        name: value.detach().to("cpu", torch.float32, copy=True)
        for name, value in model.state_dict().items()
        if value.is_floating_point()
    }
    return BaselineResult(
        state=state, samples=result.samples, metrics=result.metrics, validation=scores
    )
