"""Training job specs: validation and canonical form.

A spec is the JSON-able dict a researcher submits (web form or API) to propose a
training job. :func:`validate_spec` checks every field and returns the
*normalised* spec: defaults filled in, numbers typed, participants sorted, keys
sorted. The normalised spec is what is stored, hashed (:func:`spec_digest`) and
approved; any change to it changes the digest and voids approvals (docs/architecture.md, sections
3-4).

Normalisation rules (so equal jobs get equal digests):

* Float fields are always floats: ``"lr": 1`` and ``"lr": 1.0`` both become
  ``1.0``. Integer fields accept integral floats (``"rounds": 5.0`` becomes ``5``)
  but never bools, non-integral floats or strings. NaN and infinity are rejected.
* ``participants`` and ``exclude_layers.layers`` are sets: they are sorted.
* ``dp_sgd`` acts during local training, before any filter on the update, so the
  normalised pipeline lists it first; the other filters keep their order, which
  is the order they are applied to the update.
* Every optional field is present in the output with its default, except
  ``contribution``, ``evaluation``, ``loss`` and ``aggregation``: each is present only
  when it differs from its default (specs written before they existed keep their
  digests, and so their approvals); :func:`contribution_settings`,
  :func:`evaluation_settings`, :func:`loss_of` and :func:`aggregation_of` read them
  with the defaults filled in. Inside ``contribution``, ``value`` follows the same
  rule. Privacy-filter parameters marked ``optional`` in
  :data:`training.fl.params.FILTER_PARAMS` (svt's ``selection_share``,
  ``threshold_share`` and ``bound``, laplace_noise's ``clip``) follow the same rule: present
  only when given at a value other than the one they take when left out
  (:func:`training.fl.params.derived_default`), which the engine fills in itself.

Where models are evaluated (``evaluation``): ``{"where": "central"}`` on the
consortium's validation set (the bundled data sets carry one; for any other key it is one an
institution's data steward uploaded, which :mod:`training.jobs.compliance` checks), or
``{"where": "sites", "validation_fraction": f, "max_models": m}``: each site keeps
the fraction ``f`` of its own records aside (never trained on; the privacy
accountant projects DP-SGD on the records left, :func:`training_records`), and
after each round evaluates on it the round's model and the coalition models its
contribution scores need, at most ``m`` of them. ``sites`` is the default for any
data set that is not bundled, ``central`` for the bundled ones.

The privacy filters' parameters (names, types, bounds, defaults) are the engine's
schema, :mod:`training.fl.params`, which the site checks again before it filters an
update; the plain-English summaries an approver reads are in
:mod:`training.jobs.describe`.

The loss local training minimises (``loss``): ``cross_entropy`` (the default for
every purpose, so that a segmentation job written before the key existed keeps both
its digest and its meaning) or ``dice_bce`` (segmentation only: cross-entropy plus
one minus the soft Dice of the foreground, :mod:`training.fl.evaluate`). How FedAvg
averages partial updates (``aggregation``, ``fedavg`` only): ``masked_mean`` (the
default: each coordinate over the sites that shared it) or ``zero_filled_mean``
(unshared coordinates count as zeros, the seed's tooling; :mod:`training.fl.aggregate`).
What a coalition is worth in contribution scoring (``contribution.value``): the
task's ``metric`` (the default) or its ``loss`` (minus the validation loss).

This module imports neither torch nor Django models; model architectures come
from :mod:`training.jobs.registry`.

Why one module: a spec is one document with one normal form, and its digest is what every
approver signs off. Each field's checker shares the checker that collects every problem at
once, and the normalisation rules above (defaults, ordering, the fields left out when they are
the default); split by field, a new field would be easier to add without its place in the
digest rules, which is how an approval is voided by accident.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from training.fl.holdout import BUNDLED_DATASETS, training_count
from training.fl.params import (
    FILTER_NAMES,
    FILTER_PARAMS,
    LAYER_NAME_MAX_LEN,
    MISSING,
    Choice,
    Field,
    LayerList,
    Number,
    derived_default,
    relation_errors,
)
from training.jobs.registry import MODALITY_PURPOSE, ModelSpec, model_registry
from training.queues import MIN_ROUND_TIMEOUT_SECONDS

SPEC_SCHEMA_VERSION = 1

#: DP mechanism (a ``consortium.governance.models.DPMechanism`` value) of each DP filter.
FILTER_MECHANISM = {
    "laplace_noise": "laplace",
    "gaussian_noise": "gaussian",
    "svt": "svt",
    "dp_sgd": "dp_sgd",
}

PURPOSES = ("classification", "segmentation")
TOPOLOGIES = ("fedavg", "cyclic")
OPTIMIZERS = ("sgd", "adam")
#: training.fl.evaluate.LOSSES (no torch import here); the first is the default.
LOSSES = ("cross_entropy", "dice_bce")
DEFAULT_LOSS = "cross_entropy"
#: The losses each purpose may train with.
PURPOSE_LOSSES = {"classification": ("cross_entropy",), "segmentation": LOSSES}
#: training.fl.aggregate.AGGREGATIONS; the first is the default.
AGGREGATIONS = ("masked_mean", "zero_filled_mean")
DEFAULT_AGGREGATION = "masked_mean"

SLUG_RE = re.compile(r"^[a-z0-9-]+$")
SLUG_MAX_LEN = 64  # Institution.slug max_length
DATASET_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

ROOT = "$"  # the error path of the spec as a whole

#: How contributions are scored each round (training.rounds.contributions): ``auto`` is exact
#: Shapley values up to CONTRIBUTION_EXACT_MAX sites and GTG-Shapley sampling above.
CONTRIBUTION_METHODS = ("auto", "leave_one_out", "shapley_exact", "shapley_sampled")
CONTRIBUTION_EXACT_MAX = 8  # training.fl.contribution.EXACT_MAX_PLAYERS (no torch import here)
#: What a coalition is valued by (training.fl.coalition.VALUES); left out when the default.
CONTRIBUTION_VALUES = ("metric", "loss")
CONTRIBUTION_DEFAULT_VALUE = "metric"
CONTRIBUTION_DEFAULTS = {
    "method": "auto",
    "permutations": 100,
    "tolerance": 0.02,
    "truncation": 0.005,
}
#: The parameters of the sampled method (also taken by ``auto``, which may sample).
CONTRIBUTION_SAMPLING = {
    "permutations": ("int", 1, 10000),
    "tolerance": ("float", 0, 1),
    "truncation": ("float", 0, 1),
}

#: Where a job's models are evaluated (module docstring).
EVALUATION_CENTRAL = "central"
EVALUATION_SITES = "sites"
EVALUATION_WHERE = (EVALUATION_SITES, EVALUATION_CENTRAL)
EVALUATION_SITES_DEFAULTS = {
    "where": EVALUATION_SITES,
    "validation_fraction": 0.2,
    #: 2^8: exact Shapley values up to CONTRIBUTION_EXACT_MAX sites, as when evaluated centrally.
    "max_models": 256,
}
EVALUATION_SITES_FIELDS = {
    "validation_fraction": ("float", 0.05, 0.5),
    "max_models": ("int", 2, 4096),
}


class SpecError(ValueError):
    """A spec with problems. ``errors`` maps each JSON path to what is wrong there.

    Paths look like ``rounds``, ``optimizer.lr``, ``participants[2]``,
    ``privacy_pipeline[1].noise_multiplier``; ``$`` is the spec itself.
    """

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__(self.errors)  # args == (errors,), so the exception pickles

    def __str__(self) -> str:
        return "; ".join(
            msg if path == ROOT else f"{path}: {msg}" for path, msg in self.errors.items()
        )


# --- field checkers ------------------------------------------------------------------------

_TOP_LEVEL = (
    "schema_version",
    "purpose",
    "participants",
    "dataset_key",
    "model",
    "topology",
    "rounds",
    "local_epochs",
    "batch_size",
    "optimizer",
    "momentum_restart",
    "privacy_pipeline",
    "min_participants",
    "round_timeout_seconds",
    "approval_ttl_hours",
    "contribution",
    "evaluation",
    "loss",
    "aggregation",
    "privacy_audit",
)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


class _Checker:
    """Collects every problem in one pass; ``errors`` keeps the first message per path."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}

    def error(self, path: str, message: str) -> None:
        self.errors.setdefault(path, message)

    def field(self, obj: Mapping, key: str, path: str, spec: Field) -> Any:
        """The checked value of ``obj[key]``, its default, or None (error recorded)."""
        if key not in obj:
            if spec.default is MISSING:
                self.error(path, "required")
                return None
            return list(spec.default) if isinstance(spec.default, list) else spec.default
        if isinstance(spec, LayerList):
            return self.layers(obj[key], path)
        converted = spec.convert(obj[key])
        if converted is None:
            self.error(path, spec.message())
        return converted

    def layers(self, value: Any, path: str) -> list[str] | None:
        if not isinstance(value, list) or not value:
            self.error(path, "must be a non-empty list of layer names")
            return None
        ok, seen = True, set()
        for i, name in enumerate(value):
            if not isinstance(name, str) or not name.strip() or len(name) > LAYER_NAME_MAX_LEN:
                self.error(
                    f"{path}[{i}]",
                    f"must be a layer name (non-empty, at most {LAYER_NAME_MAX_LEN} characters)",
                )
                ok = False
            elif name in seen:
                self.error(f"{path}[{i}]", f"duplicate layer '{name}'")
                ok = False
            else:
                seen.add(name)
        return sorted(value) if ok else None

    def unknown_keys(self, obj: Mapping, allowed: Any, prefix: str, what: str) -> None:
        for key in obj:
            if key not in allowed:
                path = f"{prefix}.{key}" if prefix else str(key)
                self.error(path, f"unknown {what}")


def _check_participants(c: _Checker, raw: Mapping) -> list[str] | None:
    if "participants" not in raw:
        c.error("participants", "required")
        return None
    value = raw["participants"]
    if not isinstance(value, list) or not value:
        c.error("participants", "must be a non-empty list of institution slugs")
        return None
    ok, seen = True, set()
    for i, slug in enumerate(value):
        path = f"participants[{i}]"
        if not isinstance(slug, str) or not SLUG_RE.fullmatch(slug) or len(slug) > SLUG_MAX_LEN:
            c.error(
                path,
                "must be an institution slug (lower-case letters, digits and hyphens, "
                f"at most {SLUG_MAX_LEN} characters)",
            )
            ok = False
        elif slug in seen:
            c.error(path, f"duplicate participant '{slug}'")
            ok = False
        else:
            seen.add(slug)
    return sorted(value) if ok else None


def _check_model(
    c: _Checker, raw: Mapping, registry: Mapping[str, ModelSpec], purpose: str | None
) -> dict | None:
    if "model" not in raw:
        c.error("model", "required")
        return None
    value = raw["model"]
    if not isinstance(value, Mapping):
        c.error("model", 'must be an object like {"name": "mlp", "params": {...}}')
        return None
    c.unknown_keys(value, ("name", "params"), "model", "field")
    name = value.get("name", MISSING)
    if name is MISSING:
        c.error("model.name", "required")
        return None
    if not isinstance(name, str) or name not in registry:
        c.error("model.name", f"unknown model {name!r}; known: {', '.join(sorted(registry))}")
        return None
    model = registry[name]
    ok = True
    if purpose is not None and MODALITY_PURPOSE[model.modality] != purpose:
        c.error(
            "model.name",
            f"model '{name}' is a {model.modality} model for "
            f"{MODALITY_PURPOSE[model.modality]}, but the job's purpose is {purpose}",
        )
        ok = False
    params, errors = model.validate_params(value.get("params"))
    for rel, msg in errors.items():
        c.error(f"model.params.{rel}" if rel else "model.params", msg)
    if errors or not ok:
        return None
    return {"name": name, "params": params}


def _check_optimizer(c: _Checker, raw: Mapping) -> dict | None:
    if "optimizer" not in raw:
        c.error("optimizer", "required")
        return None
    value = raw["optimizer"]
    if not isinstance(value, Mapping):
        c.error("optimizer", 'must be an object like {"name": "sgd", "lr": 0.01}')
        return None
    c.unknown_keys(value, ("name", "lr", "momentum"), "optimizer", "field")
    name = c.field(value, "name", "optimizer.name", Choice(OPTIMIZERS))
    lr = c.field(value, "lr", "optimizer.lr", Number("float", 0, 10, lo_open=True))
    out: dict[str, Any] = {"name": name, "lr": lr}
    ok = name is not None and lr is not None
    if name == "sgd":
        momentum = c.field(
            value,
            "momentum",
            "optimizer.momentum",
            Number("float", 0, 1, hi_open=True, default=0.9),
        )
        out["momentum"] = momentum
        ok = ok and momentum is not None
    elif name == "adam" and "momentum" in value:
        c.error("optimizer.momentum", "adam takes no momentum (only sgd does)")
        ok = False
    return out if ok else None


def _check_pipeline(c: _Checker, raw: Mapping) -> list[dict] | None:
    value = raw.get("privacy_pipeline", [])
    if not isinstance(value, list):
        c.error("privacy_pipeline", "must be a list of filters")
        return None
    out: list[dict] = []
    ok = True
    dp_sgd_at: int | None = None
    for i, item in enumerate(value):
        path = f"privacy_pipeline[{i}]"
        if not isinstance(item, Mapping):
            c.error(path, 'must be an object like {"filter": "gaussian_noise", ...}')
            ok = False
            continue
        if "filter" not in item:
            c.error(f"{path}.filter", "required")
            ok = False
            continue
        name = item["filter"]
        if not isinstance(name, str) or name not in FILTER_PARAMS:
            c.error(f"{path}.filter", f"unknown filter {name!r}; known: {', '.join(FILTER_NAMES)}")
            ok = False
            continue
        if name == "dp_sgd":
            if dp_sgd_at is not None:
                c.error(
                    f"{path}.filter",
                    f"dp_sgd may appear at most once (already at privacy_pipeline[{dp_sgd_at}])",
                )
                ok = False
            else:
                dp_sgd_at = i
        params = FILTER_PARAMS[name]
        before = len(c.errors)
        for key in item:
            if key != "filter" and key not in params:
                known = ", ".join(params)
                c.error(f"{path}.{key}", f"unknown parameter of {name} (allowed: {known})")
        entry: dict[str, Any] = {"filter": name}
        optional = [k for k, s in params.items() if isinstance(s, Number) and s.optional]
        for key, spec in params.items():
            if key in optional and key not in item:
                continue  # left out of the normal form (module docstring)
            entry[key] = c.field(item, key, f"{path}.{key}", spec)
        if len(c.errors) == before:
            for key, message in relation_errors(name, entry).items():
                c.error(f"{path}.{key}", message)
        if len(c.errors) != before:
            ok = False
        else:
            # An optional parameter given at the value it takes when left out says nothing:
            # the normal form leaves it out, so the two spellings of one job share a digest.
            for key in optional:
                if key in entry and entry[key] == derived_default(name, key, entry):
                    del entry[key]
        out.append(entry)
    if not ok:
        return None
    # dp_sgd acts during local training, before every filter on the update.
    out.sort(key=lambda f: 0 if f["filter"] == "dp_sgd" else 1)
    return out


def _check_contribution(c: _Checker, raw: Mapping, participants: list[str] | None) -> Any:
    """The normalised ``contribution`` object, or ``MISSING`` when it is the default."""
    value = raw.get("contribution", MISSING)
    if value is MISSING:
        return MISSING
    if not isinstance(value, Mapping):
        c.error("contribution", 'must be an object like {"method": "auto"}')
        return None
    c.unknown_keys(value, ("method", "value", *CONTRIBUTION_SAMPLING), "contribution", "field")
    method = c.field(
        value,
        "method",
        "contribution.method",
        Choice(CONTRIBUTION_METHODS, default=CONTRIBUTION_DEFAULTS["method"]),
    )
    valued_by = c.field(
        value,
        "value",
        "contribution.value",
        Choice(CONTRIBUTION_VALUES, default=CONTRIBUTION_DEFAULT_VALUE),
    )
    if method is None or valued_by is None:
        return None
    out: dict[str, Any] = {"method": method}
    ok = True
    if method == "shapley_exact" and participants and len(participants) > CONTRIBUTION_EXACT_MAX:
        c.error(
            "contribution.method",
            f"exact Shapley values evaluate 2^n coalitions each round: at most "
            f"{CONTRIBUTION_EXACT_MAX} participants (this job has {len(participants)}); "
            'use "auto" or "shapley_sampled"',
        )
        ok = False
    sampling = method in ("auto", "shapley_sampled")
    for key, (kind, lo, hi) in CONTRIBUTION_SAMPLING.items():
        path = f"contribution.{key}"
        if not sampling:
            if key in value:
                c.error(path, f'applies only to "shapley_sampled" (and "auto"), not to {method}')
                ok = False
            continue
        number = c.field(value, key, path, Number(kind, lo, hi, default=CONTRIBUTION_DEFAULTS[key]))
        ok = ok and number is not None
        out[key] = number
    if not ok:
        return None
    if valued_by != CONTRIBUTION_DEFAULT_VALUE:
        return out | {"value": valued_by}  # left out at the default (module docstring)
    return MISSING if out == CONTRIBUTION_DEFAULTS else out


def contribution_settings(spec: Mapping) -> dict:
    """The job's contribution scoring method and its parameters with every default filled in
    (``contribution`` is left out of a normalised spec when it is the default); what a
    coalition is valued by is :func:`contribution_value`."""
    given = spec.get("contribution")
    if not given:
        return dict(CONTRIBUTION_DEFAULTS)
    out = {"method": given.get("method", CONTRIBUTION_DEFAULTS["method"])}
    if out["method"] in ("auto", "shapley_sampled"):
        for key in CONTRIBUTION_SAMPLING:
            out[key] = given.get(key, CONTRIBUTION_DEFAULTS[key])
    return out


def contribution_value(spec: Mapping) -> str:
    """What the job's coalitions are valued by: the task's ``metric`` (the default) or its
    ``loss`` (minus the validation loss; ``training.fl.coalition``)."""
    given = spec.get("contribution") or {}
    return str(given.get("value") or CONTRIBUTION_DEFAULT_VALUE)


def loss_of(spec: Mapping) -> str:
    """The loss the job's local training minimises (``loss`` is left out at the default)."""
    return str(spec.get("loss") or DEFAULT_LOSS)


def aggregation_of(spec: Mapping) -> str:
    """How the job's FedAvg averages partial updates (left out at the default)."""
    return str(spec.get("aggregation") or DEFAULT_AGGREGATION)


def _check_loss(c: _Checker, raw: Mapping, purpose: str | None) -> Any:
    """The spec's ``loss``, or ``MISSING`` when it is the default (left out of the normal form)."""
    if "loss" not in raw:
        return MISSING
    loss = c.field(raw, "loss", "loss", Choice(LOSSES))
    if loss is None:
        return None
    if purpose in PURPOSE_LOSSES and loss not in PURPOSE_LOSSES[purpose]:
        c.error(
            "loss",
            f"the {loss} loss is for segmentation masks; a {purpose} model trains with "
            f"{' or '.join(PURPOSE_LOSSES[purpose])}",
        )
        return None
    return MISSING if loss == DEFAULT_LOSS else loss


def _check_aggregation(c: _Checker, raw: Mapping, topology: str | None) -> Any:
    """The spec's ``aggregation``, or ``MISSING`` when it is the default."""
    if "aggregation" not in raw:
        return MISSING
    aggregation = c.field(raw, "aggregation", "aggregation", Choice(AGGREGATIONS))
    if aggregation is None:
        return None
    if aggregation == DEFAULT_AGGREGATION:
        return MISSING
    if topology == "cyclic":
        c.error(
            "aggregation",
            "applies only to the fedavg topology (a cyclic round averages nothing: each site's "
            "shared coordinates are applied in turn)",
        )
        return None
    return aggregation


#: ``privacy_audit``: each site audits its own update before the approvers decide
#: (``training.jobs.privacy_audits``); its knobs, with their bounds and defaults. ``records``
#: is how many of the site's records are attacked (each costs seconds of CPU at the site),
#: ``seed`` fixes which records, the step's randomness, the pipeline's noise and the attacks.
PRIVACY_AUDIT_FIELDS = {
    "records": ("int", 1, 32, 8),
    "seed": ("int", 0, 2**31 - 1, 0),
}


def _check_privacy_audit(c: _Checker, raw: Mapping) -> Any:
    """The normalised ``privacy_audit`` object (every knob filled in), or ``MISSING`` when the
    spec asks for no audit. ``{}`` asks for one at the defaults; ``false`` or ``null`` for none."""
    value = raw.get("privacy_audit", MISSING)
    if value is MISSING or value is None or value is False:
        return MISSING
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        c.error("privacy_audit", 'must be an object like {"records": 8, "seed": 0}')
        return None
    c.unknown_keys(value, tuple(PRIVACY_AUDIT_FIELDS), "privacy_audit", "field")
    out: dict[str, Any] = {}
    for key, (kind, lo, hi, default) in PRIVACY_AUDIT_FIELDS.items():
        out[key] = c.field(
            value, key, f"privacy_audit.{key}", Number(kind, lo, hi, default=default)
        )
    return None if any(v is None for v in out.values()) else out


def privacy_audit_settings(spec: Mapping) -> dict | None:
    """``{"records", "seed"}`` when the job asks every site for a privacy audit before the
    approvers decide, else None."""
    value = spec.get("privacy_audit")
    if not value:
        return None
    return {key: value.get(key, default) for key, (*_, default) in PRIVACY_AUDIT_FIELDS.items()}


def default_evaluation_where(dataset_key: str | None) -> str:
    """``central`` for a bundled data set (it has a consortium validation set), else ``sites``."""
    return EVALUATION_CENTRAL if dataset_key in BUNDLED_DATASETS else EVALUATION_SITES


def _check_evaluation(
    c: _Checker, raw: Mapping, dataset_key: str | None, participants: list[str] | None
) -> Any:
    """The normalised ``evaluation`` object, or ``MISSING`` when it is the default."""
    value = raw.get("evaluation", MISSING)
    if value is MISSING:
        where = default_evaluation_where(dataset_key)
        _check_sites_budget(c, raw, participants, where, EVALUATION_SITES_DEFAULTS["max_models"])
        return MISSING
    if not isinstance(value, Mapping):
        c.error("evaluation", 'must be an object like {"where": "sites"}')
        return None
    c.unknown_keys(value, ("where", *EVALUATION_SITES_FIELDS), "evaluation", "field")
    where = c.field(
        value,
        "where",
        "evaluation.where",
        Choice(EVALUATION_WHERE, default=default_evaluation_where(dataset_key)),
    )
    if where is None:
        return None
    out: dict[str, Any] = {"where": where}
    ok = True
    if where == EVALUATION_CENTRAL:
        # Whether the consortium holds a validation set for a key that is not bundled is a
        # question for the database: training.jobs.compliance asks it when the job is proposed.
        for key in EVALUATION_SITES_FIELDS:
            if key in value:
                c.error(
                    f"evaluation.{key}", 'applies only when models are evaluated at the "sites"'
                )
                ok = False
    else:
        for key, (kind, lo, hi) in EVALUATION_SITES_FIELDS.items():
            number = c.field(
                value,
                key,
                f"evaluation.{key}",
                Number(kind, lo, hi, default=EVALUATION_SITES_DEFAULTS[key]),
            )
            ok = ok and number is not None
            out[key] = number
        if ok:
            ok = _check_sites_budget(c, raw, participants, where, out["max_models"])
    if not ok:
        return None
    default = (
        {"where": EVALUATION_CENTRAL}
        if default_evaluation_where(dataset_key) == EVALUATION_CENTRAL
        else EVALUATION_SITES_DEFAULTS
    )
    return MISSING if out == default else out


def _check_sites_budget(
    c: _Checker, raw: Mapping, participants: list[str] | None, where: str, max_models: int
) -> bool:
    """Exact Shapley values evaluated at the sites need 2^n models per site and round: they
    must fit the spec's ``max_models`` (``auto`` samples instead when they do not)."""
    if where != EVALUATION_SITES or not participants:
        return True
    given = raw.get("contribution")
    method = given.get("method") if isinstance(given, Mapping) else None
    if method == "shapley_exact" and 2 ** len(participants) > max_models:
        c.error(
            "contribution.method",
            f"exact Shapley values for {len(participants)} sites need {2 ** len(participants)} "
            f"models evaluated at every site each round, more than evaluation.max_models "
            f'({max_models}); raise it, or use "auto" or "shapley_sampled"',
        )
        return False
    return True


def evaluation_settings(spec: Mapping) -> dict:
    """Where the job's models are evaluated, with every default filled in: ``{"where":
    "central"}`` or ``{"where": "sites", "validation_fraction": f, "max_models": m}``."""
    given = spec.get("evaluation") or {}
    where = given.get("where") or default_evaluation_where(spec.get("dataset_key"))
    if where == EVALUATION_CENTRAL:
        return {"where": EVALUATION_CENTRAL}
    return {
        "where": EVALUATION_SITES,
        "validation_fraction": float(
            given.get("validation_fraction", EVALUATION_SITES_DEFAULTS["validation_fraction"])
        ),
        "max_models": int(given.get("max_models", EVALUATION_SITES_DEFAULTS["max_models"])),
    }


def training_records(num_records: int, spec: Mapping) -> int:
    """How many of a site's ``num_records`` records it trains on in this job: all of them, or,
    when the job evaluates at the sites, those left once its validation share is aside. The
    privacy accountant projects DP-SGD's sampling rate on this count."""
    settings = evaluation_settings(spec)
    if settings["where"] != EVALUATION_SITES:
        return int(num_records)
    if int(num_records) < 2:
        return int(num_records)  # the site cannot split: its worker will say so
    return training_count(num_records, settings["validation_fraction"])


def validate_spec(raw: Any, *, registry: Mapping[str, ModelSpec] | None = None) -> dict:
    """Check a submitted spec and return its normalised form, or raise :class:`SpecError`.

    Every problem is reported at once, one message per JSON path. ``registry``
    defaults to :func:`training.jobs.registry.model_registry` (built-ins plus the
    deployment's custom models). Validating a normalised spec returns it unchanged.
    """
    c = _Checker()
    if not isinstance(raw, Mapping):
        raise SpecError({ROOT: "a training spec must be a JSON object"})
    models = model_registry() if registry is None else registry

    c.unknown_keys(raw, _TOP_LEVEL, "", "field")
    out: dict[str, Any] = {}

    version = raw.get("schema_version", SPEC_SCHEMA_VERSION)
    if Number("int").convert(version) != SPEC_SCHEMA_VERSION:
        c.error(
            "schema_version",
            f"unsupported schema version {version!r}; this server understands "
            f"{SPEC_SCHEMA_VERSION}",
        )
    out["schema_version"] = SPEC_SCHEMA_VERSION

    purpose = c.field(raw, "purpose", "purpose", Choice(PURPOSES))
    out["purpose"] = purpose

    participants = _check_participants(c, raw)
    out["participants"] = participants

    if "dataset_key" not in raw:
        c.error("dataset_key", "required")
    elif not isinstance(raw["dataset_key"], str) or not DATASET_KEY_RE.fullmatch(
        raw["dataset_key"]
    ):
        c.error(
            "dataset_key",
            "must be a data set key: 1-64 characters of lower-case letters, digits, "
            "'_', '.' and '-', starting with a letter or digit",
        )
    else:
        out["dataset_key"] = raw["dataset_key"]

    out["model"] = _check_model(c, raw, models, purpose)
    out["topology"] = c.field(raw, "topology", "topology", Choice(TOPOLOGIES, default="fedavg"))
    aggregation = _check_aggregation(c, raw, out["topology"])
    if aggregation is not MISSING:
        out["aggregation"] = aggregation
    out["rounds"] = c.field(raw, "rounds", "rounds", Number("int", 1, 1000))
    out["local_epochs"] = c.field(
        raw, "local_epochs", "local_epochs", Number("int", 1, 100, default=1)
    )
    out["batch_size"] = c.field(raw, "batch_size", "batch_size", Number("int", 1, 4096, default=32))
    out["optimizer"] = _check_optimizer(c, raw)
    loss = _check_loss(c, raw, purpose)
    if loss is not MISSING:
        out["loss"] = loss

    restart = raw.get("momentum_restart", True)
    if not isinstance(restart, bool):
        c.error("momentum_restart", "must be true or false")
    out["momentum_restart"] = restart

    out["privacy_pipeline"] = _check_pipeline(c, raw)

    if "min_participants" in raw:
        value = raw["min_participants"]
        hi = len(participants) if participants is not None else None
        spec = Number("int", 1, hi)
        converted = spec.convert(value)
        if converted is None:
            if hi is not None and Number("int", 1).convert(value) is not None:
                c.error(
                    "min_participants",
                    f"must be at most the number of participants ({hi})",
                )
            else:
                c.error("min_participants", spec.message())
        out["min_participants"] = converted
    else:
        out["min_participants"] = len(participants) if participants is not None else None

    out["round_timeout_seconds"] = c.field(
        raw,
        "round_timeout_seconds",
        "round_timeout_seconds",
        # At least two ticks, so a lost site task is sent again before the deadline.
        Number("int", MIN_ROUND_TIMEOUT_SECONDS, 86400, default=600),
    )
    out["approval_ttl_hours"] = c.field(
        raw, "approval_ttl_hours", "approval_ttl_hours", Number("int", 1, 720, default=168)
    )
    contribution = _check_contribution(c, raw, participants)
    if contribution is not MISSING:
        out["contribution"] = contribution
    evaluation = _check_evaluation(c, raw, out.get("dataset_key"), participants)
    if evaluation is not MISSING:
        out["evaluation"] = evaluation
    audit = _check_privacy_audit(c, raw)
    if audit is not MISSING:
        out["privacy_audit"] = audit

    if c.errors:
        raise SpecError(c.errors)
    return _sorted(out)


def canonical_spec_text(spec: Mapping) -> str:
    """The canonical JSON text of a (normalised) spec: the bytes that are hashed."""
    return json.dumps(
        spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def spec_digest(spec: Mapping) -> str:
    """SHA-256 hex digest of :func:`canonical_spec_text`; approvals bind to it."""
    return hashlib.sha256(canonical_spec_text(spec).encode("utf-8")).hexdigest()


def _pipeline(spec: Mapping) -> list[Mapping]:
    return list(spec.get("privacy_pipeline") or [])


def shared_fraction(spec: Mapping) -> float:
    """Fraction of the model's coordinates a site shares per round (1.0 = all).

    The product of every ``partial_sharing`` and ``svt`` ``fraction`` in the
    pipeline. ``exclude_layers`` does not count: it removes a set of layers whose
    size is unknown until the model is built, so the true shared fraction is at
    most this value. An agreement's "max fraction shared" is checked against it.
    """
    fractions = [
        float(f["fraction"])
        for f in _pipeline(spec)
        if f.get("filter") in ("partial_sharing", "svt")
    ]
    return float(math.prod(fractions)) if fractions else 1.0


def dp_mechanisms(spec: Mapping) -> set[str]:
    """The DP mechanisms in the pipeline, as ``consortium.governance.models.DPMechanism`` values."""
    return {
        FILTER_MECHANISM[f.get("filter")]
        for f in _pipeline(spec)
        if f.get("filter") in FILTER_MECHANISM
    }
