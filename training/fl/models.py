"""The built-in model architectures, in plain PyTorch (no Django import).

``training.jobs.registry`` names these classes by dotted path (``training.fl.models.MLP`` ...) and
the site worker builds them with :func:`build_model`. Every class follows the registry's
constructor contract::

    cls(input_shape=[...], n_classes=n, **params)

``input_shape`` is one example's shape without the batch dimension: ``[features]`` for tabular
data, ``[C, H, W]`` for images and segmentation. Classifiers return logits ``[N, n_classes]``;
:class:`SmallUNet` returns per-pixel logits ``[N, n_classes, H, W]``.

Initialisation uses PyTorch's default initialisers, which draw from the global generator: the
same ``torch.manual_seed`` before construction gives the same weights. None of the models uses
batch normalisation: its batch statistics mix examples, which breaks DP-SGD's per-sample
gradients, and its running statistics are site-specific state that averages poorly.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["MLP", "LogisticRegression", "SmallCNN", "SmallUNet", "build_model", "import_class"]


def _shape(input_shape: Sequence[int], what: str) -> list[int]:
    try:
        shape = [int(d) for d in input_shape]
    except (TypeError, ValueError):
        raise ValueError(
            f"{what}: input_shape must be a list of sizes, got {input_shape!r}"
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"{what}: input_shape must hold positive sizes, got {shape}")
    return shape


def _n_classes(n_classes: int, what: str) -> int:
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"{what}: n_classes must be an integer of at least 2, got {n_classes!r}")
    return n_classes


def _image_shape(input_shape: Sequence[int], what: str) -> tuple[int, int, int]:
    shape = _shape(input_shape, what)
    if len(shape) != 3:
        raise ValueError(f"{what} needs input_shape [C, H, W], got {shape}")
    c, h, w = shape
    return c, h, w


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer on the flattened input."""

    def __init__(self, *, input_shape: Sequence[int], n_classes: int) -> None:
        super().__init__()
        features = math.prod(_shape(input_shape, "LogisticRegression"))
        self.linear = nn.Linear(features, _n_classes(n_classes, "LogisticRegression"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.linear(torch.flatten(x, 1))
        return logits


class MLP(nn.Module):
    """Multilayer perceptron: ``Linear -> ReLU -> Dropout`` per hidden size, then a linear head."""

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        n_classes: int,
        hidden_sizes: Sequence[int] = (64, 32),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        width = math.prod(_shape(input_shape, "MLP"))
        n_classes = _n_classes(n_classes, "MLP")
        if not hidden_sizes or any(int(h) < 1 for h in hidden_sizes):
            raise ValueError(f"MLP: hidden_sizes must be positive sizes, got {hidden_sizes!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"MLP: dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        for size in hidden_sizes:
            layers += [nn.Linear(width, int(size)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(float(dropout)))
            width = int(size)
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(torch.flatten(x, 1))
        return logits


class SmallCNN(nn.Module):
    """Conv blocks (3x3 conv, ReLU, 2x2 max-pool), global average pooling, linear head.

    A block pools only while the feature map is at least 2x2, so any ``H, W >= 8`` works with up
    to four blocks (the registry's limit).
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        n_classes: int,
        channels: Sequence[int] = (16, 32),
    ) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "SmallCNN")
        n_classes = _n_classes(n_classes, "SmallCNN")
        if h < 8 or w < 8:
            raise ValueError(f"SmallCNN needs images of at least 8x8 pixels, got {h}x{w}")
        if not channels or any(int(ch) < 1 for ch in channels):
            raise ValueError(f"SmallCNN: channels must be positive sizes, got {channels!r}")
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, int(out), kernel_size=3, padding=1), nn.ReLU()]
            if h >= 2 and w >= 2:
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = int(out)
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(torch.flatten(self.pool(self.features(x)), 1))
        return logits


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, kernel_size=3, padding=1),
        nn.ReLU(),
    )


class SmallUNet(nn.Module):
    """A small U-Net: ``depth`` down-sampling levels, skip connections, per-pixel logits.

    Level ``i`` has ``base_channels * 2**i`` channels; ``H`` and ``W`` must be divisible by
    ``2 ** depth``. The output is ``[N, n_classes, H, W]``.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        n_classes: int,
        base_channels: int = 8,
        depth: int = 2,
    ) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape, "SmallUNet")
        n_classes = _n_classes(n_classes, "SmallUNet")
        depth, base = int(depth), int(base_channels)
        if depth < 1 or base < 1:
            raise ValueError(f"SmallUNet: depth and base_channels must be positive, got {depth}")
        step = 2**depth
        if h % step or w % step:
            raise ValueError(
                f"SmallUNet with depth {depth} halves the image {depth} times, so height and "
                f"width must be divisible by {step}; got {h}x{w}"
            )
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c_in = c
        for width in widths[:-1]:
            self.down.append(_double_conv(c_in, width))
            c_in = width
        self.pool = nn.MaxPool2d(2)
        self.bottom = _double_conv(widths[-2], widths[-1])
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for i in range(depth, 0, -1):
            self.up.append(nn.ConvTranspose2d(widths[i], widths[i - 1], kernel_size=2, stride=2))
            self.up_conv.append(_double_conv(2 * widths[i - 1], widths[i - 1]))
        self.head = nn.Conv2d(widths[0], n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips), strict=True):
            x = conv(torch.cat([up(x), skip], dim=1))
        logits: torch.Tensor = self.head(x)
        return logits


def import_class(class_path: str) -> object:
    """The object at ``package.module.Name``; ``ValueError`` says what could not be found."""
    if not isinstance(class_path, str) or "." not in class_path:
        raise ValueError(f"model class path {class_path!r} is not like 'package.module.Class'")
    module_name, _, attr = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"cannot import module {module_name!r} for model {class_path!r}: {exc}"
        ) from exc
    try:
        found: object = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    return found


def build_model(
    class_path: str,
    *,
    input_shape: Sequence[int],
    n_classes: int,
    params: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Import ``class_path`` and build ``cls(input_shape=..., n_classes=..., **params)``.

    The built-in models and a deployment's own ("bring your own model") classes go through
    the same path. The class must be a ``torch.nn.Module`` subclass. Seed with
    ``torch.manual_seed`` beforehand for reproducible weights.
    """
    cls = import_class(class_path)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{class_path!r} is not a torch.nn.Module subclass")
    return cls(input_shape=list(input_shape), n_classes=n_classes, **dict(params or {}))
