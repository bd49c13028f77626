"""What leaves a site, as the attacker sees it, and the attacks on it: DLG, inverting gradients,
the analytic read-off of a first linear layer and label inference. Why each is built as it
is: "Decisions" in :mod:`training.fl.inversion`."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.fl.data import SiteData
from training.fl.filters import apply_pipeline
from training.fl.inversion.settings import AttackLoss, AuditSettings
from training.fl.local import train_local

# --- the step and the attacker's view --------------------------------------------------------


def sub_seed(seed: int, *parts: object) -> int:
    text = ":".join(str(p) for p in (seed, *parts)).encode()
    return int(hashlib.sha256(text).hexdigest()[:15], 16)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # The job's cross-entropy (training.fl.local) with class probabilities as the target.
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@dataclass
class SiteView:
    """What leaves the site for one batch: the target "gradient" per parameter and its mask."""

    target: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    shared_fraction: float


def site_view(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    modality: str,
    optimizer: Mapping[str, Any],
    pipeline: Sequence[Mapping[str, Any]],
    seed: int,
    step_options: Mapping[str, Any],
) -> SiteView:
    dp_sgd = next((dict(f) for f in pipeline if f.get("filter") == "dp_sgd"), None)
    data = SiteData(
        x_train=x,
        y_train=y,
        num_records=len(x),
        modality="segmentation" if modality == "segmentation" else "tabular",
        input_shape=list(x.shape[1:]),
        n_classes=2,
        source="privacy-audit",
    )
    local = train_local(
        copy.deepcopy(model),
        data,
        epochs=1,
        batch_size=len(x),
        optimizer=optimizer,
        momentum_restart=True,
        dp_sgd=dp_sgd,
        seed=sub_seed(seed, "step"),
        dp_seed=sub_seed(seed, "dp"),
        device="cpu",
        **dict(step_options),
    )
    filters = [dict(f) for f in pipeline if f.get("filter") != "dp_sgd"]
    noise = torch.Generator().manual_seed(sub_seed(seed, "pipeline"))
    filtered = apply_pipeline(local.delta, filters, generator=noise)
    params = dict(model.named_parameters())
    scale = -1.0 / float(optimizer["lr"])
    target, mask = {}, {}
    for name, value in filtered.delta.items():
        if name not in params:
            continue  # a buffer, not differentiated
        shared = (
            torch.ones_like(value, dtype=torch.bool)
            if filtered.mask is None
            else filtered.mask[name].clone()
        )
        if not bool(shared.any()):
            continue
        target[name] = value.detach().clone() * scale  # the workspace's views are reused
        mask[name] = shared
    return SiteView(target=target, mask=mask, shared_fraction=filtered.shared_fraction)


def last_linear_layer(model: nn.Module) -> str | None:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
        elif isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            last = None  # a convolution after the last linear layer: its rows are not classes
    return last


def infer_labels(view: SiteView, layer: str, batch: int) -> torch.Tensor | None:
    """iDLG (module docstring): the ``batch`` classes with the most negative gradient rows."""
    bias, weight = f"{layer}.bias", f"{layer}.weight"
    scores: torch.Tensor | None = None
    if weight in view.target:
        # A row's sum over its shared coordinates has the sign of (softmax - onehot) where the
        # layer's input is not negative (after a ReLU, or pixel values).
        rows = (view.target[weight] * view.mask[weight]).sum(dim=1)
        scores = rows.masked_fill(~view.mask[weight].any(dim=1), math.inf)
    if bias in view.target:
        # The bias entry is (softmax - onehot) itself: it wins wherever it is shared.
        base = scores if scores is not None else torch.full_like(view.target[bias], math.inf)
        scores = torch.where(view.mask[bias], view.target[bias], base)
    if scores is None or not bool(torch.isfinite(scores).any()):
        return None
    order = torch.argsort(scores)
    return order[torch.arange(batch) % len(order)]


def _distance(
    grads: Sequence[torch.Tensor], view: SiteView, names: Sequence[str], kind: str
) -> torch.Tensor:
    if kind == "l2":
        total = torch.zeros(())
        for g, name in zip(grads, names, strict=True):
            total = total + (((g - view.target[name]) * view.mask[name]) ** 2).sum()
        return total
    dot = torch.zeros(())
    gn = torch.zeros(())
    tn = 0.0
    for g, name in zip(grads, names, strict=True):
        gm, tm = g * view.mask[name], view.target[name] * view.mask[name]
        dot = dot + (gm * tm).sum()
        gn = gn + (gm * gm).sum()
        tn += float((tm * tm).sum())
    return 1.0 - dot / ((gn + 1e-20).sqrt() * math.sqrt(tn) + 1e-20)


def _tv(x: torch.Tensor) -> torch.Tensor:
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return dh + dw


@dataclass
class AttackProblem:
    """One batch's attack problem, the same for both attacks."""

    model: nn.Module
    view: SiteView
    names: list[str]
    params: list[nn.Parameter]
    input_shape: tuple[int, ...]
    image_shape: tuple[int, int, int] | None
    n_classes: int
    label_shape: tuple[int, ...]  # a soft label's shape per record (after the class axis)
    distance: str
    loss: AttackLoss
    value_range: tuple[float, float]
    batch: int


def _grads(p: AttackProblem, x: torch.Tensor, soft: torch.Tensor) -> tuple[torch.Tensor, ...]:
    loss = p.loss(p.model(x), soft)
    return torch.autograd.grad(loss, p.params, create_graph=True)


def dlg(
    p: AttackProblem, settings: AuditSettings, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn((p.batch, *p.input_shape), generator=gen).requires_grad_(True)
    label = torch.randn((p.batch, p.n_classes, *p.label_shape), generator=gen).requires_grad_(True)
    best = (math.inf, x.detach().clone(), label.detach().clone())
    opt = torch.optim.LBFGS(
        [x, label],
        lr=1.0,
        max_iter=max(1, settings.dlg_iterations),
        history_size=50,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        nonlocal best
        opt.zero_grad()
        d = _distance(_grads(p, x, F.softmax(label, dim=1)), p.view, p.names, p.distance)
        value = float(d.detach())
        if math.isfinite(value) and value < best[0]:
            best = (value, x.detach().clone(), label.detach().clone())
        if not math.isfinite(value):
            return d.detach()
        d.backward()
        return d

    if settings.dlg_iterations > 0:
        # A line search that meets a NaN raises: the best point seen is kept either way.
        with contextlib.suppress(RuntimeError):
            opt.step(closure)
    return best[1], F.softmax(best[2], dim=1)


def inverting_gradients(
    p: AttackProblem, settings: AuditSettings, gen: torch.Generator, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = p.value_range
    x = torch.randn((p.batch, *p.input_shape), generator=gen)
    if p.image_shape is not None:
        x = x.clamp(lo, hi)
    x.requires_grad_(True)
    if labels is not None:
        soft_fixed = F.one_hot(labels, p.n_classes).to(torch.float32)
        label = None
    else:
        label = torch.randn((p.batch, p.n_classes, *p.label_shape), generator=gen)
        label.requires_grad_(True)
    variables = [x] if label is None else [x, label]
    opt = torch.optim.Adam(variables, lr=settings.ig_lr)
    n = settings.ig_iterations
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[n * 3 // 8, n * 5 // 8, n * 7 // 8], gamma=0.1
    )
    best = (math.inf, x.detach().clone(), None if label is None else label.detach().clone())
    for _ in range(n):
        opt.zero_grad()
        soft = soft_fixed if label is None else F.softmax(label, dim=1)
        d = _distance(_grads(p, x, soft), p.view, p.names, "cosine")
        if p.image_shape is not None and settings.tv_weight > 0:
            d = d + settings.tv_weight * _tv(x.view(p.batch, *p.image_shape))
        value = float(d.detach())
        if not math.isfinite(value):
            break
        if value < best[0]:
            best = (value, x.detach().clone(), None if label is None else label.detach().clone())
        d.backward()
        opt.step()
        sched.step()
        if p.image_shape is not None:
            with torch.no_grad():
                x.clamp_(lo, hi)
    soft_out = soft_fixed if best[2] is None else F.softmax(best[2], dim=1)
    return best[1], soft_out


def first_linear_layer(model: nn.Module, values: int) -> str | None:
    """The name of the model's first layer if it is a linear layer on the flattened record."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return name if module.in_features == values and module.bias is not None else None
        if any(True for _ in module.parameters(recurse=False)):
            return None
    return None


def analytic(p: AttackProblem, layer: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The input of a first linear layer read off its gradient (one record, SGD).

    ``dL/dW[i, j] = dL/db[i] * x[j]``, so each row with a shared bias entry gives ``x`` up to
    noise; the least-squares estimate over the shared pairs is ``sum_i b_i W_ij / sum_i b_i^2``.
    A feature that no shared pair covers is set to the middle of the value range (0 for tabular
    records): the attacker knows nothing of it.
    """
    weight, bias = f"{layer}.weight", f"{layer}.bias"
    if p.batch != 1 or weight not in p.view.target or bias not in p.view.target:
        return None
    w = p.view.target[weight] * p.view.mask[weight]
    b = (p.view.target[bias] * p.view.mask[bias]).unsqueeze(1)
    pairs = p.view.mask[weight] & p.view.mask[bias].unsqueeze(1)
    num = (b * w * pairs).sum(dim=0)
    den = (b * b * pairs).sum(dim=0)
    fill = sum(p.value_range) / 2.0 if p.image_shape is not None else 0.0
    x = torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, fill))
    if p.image_shape is not None:
        x = x.clamp(*p.value_range)
    soft = torch.full((1, p.n_classes, *p.label_shape), 1.0 / p.n_classes)
    return x.reshape(1, *p.input_shape).detach(), soft
