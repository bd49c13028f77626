"""Training job specs (training/spec.py) and the model registry (training/registry.py).

Plain pytest, no database: tests that change settings use pytest-django's
``settings`` fixture, which needs none.
"""

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from training.fl.params import FILTER_NAMES
from training.jobs.describe import describe_pipeline, pipeline_warnings
from training.jobs.registry import ModelSpec, builtin_models, get_model, model_registry
from training.jobs.spec import (
    SPEC_SCHEMA_VERSION,
    SpecError,
    canonical_spec_text,
    dp_mechanisms,
    shared_fraction,
    spec_digest,
    validate_spec,
)

ROOT = Path(__file__).resolve().parents[2]


def minimal_spec(**overrides):
    spec = {
        "purpose": "classification",
        "participants": ["hospital-b", "hospital-a"],
        "dataset_key": "chest_xray.v2",
        "model": {"name": "mlp"},
        "rounds": 10,
        "optimizer": {"name": "sgd", "lr": 0.01},
    }
    spec.update(overrides)
    return spec


def full_spec():
    return {
        "schema_version": 1,
        "purpose": "classification",
        "participants": ["hospital-c", "hospital-a", "hospital-b"],
        "dataset_key": "tabular-risk",
        "model": {"name": "mlp", "params": {"hidden_sizes": [128, 64, 32], "dropout": 0.25}},
        "topology": "cyclic",
        "rounds": 50,
        "local_epochs": 2,
        "batch_size": 64,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.5},
        "momentum_restart": False,
        "privacy_pipeline": [
            {"filter": "exclude_layers", "layers": ["net.4.weight", "net.0.bias"]},
            {"filter": "partial_sharing", "fraction": 0.4, "strategy": "random"},
            {"filter": "percentile_clipping", "percentile": 95},
            {"filter": "gaussian_noise", "noise_multiplier": 1.1, "clip_norm": 1.0},
        ],
        "min_participants": 2,
        "round_timeout_seconds": 1200,
        "approval_ttl_hours": 48,
    }


def errors_of(raw, **kwargs):
    with pytest.raises(SpecError) as info:
        validate_spec(raw, **kwargs)
    return info.value.errors


# --- normalisation and digests --------------------------------------------------------------


def test_minimal_spec_fills_defaults():
    spec = validate_spec(minimal_spec())
    assert spec == {
        "schema_version": SPEC_SCHEMA_VERSION,
        "purpose": "classification",
        "participants": ["hospital-a", "hospital-b"],
        "dataset_key": "chest_xray.v2",
        "model": {"name": "mlp", "params": {"dropout": 0.0, "hidden_sizes": [64, 32]}},
        "topology": "fedavg",
        "rounds": 10,
        "local_epochs": 1,
        "batch_size": 32,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "momentum_restart": True,
        "privacy_pipeline": [],
        "min_participants": 2,
        "round_timeout_seconds": 600,
        "approval_ttl_hours": 168,
    }
    assert list(spec) == sorted(spec)
    assert list(spec["optimizer"]) == sorted(spec["optimizer"])


def test_full_spec_normalises():
    spec = validate_spec(full_spec())
    assert spec["participants"] == ["hospital-a", "hospital-b", "hospital-c"]
    assert spec["model"]["params"] == {"dropout": 0.25, "hidden_sizes": [128, 64, 32]}
    assert spec["topology"] == "cyclic"
    assert spec["momentum_restart"] is False
    assert spec["privacy_pipeline"][0] == {
        "filter": "exclude_layers",
        "layers": ["net.0.bias", "net.4.weight"],  # a set: sorted
    }
    assert spec["privacy_pipeline"][2] == {"filter": "percentile_clipping", "percentile": 95.0}
    assert isinstance(spec["privacy_pipeline"][2]["percentile"], float)
    assert spec["min_participants"] == 2
    # Validating a normalised spec changes nothing.
    assert validate_spec(spec) == spec
    assert spec_digest(validate_spec(spec)) == spec_digest(spec)


def test_input_is_not_mutated():
    raw = full_spec()
    before = copy.deepcopy(raw)
    validate_spec(raw)
    assert raw == before


def test_digest_is_stable_across_key_order_and_number_spellings():
    a = full_spec()
    b = {k: a[k] for k in reversed(list(a))}
    b["optimizer"] = {"momentum": 0.5, "lr": 0.05, "name": "sgd"}
    b["rounds"] = 50.0  # integral float for an int field
    b["privacy_pipeline"] = copy.deepcopy(a["privacy_pipeline"])
    b["privacy_pipeline"][2]["percentile"] = 95.0  # float field spelled as float vs int
    b["privacy_pipeline"][3]["clip_norm"] = 1  # and as int vs float
    b["participants"] = ["hospital-b", "hospital-c", "hospital-a"]
    sa, sb = validate_spec(a), validate_spec(b)
    assert sa == sb
    assert canonical_spec_text(sa) == canonical_spec_text(sb)
    assert spec_digest(sa) == spec_digest(sb)
    assert len(spec_digest(sa)) == 64


def test_lr_int_and_float_spellings_normalise_to_float():
    one = validate_spec(minimal_spec(optimizer={"name": "adam", "lr": 1}))
    one_f = validate_spec(minimal_spec(optimizer={"name": "adam", "lr": 1.0}))
    assert one["optimizer"] == {"name": "adam", "lr": 1.0}
    assert isinstance(one["optimizer"]["lr"], float)
    assert spec_digest(one) == spec_digest(one_f)
    assert '"lr":1.0' in canonical_spec_text(one)


def test_digest_changes_with_any_change():
    base = validate_spec(full_spec())
    changed = validate_spec({**full_spec(), "rounds": 51})
    assert spec_digest(base) != spec_digest(changed)


def test_canonical_text_is_compact_sorted_utf8():
    text = canonical_spec_text({"b": 1, "a": "é"})
    assert text == '{"a":"é","b":1}'
    with pytest.raises(ValueError):
        canonical_spec_text({"x": float("nan")})


def test_dp_sgd_moves_to_the_front_of_the_pipeline():
    pipeline = [
        {"filter": "percentile_clipping", "percentile": 99},
        {"filter": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0},
        {"filter": "partial_sharing", "fraction": 0.5},
    ]
    spec = validate_spec(minimal_spec(privacy_pipeline=pipeline))
    assert [f["filter"] for f in spec["privacy_pipeline"]] == [
        "dp_sgd",
        "percentile_clipping",
        "partial_sharing",
    ]
    front = [pipeline[1], pipeline[0], pipeline[2]]
    assert spec_digest(spec) == spec_digest(validate_spec(minimal_spec(privacy_pipeline=front)))


def test_filter_defaults_are_filled():
    spec = validate_spec(
        minimal_spec(
            privacy_pipeline=[
                {"filter": "partial_sharing", "fraction": 0.3},
                {"filter": "svt", "epsilon": 1, "threshold": 0.1, "fraction": 0.1},
            ]
        )
    )
    assert spec["privacy_pipeline"] == [
        {"filter": "partial_sharing", "fraction": 0.3, "strategy": "topk"},
        {"filter": "svt", "epsilon": 1.0, "threshold": 0.1, "fraction": 0.1, "max_passes": 1},
    ]


def test_adam_has_no_momentum_and_sgd_default_momentum():
    spec = validate_spec(minimal_spec(optimizer={"name": "adam", "lr": 0.001}))
    assert spec["optimizer"] == {"name": "adam", "lr": 0.001}
    spec = validate_spec(minimal_spec(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0}))
    assert spec["optimizer"]["momentum"] == 0.0


def test_model_params_defaults_for_each_builtin():
    cases = {
        "logistic_regression": ("classification", {}),
        "mlp": ("classification", {"dropout": 0.0, "hidden_sizes": [64, 32]}),
        "small_cnn": ("classification", {"channels": [16, 32]}),
        "small_unet": ("segmentation", {"base_channels": 8, "depth": 2}),
    }
    for name, (purpose, params) in cases.items():
        spec = validate_spec(minimal_spec(purpose=purpose, model={"name": name}))
        assert spec["model"] == {"name": name, "params": params}


# --- errors, one per path -------------------------------------------------------------------


def _pipe(*filters):
    return {"privacy_pipeline": list(filters)}


BAD_FIELDS = [
    # (overrides, path)
    pytest.param({"schema_version": 2}, "schema_version", id="schema-version"),
    pytest.param({"purpose": "regression"}, "purpose", id="purpose"),
    pytest.param({"participants": []}, "participants", id="participants-empty"),
    pytest.param({"participants": "hospital-a"}, "participants", id="participants-str"),
    pytest.param({"participants": ["hospital-a", "Bad Slug"]}, "participants[1]", id="slug"),
    pytest.param({"participants": ["a", "b", "a"]}, "participants[2]", id="participant-dup"),
    pytest.param({"dataset_key": "-leading"}, "dataset_key", id="dataset-key"),
    pytest.param({"dataset_key": "x" * 65}, "dataset_key", id="dataset-key-long"),
    pytest.param({"model": {"name": "resnet152"}}, "model.name", id="model-unknown"),
    pytest.param({"model": "mlp"}, "model", id="model-not-object"),
    pytest.param(
        {"model": {"name": "mlp", "params": {"width": 3}}}, "model.params.width", id="param"
    ),
    pytest.param(
        {"model": {"name": "mlp", "params": {"hidden_sizes": [64, 0]}}},
        "model.params.hidden_sizes[1]",
        id="param-item",
    ),
    pytest.param(
        {"model": {"name": "mlp", "params": {"hidden_sizes": [1, 2, 3, 4, 5]}}},
        "model.params.hidden_sizes",
        id="param-length",
    ),
    pytest.param(
        {"model": {"name": "mlp", "params": {"dropout": 0.95}}},
        "model.params.dropout",
        id="param-range",
    ),
    pytest.param({"model": {"name": "small_unet"}}, "model.name", id="model-purpose-mismatch"),
    pytest.param({"topology": "ring"}, "topology", id="topology"),
    pytest.param({"rounds": 0}, "rounds", id="rounds-low"),
    pytest.param({"rounds": 1001}, "rounds", id="rounds-high"),
    pytest.param({"rounds": True}, "rounds", id="rounds-bool"),
    pytest.param({"rounds": 2.5}, "rounds", id="rounds-fraction"),
    pytest.param({"rounds": "10"}, "rounds", id="rounds-string"),
    pytest.param({"local_epochs": 101}, "local_epochs", id="local-epochs"),
    pytest.param({"batch_size": 4097}, "batch_size", id="batch-size"),
    pytest.param({"optimizer": {"name": "rmsprop", "lr": 0.1}}, "optimizer.name", id="opt"),
    pytest.param({"optimizer": {"name": "sgd", "lr": 0}}, "optimizer.lr", id="lr-zero"),
    pytest.param({"optimizer": {"name": "sgd", "lr": 10.5}}, "optimizer.lr", id="lr-high"),
    pytest.param({"optimizer": {"name": "sgd", "lr": float("nan")}}, "optimizer.lr", id="nan"),
    pytest.param({"optimizer": {"name": "sgd", "lr": float("inf")}}, "optimizer.lr", id="inf"),
    pytest.param({"optimizer": {"name": "sgd"}}, "optimizer.lr", id="lr-missing"),
    pytest.param(
        {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 1.0}},
        "optimizer.momentum",
        id="momentum-one",
    ),
    pytest.param(
        {"optimizer": {"name": "adam", "lr": 0.1, "momentum": 0.9}},
        "optimizer.momentum",
        id="adam-momentum",
    ),
    pytest.param(
        {"optimizer": {"name": "adam", "lr": 0.1, "beta": 0.9}}, "optimizer.beta", id="opt-key"
    ),
    pytest.param({"momentum_restart": "yes"}, "momentum_restart", id="restart-yes"),
    pytest.param({"momentum_restart": 1}, "momentum_restart", id="restart-int"),
    pytest.param({"privacy_pipeline": {}}, "privacy_pipeline", id="pipeline-type"),
    pytest.param(_pipe({"filter": "blur"}), "privacy_pipeline[0].filter", id="filter-unknown"),
    pytest.param(_pipe({"fraction": 0.5}), "privacy_pipeline[0].filter", id="filter-missing"),
    pytest.param(
        _pipe({"filter": "exclude_layers", "layers": []}),
        "privacy_pipeline[0].layers",
        id="layers-empty",
    ),
    pytest.param(
        _pipe({"filter": "exclude_layers", "layers": ["fc.weight", 3]}),
        "privacy_pipeline[0].layers[1]",
        id="layers-item",
    ),
    pytest.param(
        _pipe({"filter": "partial_sharing", "fraction": 0}),
        "privacy_pipeline[0].fraction",
        id="fraction-zero",
    ),
    pytest.param(
        _pipe({"filter": "partial_sharing", "fraction": 0.5, "strategy": "bottomk"}),
        "privacy_pipeline[0].strategy",
        id="strategy",
    ),
    pytest.param(
        _pipe({"filter": "percentile_clipping", "percentile": 100.5}),
        "privacy_pipeline[0].percentile",
        id="percentile",
    ),
    pytest.param(
        _pipe({"filter": "laplace_noise", "epsilon": -1, "sensitivity": 1}),
        "privacy_pipeline[0].epsilon",
        id="laplace-epsilon",
    ),
    pytest.param(
        _pipe(
            {"filter": "percentile_clipping", "percentile": 99},
            {"filter": "gaussian_noise", "noise_multiplier": 0, "clip_norm": 1},
        ),
        "privacy_pipeline[1].noise_multiplier",
        id="gaussian-multiplier",
    ),
    pytest.param(
        _pipe({"filter": "gaussian_noise", "noise_multiplier": 1, "clip_norm": 1, "sigma": 2}),
        "privacy_pipeline[0].sigma",
        id="filter-unknown-param",
    ),
    pytest.param(
        _pipe({"filter": "svt", "epsilon": 1, "threshold": -0.1, "fraction": 0.1}),
        "privacy_pipeline[0].threshold",
        id="svt-threshold",
    ),
    pytest.param(
        _pipe({"filter": "svt", "epsilon": 1, "threshold": 1, "fraction": 0.1, "max_passes": 11}),
        "privacy_pipeline[0].max_passes",
        id="svt-passes",
    ),
    pytest.param(
        _pipe({"filter": "svt", "epsilon": 1, "threshold": 0.5, "fraction": 0.1, "bound": 0.4}),
        "privacy_pipeline[0].bound",
        id="svt-bound-below-threshold",
    ),
    pytest.param(
        _pipe({"filter": "svt", "epsilon": 1, "threshold": 0.5, "fraction": 0.1, "bound": 0}),
        "privacy_pipeline[0].bound",
        id="svt-bound-zero",
    ),
    pytest.param(
        _pipe(
            {"filter": "svt", "epsilon": 1, "threshold": 0.5, "fraction": 0.1},
            {"filter": "svt", "epsilon": 1, "threshold": 0.5, "fraction": 0.1, "bound": 0.3},
        ),
        "privacy_pipeline[1].bound",
        id="svt-bound-checked-per-entry",
    ),
    pytest.param(
        _pipe({"filter": "svt", "epsilon": 1, "threshold": 1, "fraction": 1, "selection_share": 1}),
        "privacy_pipeline[0].selection_share",
        id="svt-selection-share-all",
    ),
    pytest.param(
        _pipe({"filter": "svt", "epsilon": 1, "threshold": 1, "fraction": 1, "threshold_share": 0}),
        "privacy_pipeline[0].threshold_share",
        id="svt-threshold-share-none",
    ),
    pytest.param(
        _pipe({"filter": "laplace_noise", "epsilon": 1, "sensitivity": 1, "clip": 0}),
        "privacy_pipeline[0].clip",
        id="laplace-clip-zero",
    ),
    pytest.param(
        _pipe({"filter": "laplace_noise", "epsilon": 1, "sensitivity": 1, "clip": 1.5}),
        "privacy_pipeline[0].clip",
        id="laplace-clip-above-sensitivity",
    ),
    pytest.param(
        _pipe({"filter": "dp_sgd", "noise_multiplier": 1}),
        "privacy_pipeline[0].max_grad_norm",
        id="dp-sgd-missing-param",
    ),
    pytest.param(
        _pipe(
            {"filter": "dp_sgd", "noise_multiplier": 1, "max_grad_norm": 1},
            {"filter": "dp_sgd", "noise_multiplier": 2, "max_grad_norm": 1},
        ),
        "privacy_pipeline[1].filter",
        id="dp-sgd-twice",
    ),
    pytest.param({"min_participants": 3}, "min_participants", id="min-participants-high"),
    pytest.param({"min_participants": 0}, "min_participants", id="min-participants-low"),
    pytest.param({"round_timeout_seconds": 5}, "round_timeout_seconds", id="timeout"),
    pytest.param({"approval_ttl_hours": 721}, "approval_ttl_hours", id="ttl"),
    pytest.param({"learning_rate": 0.1}, "learning_rate", id="unknown-top-level"),
]


@pytest.mark.parametrize(("overrides", "path"), BAD_FIELDS)
def test_bad_field_reports_its_path(overrides, path):
    errors = errors_of(minimal_spec(**overrides))
    assert list(errors) == [path], errors
    assert errors[path]


@pytest.mark.parametrize("field", ["purpose", "participants", "dataset_key", "model", "rounds"])
def test_required_fields(field):
    raw = minimal_spec()
    del raw[field]
    assert errors_of(raw) == {field: "required"}


def test_all_errors_reported_together():
    raw = minimal_spec(
        rounds=0,
        batch_size=True,
        optimizer={"name": "sgd", "lr": -1},
        momentum_restart="yes",
        privacy_pipeline=[
            {"filter": "partial_sharing", "fraction": 2},
            {"filter": "gaussian_noise", "noise_multiplier": 1.1},
        ],
        colour="blue",
    )
    del raw["dataset_key"]
    with pytest.raises(SpecError) as info:
        validate_spec(raw)
    exc = info.value
    assert set(exc.errors) == {
        "rounds",
        "batch_size",
        "optimizer.lr",
        "momentum_restart",
        "privacy_pipeline[0].fraction",
        "privacy_pipeline[1].clip_norm",
        "colour",
        "dataset_key",
    }
    text = str(exc)
    for path in exc.errors:
        assert f"{path}: " in text
    assert isinstance(exc, ValueError)


def test_spec_error_pickles_and_root_error():
    exc = SpecError({"rounds": "must be an integer from 1 to 1000"})
    again = pickle.loads(pickle.dumps(exc))
    assert again.errors == exc.errors
    assert str(again) == "rounds: must be an integer from 1 to 1000"
    assert errors_of(["not", "a", "dict"]) == {"$": "a training spec must be a JSON object"}


def test_min_participants_message_names_the_count():
    errors = errors_of(minimal_spec(min_participants=5))
    assert "2" in errors["min_participants"]


# --- pipeline summaries ---------------------------------------------------------------------


SAMPLE_PIPELINES = [
    pytest.param([], 1.0, set(), id="empty"),
    pytest.param(
        [{"filter": "exclude_layers", "layers": ["fc.weight"]}], 1.0, set(), id="exclude-only"
    ),
    pytest.param(
        [
            {"filter": "partial_sharing", "fraction": 0.4},
            {"filter": "gaussian_noise", "noise_multiplier": 1.1, "clip_norm": 1.0},
        ],
        0.4,
        {"gaussian"},
        id="topk-gaussian",
    ),
    pytest.param(
        [
            {"filter": "partial_sharing", "fraction": 0.5},
            {"filter": "svt", "epsilon": 0.5, "threshold": 0.01, "fraction": 0.2},
            {"filter": "laplace_noise", "epsilon": 1.0, "sensitivity": 0.1},
        ],
        0.1,
        {"svt", "laplace"},
        id="partial-svt-laplace",
    ),
    pytest.param(
        [
            {"filter": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0},
            {"filter": "percentile_clipping", "percentile": 99},
        ],
        1.0,
        {"dp_sgd"},
        id="dp-sgd",
    ),
]


@pytest.mark.parametrize(("pipeline", "fraction", "mechanisms"), SAMPLE_PIPELINES)
def test_shared_fraction_and_dp_mechanisms(pipeline, fraction, mechanisms):
    spec = validate_spec(minimal_spec(privacy_pipeline=pipeline))
    assert shared_fraction(spec) == pytest.approx(fraction)
    assert isinstance(shared_fraction(spec), float)
    assert dp_mechanisms(spec) == mechanisms


def test_describe_pipeline_mentions_every_parameter():
    pipeline = [
        {"filter": "exclude_layers", "layers": ["head.weight", "head.bias"]},
        {"filter": "partial_sharing", "fraction": 0.4},
        {"filter": "partial_sharing", "fraction": 0.25, "strategy": "random"},
        {"filter": "percentile_clipping", "percentile": 95},
        {"filter": "laplace_noise", "epsilon": 0.7, "sensitivity": 0.05},
        {"filter": "gaussian_noise", "noise_multiplier": 1.1, "clip_norm": 1.0},
        {"filter": "svt", "epsilon": 0.5, "threshold": 0.01, "fraction": 0.1, "max_passes": 3},
        {"filter": "dp_sgd", "noise_multiplier": 0.8, "max_grad_norm": 2.5},
    ]
    spec = validate_spec(minimal_spec(privacy_pipeline=pipeline))
    lines = describe_pipeline(spec)
    assert len(lines) == len(pipeline)
    dp, exclude, topk, rand, clip, laplace, gauss, svt = lines
    assert "DP-SGD" in dp and "2.5" in dp and "0.8" in dp
    assert "head.bias" in exclude and "head.weight" in exclude
    assert topk == "Share only the 40% of coordinates with the largest change (top-k)"
    assert "random" in rand and "25%" in rand
    assert clip == "Clip every update at its 95th percentile of absolute values"
    assert "Laplace" in laplace and "0.7" in laplace and "0.05" in laplace
    assert gauss == (
        "Add Gaussian noise with noise multiplier 1.1 after clipping the update to L2 norm 1.0"
    )
    assert "sparse vector" in svt
    assert all(s in svt for s in ("10%", "0.5", "0.01", "3 passes"))


def test_describe_pipeline_covers_every_filter_name():
    assert set(FILTER_NAMES) == {
        "exclude_layers",
        "partial_sharing",
        "percentile_clipping",
        "laplace_noise",
        "gaussian_noise",
        "svt",
        "dp_sgd",
    }
    assert describe_pipeline(validate_spec(minimal_spec())) == []


def test_describe_percentile_ordinals():
    for value, word in [(1, "1st"), (2, "2nd"), (3, "3rd"), (11, "11th"), (99.5, "99.5th")]:
        spec = validate_spec(
            minimal_spec(privacy_pipeline=[{"filter": "percentile_clipping", "percentile": value}])
        )
        assert f"its {word} percentile" in describe_pipeline(spec)[0]


# --- registry -------------------------------------------------------------------------------


def test_builtin_models():
    models = builtin_models()
    assert set(models) == {"logistic_regression", "mlp", "small_cnn", "small_unet"}
    assert {m.family for m in models.values()} == {"linear", "mlp", "cnn", "unet"}
    for name, model in models.items():
        assert isinstance(model, ModelSpec)
        assert model.name == name
        assert model.class_path.startswith("training.fl.models.")
        assert model.description
    assert models["small_unet"].modality == "segmentation"
    assert models["small_cnn"].modality == "image"
    assert models["logistic_regression"].params == {}


SHAPE_CASES = [
    # (model, params, input_shape, n_classes, ok, reason fragment)
    ("logistic_regression", None, [30], 2, True, None),
    ("logistic_regression", None, [3, 32, 32], 2, False, "tabular"),
    ("logistic_regression", None, [30], 1, False, "at least 2 classes"),
    ("mlp", None, [12], 5, True, None),
    ("mlp", None, [4, 3], 2, False, "tabular"),
    ("mlp", None, [0], 2, False, "positive"),
    ("small_cnn", None, [1, 28, 28], 10, True, None),
    ("small_cnn", None, [3, 8, 8], 2, True, None),
    ("small_cnn", None, [3, 7, 32], 2, False, "8x8"),
    ("small_cnn", None, [784], 10, False, "[C, H, W]"),
    ("small_unet", None, [1, 64, 64], 2, True, None),
    ("small_unet", None, [1, 64, 66], 2, False, "divisible by 4"),
    ("small_unet", {"depth": 4}, [1, 48, 48], 3, True, None),
    ("small_unet", {"depth": 4}, [1, 40, 40], 3, False, "divisible by 16"),
    ("small_unet", None, [64, 64], 2, False, "[C, H, W]"),
    ("small_unet", None, [1, 64, 64], 1, False, "at least 2 classes"),
]


@pytest.mark.parametrize(("name", "params", "shape", "n_classes", "ok", "reason"), SHAPE_CASES)
def test_builtin_check_dataset(name, params, shape, n_classes, ok, reason):
    model = builtin_models()[name]
    if ok:
        model.check_dataset(input_shape=shape, n_classes=n_classes, params=params)
    else:
        with pytest.raises(ValueError) as info:
            model.check_dataset(input_shape=shape, n_classes=n_classes, params=params)
        assert reason in str(info.value)


def test_get_model_unknown_is_value_error():
    assert get_model("mlp", registry=builtin_models()).family == "mlp"
    with pytest.raises(ValueError, match="unknown model 'nope'; known: logistic_regression"):
        get_model("nope")


CUSTOM = {
    "tiny_resnet": {
        "class_path": "hospital_models.resnet.TinyResNet",
        "modality": "image",
        "description": "ResNet-8 for 64x64 scans",
        "params": {
            "width": {"type": "int", "min": 4, "max": 128, "default": 16},
            "pretrained": {"type": "bool", "default": False},
        },
    },
    "survival_net": {"class_path": "hospital_models.survival.Net", "modality": "tabular"},
}


def test_custom_models_from_settings(settings):
    settings.TRAINING_CUSTOM_MODELS = CUSTOM
    registry = model_registry()
    assert set(builtin_models()) < set(registry)
    resnet = registry["tiny_resnet"]
    assert resnet.family == "custom"
    assert resnet.modality == "image"
    assert resnet.class_path == "hospital_models.resnet.TinyResNet"
    assert registry["survival_net"].family == "custom"
    assert get_model("survival_net").class_path == "hospital_models.survival.Net"
    resnet.check_dataset(input_shape=[3, 64, 64], n_classes=2)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        resnet.check_dataset(input_shape=[10], n_classes=2)

    # A job can name it, with its params validated and defaulted.
    spec = validate_spec(minimal_spec(model={"name": "tiny_resnet", "params": {"width": 32}}))
    assert spec["model"] == {"name": "tiny_resnet", "params": {"pretrained": False, "width": 32}}
    errors = errors_of(minimal_spec(model={"name": "tiny_resnet", "params": {"width": 2}}))
    assert list(errors) == ["model.params.width"]


def test_no_custom_models_setting_gives_builtins(settings):
    settings.TRAINING_CUSTOM_MODELS = {}
    assert set(model_registry()) == set(builtin_models())
    del settings.TRAINING_CUSTOM_MODELS
    assert set(model_registry()) == set(builtin_models())


BAD_CUSTOM = [
    pytest.param({"mlp": {"class_path": "x.Y", "modality": "tabular"}}, "built-in", id="reuse"),
    pytest.param({"net": {"modality": "tabular"}}, "class_path", id="no-class-path"),
    pytest.param({"net": {"class_path": "Net", "modality": "tabular"}}, "dotted", id="not-dotted"),
    pytest.param({"net": {"class_path": "a.Net", "modality": "audio"}}, "modality", id="modality"),
    pytest.param({"net": {"class_path": "a.Net"}}, "modality", id="no-modality"),
    pytest.param({"Bad Name": {"class_path": "a.Net", "modality": "image"}}, "name", id="name"),
    pytest.param(
        {"net": {"class_path": "a.Net", "modality": "image", "klass": "x"}}, "klass", id="key"
    ),
    pytest.param(
        {"net": {"class_path": "a.Net", "modality": "image", "params": {"w": {"type": "str"}}}},
        "type",
        id="param-type",
    ),
    pytest.param(
        {
            "net": {
                "class_path": "a.Net",
                "modality": "image",
                "params": {"w": {"type": "int", "min": 1, "max": 4, "default": 9}},
            }
        },
        "default",
        id="param-default",
    ),
    pytest.param(["not", "a", "dict"], "dict", id="not-a-dict"),
]


@pytest.mark.parametrize(("custom", "fragment"), BAD_CUSTOM)
def test_bad_custom_model_is_improperly_configured(settings, custom, fragment):
    settings.TRAINING_CUSTOM_MODELS = custom
    with pytest.raises(ImproperlyConfigured) as info:
        model_registry()
    assert fragment in str(info.value)


def test_modules_import_without_django_settings_torch_or_models():
    """The web process imports these; they must not pull in torch or Django models."""
    code = (
        "import sys\n"
        "from training.jobs import registry, spec\n"
        "assert sorted(registry.model_registry()) == sorted(registry.builtin_models())\n"
        "s = spec.validate_spec({'purpose': 'classification', 'participants': ['a'],"
        " 'dataset_key': 'd', 'model': {'name': 'mlp'}, 'rounds': 1,"
        " 'optimizer': {'name': 'adam', 'lr': 0.1}})\n"
        "assert s['min_participants'] == 1\n"
        "bad = [m for m in ('torch', 'django.db', 'django.apps.registry') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# --- the privacy engine's knobs (issue 15) ---------------------------------------------------


def test_svt_threshold_zero_is_refused_and_says_why():
    """Threshold 0 used to pass: the bound 2 x threshold then clipped every value to 0 while the
    mask said shared and ε was charged."""
    errors = errors_of(
        minimal_spec(
            privacy_pipeline=[{"filter": "svt", "epsilon": 1, "threshold": 0, "fraction": 0.1}]
        )
    )
    message = errors["privacy_pipeline[0].threshold"]
    assert "greater than 0" in message and "bound is derived from it" in message


SVT_OLD = {"filter": "svt", "epsilon": 0.5, "threshold": 0.01, "fraction": 0.1, "max_passes": 3}


def test_new_filter_parameters_leave_old_specs_and_digests_alone():
    """The split, the bound and Laplace's clip are optional and left out of the normal form when
    absent or at the value they take when left out: a spec written before them keeps its
    canonical text, so its digest and approvals."""
    laplace = {"filter": "laplace_noise", "epsilon": 0.7, "sensitivity": 0.05}
    spec = validate_spec(minimal_spec(privacy_pipeline=[SVT_OLD, laplace]))
    assert spec["privacy_pipeline"] == [
        {**SVT_OLD, "epsilon": 0.5},
        {**laplace},
    ]
    assert "selection_share" not in canonical_spec_text(spec)
    assert validate_spec(spec) == spec
    spelled_out = [
        {**SVT_OLD, "selection_share": 0.5, "threshold_share": 0.5, "bound": 0.02},
        laplace,
    ]
    assert spec_digest(validate_spec(minimal_spec(privacy_pipeline=spelled_out))) == spec_digest(
        spec
    )


def test_new_filter_parameters_are_kept_when_set():
    pipeline = [
        {**SVT_OLD, "selection_share": 0.25, "threshold_share": 0.75, "bound": 0.05},
        {"filter": "laplace_noise", "epsilon": 0.7, "sensitivity": 0.05, "clip": 0.001},
    ]
    spec = validate_spec(minimal_spec(privacy_pipeline=pipeline))
    assert spec["privacy_pipeline"] == [
        {
            **SVT_OLD,
            "epsilon": 0.5,
            "selection_share": 0.25,
            "threshold_share": 0.75,
            "bound": 0.05,
        },
        {"filter": "laplace_noise", "epsilon": 0.7, "sensitivity": 0.05, "clip": 0.001},
    ]
    assert validate_spec(spec) == spec
    assert spec_digest(spec) != spec_digest(validate_spec(minimal_spec(privacy_pipeline=[SVT_OLD])))
    svt, laplace = describe_pipeline(spec)
    assert "±0.05" in svt and "25% of each pass's ε" in svt and "75% of the selection" in svt
    assert "±0.001" in laplace


def test_svt_at_full_share_says_it_leaves_coordinates_unshared():
    full = {**SVT_OLD, "fraction": 1.0}
    spec = validate_spec(minimal_spec(privacy_pipeline=[full]))
    (line,) = describe_pipeline(spec)
    assert "still leaves coordinates unshared" in line and "each pass is charged" in line
    (warning,) = pipeline_warnings(spec)
    assert "does not share every coordinate" in warning
    assert "12.5% of them stay unshared" in warning  # 2**-3 after 3 passes
    assert "up to 1.5 per round" in warning
    partial = validate_spec(minimal_spec(privacy_pipeline=[SVT_OLD]))
    assert pipeline_warnings(partial) == []
    assert "unshared" not in describe_pipeline(partial)[0]


@pytest.mark.parametrize("cap", [0.1, 1.0])
def test_the_proposal_forms_svt_pipeline_is_valid(cap):
    """The form's starting pipeline for an agreement that requires SVT had threshold 0, which
    shared nothing; it now validates, and at a share of 100% the proposer is told the truth."""
    from training.jobs.proposal_guidance import pipeline_for_terms

    pipeline = pipeline_for_terms(required_mechanism="svt", max_shared_fraction=cap)
    spec = validate_spec(minimal_spec(privacy_pipeline=pipeline))
    (svt,) = [f for f in spec["privacy_pipeline"] if f["filter"] == "svt"]
    assert svt["threshold"] > 0 and svt["fraction"] == cap
    assert bool(pipeline_warnings(spec)) == (cap == 1.0)


# --- the loss, the aggregation and what a coalition is valued by (issue 15) --------------------

#: Digests of specs written before ``loss``, ``aggregation`` and ``contribution.value`` existed,
#: as the code before them computed: approvals bound to them must stay valid.
SEG_SPEC = {
    "purpose": "segmentation",
    "participants": ["hospital-b", "hospital-a"],
    "dataset_key": "lesions",
    "model": {"name": "small_unet"},
    "rounds": 3,
    "optimizer": {"name": "adam", "lr": 0.01},
    "contribution": {"method": "leave_one_out"},
}
OLD_DIGESTS = [
    (minimal_spec(), "38bde1fa5a118c3613061354105b69d2d42ee1d9e4a3049980cb817317a9f892"),
    (SEG_SPEC, "439faf2dd5fff640d3860a362ae949cd6241e052f606a21067a3f8582272c2c5"),
]


@pytest.mark.parametrize("raw, digest", OLD_DIGESTS)
def test_specs_without_the_new_keys_keep_their_digests(raw, digest):
    from training.jobs.spec import aggregation_of, contribution_value, loss_of

    spec = validate_spec(raw)
    assert spec_digest(spec) == digest
    assert "loss" not in spec and "aggregation" not in spec
    # Their meaning is unchanged too: cross-entropy, the mask-aware mean, the task's metric.
    assert loss_of(spec) == "cross_entropy"
    assert aggregation_of(spec) == "masked_mean"
    assert contribution_value(spec) == "metric"
    # Spelling the defaults out is the same job, with the same digest.
    contribution = dict(raw.get("contribution") or {"method": "auto"}, value="metric")
    spelled = dict(raw, loss="cross_entropy", aggregation="masked_mean", contribution=contribution)
    assert spec_digest(validate_spec(spelled)) == digest


def test_the_new_keys_are_kept_when_they_differ_from_the_default():
    from training.jobs.spec import aggregation_of, contribution_value, loss_of

    spec = validate_spec(
        dict(
            SEG_SPEC,
            loss="dice_bce",
            aggregation="zero_filled_mean",
            contribution={"method": "leave_one_out", "value": "loss"},
        )
    )
    assert spec["loss"] == "dice_bce"
    assert spec["aggregation"] == "zero_filled_mean"
    assert spec["contribution"] == {"method": "leave_one_out", "value": "loss"}
    assert (loss_of(spec), aggregation_of(spec), contribution_value(spec)) == (
        "dice_bce",
        "zero_filled_mean",
        "loss",
    )
    assert validate_spec(spec) == spec
    assert spec_digest(spec) != OLD_DIGESTS[1][1]
    # A default method valued by the loss is kept too (the contribution is not the default).
    auto = validate_spec(minimal_spec(contribution={"value": "loss"}))
    assert auto["contribution"] == {
        "method": "auto",
        "permutations": 100,
        "tolerance": 0.02,
        "truncation": 0.005,
        "value": "loss",
    }


@pytest.mark.parametrize(
    "overrides, path, fragment",
    [
        ({"loss": "focal"}, "loss", 'must be one of "cross_entropy", "dice_bce"'),
        ({"loss": 1}, "loss", "must be one of"),
        ({"loss": "dice_bce"}, "loss", "a classification model trains with cross_entropy"),
        ({"aggregation": "median"}, "aggregation", "must be one of"),
        (
            {"aggregation": "zero_filled_mean", "topology": "cyclic"},
            "aggregation",
            "only to the fedavg topology",
        ),
        ({"contribution": {"value": "dice"}}, "contribution.value", 'one of "metric", "loss"'),
    ],
)
def test_the_new_keys_are_checked(overrides, path, fragment):
    errors = errors_of(minimal_spec(**overrides))
    assert fragment in errors[path], errors


def test_the_spec_and_the_engine_name_the_same_choices():
    from training.fl.aggregate import AGGREGATIONS
    from training.fl.coalition import VALUES
    from training.fl.evaluate import DEFAULT_LOSS, LOSSES
    from training.jobs import spec as spec_module

    assert spec_module.LOSSES == LOSSES and spec_module.DEFAULT_LOSS == DEFAULT_LOSS
    assert spec_module.AGGREGATIONS == AGGREGATIONS
    assert spec_module.CONTRIBUTION_VALUES == VALUES


def test_describe_contribution_says_when_coalitions_are_valued_by_the_loss():
    from training.jobs.describe import describe_contribution

    spec = validate_spec(
        dict(SEG_SPEC, loss="dice_bce", contribution={"method": "leave_one_out", "value": "loss"})
    )
    text = describe_contribution(spec)
    assert "validation Dice + cross-entropy loss (lower is better)" in text
    assert "Dice score" not in text
    assert "by the Dice score" in describe_contribution(validate_spec(SEG_SPEC))
