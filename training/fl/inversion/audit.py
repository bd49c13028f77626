"""The audit: its settings and limits (what is out of its reach), one local step per audited
batch through the job's pipeline, the attacks, the figures per record and their summary
(:func:`run_audit`)."""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from training.fl.audit_report import summary_of, summary_words
from training.fl.inversion.attacks import (
    AttackProblem,
    analytic,
    dlg,
    first_linear_layer,
    infer_labels,
    inverting_gradients,
    last_linear_layer,
    site_view,
    soft_cross_entropy,
    sub_seed,
)
from training.fl.inversion.metrics import dice, psnr, ssim
from training.fl.inversion.settings import MODALITIES, AttackLoss, AuditOutOfReach, AuditSettings


@dataclass
class RecordFigures:
    """One audited record's figures (the best attack's; see the module docstring)."""

    record: int
    attack: str
    success: bool
    label_inferred: bool | None
    ssim: float | None = None
    psnr: float | None = None
    dice: float | None = None
    relative_error: float | None = None
    features_within: float | None = None
    by_attack: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class AuditResult:
    """What the audit found: per-record figures, a summary, and how it was run."""

    modality: str
    records: list[RecordFigures]
    summary: dict[str, Any]
    settings: dict[str, Any]
    seed: int
    shared_fraction: float
    label_inference: str  # "ran", or why it was skipped
    seconds_per_record: float
    #: The same attacks on unfiltered updates of the first records (:func:`run_audit`): their
    #: success rate and median figure; None when not calibrated.
    calibration: dict[str, Any] | None = None

    @property
    def conclusive(self) -> bool | None:
        """Whether a low figure means something: the attacks rebuilt at least one record from an
        unfiltered update. False: they fail on this model even without a filter, so the
        pipeline's figures say nothing of its protection. None: not calibrated."""
        if self.calibration is None:
            return None
        return bool(self.calibration["success_rate"] > 0)

    def in_words(self) -> str:
        """The result in plain words, for people (the command, the approver's page): the same
        words the centre says of a site's report
        (:func:`training.fl.audit_report.summary_words`)."""
        return summary_words(summary_of(self.to_json()))

    def to_json(self) -> dict[str, Any]:
        """Plain figures only (what may leave a site): no record, label or reconstruction."""
        return {
            "modality": self.modality,
            "summary": dict(self.summary),
            "records": [
                {
                    k: v
                    for k, v in asdict(r).items()
                    if v is not None or k in ("label_inferred", "attack")
                }
                for r in self.records
            ],
            "settings": dict(self.settings),
            "seed": self.seed,
            "shared_fraction": self.shared_fraction,
            "label_inference": self.label_inference,
            "seconds_per_record": self.seconds_per_record,
            "calibration": self.calibration,
            "conclusive": self.conclusive,
        }


# --- the audit -----------------------------------------------------------------------------


def _check_reach(model: nn.Module, x: torch.Tensor, modality: str, settings: AuditSettings) -> None:
    if modality not in MODALITIES:
        raise AuditOutOfReach(
            f"the audit knows images, segmentation and tabular records, not {modality!r}"
        )
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if count > settings.max_parameters:
        raise AuditOutOfReach(
            f"the model has {count:,} trainable parameters, more than the audit's limit of "
            f"{settings.max_parameters:,}: its attacks differentiate the model's gradient at "
            "every iteration, which would take far more than a few seconds a record on a CPU. "
            "Audit a smaller configuration of the same model instead."
        )
    if settings.batch_size > settings.max_batch_size:
        raise AuditOutOfReach(
            f"a batch of {settings.batch_size} records per step is above the audit's limit of "
            f"{settings.max_batch_size}: the attacks rebuild every record of a step at once, "
            "and beyond that they no longer separate them. A batch of one is the strongest case."
        )
    values = math.prod(x.shape[1:])
    if values > settings.max_input_values:
        raise AuditOutOfReach(
            f"a record holds {values:,} values, more than the audit's limit of "
            f"{settings.max_input_values:,} (for example 128x128 greyscale pixels)"
        )


def _feature_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each feature's mean and spread among the audited site's records, to standardise tabular
    records. A feature that (nearly) never varies among them, a pixel that is always blank in
    the digits, has no spread of its own: it is scaled by the spread of all the values instead.
    Dividing by a clamped zero would turn a reconstruction error of 0.01 there into a relative
    error of millions, which says nothing of how well the record was rebuilt."""
    if len(x) < 2:
        return torch.zeros_like(x[0]), torch.ones_like(x[0])
    overall = float(x.std())
    overall = overall if overall > 1e-8 else 1.0
    spread = x.std(dim=0)
    return x.mean(dim=0), torch.where(
        spread > 1e-3 * overall, spread, torch.full_like(spread, overall)
    )


def _image_view(x: torch.Tensor, shape: tuple[int, int, int] | None) -> torch.Tensor | None:
    if shape is None:
        return None
    return x.reshape(shape)


def _figures(
    p: AttackProblem,
    modality: str,
    true_x: torch.Tensor,
    true_y: torch.Tensor,
    rec_x: torch.Tensor,
    rec_soft: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    settings: AuditSettings,
) -> dict[str, float]:
    out: dict[str, float] = {}
    if p.image_shape is not None:
        lo, hi = p.value_range
        span = hi - lo if hi > lo else 1.0
        a = ((true_x - lo) / span).clamp(0, 1).reshape(p.image_shape)
        b = ((rec_x - lo) / span).clamp(0, 1).reshape(p.image_shape)
        out["ssim"] = ssim(a, b)
        out["psnr"] = psnr(a, b)
    else:
        mean, std = stats
        a, b = (true_x - mean) / std, (rec_x - mean) / std
        norm = float(a.norm())
        out["relative_error"] = float((b - a).norm()) / (norm if norm > 0 else 1.0)
        out["features_within"] = float(((b - a).abs() <= settings.feature_tolerance).float().mean())
    if modality == "segmentation":
        out["dice"] = dice(rec_soft.argmax(dim=0) > 0, true_y > 0)
    return out


def _better(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Is ``a`` a better reconstruction than ``b`` (the attacker's pick)?"""
    for key, higher in (("ssim", True), ("dice", True), ("relative_error", False)):
        if key in a:
            return a[key] > b[key] if higher else a[key] < b[key]
    return False


def _success(figures: Mapping[str, float], modality: str, settings: AuditSettings) -> bool:
    if modality == "segmentation":
        return (
            figures.get("dice", 0.0) >= settings.dice_threshold
            or figures.get("ssim", 0.0) >= settings.ssim_threshold
        )
    if "ssim" in figures:
        return figures["ssim"] >= settings.ssim_threshold
    return figures["relative_error"] <= settings.distance_threshold


def _summary(
    modality: str, records: list[RecordFigures], label_rate: float | None
) -> dict[str, Any]:
    def stat(key: str) -> dict[str, float]:
        values = [getattr(r, key) for r in records if getattr(r, key) is not None]
        if not values:
            return {}
        return {
            f"median_{key}": float(statistics.median(values)),
            f"mean_{key}": float(statistics.fmean(values)),
        }

    out: dict[str, Any] = {"records": len(records)}
    keys = ["relative_error", "features_within"] if modality == "tabular" else ["ssim", "psnr"]
    if modality == "segmentation":
        keys.append("dice")
    for key in keys:
        out.update(stat(key))
    out["success_rate"] = sum(r.success for r in records) / len(records) if records else 0.0
    out["label_inference_rate"] = label_rate
    return out


def audit_batches(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    modality: str,
    optimizer: Mapping[str, Any],
    pipeline: Sequence[Mapping[str, Any]],
    settings: AuditSettings,
    image_shape: Sequence[int] | None,
    value_range: tuple[float, float] | None,
    attack_loss: AttackLoss | None,
    step_options: Mapping[str, Any] | None,
    keep: bool,
) -> tuple[AuditResult, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    _check_reach(model, x, modality, settings)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"the audit needs records with their labels, got {len(x)} and {len(y)}")
    if optimizer.get("name") not in ("sgd", "adam"):
        raise ValueError(f"unknown optimizer {optimizer.get('name')!r} (sgd or adam)")
    x = x.detach().to(torch.float32)
    y = y.detach().to(torch.int64)
    shape: tuple[int, int, int] | None = None
    if image_shape is not None:
        shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
        if math.prod(shape) != math.prod(x.shape[1:]):
            raise ValueError(
                f"image_shape {list(shape)} does not hold records of {list(x.shape[1:])}"
            )
    elif modality in ("image", "segmentation"):
        if x.dim() != 4:
            raise ValueError(f"{modality} records must be [N, C, H, W] or come with image_shape")
        shape = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    if modality == "tabular":
        shape = None
    lo, hi = value_range if value_range is not None else (float(x.min()), float(x.max()))
    stats = _feature_scale(x)

    start = copy.deepcopy(model).to("cpu").float()
    attacker = copy.deepcopy(start).eval()
    for q in attacker.parameters():
        q.requires_grad_(True)
    n_classes = int(attacker(x[:1]).shape[1])
    dp = any(f.get("filter") == "dp_sgd" for f in pipeline)
    distance = "l2" if optimizer.get("name") == "sgd" and not dp else "cosine"
    layer = last_linear_layer(attacker) if modality != "segmentation" else None
    why_no_labels = (
        "ran"
        if layer is not None
        else "skipped: segmentation labels are masks, one per pixel"
        if modality == "segmentation"
        else "skipped: the model has no last linear layer to read the label from"
    )
    loss = attack_loss or soft_cross_entropy
    first = first_linear_layer(attacker, math.prod(x.shape[1:]))

    gen = torch.Generator().manual_seed(sub_seed(settings.seed, "records"))
    chosen = torch.randperm(len(x), generator=gen)[: settings.records]
    records: list[RecordFigures] = []
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    shared: list[float] = []
    labels_right: list[bool] = []
    began = time.perf_counter()
    for b, at in enumerate(range(0, len(chosen), settings.batch_size)):
        idx = chosen[at : at + settings.batch_size]
        xb, yb = x[idx], y[idx]
        seed = sub_seed(settings.seed, "batch", b)
        view = site_view(
            start, xb, yb, modality=modality, optimizer=optimizer, pipeline=pipeline,
            seed=seed, step_options=step_options or {},
        )  # fmt: skip
        shared.append(view.shared_fraction)
        named = dict(attacker.named_parameters())
        names = [n for n in named if n in view.target]
        problem = AttackProblem(
            model=attacker,
            view=view,
            names=names,
            params=[named[n] for n in names],
            input_shape=tuple(x.shape[1:]),
            image_shape=shape,
            n_classes=n_classes,
            label_shape=tuple(y.shape[1:]),
            distance=distance,
            loss=loss,
            value_range=(lo, hi),
            batch=len(idx),
        )
        inferred = infer_labels(view, layer, len(idx)) if layer is not None and names else None
        if inferred is not None:
            pool = inferred.tolist()
            for label in yb.tolist():
                hit = label in pool
                if hit:
                    pool.remove(label)
                labels_right.append(hit)
        outcomes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        attack_gen = torch.Generator().manual_seed(sub_seed(seed, "attack"))
        if not names:  # nothing shared: nothing to attack, the attacker guesses
            guess = torch.randn((len(idx), *problem.input_shape), generator=attack_gen)
            soft = torch.full((len(idx), n_classes, *problem.label_shape), 1.0 / n_classes)
            outcomes["none"] = (guess, soft)
        else:
            if "dlg" in settings.attacks:
                outcomes["dlg"] = dlg(problem, settings, attack_gen)
            if "ig" in settings.attacks:
                outcomes["ig"] = inverting_gradients(problem, settings, attack_gen, inferred)
            if "analytic" in settings.attacks and first is not None and distance == "l2":
                found = analytic(problem, first)
                if found is not None:
                    outcomes["analytic"] = found
        for j in range(len(idx)):
            per_attack: dict[str, dict[str, float]] = {}
            best_name, best_figs, best_pair = "", None, None
            for attack, (rx, rsoft) in outcomes.items():
                # The attacker's best match among the batch's reconstructions.
                options = [
                    _figures(problem, modality, xb[j], yb[j], rx[k], rsoft[k], stats, settings)
                    for k in range(len(idx))
                ]
                pick = 0
                for k in range(1, len(options)):
                    if _better(options[k], options[pick]):
                        pick = k
                per_attack[attack] = options[pick]
                if best_figs is None or _better(options[pick], best_figs):
                    best_name, best_figs = attack, options[pick]
                    best_pair = (rx[pick].detach(), rsoft[pick].detach())
            assert best_figs is not None and best_pair is not None
            records.append(
                RecordFigures(
                    record=len(records),
                    attack=best_name,
                    success=_success(best_figs, modality, settings),
                    label_inferred=None if inferred is None else labels_right[len(records)],
                    ssim=best_figs.get("ssim"),
                    psnr=best_figs.get("psnr"),
                    dice=best_figs.get("dice"),
                    relative_error=best_figs.get("relative_error"),
                    features_within=best_figs.get("features_within"),
                    by_attack=per_attack,
                )
            )
            if keep:
                kept.append(
                    (xb[j].clone(), yb[j].clone(), best_pair[0].clone(), best_pair[1].clone())
                )
    seconds = (time.perf_counter() - began) / max(1, len(records))
    label_rate = sum(labels_right) / len(labels_right) if labels_right else None
    result = AuditResult(
        modality=modality,
        records=records,
        summary=_summary(modality, records, label_rate),
        settings={
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
            "distance": distance,
            "optimizer": dict(optimizer),
            "pipeline": [dict(f) for f in pipeline],
            "image_shape": None if shape is None else list(shape),
        },
        seed=settings.seed,
        shared_fraction=float(statistics.fmean(shared)) if shared else 0.0,
        label_inference=why_no_labels,
        seconds_per_record=seconds,
    )
    return result, kept


def run_audit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    modality: str,
    optimizer: Mapping[str, Any],
    pipeline: Sequence[Mapping[str, Any]],
    settings: AuditSettings | None = None,
    image_shape: Sequence[int] | None = None,
    value_range: tuple[float, float] | None = None,
    attack_loss: AttackLoss | None = None,
    step_options: Mapping[str, Any] | None = None,
) -> AuditResult:
    """Audit ``model`` (the round's start model, not changed) on a site's records ``x, y``.

    ``x`` is what the model takes (``[N, *input_shape]``), ``y`` class indices ``[N]`` or masks
    ``[N, H, W]``. ``modality``: ``image``, ``segmentation`` or ``tabular``; ``image_shape``
    (``[C, H, W]``) views flat records as images (the digits' 64 features are 8x8 pixels).
    ``optimizer`` and ``pipeline`` are the spec's ``optimizer`` and ``privacy_pipeline``
    (``dp_sgd`` included). ``value_range`` scales images to ``[0, 1]`` (default: the records'
    minimum and maximum). ``attack_loss`` is the job's loss on soft targets (default the
    cross-entropy :mod:`training.fl.local` trains with); ``step_options`` go to
    :func:`~training.fl.local.train_local` as they are (a job's loss, once the spec chooses one).
    ``settings.records`` records are drawn from ``x`` with ``settings.seed``.

    Raises :class:`AuditOutOfReach` when the model or setting is beyond the audit, and
    ``ValueError`` for inconsistent input.
    """
    settings = settings or AuditSettings()
    common: dict[str, Any] = dict(
        modality=modality,
        optimizer=optimizer,
        image_shape=image_shape,
        value_range=value_range,
        attack_loss=attack_loss,
        step_options=step_options,
        keep=False,
    )
    result, _ = audit_batches(model, x, y, pipeline=pipeline, settings=settings, **common)
    if settings.calibration_records:
        # The same attacks on the same first records' unfiltered updates: if they fail there
        # too, the pipeline's low figures say nothing (AuditResult.conclusive).
        if pipeline:
            few = replace(
                settings,
                records=min(settings.records, settings.calibration_records),
                batch_size=min(settings.batch_size, settings.calibration_records),
            )
            bare, _ = audit_batches(model, x, y, pipeline=[], settings=few, **common)
        else:
            bare = result
        result.calibration = {
            "records": len(bare.records),
            "success_rate": bare.summary["success_rate"],
            **{k: v for k, v in bare.summary.items() if k.startswith("median_")},
        }
    return result
