"""Local training on a site (training/fl/local.py): loss goes down, the update is the trained
minus the initial state, momentum restart really clears optimizer state, and DP-SGD clips per
sample, adds noise of the right scale and reports the event the accountant projects.

Plain pytest, no database.
"""

import copy
import math

import pytest
import torch
from torch import nn

from training.fl import local
from training.fl.data import SiteData, demo_split, load_validation_set
from training.fl.evaluate import apply_delta, evaluate
from training.fl.local import (
    add_gaussian_noise,
    clip_per_sample,
    per_sample_gradients,
    pick_device,
    private_gradient,
    train_local,
)
from training.fl.models import MLP, LogisticRegression, SmallUNet, build_model
from training.jobs.accounting import PrivacyEvent, epsilon_spent, events_for_pipeline

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9}


@pytest.fixture(scope="module")
def site():
    return demo_split("breast-cancer", ["st-thomas", "kings-regional", "maudsley", "barts"])[
        "st-thomas"
    ]


def _model(class_path="training.fl.models.LogisticRegression", params=None, seed=0):
    torch.manual_seed(seed)
    return build_model(class_path, input_shape=[30], n_classes=2, params=params or {})


@pytest.mark.parametrize(
    ("class_path", "params", "optimizer"),
    [
        ("training.fl.models.LogisticRegression", {}, SGD),
        ("training.fl.models.MLP", {"hidden_sizes": [32, 16], "dropout": 0.1}, SGD),
        ("training.fl.models.MLP", {"hidden_sizes": [16]}, {"name": "adam", "lr": 0.01}),
    ],
)
def test_training_reduces_the_loss_on_breast_cancer(site, class_path, params, optimizer):
    model = _model(class_path, params)
    x_val, y_val = load_validation_set("breast-cancer")
    before = evaluate(model, x_val, y_val, modality="tabular")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(
        model, site, epochs=3, batch_size=32, optimizer=optimizer, momentum_restart=True
    )
    after = evaluate(model, x_val, y_val, modality="tabular")
    print(class_path, before, after, result.metrics)
    assert after["loss"] < 0.6 * before["loss"]
    assert after["accuracy"] > 0.85
    m = result.metrics
    assert m["train_loss_last_epoch"] < m["train_loss_first_epoch"]
    assert m["steps"] == 3 * math.ceil(site.num_records / 32) and m["epochs"] == 3
    assert 0.85 < m["train_accuracy"] <= 1.0
    assert result.samples == site.num_records
    assert result.privacy_events == []
    # The delta is exactly trained minus initial, float32 on the CPU.
    rebuilt = apply_delta(initial, result.delta)
    for name, value in model.state_dict().items():
        assert result.delta[name].dtype == torch.float32
        assert result.delta[name].device.type == "cpu"
        assert torch.allclose(rebuilt[name], value, atol=1e-6)


class WithBatchNorm(nn.Module):
    def __init__(self, *, input_shape, n_classes):
        super().__init__()
        self.norm = nn.BatchNorm1d(input_shape[0])
        self.linear = nn.Linear(input_shape[0], n_classes)

    def forward(self, x):
        return self.linear(self.norm(x))


def test_delta_holds_only_floating_entries_and_training_is_seeded(site):
    def run(seed):
        torch.manual_seed(0)
        model = WithBatchNorm(input_shape=[30], n_classes=2)
        return train_local(
            model, site, epochs=1, batch_size=16, optimizer=SGD, momentum_restart=True, seed=seed
        )

    result = run(0)
    assert set(result.delta) == {
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "linear.weight",
        "linear.bias",
    }  # num_batches_tracked (int64) is not part of the update
    assert result.delta["norm.running_mean"].abs().sum() > 0
    again, other = run(0), run(1)
    assert all(torch.equal(result.delta[k], again.delta[k]) for k in result.delta)
    assert not torch.equal(result.delta["linear.weight"], other.delta["linear.weight"])


# --- momentum restart --------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch):
    """The optimizer state right after train_local built its optimizer, per call."""
    states = []
    real = local.build_optimizer

    def spy(model, spec, *, state=None):
        optimizer = real(model, spec, state=state)
        states.append(copy.deepcopy(optimizer.state_dict()))
        return optimizer

    monkeypatch.setattr(local, "build_optimizer", spy)
    return states


def _buffers(state):
    """{(param index, key): tensor} of an optimizer state_dict's per-parameter tensors."""
    return {
        (index, key): value
        for index, entry in state["state"].items()
        for key, value in entry.items()
        if isinstance(value, torch.Tensor) and value.numel() > 1
    }


@pytest.mark.parametrize(
    ("optimizer", "keys"),
    [(SGD, {"momentum_buffer"}), ({"name": "adam", "lr": 0.01}, {"exp_avg", "exp_avg_sq"})],
)
def test_momentum_restart_clears_the_optimizer_state(site, captured, optimizer, keys):
    model = _model()
    kept = train_local(
        model, site, epochs=1, batch_size=32, optimizer=optimizer, momentum_restart=False
    ).optimizer_state
    assert {key for _, key in _buffers(kept)} == keys
    assert all(v.abs().sum() > 0 for v in _buffers(kept).values())

    # With restart, a state handed in anyway is ignored: round 2 starts from nothing.
    captured.clear()
    first = train_local(
        model, site, epochs=1, batch_size=32, optimizer=optimizer, momentum_restart=True
    )
    second = train_local(
        model,
        site,
        epochs=1,
        batch_size=32,
        optimizer=optimizer,
        momentum_restart=True,
        optimizer_state=kept,
    )
    assert first.optimizer_state is None and second.optimizer_state is None
    assert len(captured) == 2
    assert all(state["state"] == {} for state in captured)


@pytest.mark.parametrize("optimizer", [SGD, {"name": "adam", "lr": 0.01}])
def test_without_restart_round_two_starts_from_round_ones_state(site, captured, optimizer):
    model = _model()
    round1 = train_local(
        model, site, epochs=1, batch_size=32, optimizer=optimizer, momentum_restart=False
    )
    assert captured[0]["state"] == {}  # the very first round starts fresh
    saved = copy.deepcopy(round1.optimizer_state)
    round2 = train_local(
        model,
        site,
        epochs=1,
        batch_size=32,
        optimizer=optimizer,
        momentum_restart=False,
        optimizer_state=round1.optimizer_state,
    )
    start = _buffers(captured[1])
    returned = _buffers(round1.optimizer_state)
    assert start.keys() == returned.keys() and start
    assert all(torch.equal(start[k], returned[k]) for k in start)
    # Round 2 worked on a copy: round 1's returned state is unchanged, round 2's moved on.
    assert all(torch.equal(returned[k], _buffers(saved)[k]) for k in returned)
    after = _buffers(round2.optimizer_state)
    assert any(not torch.equal(after[k], returned[k]) for k in after)
    assert all(v.device.type == "cpu" for v in after.values())


def test_carried_momentum_changes_the_update(site):
    kept = train_local(
        _model(), site, epochs=1, batch_size=32, optimizer=SGD, momentum_restart=False
    ).optimizer_state
    fresh = train_local(
        _model(), site, epochs=1, batch_size=32, optimizer=SGD, momentum_restart=True
    )
    carried = train_local(
        _model(),
        site,
        epochs=1,
        batch_size=32,
        optimizer=SGD,
        momentum_restart=False,
        optimizer_state=kept,
    )
    assert not torch.allclose(fresh.delta["linear.weight"], carried.delta["linear.weight"])


# --- DP-SGD ----------------------------------------------------------------------------------


def test_clipping_bounds_each_samples_gradient_norm():
    gen = torch.Generator().manual_seed(0)
    grads = {
        "w": torch.randn(64, 5, 3, generator=gen) * torch.logspace(-3, 2, 64).view(-1, 1, 1),
        "b": torch.randn(64, 3, generator=gen),
    }
    clipped, norms = clip_per_sample(grads, 1.5)
    before = torch.sqrt(grads["w"].flatten(1).pow(2).sum(1) + grads["b"].pow(2).sum(1))
    after = torch.sqrt(clipped["w"].flatten(1).pow(2).sum(1) + clipped["b"].pow(2).sum(1))
    assert torch.allclose(norms, before)
    assert (after <= 1.5 + 1e-5).all()
    big = before > 1.5
    assert big.any() and (~big).any()
    assert torch.allclose(after[big], torch.full_like(after[big], 1.5), atol=1e-4)
    # Small gradients pass unchanged (up to the 1e-6 guard) and directions are kept.
    assert torch.allclose(clipped["w"][~big], grads["w"][~big], rtol=1e-5)
    cosine = nn.functional.cosine_similarity(clipped["w"].flatten(1), grads["w"].flatten(1))
    assert torch.allclose(cosine, torch.ones(64), atol=1e-5)


def test_per_sample_gradients_match_one_backward_per_example():
    torch.manual_seed(0)
    model = MLP(input_shape=[6], n_classes=3, hidden_sizes=[5])
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    grads, losses = per_sample_gradients(model, x, y)
    for i in range(7):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name][i], p.grad, atol=1e-6), name


def test_noise_scale_matches_noise_multiplier_times_max_grad_norm():
    gen = torch.Generator().manual_seed(1)
    zero = {"w": torch.zeros(300, 200), "b": torch.zeros(1000)}
    noisy = add_gaussian_noise(zero, noise_multiplier=1.3, max_grad_norm=0.7, generator=gen)
    for tensor in noisy.values():
        assert tensor.std().item() == pytest.approx(1.3 * 0.7, rel=0.1)
        assert abs(tensor.mean().item()) < 0.1 * 1.3 * 0.7
    # Through the whole DP gradient: zero per-sample gradients give noise / expected batch size.
    per_sample = {"w": torch.zeros(8, 400, 100)}
    grad = private_gradient(
        per_sample, noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=8, generator=gen
    )
    assert grad["w"].std().item() == pytest.approx(2.0 * 0.5 / 8, rel=0.1)


def test_dp_sgd_uses_poisson_sampled_batches(site, monkeypatch):
    sizes = []
    real = local.per_sample_gradients

    def spy(model, x, y, **kwargs):
        sizes.append(len(x))
        return real(model, x, y, **kwargs)

    monkeypatch.setattr(local, "per_sample_gradients", spy)
    train_local(
        _model(),
        site,
        epochs=4,
        batch_size=20,
        optimizer=SGD,
        momentum_restart=True,
        dp_sgd={"noise_multiplier": 1.0, "max_grad_norm": 1.0},
        dp_seed=3,
    )
    steps = 4 * math.ceil(site.num_records / 20)
    assert len(sizes) <= steps  # an empty draw computes no gradient but still steps
    assert len(set(sizes)) > 3  # batch sizes vary
    assert sum(sizes) / steps == pytest.approx(20, rel=0.15)


def test_dp_sgd_event_matches_the_accountants_projection(site):
    rounds, epochs, batch = 3, 2, 25
    dp = {"noise_multiplier": 1.1, "max_grad_norm": 1.0}
    model = _model()
    events = []
    for r in range(rounds):
        result = train_local(
            model,
            site,
            epochs=epochs,
            batch_size=batch,
            optimizer=SGD,
            momentum_restart=True,
            dp_sgd=dp,
            dp_seed=r,
        )
        assert len(result.privacy_events) == 1
        events.append(result.privacy_events[0])
        assert result.metrics["steps"] == epochs * math.ceil(site.num_records / batch)
    event = events[0]
    assert event == {
        "mechanism": "sampled_gaussian",
        "params": {
            "noise_multiplier": 1.1,
            "sample_rate": batch / site.num_records,
            "steps": epochs * math.ceil(site.num_records / batch),
        },
        "count": 1,
        "source": "dp_sgd",
    }
    (projected,) = events_for_pipeline(
        [{"filter": "dp_sgd", **dp}],
        rounds=rounds,
        local_epochs=epochs,
        batch_size=batch,
        num_records=site.num_records,
    )
    recorded = [PrivacyEvent.from_json(e) for e in events]
    assert sum(e.params["steps"] for e in recorded) == projected.params["steps"]
    assert {e.params["sample_rate"] for e in recorded} == {projected.params["sample_rate"]}
    assert {e.params["noise_multiplier"] for e in recorded} == {
        projected.params["noise_multiplier"]
    }
    assert epsilon_spent(recorded, delta=1e-5) == pytest.approx(
        epsilon_spent([projected], delta=1e-5), rel=1e-9
    )


def test_dp_sgd_batch_larger_than_the_site_samples_everyone(site):
    result = train_local(
        _model(),
        site,
        epochs=2,
        batch_size=4096,
        optimizer=SGD,
        momentum_restart=True,
        dp_sgd={"noise_multiplier": 0.8, "max_grad_norm": 2.0},
        dp_seed=0,
    )
    assert result.privacy_events[0]["params"] == {
        "noise_multiplier": 0.8,
        "sample_rate": 1.0,
        "steps": 2,
    }


def test_dp_sgd_noise_is_secret_unless_seeded(site):
    def run(dp_seed):
        return train_local(
            _model(),
            site,
            epochs=1,
            batch_size=32,
            optimizer=SGD,
            momentum_restart=True,
            dp_sgd={"noise_multiplier": 1.0, "max_grad_norm": 1.0},
            seed=0,
            dp_seed=dp_seed,
        ).delta["linear.weight"]

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(None), run(None))


def test_dp_sgd_still_learns_with_moderate_noise(site):
    model = _model()
    x_val, y_val = load_validation_set("breast-cancer")
    before = evaluate(model, x_val, y_val, modality="tabular")["loss"]
    train_local(
        model,
        site,
        epochs=5,
        batch_size=32,
        optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0},
        momentum_restart=True,
        dp_sgd={"noise_multiplier": 0.5, "max_grad_norm": 1.0},
        dp_seed=0,
    )
    assert evaluate(model, x_val, y_val, modality="tabular")["loss"] < 0.7 * before


def test_dp_sgd_refuses_batch_norm(site):
    model = WithBatchNorm(input_shape=[30], n_classes=2)
    with pytest.raises(ValueError, match="batch normalisation"):
        train_local(
            model,
            site,
            epochs=1,
            batch_size=32,
            optimizer=SGD,
            momentum_restart=True,
            dp_sgd={"noise_multiplier": 1.0, "max_grad_norm": 1.0},
        )


# --- segmentation, errors, device ------------------------------------------------------------


def test_segmentation_training_runs_with_and_without_dp():
    full = demo_split("lesions", ["a", "b", "c", "d"])["d"]
    small = SiteData(
        x_train=full.x_train[:24],
        y_train=full.y_train[:24],
        num_records=24,
        modality="segmentation",
        input_shape=[1, 32, 32],
        n_classes=2,
    )
    for dp in (None, {"noise_multiplier": 1.0, "max_grad_norm": 1.0}):
        torch.manual_seed(0)
        model = SmallUNet(input_shape=[1, 32, 32], n_classes=2, base_channels=4, depth=2)
        result = train_local(
            model,
            small,
            epochs=1,
            batch_size=8,
            optimizer={"name": "adam", "lr": 0.01},
            momentum_restart=True,
            dp_sgd=dp,
            dp_seed=0,
        )
        assert 0.0 <= result.metrics["train_dice"] <= 1.0
        assert set(result.delta) == set(model.state_dict())
        assert all(torch.isfinite(d).all() for d in result.delta.values())


def test_train_local_errors_name_the_problem(site):
    with pytest.raises(ValueError, match="predicts 2 classes"):
        bad = SiteData(site.x_train, site.y_train + 1, site.num_records, "tabular", [30], 3)
        train_local(_model(), bad, epochs=1, batch_size=8, optimizer=SGD, momentum_restart=True)
    with pytest.raises(ValueError, match="does not accept"):
        model = LogisticRegression(input_shape=[12], n_classes=2)
        train_local(model, site, epochs=1, batch_size=8, optimizer=SGD, momentum_restart=True)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train_local(
            _model(),
            site,
            epochs=1,
            batch_size=8,
            optimizer={"name": "rmsprop", "lr": 0.1},
            momentum_restart=True,
        )
    with pytest.raises(ValueError, match="max_grad_norm"):
        train_local(
            _model(),
            site,
            epochs=1,
            batch_size=8,
            optimizer=SGD,
            momentum_restart=True,
            dp_sgd={"noise_multiplier": 1.0},
        )
    with pytest.raises(ValueError, match="epochs"):
        train_local(_model(), site, epochs=0, batch_size=8, optimizer=SGD, momentum_restart=True)


def test_pick_device():
    assert pick_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_training_seeds_only_the_generators_it_forked(site, monkeypatch):
    """On the CPU it seeds the CPU's generator alone: not the GPUs (torch.manual_seed would,
    queueing a formatted stack trace per call while CUDA sleeps), and the caller's CPU stream
    is as it was before the call."""

    def refused(*args, **kwargs):
        raise AssertionError("training on the CPU seeded the GPUs")

    models = [_model(), _model()]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    monkeypatch.setattr(torch.cuda, "manual_seed_all", refused)
    monkeypatch.setattr(torch.cuda, "manual_seed", refused)
    runs = [
        train_local(
            model, site, epochs=1, batch_size=16, optimizer=SGD, momentum_restart=True, seed=7
        )
        for model in models
    ]
    assert all(torch.equal(runs[0].delta[k], runs[1].delta[k]) for k in runs[0].delta)
    assert torch.equal(torch.get_rng_state(), before)


def test_training_on_a_gpu_seeds_that_gpu_alone(monkeypatch):
    """No GPU here: the calls are recorded. The device fork_rng forked (its index, 0 for a bare
    "cuda") is seeded, inside that device's context; no other GPU is."""
    import contextlib

    calls = []

    @contextlib.contextmanager
    def device(index):
        calls.append(("device", index))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("seed", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("all", seed)))
    monkeypatch.setattr(torch, "manual_seed", lambda seed: calls.append(("every device", seed)))
    local._seed_forked(5, torch.device("cuda", 1))
    local._seed_forked(6, torch.device("cuda"))
    assert calls == [("device", 1), ("seed", 5), ("device", 0), ("seed", 6)]
    # A device fork_rng does not fork (Apple's MPS): torch.manual_seed, as before.
    calls.clear()
    local._seed_forked(7, torch.device("mps"))
    assert calls == [("every device", 7)]
