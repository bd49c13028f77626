"""A reconstruction to show people, drawn only from a bundled data set's public records (it
takes a data set key, never a site's records)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from training.fl.data import DEMO_SITES, demo_split, load_validation_set
from training.fl.inversion.audit import RecordFigures, audit_batches
from training.fl.inversion.settings import AuditSettings

# --- a picture of public data --------------------------------------------------------------


@dataclass(frozen=True)
class BundledRecords:
    """A bundled (public) data set's records as the audit takes them."""

    x: torch.Tensor
    y: torch.Tensor
    modality: str
    image_shape: tuple[int, int, int] | None
    value_range: tuple[float, float] | None
    n_classes: int


def bundled_records(
    dataset_key: str, *, image_model: bool = False, part: str = "site"
) -> BundledRecords:
    """A bundled demo set for the audit: ``part`` ``"site"`` is the first demo site's records,
    ``"validation"`` the consortium's (public) validation part. ``image_model``: the model takes
    images, so the digits' 64 features are given as ``[1, 8, 8]``."""
    if part == "validation":
        x, y = load_validation_set(dataset_key)
    else:
        data = demo_split(dataset_key, DEMO_SITES)[DEMO_SITES[0]]
        x, y = data.x_train, data.y_train
    if dataset_key == "lesions":
        return BundledRecords(x, y, "segmentation", None, (float(x.min()), float(x.max())), 2)
    n_classes = int(y.max()) + 1
    if dataset_key == "digits":
        shape = (1, 8, 8)
        if image_model:
            x = x.reshape(len(x), *shape)
        return BundledRecords(x, y, "image", shape, (0.0, 1.0), 10)
    return BundledRecords(x, y, "tabular", None, None, max(2, n_classes))


def _png(gray: torch.Tensor) -> bytes:
    from PIL import Image  # pillow is a dependency of the app; only the picture needs it

    pixels = (gray.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def reconstruction_picture(
    model: nn.Module,
    dataset_key: str,
    *,
    optimizer: Mapping[str, Any],
    pipeline: Sequence[Mapping[str, Any]],
    settings: AuditSettings | None = None,
    image_model: bool = False,
    scale: int = 8,
) -> tuple[bytes, RecordFigures]:
    """A PNG of one record of a **bundled** set's public validation part (left) and what the
    attack rebuilt from its update under ``pipeline`` (right), with the record's figures.

    It takes a data set key, not records, so it can only ever draw public data: the approver's
    page shows it in place of a site's records, which never leave the site. Tabular records are
    drawn as a strip of standardised features (black -3, white +3 standard deviations);
    segmentation draws the image and, below, the mask.
    """
    data = bundled_records(dataset_key, image_model=image_model, part="validation")
    base = settings or AuditSettings()
    one = AuditSettings(**{**asdict(base), "records": 1, "batch_size": 1})
    result, kept = audit_batches(
        model,
        data.x,
        data.y,
        modality=data.modality,
        optimizer=optimizer,
        pipeline=pipeline,
        settings=one,
        image_shape=data.image_shape,
        value_range=data.value_range,
        attack_loss=None,
        step_options=None,
        keep=True,
    )
    true_x, true_y, rec_x, rec_soft = kept[0]
    if data.modality == "tabular":
        mean, std = data.x.mean(dim=0), data.x.std(dim=0).clamp_min(1e-8)
        # One row of features would be a strip one cell high: repeated to a fifth of its
        # length (30 features: 6 rows), so that each feature reads as a bar on the page.
        rows = max(1, round(true_x.numel() / 5))
        left = (((true_x - mean) / std + 3) / 6).reshape(1, -1).repeat(rows, 1)
        right = (((rec_x - mean) / std + 3) / 6).reshape(1, -1).repeat(rows, 1)
    else:
        lo, hi = data.value_range or (0.0, 1.0)
        shape = data.image_shape or tuple(true_x.shape)
        left = ((true_x.reshape(shape) - lo) / (hi - lo))[0]
        right = ((rec_x.reshape(shape) - lo) / (hi - lo))[0]
        if data.modality == "segmentation":
            left = torch.cat([left, (true_y > 0).float()], dim=0)
            right = torch.cat([right, (rec_soft.argmax(dim=0) > 0).float()], dim=0)
    gap = torch.ones((left.shape[0], 1))
    picture = torch.cat([left.clamp(0, 1), gap, right.clamp(0, 1)], dim=1)
    picture = picture.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)
    return _png(picture), result.records[0]
