"""Evaluation of a model on held-out data, the training losses, and applying an update to a
state (no Django).

Classification (``tabular`` and ``image`` modalities) reports ``accuracy`` and the mean
``loss``; segmentation reports ``dice`` (of the lesion class, i.e. every non-background class
taken together, pooled over the whole set) and the mean ``loss``.

The losses (:data:`LOSSES`) live here because local training (:mod:`training.fl.local`) and
evaluation must compute the very same one: a coalition valued by its validation loss
(:mod:`training.fl.coalition`) is valued by what the sites trained for.

* ``cross_entropy`` (every modality, the default): the mean cross-entropy, per pixel for
  segmentation. Evaluation reports it as the mean over every unit (record or pixel).
* ``dice_bce`` (segmentation only): per record, ``CE + (1 - soft Dice of the foreground)``,
  averaged over the records. The foreground probability is ``1 - p(background)``, every lesion
  class taken together, which is what :func:`dice_score` and the evaluation's ``dice`` measure;
  soft Dice is smoothed by :data:`SOFT_DICE_SMOOTH` (an empty mask predicted empty scores 1,
  not 0/0). With two classes (background and lesion, the bundled lesions data and the seed's
  task) the per-pixel cross-entropy *is* the binary cross-entropy of the foreground channel,
  so this is exactly the seed's Dice + BCE; with more classes the multi-class cross-entropy
  keeps the lesion classes apart, which a binary term on the pooled foreground would not,
  while the Dice term still targets the pooled foreground the metric measures. The Dice term
  is per record (not pooled over a batch) so that a batch's loss is the mean of its records'
  losses, the same under DP-SGD's per-sample gradients as in plain training.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_LOSS",
    "DICE_EPS",
    "LOSSES",
    "NEG_LOSS",
    "SOFT_DICE_SMOOTH",
    "apply_delta",
    "check_loss",
    "dice_score",
    "evaluate",
    "loss_per_record",
    "task_loss",
]

DICE_EPS = 1e-6
_CLASSIFICATION = ("tabular", "image")

CROSS_ENTROPY = "cross_entropy"
DICE_BCE = "dice_bce"
#: The training losses a spec can choose (``training.jobs.spec`` keeps the same names).
LOSSES = (CROSS_ENTROPY, DICE_BCE)
DEFAULT_LOSS = CROSS_ENTROPY
#: The losses each modality may train with.
_LOSSES_OF = {"tabular": (CROSS_ENTROPY,), "image": (CROSS_ENTROPY,), "segmentation": LOSSES}
#: Laplace smoothing of the soft Dice term (the usual 1: stable on empty masks).
SOFT_DICE_SMOOTH = 1.0
#: The figure :func:`evaluate` adds with ``negative_loss=True``: minus the loss, so that higher
#: is better, as a coalition value must be.
NEG_LOSS = "neg_loss"


def check_loss(loss: str, modality: str) -> str:
    """``loss`` if ``modality`` can train with it, else ``ValueError`` saying why."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r} ({' or '.join(LOSSES)})")
    if modality not in _LOSSES_OF:
        raise ValueError(f"unknown modality {modality!r} (tabular, image or segmentation)")
    if loss not in _LOSSES_OF[modality]:
        raise ValueError(f"the {loss} loss is for segmentation masks, not {modality} data")
    return loss


def loss_per_record(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Each record's loss, ``[N]`` (module docstring), of logits ``[N, C, ...]`` for labels
    ``[N, ...]``."""
    ce = F.cross_entropy(logits, target, reduction="none").reshape(len(target), -1).mean(dim=1)
    if loss == CROSS_ENTROPY:
        return ce
    if loss != DICE_BCE:
        raise ValueError(f"unknown loss {loss!r} ({' or '.join(LOSSES)})")
    if logits.dim() < 3:
        raise ValueError("the dice_bce loss needs segmentation logits [N, C, H, W]")
    foreground = 1.0 - logits.softmax(dim=1)[:, 0]
    truth = (target > 0).to(foreground.dtype)
    inter = (foreground * truth).reshape(len(target), -1).sum(dim=1)
    sizes = (foreground + truth).reshape(len(target), -1).sum(dim=1)
    soft_dice = (2.0 * inter + SOFT_DICE_SMOOTH) / (sizes + SOFT_DICE_SMOOTH)
    return ce + (1.0 - soft_dice)


def task_loss(logits: torch.Tensor, target: torch.Tensor, loss: str = DEFAULT_LOSS) -> torch.Tensor:
    """The batch's mean loss, what local training minimises.

    ``cross_entropy`` is ``F.cross_entropy``'s own mean (per pixel for segmentation), as it
    always was, so jobs that do not choose a loss train bit for bit as before.
    """
    if loss == CROSS_ENTROPY:
        return F.cross_entropy(logits, target)
    return loss_per_record(logits, target, loss).mean()


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
    loss: str = DEFAULT_LOSS,
    negative_loss: bool = False,
) -> dict[str, float]:
    """Metrics of ``model`` on ``(x, y)``: accuracy and loss, or Dice and loss.

    ``loss`` is the job's training loss (module docstring); ``negative_loss`` adds
    :data:`NEG_LOSS`, minus the loss (exactly: negation rounds nothing), for a coalition valued
    by its loss. Runs in eval mode without gradients on the model's device, and puts the model
    back in the mode it was in.
    """
    if modality not in (*_CLASSIFICATION, "segmentation"):
        raise ValueError(f"unknown modality {modality!r} (tabular, image or segmentation)")
    check_loss(loss, modality)
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
                if loss == CROSS_ENTROPY:
                    loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
                    units += yb.numel()
                else:  # a per-record loss: the mean over records
                    loss_sum += loss_per_record(logits, yb, loss).sum().item()
                    units += len(yb)
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
        metrics["accuracy"] = correct / len(x)
    if negative_loss:
        metrics[NEG_LOSS] = -metrics["loss"]
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
