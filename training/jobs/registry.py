"""The model architectures a training job may name (docs/architecture.md, sections 3-4).

Each entry is a :class:`ModelSpec`: its family (a ``consortium.governance.models.ModelFamily``
value, which agreements permit or not), the kind of data it takes, the dotted path
of the ``torch.nn.Module`` that implements it and the constructor parameters a job
may set. Nothing here imports torch or a Django model: this module runs in the
central web process, and the site worker imports ``class_path`` lazily.

The built-in models are listed by :func:`builtin_models`. A deployment adds its
own through ``settings.TRAINING_CUSTOM_MODELS``::

    TRAINING_CUSTOM_MODELS = {
        "tiny_resnet": {
            "class_path": "hospital_models.resnet.TinyResNet",
            "modality": "image",                      # tabular | image | segmentation
            "description": "ResNet-8 for 64x64 scans",  # optional
            "params": {                               # optional
                "width": {"type": "int", "min": 4, "max": 128, "default": 16},
                "dropout": {"type": "float", "min": 0.0, "max": 0.9, "default": 0.0},
                "blocks": {"type": "int_list", "min": 1, "max": 512,
                           "min_len": 1, "max_len": 4, "default": [16, 32]},
                "batch_norm": {"type": "bool", "default": True},
            },
        },
    }

Custom models have family ``"custom"``; :func:`model_registry` merges them with
the built-ins and raises ``ImproperlyConfigured`` for an entry it cannot use.

The contract for the torch implementations (``training.fl.models``), which the
shape checks in :meth:`ModelSpec.check_dataset` rely on:

* every model is built as ``cls(input_shape=[...], n_classes=n, **params)``;
* ``small_cnn`` ends with global (adaptive) pooling, so any ``H, W >= 8`` works;
* ``small_unet`` halves ``H`` and ``W`` ``depth`` times on its way down, so both
  must be divisible by ``2 ** depth``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

FAMILIES = ("linear", "mlp", "cnn", "unet", "custom")
MODALITIES = ("tabular", "image", "segmentation")
PARAM_TYPES = ("int", "float", "bool", "int_list")

#: The job purpose (``spec["purpose"]``) each modality serves.
MODALITY_PURPOSE = {
    "tabular": "classification",
    "image": "classification",
    "segmentation": "segmentation",
}

_MODEL_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CLASS_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value: Any) -> int | None:
    """``value`` as an int, or None. Integral floats (``5.0``) count; bools do not."""
    if _is_int(value):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    """``value`` as a finite float, or None. Ints count; bools, NaN and inf do not."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def _range_text(lo: Any, hi: Any) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" of at least {lo}"
    if hi is not None:
        return f" of at most {hi}"
    return ""


@dataclass(frozen=True)
class ParamSpec:
    """One constructor parameter a job may set.

    ``type`` is ``"int"``, ``"float"``, ``"bool"`` or ``"int_list"``. ``min`` and
    ``max`` bound the value (inclusive; for ``int_list``, each item), ``min_len``
    and ``max_len`` bound an ``int_list``'s length, ``default`` fills it in.
    """

    type: str
    default: Any
    min: float | None = None
    max: float | None = None
    min_len: int | None = None
    max_len: int | None = None
    help: str = ""

    def describe(self) -> str:
        """What a valid value looks like, for error messages and form help."""
        if self.type == "int_list":
            if self.min_len is not None and self.max_len is not None:
                count = f"{self.min_len} to {self.max_len} "
            elif self.min_len is not None:
                count = f"at least {self.min_len} "
            elif self.max_len is not None:
                count = f"at most {self.max_len} "
            else:
                count = ""
            return f"a list of {count}integers" + _range_text(self.min, self.max)
        noun = {"int": "an integer", "float": "a number", "bool": "true or false"}[self.type]
        return noun + _range_text(self.min, self.max)

    def _scalar(self, value: Any, kind: str) -> tuple[Any, bool]:
        converted = _as_int(value) if kind == "int" else _as_float(value)
        if converted is None:
            return None, False
        if self.min is not None and converted < self.min:
            return None, False
        if self.max is not None and converted > self.max:
            return None, False
        return converted, True

    def validate(self, value: Any, path: str) -> tuple[Any, dict[str, str]]:
        """Return ``(normalised value, errors by path)``; ``path`` names the parameter."""
        if self.type == "bool":
            if isinstance(value, bool):
                return value, {}
            return None, {path: "must be true or false"}
        if self.type in ("int", "float"):
            converted, ok = self._scalar(value, self.type)
            return (converted, {}) if ok else (None, {path: f"must be {self.describe()}"})
        # int_list
        if not isinstance(value, list | tuple):
            return None, {path: f"must be {self.describe()}"}
        if (self.min_len is not None and len(value) < self.min_len) or (
            self.max_len is not None and len(value) > self.max_len
        ):
            return None, {path: f"must be {self.describe()}"}
        items, errors = [], {}
        item_text = "an integer" + _range_text(self.min, self.max)
        for i, item in enumerate(value):
            converted, ok = self._scalar(item, "int")
            if ok:
                items.append(converted)
            else:
                errors[f"{path}[{i}]"] = f"must be {item_text}"
        return (None if errors else items), errors


@dataclass(frozen=True)
class ModelSpec:
    """A model architecture a job may name. See the module docstring for the contract."""

    name: str
    family: str
    modality: str
    class_path: str
    description: str
    params: dict[str, ParamSpec] = field(default_factory=dict)

    @property
    def purpose(self) -> str:
        """The job purpose this model serves: ``classification`` or ``segmentation``."""
        return MODALITY_PURPOSE[self.modality]

    def default_params(self) -> dict[str, Any]:
        return {
            name: (list(p.default) if isinstance(p.default, list) else p.default)
            for name, p in sorted(self.params.items())
        }

    def validate_params(self, raw: Any) -> tuple[dict[str, Any], dict[str, str]]:
        """Check ``raw`` constructor params; return ``(params with defaults, errors)``.

        Error keys are relative paths (``"hidden_sizes"``, ``"hidden_sizes[1]"``), or
        ``""`` when ``raw`` is not a dict at all.
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            return {}, {"": "must be an object of constructor parameters"}
        errors: dict[str, str] = {}
        out = self.default_params()
        for key, value in raw.items():
            if not isinstance(key, str) or key not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                errors[str(key)] = f"unknown parameter for model '{self.name}' (allowed: {known})"
                continue
            converted, errs = self.params[key].validate(value, key)
            errors.update(errs)
            if not errs:
                out[key] = converted
        return dict(sorted(out.items())), errors

    def check_dataset(
        self,
        *,
        input_shape: list[int],
        n_classes: int,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise ``ValueError`` saying why this model cannot take data of that shape.

        ``input_shape`` is one example's shape without the batch dimension:
        ``[features]`` for tabular data, ``[C, H, W]`` for images and segmentation.
        ``params`` are the job's model params (defaults are used for missing ones).
        """
        if not isinstance(input_shape, list | tuple) or not input_shape:
            raise ValueError(f"{self.name}: input_shape must be a non-empty list of sizes")
        if not all(_is_int(d) and d >= 1 for d in input_shape):
            raise ValueError(
                f"{self.name}: input_shape {list(input_shape)} must hold positive integers"
            )
        if not _is_int(n_classes) or n_classes < 2:
            raise ValueError(f"{self.name}: needs at least 2 classes, the data set has {n_classes}")
        shape = list(input_shape)
        if self.modality == "tabular":
            if len(shape) != 1:
                raise ValueError(
                    f"{self.name} is a tabular model and needs input_shape [features], "
                    f"got {shape} ({len(shape)} dimensions)"
                )
            return
        if len(shape) != 3:
            raise ValueError(
                f"{self.name} is an {self.modality} model and needs input_shape [C, H, W], "
                f"got {shape} ({len(shape)} dimensions)"
            )
        _, h, w = shape
        if self.name == "small_cnn" and self.family == "cnn" and (h < 8 or w < 8):
            raise ValueError(f"small_cnn needs images of at least 8x8 pixels, got {h}x{w}")
        if self.name == "small_unet" and self.family == "unet":
            merged = self.default_params()
            merged.update(params or {})
            depth = merged["depth"]
            step = 2**depth
            if h % step or w % step:
                raise ValueError(
                    f"small_unet with depth {depth} halves the image {depth} times, so height "
                    f"and width must be divisible by {step}; got {h}x{w}"
                )


def builtin_models() -> dict[str, ModelSpec]:
    """The models every deployment offers, by name (a fresh dict each call)."""
    models = [
        ModelSpec(
            name="logistic_regression",
            family="linear",
            modality="tabular",
            class_path="training.fl.models.LogisticRegression",
            description="Multinomial logistic regression on tabular features.",
            params={},
        ),
        ModelSpec(
            name="mlp",
            family="mlp",
            modality="tabular",
            class_path="training.fl.models.MLP",
            description="Multilayer perceptron with ReLU hidden layers on tabular features.",
            params={
                "hidden_sizes": ParamSpec(
                    "int_list",
                    default=[64, 32],
                    min=1,
                    max=4096,
                    min_len=1,
                    max_len=4,
                    help="Width of each hidden layer.",
                ),
                "dropout": ParamSpec(
                    "float", default=0.0, min=0.0, max=0.9, help="Dropout after each layer."
                ),
            },
        ),
        ModelSpec(
            name="small_cnn",
            family="cnn",
            modality="image",
            class_path="training.fl.models.SmallCNN",
            description="Small convolutional classifier (conv blocks, global pooling, linear).",
            params={
                "channels": ParamSpec(
                    "int_list",
                    default=[16, 32],
                    min=1,
                    max=512,
                    min_len=1,
                    max_len=4,
                    help="Output channels of each convolutional block.",
                ),
            },
        ),
        ModelSpec(
            name="small_unet",
            family="unet",
            modality="segmentation",
            class_path="training.fl.models.SmallUNet",
            description="Small U-Net for per-pixel segmentation.",
            params={
                "base_channels": ParamSpec(
                    "int", default=8, min=4, max=64, help="Channels of the first level."
                ),
                "depth": ParamSpec(
                    "int", default=2, min=1, max=4, help="Number of down-sampling levels."
                ),
            },
        ),
    ]
    return {m.name: m for m in models}


def _param_from_settings(model: str, pname: Any, raw: Any) -> ParamSpec:
    where = f"TRAINING_CUSTOM_MODELS['{model}']['params']['{pname}']"
    if not isinstance(pname, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", pname):
        raise ImproperlyConfigured(f"{where}: parameter name must be a Python identifier")
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(f"{where} must be a dict with 'type' and 'default'")
    allowed = {"type", "default", "min", "max", "min_len", "max_len", "help"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ImproperlyConfigured(f"{where}: unknown keys {unknown} (allowed: {sorted(allowed)})")
    ptype = raw.get("type")
    if ptype not in PARAM_TYPES:
        raise ImproperlyConfigured(f"{where}: 'type' must be one of {', '.join(PARAM_TYPES)}")
    if "default" not in raw:
        raise ImproperlyConfigured(f"{where}: 'default' is required")
    for bound in ("min", "max"):
        if raw.get(bound) is not None and _as_float(raw[bound]) is None:
            raise ImproperlyConfigured(f"{where}: '{bound}' must be a finite number")
    for bound in ("min_len", "max_len"):
        if raw.get(bound) is not None and not (_is_int(raw[bound]) and raw[bound] >= 0):
            raise ImproperlyConfigured(f"{where}: '{bound}' must be a non-negative integer")
    spec = ParamSpec(
        type=ptype,
        default=raw["default"],
        min=raw.get("min"),
        max=raw.get("max"),
        min_len=raw.get("min_len"),
        max_len=raw.get("max_len"),
        help=str(raw.get("help", "")),
    )
    default, errors = spec.validate(raw["default"], "default")
    if errors:
        raise ImproperlyConfigured(f"{where}: default {raw['default']!r} is not {spec.describe()}")
    return ParamSpec(
        type=spec.type,
        default=default,
        min=spec.min,
        max=spec.max,
        min_len=spec.min_len,
        max_len=spec.max_len,
        help=spec.help,
    )


def _custom_from_settings(name: Any, entry: Any, builtins: Mapping[str, ModelSpec]) -> ModelSpec:
    where = f"TRAINING_CUSTOM_MODELS[{name!r}]"
    if not isinstance(name, str) or not _MODEL_NAME_RE.fullmatch(name):
        raise ImproperlyConfigured(
            f"{where}: a model name must match {_MODEL_NAME_RE.pattern} (lower case, digits, _)"
        )
    if name in builtins:
        raise ImproperlyConfigured(
            f"{where}: '{name}' is a built-in model; give the custom model another name"
        )
    if not isinstance(entry, Mapping):
        raise ImproperlyConfigured(f"{where} must be a dict with 'class_path' and 'modality'")
    allowed = {"class_path", "modality", "description", "params"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ImproperlyConfigured(f"{where}: unknown keys {unknown} (allowed: {sorted(allowed)})")
    class_path = entry.get("class_path")
    if not isinstance(class_path, str) or not class_path:
        raise ImproperlyConfigured(
            f"{where}: 'class_path' (dotted path of the nn.Module) is missing"
        )
    if not _CLASS_PATH_RE.fullmatch(class_path):
        raise ImproperlyConfigured(
            f"{where}: 'class_path' {class_path!r} is not a dotted path like 'package.module.Class'"
        )
    modality = entry.get("modality")
    if modality not in MODALITIES:
        raise ImproperlyConfigured(
            f"{where}: unknown modality {modality!r}; use one of {', '.join(MODALITIES)}"
        )
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise ImproperlyConfigured(f"{where}: 'description' must be a string")
    raw_params = entry.get("params") or {}
    if not isinstance(raw_params, Mapping):
        raise ImproperlyConfigured(f"{where}: 'params' must be a dict of parameter specs")
    params = {p: _param_from_settings(name, p, spec) for p, spec in raw_params.items()}
    return ModelSpec(
        name=name,
        family="custom",
        modality=modality,
        class_path=class_path,
        description=description or f"Custom model {class_path}",
        params=params,
    )


def model_registry() -> dict[str, ModelSpec]:
    """Built-in models plus the deployment's ``settings.TRAINING_CUSTOM_MODELS``.

    Without configured Django settings (a bare script, the site worker) this is
    :func:`builtin_models`. A custom entry that reuses a built-in name, lacks a
    ``class_path`` or names an unknown modality raises ``ImproperlyConfigured``.
    Read afresh on each call, so changed settings (tests) take effect at once.
    """
    registry = builtin_models()
    try:
        custom = getattr(settings, "TRAINING_CUSTOM_MODELS", None)
    except ImproperlyConfigured:  # DJANGO_SETTINGS_MODULE unset and settings not configured
        return registry
    if not custom:
        return registry
    if not isinstance(custom, Mapping):
        raise ImproperlyConfigured("TRAINING_CUSTOM_MODELS must be a dict of name -> model entry")
    for name, entry in custom.items():
        spec = _custom_from_settings(name, entry, registry)
        registry[spec.name] = spec
    return registry


def get_model(name: Any, *, registry: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    """The model called ``name``; ``ValueError`` (never ``KeyError``) if there is none."""
    models = model_registry() if registry is None else registry
    if isinstance(name, str) and name in models:
        return models[name]
    raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(models))}")
