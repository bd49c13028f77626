"""The federated engine's models and evaluation (training/fl/models.py, evaluate.py), and the
rule that nothing under training/fl imports Django. The tensor container (serialization.py) is
tested in test_fl_serialization.py.

Plain pytest, no database.
"""

import ast
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
from training.fl.serialization import state_dict_digest
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
