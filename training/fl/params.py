"""The privacy filters' parameter schema: which parameters each filter takes, of what type,
within which bounds, with which default.

Two sides read it, and it is here, in the engine, so that both read the same rules while the
engine imports nothing of the project. The app's job-spec validation
(:func:`training.jobs.spec.validate_spec`) checks a proposed job's ``privacy_pipeline`` with these
fields, reporting every problem with its JSON path; the engine checks each pipeline entry again
with :func:`validate_filter` right before it touches an update (a site runs the spec it was sent,
so it does not take the server's word that the spec was checked).

The field types (:class:`Number`, :class:`Choice`, :class:`LayerList`) also describe the spec's own
fields (rounds, optimizer, contribution scoring, ...): one way to say "a number in a range" and
word its error.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "FILTER_NAMES",
    "FILTER_PARAMS",
    "LAYER_NAME_MAX_LEN",
    "MISSING",
    "NOT_ON_UPDATE",
    "SVT_BOUND_FACTOR",
    "UPDATE_FILTERS",
    "Choice",
    "Field",
    "LayerList",
    "Missing",
    "Number",
    "derived_default",
    "relation_errors",
    "validate_filter",
]


class Missing(enum.Enum):
    """The type of :data:`MISSING` (an enum so that ``is MISSING`` narrows for the type checker)."""

    MISSING = "MISSING"


#: A field's default when it has none (the field is required), and the value of a key not given.
MISSING: Final = Missing.MISSING

#: Longest layer name (or prefix) an ``exclude_layers`` entry may hold.
LAYER_NAME_MAX_LEN = 200


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"greater than {lo}" if lo_open else f"at least {lo}")
    if hi is not None:
        parts.append(f"less than {hi}" if hi_open else f"at most {hi}")
    return (" " + " and ".join(parts)) if parts else ""


@dataclass(frozen=True)
class Number:
    """An int or float field with optional bounds (``*_open`` makes a bound exclusive)."""

    kind: str  # "int" | "float"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    default: float | Missing = MISSING
    #: May be left out even without a ``default`` (its value is then derived: see
    #: :func:`derived_default`). An optional field is left out of a normalised spec when it is
    #: absent or equal to its default, so adding one never changes the digest of a spec
    #: written before it existed.
    optional: bool = False
    #: Why the bounds are what they are, or what leaving it out means: said with the bounds.
    note: str = ""

    def message(self) -> str:
        noun = "an integer" if self.kind == "int" else "a number"
        if self.kind == "int" and self.lo is not None and self.hi is not None:
            text = f"must be an integer from {self.lo} to {self.hi}"
        else:
            text = f"must be {noun}" + _range_text(self.lo, self.hi, self.lo_open, self.hi_open)
        return f"{text} ({self.note})" if self.note else text

    def convert(self, value: object) -> int | float | None:
        """The value typed (an integral float becomes an int for an int field), or None when
        it is not a valid value of this field (bools never are)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if self.kind == "int":
            if isinstance(value, float):
                if not (math.isfinite(value) and value.is_integer()):
                    return None
                value = int(value)
        else:
            try:
                value = float(value)
            except OverflowError:
                return None
            if not math.isfinite(value):
                return None
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return None
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return None
        return value


@dataclass(frozen=True)
class Choice:
    """A string field that takes one of ``choices``."""

    choices: tuple[str, ...]
    default: str | Missing = MISSING

    def message(self) -> str:
        return "must be one of " + ", ".join(f'"{c}"' for c in self.choices)

    def convert(self, value: object) -> str | None:
        return value if isinstance(value, str) and value in self.choices else None


@dataclass(frozen=True)
class LayerList:
    """A non-empty list of layer names (or name prefixes): ``exclude_layers``' ``layers``."""

    default: list[str] | Missing = MISSING


Field = Number | Choice | LayerList

#: An svt filter's value bound ``bound`` is this multiple of its ``threshold`` unless given.
SVT_BOUND_FACTOR = 2.0

#: Parameters of each privacy filter (besides ``"filter"`` itself), in the order the filters are
#: listed to people.
FILTER_PARAMS: dict[str, dict[str, Field]] = {
    "exclude_layers": {"layers": LayerList()},
    "partial_sharing": {
        "fraction": Number("float", 0, 1, lo_open=True),
        "strategy": Choice(("topk", "random"), default="topk"),
    },
    "percentile_clipping": {"percentile": Number("float", 0, 100, lo_open=True)},
    "laplace_noise": {
        "epsilon": Number("float", 0, lo_open=True),
        "sensitivity": Number("float", 0, lo_open=True),
        # Each shared coordinate clamped to [-clip, clip] before the L1 clip and the noise.
        "clip": Number(
            "float",
            0,
            lo_open=True,
            optional=True,
            note="optional: each shared coordinate is clamped to [-clip, clip] before the noise; "
            "at most sensitivity",
        ),
    },
    "gaussian_noise": {
        "noise_multiplier": Number("float", 0, lo_open=True),
        "clip_norm": Number("float", 0, lo_open=True),
    },
    "svt": {
        "epsilon": Number("float", 0, lo_open=True),
        "threshold": Number(
            "float",
            0,
            lo_open=True,
            note="the value bound is derived from it: bound is 2 × threshold unless given, so at 0 "
            "every value would be clipped to 0 and nothing shared while ε is spent",
        ),
        "fraction": Number("float", 0, 1, lo_open=True),
        "max_passes": Number("int", 1, 10, default=1),
        # Lyu et al.'s budget split: selection (threshold and query noise) against release.
        "selection_share": Number(
            "float",
            0,
            1,
            lo_open=True,
            hi_open=True,
            default=0.5,
            optional=True,
            note="the part of each pass's ε spent on selecting coordinates; the release of "
            "their values gets the rest",
        ),
        "threshold_share": Number(
            "float",
            0,
            1,
            lo_open=True,
            hi_open=True,
            default=0.5,
            optional=True,
            note="the part of the selection's ε spent on the threshold's noise; the queries' "
            "noise gets the rest",
        ),
        "bound": Number(
            "float",
            0,
            lo_open=True,
            optional=True,
            note="optional: every value is clipped to [-bound, bound], the sensitivity of the "
            "queries and the release; 2 × threshold when left out; at least threshold",
        ),
    },
    "dp_sgd": {
        "noise_multiplier": Number("float", 0, lo_open=True),
        "max_grad_norm": Number("float", 0, lo_open=True),
    },
}

#: Every privacy filter's name.
FILTER_NAMES: tuple[str, ...] = tuple(FILTER_PARAMS)

#: Filters that act on the update in :func:`training.fl.filters.apply_pipeline`; ``dp_sgd`` acts
#: during local training (:mod:`training.fl.local`) instead.
UPDATE_FILTERS = (
    "exclude_layers",
    "partial_sharing",
    "percentile_clipping",
    "laplace_noise",
    "gaussian_noise",
    "svt",
)
#: Pipeline entries that do not act on the update's values: ``exclude_layers`` removes layers
#: before any other filter runs, ``dp_sgd`` acts during local training.
NOT_ON_UPDATE = ("exclude_layers", "dp_sgd")


def derived_default(name: str, key: str, params: Mapping[str, Any]) -> Any:
    """The value an optional parameter takes when it is left out: its default, or one derived
    from the entry's other (checked) parameters; None where leaving it out means "none"."""
    if name == "svt" and key == "bound":
        return SVT_BOUND_FACTOR * float(params["threshold"])
    field_spec = FILTER_PARAMS[name][key]
    return None if field_spec.default is MISSING else field_spec.default


def relation_errors(name: str, params: Mapping[str, Any]) -> dict[str, str]:
    """The rules that tie one filter's parameters together, as ``{parameter: message}``.

    ``params`` holds the checked values (an absent optional parameter is absent or None). Both
    sides run them: the spec validation after each field's own check, the engine in
    :func:`validate_filter`.
    """
    errors: dict[str, str] = {}
    if name == "svt":
        bound, threshold = params.get("bound"), params.get("threshold")
        if bound is not None and threshold is not None and bound < threshold:
            errors["bound"] = (
                f"must be at least threshold ({threshold!r}): every value is clipped to the "
                "bound, so no query could reach a higher threshold"
            )
    elif name == "laplace_noise":
        clip, sensitivity = params.get("clip"), params.get("sensitivity")
        if clip is not None and sensitivity is not None and clip > sensitivity:
            errors["clip"] = (
                f"must be at most sensitivity ({sensitivity!r}): one coordinate cannot move "
                "further than the L1 norm the noise is calibrated to"
            )
    return errors


def validate_filter(spec: object) -> dict[str, Any]:
    """One pipeline entry checked with the spec's own rules, defaults filled in.

    Optional parameters left out take :func:`derived_default` (None for "none"), so the
    engine always finds every key. Raises ``ValueError`` naming the filter and the parameter.
    """
    if not isinstance(spec, Mapping) or "filter" not in spec:
        raise ValueError(f"a privacy filter must be an object with a 'filter' key, got {spec!r}")
    name = spec["filter"]
    if name not in FILTER_PARAMS:
        raise ValueError(f"unknown privacy filter {name!r}; known: {', '.join(FILTER_PARAMS)}")
    params = FILTER_PARAMS[name]
    unknown = sorted(str(k) for k in spec if k != "filter" and k not in params)
    if unknown:
        raise ValueError(
            f"{name}: unknown parameter {', '.join(unknown)} (allowed: {', '.join(params)})"
        )
    out: dict[str, Any] = {"filter": name}
    for key, field_spec in params.items():
        if key not in spec:
            if isinstance(field_spec, Number) and field_spec.optional:
                out[key] = None  # filled in below, once the others are checked
                continue
            if field_spec.default is MISSING:
                raise ValueError(f"{name}.{key}: required")
            out[key] = field_spec.default
            continue
        value = spec[key]
        if isinstance(field_spec, LayerList):
            ok = (
                isinstance(value, list | tuple)
                and value
                and all(isinstance(v, str) and v.strip() for v in value)
            )
            if not ok:
                raise ValueError(f"{name}.{key}: must be a non-empty list of layer names")
            out[key] = list(value)
            continue
        converted = field_spec.convert(value)
        if converted is None:
            raise ValueError(f"{name}.{key}: {field_spec.message()}, got {value!r}")
        out[key] = converted
    errors = relation_errors(name, out)
    if errors:
        key, message = next(iter(errors.items()))
        raise ValueError(f"{name}.{key}: {message}, got {out[key]!r}")
    for key in params:
        if out[key] is None:
            out[key] = derived_default(name, key, out)
    return out
