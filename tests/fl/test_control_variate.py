"""Contribution estimator 3 (training/fl/contribution.py) and the surrogate it is given
(training/fl/coalition_surrogate.py): estimator 2 on the residual of a surrogate whose Shapley
value is exact (issue 15)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from training.fl import contribution as C
from training.fl.coalition import CoalitionUtility
from training.fl.coalition_surrogate import surrogate_out_of_reach
from training.fl.models import MLP, LogisticRegression, SmallCNN, SmallUNet


def interacting(n, seed=0):
    """A game with interactions of every order (so estimator 2 alone is not exact)."""
    rng = random.Random(seed)
    w = {f"s{i}": rng.uniform(0.1, 1) for i in range(n)}
    return sorted(w), lambda s: math.sin(sum(w[p] for p in sorted(s))) + 0.1 * len(s) ** 1.5


def table_of(players, game):
    return [
        game(frozenset(p for j, p in enumerate(players) if k >> j & 1))
        for k in range(2 ** len(players))
    ]


def normalised_error(got, exact, total):
    return sum(abs(got[p] - exact[p]) for p in exact) / abs(total)


def test_a_perfect_surrogate_gives_exact_shapley_from_estimator_twos_plan():
    players, v = interacting(9, 1)
    exact = C.shapley_exact(players, v, max_players=9).scores
    got = C.compute("shapley_sampled", players, v, estimator=3, surrogate=table_of(players, v))
    assert all(got.scores[p] == pytest.approx(exact[p], abs=1e-12) for p in players)
    plain = C.compute("shapley_sampled", players, v, estimator=2)
    # The same coalitions evaluated as estimator 2 (a third of 2^9), which alone errs here.
    assert set(got.values) == set(plain.values) and got.evaluations <= 2**9 // 3
    total = v(frozenset(players)) - v(frozenset())
    assert normalised_error(plain.scores, exact, total) > 1e-3


def test_a_rough_surrogate_still_helps_and_any_surrogate_is_efficient():
    players, v = interacting(8, 2)
    exact = C.shapley_exact(players, v).scores
    total = v(frozenset(players)) - v(frozenset())
    rng = random.Random(5)
    rough = [x + rng.gauss(0, 0.02) for x in table_of(players, v)]
    with_cv = C.compute("shapley_sampled", players, v, estimator=3, surrogate=rough, seed=3)
    plain = C.compute("shapley_sampled", players, v, estimator=2, seed=3)
    assert normalised_error(with_cv.scores, exact, total) < normalised_error(
        plain.scores, exact, total
    )
    # Whatever the surrogate, the scores add up to the round's change.
    nonsense = [rng.uniform(-5, 5) for _ in rough]
    wild = C.compute("shapley_sampled", players, v, estimator=3, surrogate=nonsense, seed=3)
    assert sum(wild.scores.values()) == pytest.approx(total, abs=1e-9)


def test_with_every_coalition_drawn_any_surrogate_gives_exact_values():
    players, v = interacting(6, 3)
    nonsense = [random.Random(k).uniform(-1, 1) for k in range(64)]
    got = C.shapley_sampled(players, v, budget=64, estimator=3, surrogate=nonsense, truncation=0)
    exact = C.shapley_exact(players, v).scores
    assert all(got.scores[p] == pytest.approx(exact[p], abs=1e-12) for p in players)


def test_the_record_recomputes_bit_for_bit_and_a_changed_surrogate_does_not():
    players, v = interacting(10, 4)
    surrogate = [x + 0.01 * math.cos(k) for k, x in enumerate(table_of(players, v))]
    result = C.compute("auto", players, v, estimator=3, surrogate=surrogate, seed=8)
    assert result.method == "shapley_sampled"
    assert result.params["estimator"] == 3 and result.params["surrogate"] == surrogate
    # Through the ledger's JSON and back, as verify_report reads it.
    params = json.loads(json.dumps(result.params))
    rows = json.loads(json.dumps(result.coalitions()))
    assert C.scores_from_coalitions(result.method, params, rows) == result.scores
    assert C.sampled_kwargs(params)["surrogate"] == surrogate
    params["surrogate"][3] += 0.5
    assert C.scores_from_coalitions(result.method, params, rows) != result.scores


@pytest.mark.parametrize(
    ("surrogate", "fragment"),
    [
        (None, "needs its surrogate"),
        ([0.0] * 7, "holds 7 values; 3 sites have 8 coalitions"),
        ([0.0] * 7 + [float("nan")], "surrogate value 7 is not finite"),
        ([0.0] * 7 + ["1"], "surrogate value 7 is not a number"),
    ],
)
def test_a_missing_or_malformed_surrogate_is_refused_in_words(surrogate, fragment):
    with pytest.raises(ValueError, match=fragment):
        C.shapley_sampled("abc", lambda s: float(len(s)), estimator=3, surrogate=surrogate)


def test_estimator_three_has_its_limits():
    with pytest.raises(ValueError, match="takes no surrogate"):
        C.shapley_sampled("abc", lambda s: float(len(s)), estimator=2, surrogate=[0.0] * 8)
    many = [f"s{i:02d}" for i in range(C.SURROGATE_MAX_PLAYERS + 1)]
    with pytest.raises(ValueError, match="at most 12 sites"):
        C.shapley_sampled(many, lambda s: float(len(s)), estimator=3, surrogate=[0.0] * 2**13)
    with pytest.raises(ValueError, match="cannot be planned for evaluation at the sites"):
        C.plan_coalitions("shapley_sampled", "abcdef", max_models=30, estimator=3)


def test_a_round_nobody_moved_is_zeroed_by_the_real_values_not_the_surrogate():
    players = list("abcdef")
    flat = C.compute(
        "shapley_sampled",
        players,
        lambda s: 0.9,
        estimator=3,
        surrogate=[0.1 * k for k in range(64)],
        resolution=0.01,
    )
    assert set(flat.scores.values()) == {0.0} and flat.evaluations == 2 * 6 + 2


def test_the_surrogate_index_is_a_bit_per_sorted_player():
    assert C.surrogate_index("cab", "") == 0
    assert C.surrogate_index("cab", "a") == 1 and C.surrogate_index("cab", "c") == 4
    assert C.surrogate_index(["b", "a", "c"], {"a", "b", "c"}) == 7


# --- the surrogate (torch) ---------------------------------------------------------------------


def round_of(model_cls, n=5, seed=0, masks=False, **model_kwargs):
    torch.manual_seed(seed)
    model = model_cls(input_shape=[12], n_classes=3, **model_kwargs)
    base = {k: t.detach().clone() for k, t in model.state_dict().items()}
    updates = {}
    for i in range(n):
        delta = {k: 0.3 * torch.randn_like(t) for k, t in base.items()}
        mask = {k: torch.rand_like(t) < 0.5 for k, t in base.items()} if masks else None
        updates[f"site-{i}"] = (delta, mask, float(40 + 15 * i))
    x, y = torch.randn(200, 12), torch.randint(0, 3, (200,))
    return base, updates, model, x, y


def utility_of(base, updates, model, x, y, **kw):
    return CoalitionUtility(
        base_state=base, updates=updates, model=model, x=x, y=y, modality="tabular", **kw
    )


@pytest.mark.parametrize("zero_filled", [False, True])
def test_for_a_linear_model_the_surrogate_is_every_coalitions_true_value(zero_filled):
    """Logits are linear in the weights and every coalition lies in the updates' span, so the
    surrogate's logits are the coalitions' own: its values are the real ones."""
    base, updates, model, x, y = round_of(LogisticRegression, masks=zero_filled)
    for value, tol in (("loss", 1e-5), ("metric", 1.01 / len(y))):
        utility = utility_of(base, updates, model, x, y, value=value, zero_filled=zero_filled)
        surrogate = utility.surrogate()
        players = sorted(updates)
        real = table_of(players, utility)
        assert len(surrogate) == 2 ** len(players)
        assert max(abs(a - b) for a, b in zip(surrogate, real, strict=True)) <= tol


def test_for_an_mlp_the_surrogate_is_close_and_exact_at_the_round_model():
    base, updates, model, x, y = round_of(MLP, seed=2, hidden_sizes=(16,))
    utility = utility_of(base, updates, model, x, y, value="loss")
    surrogate = utility.surrogate()
    players = sorted(updates)
    real = table_of(players, utility)
    assert surrogate[-1] == pytest.approx(real[-1], abs=1e-5)  # the round's model itself
    spread = max(real) - min(real)
    gaps = [abs(a - b) for a, b in zip(surrogate, real, strict=True)]
    assert 0 < max(gaps) < spread  # an approximation, not a copy, and a useful one
    # And on this real (non-linear) game, it makes the sampled estimate better.
    exact = C.shapley_exact(players, utility).scores
    total = real[-1] - real[0]
    plain = C.compute("shapley_sampled", players, utility, estimator=2, seed=1, budget=14)
    with_cv = C.compute(
        "shapley_sampled", players, utility, estimator=3, seed=1, budget=14, surrogate=surrogate
    )
    assert normalised_error(with_cv.scores, exact, total) < normalised_error(
        plain.scores, exact, total
    )


def test_what_the_surrogate_cannot_serve_is_said_and_left_to_estimator_two():
    base, updates, model, x, y = round_of(LogisticRegression, masks=True)
    masked = utility_of(base, updates, model, x, y)
    assert "shared part of its update (mask-aware mean)" in surrogate_out_of_reach(masked)
    assert masked.surrogate() is None
    base, updates, model, x, y = round_of(LogisticRegression)
    cyclic = utility_of(base, updates, model, x, y, combine="sum")
    assert "cyclic" in surrogate_out_of_reach(cyclic) and cyclic.surrogate() is None
    torch.manual_seed(0)
    unet = SmallUNet(input_shape=[1, 16, 16], n_classes=2, base_channels=4)
    state = {k: t.detach().clone() for k, t in unet.state_dict().items()}
    seg = CoalitionUtility(
        base_state=state,
        updates={"a": ({k: torch.zeros_like(t) for k, t in state.items()}, None, 1.0)},
        model=unet,
        x=torch.randn(2, 1, 16, 16),
        y=torch.randint(0, 2, (2, 16, 16)),
        modality="segmentation",
    )
    assert "segmentation" in surrogate_out_of_reach(seg) and seg.surrogate() is None


def test_the_surrogate_goes_through_the_registrys_cnn():
    torch.manual_seed(3)
    cnn = SmallCNN(input_shape=[1, 8, 8], n_classes=4)
    base = {k: t.detach().clone() for k, t in cnn.state_dict().items()}
    updates = {
        f"site-{i}": ({k: 0.05 * torch.randn_like(t) for k, t in base.items()}, None, 30.0 + i)
        for i in range(4)
    }
    utility = CoalitionUtility(
        base_state=base,
        updates=updates,
        model=cnn,
        x=torch.randn(40, 1, 8, 8),
        y=torch.randint(0, 4, (40,)),
        modality="image",
        value="loss",
    )
    surrogate = utility.surrogate()
    real = table_of(sorted(updates), utility)
    assert surrogate[-1] == pytest.approx(real[-1], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(surrogate, real, strict=True)) < max(real) - min(real)


# --- the surrogate at a site, rebuilt from the models it evaluates ------------------------------


def test_a_site_rebuilds_the_centres_surrogate_from_the_models_it_is_sent():
    """The centre sends the empty coalition's model and each site's own; a site that takes
    the updates as their differences makes the surrogate the centre would on the same
    records (zero-filled masks included)."""
    from training.site.evaluation import _surrogate_models, surrogate_on_share

    base, updates, model, x, y = round_of(MLP, seed=4, masks=True, hidden_sizes=(8,))
    centre = utility_of(base, updates, model, x, y, value="loss", zero_filled=True)
    players = sorted(updates)
    states = {"d-base": {k: t.clone() for k, t in centre.state_of(frozenset()).items()}}
    for p in players:
        states[f"d-{p}"] = {k: t.clone() for k, t in centre.state_of({p}).items()}
    ask = {
        "players": players,
        "weights": [updates[p][2] for p in players],
        "base": "d-base",
        "singletons": {p: f"d-{p}" for p in players},
    }
    assert _surrogate_models(ask, list(states)) == set(states)
    torch.manual_seed(9)
    fresh = MLP(input_shape=[12], n_classes=3, hidden_sizes=(8,))
    got = surrogate_on_share(
        ask, states, fresh, x, y, modality="tabular", value="loss", loss="cross_entropy"
    )
    assert got == pytest.approx(centre.surrogate(), abs=1e-5)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda a: a.update(players=["b", "a"]), "names its sites inconsistently"),
        (lambda a: a["singletons"].pop("b"), "names its sites inconsistently"),
        (lambda a: a.update(base="elsewhere"), "rests on models not sent to evaluate"),
    ],
)
def test_a_site_refuses_a_surrogate_ask_that_does_not_add_up(change, fragment):
    from training.site.evaluation import _surrogate_models
    from training.site.worker import IntegrityFailure

    ask = {
        "players": ["a", "b"],
        "weights": [1, 1],
        "base": "m0",
        "singletons": {"a": "m1", "b": "m2"},
    }
    change(ask)
    with pytest.raises(IntegrityFailure, match=fragment):
        _surrogate_models(ask, ["m0", "m1", "m2"])


def test_the_cost_benchmark_measures_both_sides_in_one_run():
    """benchmarks/contribution_surrogate.py, in-process on a tiny case (no timing asserted)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "contribution_surrogate.py"
    spec = importlib.util.spec_from_file_location("contribution_surrogate", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.measure("mlp", 3, 16, 1)
    assert figures["surrogate_s"] > 0 and figures["exact_s"] > 0
    assert figures["ratio"] == figures["surrogate_s"] / figures["exact_s"]
