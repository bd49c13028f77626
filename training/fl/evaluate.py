"""Evaluation of a model on held-out data, and applying an update to a state (no Django).

Classification (``tabular`` and ``image`` modalities) reports ``accuracy`` and mean
cross-entropy ``loss``; segmentation reports ``dice`` (of the lesion class, i.e. every
non-background class taken together, pooled over the whole set) and mean per-pixel
cross-entropy ``loss``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DICE_EPS", "apply_delta", "dice_score", "evaluate"]

DICE_EPS = 1e-6
_CLASSIFICATION = ("tabular", "image")


def dice_score(pred: torch.Tensor, target: torch.Tensor, *, eps: float = DICE_EPS) -> float:
    """Dice of the foreground (label > 0) of two label maps: ``(2|P∩G| + ε) / (|P| + |G| + ε)``.

    A perfect prediction scores 1 (also when both are empty); an empty prediction of a
    non-empty target scores about 0.
    """
    p, g = pred > 0, target > 0
    inter = (p & g).sum().item()
    return (2.0 * inter + eps) / (p.sum().item() + g.sum().item() + eps)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    modality: str,
    batch_size: int = 256,
) -> dict[str, float]:
    """Metrics of ``model`` on ``(x, y)``: accuracy and loss, or Dice and loss.

    Runs in eval mode without gradients on the model's device, and puts the model back in the
    mode it was in.
    """
    if modality not in (*_CLASSIFICATION, "segmentation"):
        raise ValueError(f"unknown modality {modality!r} (tabular, image or segmentation)")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} records but y has {len(y)}")
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    segmentation = modality == "segmentation"
    device = _device_of(model)
    was_training = model.training
    model.eval()
    loss_sum, correct, units = 0.0, 0, 0
    inter, pred_sum, true_sum = 0, 0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size].to(device, torch.float32)
                yb = y[start : start + batch_size].to(device, torch.int64)
                logits = model(xb)
                loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
                units += yb.numel()
                pred = logits.argmax(dim=1)
                if segmentation:
                    p, g = pred > 0, yb > 0
                    # Counts of a bool tensor: item() gives an int.
                    inter += int((p & g).sum().item())
                    pred_sum += int(p.sum().item())
                    true_sum += int(g.sum().item())
                else:
                    correct += int((pred == yb).sum().item())
    finally:
        model.train(was_training)
    metrics = {"loss": loss_sum / units}
    if segmentation:
        metrics["dice"] = (2.0 * inter + DICE_EPS) / (pred_sum + true_sum + DICE_EPS)
    else:
        metrics["accuracy"] = correct / units
    return metrics


def apply_delta(
    state: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    *,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """A new state ``state + scale * delta`` (entries missing from ``delta`` are copied).

    Each result keeps its entry's dtype and device; the inputs are not changed. Masking
    (partial sharing) is handled by the filters, not here.
    """
    unknown = sorted(set(delta) - set(state))
    if unknown:
        raise ValueError(f"delta has entries the state lacks: {', '.join(unknown)}")
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name not in delta:
            out[name] = value.detach().clone()
            continue
        change = delta[name]
        if tuple(change.shape) != tuple(value.shape):
            raise ValueError(
                f"delta {name!r} has shape {list(change.shape)}, the state {list(value.shape)}"
            )
        if not value.is_floating_point():
            raise ValueError(f"cannot apply a delta to non-floating entry {name!r}")
        updated = value.detach().to(torch.float64) + scale * change.detach().to(
            value.device, torch.float64
        )
        out[name] = updated.to(value.dtype)
    return out
