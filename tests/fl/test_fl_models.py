"""The federated engine's models, tensor container and evaluation (training/fl/models.py,
serialization.py, evaluate.py), and the rule that nothing under training/fl imports Django.

Plain pytest, no database.
"""

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import training.fl
from training.fl.evaluate import apply_delta, dice_score, evaluate
from training.fl.models import MLP, LogisticRegression, SmallCNN, SmallUNet, build_model
from training.fl.serialization import (
    MAGIC,
    MalformedTensorFile,
    pack_tensors,
    sha256_hex,
    state_dict_digest,
    state_to_cpu_float,
    unpack_tensors,
)
from training.jobs.registry import builtin_models

ROOT = Path(__file__).resolve().parents[2]
FL_DIR = ROOT / "training" / "fl"


# --- models ----------------------------------------------------------------------------------


class TinyCustomModel(nn.Module):
    """A deployment's own model, built through the same dotted-path contract."""

    def __init__(self, *, input_shape, n_classes, width=3):
        super().__init__()
        self.width = width
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(input_shape[0], width), nn.Linear(width, n_classes)
        )

    def forward(self, x):
        return self.body(x)


NotAModel = object


@pytest.mark.parametrize(
    ("cls", "input_shape", "params", "out_shape"),
    [
        (LogisticRegression, [30], {}, [5, 2]),
        (MLP, [64], {"hidden_sizes": [16, 8, 4], "dropout": 0.2}, [5, 2]),
        (SmallCNN, [1, 8, 8], {"channels": [4, 4, 4, 4]}, [5, 2]),
        (SmallCNN, [3, 28, 20], {"channels": [6, 12]}, [5, 2]),
        (SmallUNet, [1, 32, 32], {"base_channels": 4, "depth": 2}, [5, 2, 32, 32]),
        (SmallUNet, [2, 16, 48], {"base_channels": 4, "depth": 4}, [5, 2, 16, 48]),
    ],
)
def test_model_output_shape_forward_and_backward(cls, input_shape, params, out_shape):
    torch.manual_seed(0)
    model = cls(input_shape=input_shape, n_classes=2, **params)
    x = torch.randn(5, *input_shape)
    out = model(x)
    assert list(out.shape) == out_shape
    target = torch.randint(0, 2, [out_shape[0], *out_shape[2:]])
    nn.functional.cross_entropy(out, target).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_models_reject_shapes_the_registry_refuses():
    with pytest.raises(ValueError, match="at least 8x8"):
        SmallCNN(input_shape=[1, 7, 8], n_classes=2)
    with pytest.raises(ValueError, match="divisible by 4"):
        SmallUNet(input_shape=[1, 30, 32], n_classes=2, depth=2)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        SmallCNN(input_shape=[64], n_classes=2)
    with pytest.raises(ValueError, match="n_classes"):
        LogisticRegression(input_shape=[4], n_classes=1)


def test_every_builtin_registry_model_builds_with_its_defaults():
    shapes = {"tabular": [30], "image": [1, 8, 8], "segmentation": [1, 16, 16]}
    for spec in builtin_models().values():
        model = build_model(
            spec.class_path,
            input_shape=shapes[spec.modality],
            n_classes=3,
            params=spec.default_params(),
        )
        out = model(torch.zeros(2, *shapes[spec.modality]))
        assert out.shape[:2] == (2, 3), spec.name


def test_build_model_by_dotted_path_is_deterministic_given_the_seed():
    def weights():
        torch.manual_seed(7)
        model = build_model(
            "training.fl.models.MLP",
            input_shape=[10],
            n_classes=4,
            params={"hidden_sizes": [8]},
        )
        return model.state_dict()

    first, second = weights(), weights()
    assert isinstance(
        build_model("training.fl.models.SmallCNN", input_shape=[1, 8, 8], n_classes=2, params={}),
        SmallCNN,
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert state_dict_digest(first) == state_dict_digest(second)


def test_build_model_takes_a_custom_class_from_any_module():
    model = build_model(
        f"{__name__}.TinyCustomModel", input_shape=[6], n_classes=3, params={"width": 5}
    )
    assert isinstance(model, TinyCustomModel) and model.width == 5
    assert model(torch.zeros(4, 6)).shape == (4, 3)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz.Model", "cannot import module 'no_such_module_xyz'"),
        ("training.fl.models.NoSuchModel", "has no attribute 'NoSuchModel'"),
        (f"{__name__}.NotAModel", "is not a torch.nn.Module subclass"),
        ("Model", "not like 'package.module.Class'"),
    ],
)
def test_build_model_errors_name_the_problem(path, message):
    with pytest.raises(ValueError, match=message):
        build_model(path, input_shape=[4], n_classes=2, params={})


# --- serialization ---------------------------------------------------------------------------


def _all_dtypes():
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=gen),
        "f64": torch.randn(5, generator=gen, dtype=torch.float64),
        "f16": torch.randn(2, 2, generator=gen).half(),
        "bf16": torch.randn(7, generator=gen).bfloat16(),
        "i64": torch.tensor([-(2**62), 0, 2**62 - 1]),
        "i32": torch.tensor([[-5, 7]], dtype=torch.int32),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "special": torch.tensor([float("nan"), float("inf"), -0.0]),
        "layer.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
    }


def test_round_trip_is_exact_for_every_dtype():
    tensors = _all_dtypes()
    back = unpack_tensors(pack_tensors(tensors))
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype, name
        assert back[name].shape == tensor.shape, name
        assert back[name].device.type == "cpu"
        # Bitwise equality (NaN payloads and -0.0 included).
        a = tensor.contiguous().reshape(-1)
        b = back[name].reshape(-1)
        if a.numel():
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    # The unpacked tensors are writable and independent of the input bytes.
    back["f32"].add_(1)


def test_packing_is_deterministic_and_ignores_key_order():
    tensors = _all_dtypes()
    reordered = dict(reversed(list(tensors.items())))
    data = pack_tensors(tensors)
    assert data == pack_tensors(tensors) == pack_tensors(reordered)
    assert data.startswith(MAGIC)
    head_len = int.from_bytes(data[4:12], "little")
    header = json.loads(data[12 : 12 + head_len])
    assert list(header) == sorted(tensors)
    assert (
        data[12 : 12 + head_len]
        == json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    )
    assert sha256_hex(data) == state_dict_digest(reordered)
    changed = dict(tensors, f32=tensors["f32"] + 1)
    assert pack_tensors(changed) != data


def test_pack_refuses_what_it_cannot_store():
    with pytest.raises(TypeError, match="dtype"):
        pack_tensors({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="not a tensor"):
        pack_tensors({"a": [1, 2]})


def test_state_to_cpu_float():
    state = {"w": torch.ones(2, dtype=torch.float64), "n": torch.tensor(3)}
    out = state_to_cpu_float(state)
    assert out["w"].dtype == torch.float32 and out["n"].dtype == torch.int64
    out["w"].add_(1)
    assert state["w"][0] == 1


def _container(header, payload=b"", raw_header=None):
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    return MAGIC + len(head).to_bytes(8, "little") + head + payload


GOOD = pack_tensors({"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2)})
A = {"dtype": "float32", "shape": [2], "offset": 0, "length": 8}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PK\x03\x04" + GOOD[4:], "wrong magic"),
        (b"FL", "truncated"),
        (GOOD[:10], "truncated"),
        (GOOD[:20], "truncated: the header claims"),
        (GOOD[:-1], "out of range"),
        (_container(None, raw_header=b"{not json"), "header is not JSON"),
        (_container(None, raw_header=b"\xff\xfe"), "header is not JSON"),
        (_container([1, 2]), "header must be a JSON object"),
        (_container({"a": dict(A, dtype="complex64")}, b"\0" * 8), "unknown dtype 'complex64'"),
        (_container({"a": dict(A, dtype="object")}, b"\0" * 8), "unknown dtype"),
        (_container({"a": dict(A, offset=4)}, b"\0" * 8), "out of range"),
        (_container({"a": dict(A, offset=-1)}, b"\0" * 8), "non-negative"),
        (_container({"a": dict(A, length=12)}, b"\0" * 12), "does not match shape"),
        (_container({"a": dict(A, shape=[2, -1])}, b"\0" * 8), "invalid shape"),
        (_container({"a": {"dtype": "float32", "shape": [2]}}, b"\0" * 8), "exactly dtype"),
        (_container({"a": A, "b": dict(A, offset=4)}, b"\0" * 12), "overlaps"),
        (_container({"a": A, "b": dict(A, offset=12)}, b"\0" * 20), "belong to no tensor"),
        (_container({"a": A}, b"\0" * 9), "trailing garbage"),
        (GOOD + b"extra", "trailing garbage"),
        (_container({"a": dict(A, dtype="bool", length=2)}, b"\x00\x07"), "other than 0 and 1"),
    ],
)
def test_malformed_containers_raise_with_a_clear_message(data, message):
    with pytest.raises(MalformedTensorFile, match=message) as info:
        unpack_tensors(data)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("malformed tensor file: ")


def test_max_bytes_is_enforced():
    assert set(unpack_tensors(GOOD, max_bytes=len(GOOD))) == {"a", "b"}
    with pytest.raises(MalformedTensorFile, match="over the limit of max_bytes"):
        unpack_tensors(GOOD, max_bytes=len(GOOD) - 1)


def test_unpack_never_unpickles():
    import pickle

    payload = pickle.dumps({"a": 1})
    with pytest.raises(MalformedTensorFile, match="wrong magic"):
        unpack_tensors(payload)


# --- evaluation ------------------------------------------------------------------------------


class MaskOracle(nn.Module):
    """Returns logits that predict channel 0 of the input as the lesion mask (or nothing)."""

    def __init__(self, empty=False):
        super().__init__()
        self.empty = empty
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        lesion = torch.zeros_like(x[:, 0]) if self.empty else x[:, 0]
        return torch.stack([1 - lesion, lesion], dim=1) * 10


def test_dice_of_a_perfect_mask_is_one_and_of_an_empty_prediction_about_zero():
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(6, 16, 16, generator=gen) > 0.8).long()
    assert dice_score(masks, masks) == pytest.approx(1.0)
    assert dice_score(torch.zeros_like(masks), masks) < 1e-6
    x = masks[:, None].float()
    perfect = evaluate(MaskOracle(), x, masks, modality="segmentation", batch_size=4)
    empty = evaluate(MaskOracle(empty=True), x, masks, modality="segmentation", batch_size=4)
    assert perfect["dice"] == pytest.approx(1.0)
    assert empty["dice"] < 1e-6
    assert perfect["loss"] < empty["loss"]
    half = masks.clone()
    half[:3] = 0
    assert 0.1 < dice_score(half, masks) < 0.9


def test_evaluate_classification_accuracy_and_loss():
    model = LogisticRegression(input_shape=[2], n_classes=2)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.linear.bias.zero_()
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1, 1, 1])
    model.train()
    metrics = evaluate(model, x, y, modality="tabular", batch_size=3)
    assert metrics["accuracy"] == 0.75
    expected = nn.functional.cross_entropy(model(x), y).item()
    assert metrics["loss"] == pytest.approx(expected)
    assert model.training  # mode restored


def test_apply_delta_returns_a_new_state():
    state = {"w": torch.ones(2), "b": torch.zeros(1), "n": torch.tensor(4)}
    delta = {"w": torch.tensor([1.0, -2.0])}
    out = apply_delta(state, delta, scale=0.5)
    assert torch.equal(out["w"], torch.tensor([1.5, 0.0]))
    assert torch.equal(out["b"], state["b"]) and out["b"] is not state["b"]
    assert torch.equal(state["w"], torch.ones(2))
    with pytest.raises(ValueError, match="the state lacks"):
        apply_delta(state, {"x": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        apply_delta(state, {"w": torch.ones(3)})


# --- no Django under training/fl ---------------------------------------------------------------


def test_nothing_under_training_fl_imports_django():
    modules = sorted(
        f"training.fl.{info.name}" for info in pkgutil.iter_modules(training.fl.__path__)
    )
    assert {"training.fl.models", "training.fl.local", "training.fl.data"} <= set(modules)
    # Static: no import statement names django.
    for path in FL_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "django" for n in names), path
    # Dynamic: importing every module in a fresh interpreter without settings loads no django.
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))\n"
        "assert not bad, bad\n"
        "print('ok', len(sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
