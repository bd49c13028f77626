"""What the audit may do and when it gives up: its settings (iterations, thresholds, limits),
the modalities it knows and the error that says a model is out of its reach."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MODALITIES = ("image", "segmentation", "tabular")
_PSNR_CAP = 100.0

#: ``(logits, soft target)`` to the loss the attacker differentiates; the soft target is class
#: probabilities ``[B, C]`` (or ``[B, C, H, W]`` per pixel).
AttackLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class AuditOutOfReach(ValueError):
    """The audit cannot attack this model or setting; the message says why, in words."""


@dataclass(frozen=True)
class AuditSettings:
    """The audit's knobs (module docstring). ``records``: how many records to audit;
    ``batch_size``: records per training step (1 is the strongest case; the job's batch size
    is the realistic one). Iterations bound each attack's cost."""

    records: int = 8
    batch_size: int = 1
    attacks: tuple[str, ...] = ("dlg", "ig", "analytic")
    dlg_iterations: int = 100
    ig_iterations: int = 300
    ig_lr: float = 0.1
    tv_weight: float = 1e-2
    ssim_threshold: float = 0.5
    dice_threshold: float = 0.5
    distance_threshold: float = 0.25
    feature_tolerance: float = 0.1
    max_parameters: int = 500_000
    max_batch_size: int = 8
    max_input_values: int = 16_384
    seed: int = 0
    #: Records attacked again without any filter, to tell "the pipeline protects" from "these
    #: bounded attacks cannot rebuild this model's records at all" (0: no calibration).
    calibration_records: int = 2

    def __post_init__(self) -> None:
        for name in ("records", "batch_size", "max_parameters", "max_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"audit {name} must be a positive integer, got {value!r}")
        for name in ("dlg_iterations", "ig_iterations", "calibration_records"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"audit {name} must be a whole number, got {value!r}")
        unknown = [a for a in self.attacks if a not in ("dlg", "ig", "analytic")]
        if not self.attacks or unknown:
            raise ValueError(
                f"audit attacks must be among 'dlg', 'ig' and 'analytic', got {self.attacks!r}"
            )
