"""Contribution scores on planted consortia, where the right answer is known in advance
(training/fl/coalition.py with training/fl/contribution.py; no database).

Sites train one real local round (``training.fl.local.train_local``) on the bundled ``digits``
set from the same random initial model, each with its own shuffling seed, as site workers do;
coalitions are valued by accuracy on the consortium's validation set (360 records), so one
record is about 0.0028.

Stated tolerances (a round's scores sum to v(N) - v(∅), about 0.6 here):

* two sites with identical data: scores within ``TWIN_TOLERANCE`` = 0.02 of each other (their
  updates differ only by the order their minibatches came in);
* a site that sends a zero update: ``|score| <= ZERO_TOLERANCE`` = 0.01 (under FedAvg its
  update still dilutes the others' by its sample weight, which costs little accuracy);
* a site with heavily noisy labels (every label replaced by a random class): the lowest score.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from training.fl import contribution as C
from training.fl.aggregate import apply_update, fedavg
from training.fl.coalition import CoalitionUtility, metric_for
from training.fl.data import SiteData, demo_split, load_validation_set
from training.fl.evaluate import evaluate
from training.fl.local import train_local
from training.fl.models import LogisticRegression, SmallUNet

TWIN_TOLERANCE = 0.02
ZERO_TOLERANCE = 0.01
KEY = "digits"
FEATURES, CLASSES = 64, 10


def _model():
    return LogisticRegression(input_shape=[FEATURES], n_classes=CLASSES)


def _noisy(data: SiteData, fraction: float, seed: int) -> SiteData:
    """``data`` with ``fraction`` of its labels replaced by uniformly random classes."""
    rng = np.random.default_rng(seed)
    labels = data.y_train.clone()
    hit = rng.random(len(labels)) < fraction
    labels[torch.from_numpy(hit)] = torch.from_numpy(rng.integers(0, CLASSES, int(hit.sum())))
    return SiteData(
        x_train=data.x_train,
        y_train=labels,
        num_records=len(labels),
        modality="tabular",
        input_shape=[FEATURES],
        n_classes=CLASSES,
    )


def _round(sites: dict[str, SiteData], *, epochs: int, seed: int = 0, zero=()):
    """One round from a seeded initial model: ``(input state, {site: (delta, None, samples)})``."""
    torch.manual_seed(seed)
    base = {k: v.detach().clone() for k, v in _model().state_dict().items()}
    updates = {}
    for index, (slug, data) in enumerate(sites.items()):
        model = _model()
        model.load_state_dict(base)
        result = train_local(
            model,
            data,
            epochs=epochs,
            batch_size=32,
            optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0},
            momentum_restart=True,
            seed=1000 * seed + index,  # each site shuffles its own way
        )
        delta = result.delta
        if slug in zero:
            delta = {k: torch.zeros_like(v) for k, v in delta.items()}
        updates[slug] = (delta, None, data.num_records)
    return base, updates


def _utility(base, updates, **kwargs):
    x, y = load_validation_set(KEY)
    return CoalitionUtility(
        base_state=base, updates=updates, model=_model(), x=x, y=y, modality="tabular", **kwargs
    )


@pytest.fixture(scope="module")
def planted():
    """Twins with the same records, a good site, a site with random labels, a zero update."""
    split = demo_split(KEY, ["s0", "s1", "s2", "s3"], seed=0)
    sites = {
        "good": split["s0"],
        "twin-a": split["s1"],
        "twin-b": split["s1"],
        "noisy": _noisy(split["s2"], 1.0, seed=3),
        "zero": split["s3"],
    }
    base, updates = _round(sites, epochs=10, zero={"zero"})
    utility = _utility(base, updates)
    return base, updates, utility, C.shapley_exact(list(updates), utility)


def test_planted_consortium_gets_the_planted_scores(planted):
    _base, _updates, utility, result = planted
    scores = result.scores
    assert result.evaluations == 2**5
    assert utility.metric == "accuracy"
    # Efficiency: the scores share out what the round did to validation accuracy.
    gain = result.values[frozenset(scores)] - result.values[frozenset()]
    assert gain > 0.4
    assert sum(scores.values()) == pytest.approx(gain, abs=1e-9)
    # Twins: equal within the stated tolerance, and closer to each other than to anyone.
    assert abs(scores["twin-a"] - scores["twin-b"]) <= TWIN_TOLERANCE
    assert scores["twin-a"] > 0.05 and scores["twin-b"] > 0.05
    # Random labels: the lowest score of all.
    assert scores["noisy"] == min(scores.values())
    assert scores["noisy"] < scores["zero"] or abs(scores["zero"]) <= ZERO_TOLERANCE
    assert all(scores["noisy"] < scores[s] for s in ("good", "twin-a", "twin-b"))
    # A zero update: about nothing.
    assert abs(scores["zero"]) <= ZERO_TOLERANCE
    # Leave-one-out on the same round: each twin can be left out, so both look worth little.
    loo = C.leave_one_out(list(scores), C.CachedUtility(utility))
    assert loo.scores["good"] > max(loo.scores["twin-a"], loo.scores["twin-b"])


def test_the_full_coalition_is_the_coordinators_fedavg_model(planted):
    base, updates, utility, result = planted
    state = apply_update(base, fedavg(list(updates.values())))
    model = _model()
    model.load_state_dict(state)
    x, y = load_validation_set(KEY)
    accuracy = evaluate(model, x, y, modality="tabular")["accuracy"]
    assert result.values[frozenset(updates)] == accuracy
    assert result.values[frozenset()] == utility(frozenset())  # the input model


def test_a_site_that_shares_no_coordinate_is_a_null_player(planted):
    base, updates, _utility_, _result = planted
    silent = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in updates["good"][0].items()}
    masked = {
        "good": updates["good"],
        "twin-a": updates["twin-a"],
        "masked": (updates["noisy"][0], silent, 300),
    }
    result = C.shapley_exact(list(masked), _utility(base, masked))
    assert result.scores["masked"] == 0.0  # nothing shared: no coalition changes
    assert result.scores["good"] > 0


def test_cyclic_coalitions_add_the_masked_deltas(planted):
    base, updates, _utility_, _result = planted
    # Half of one site's coordinates were not shared: only the shared half is applied.
    delta = updates["good"][0]
    half = {
        k: torch.rand(v.shape, generator=torch.Generator().manual_seed(1)) < 0.5
        for k, v in delta.items()
    }
    chain = {"good": (delta, half, 1), "twin-a": updates["twin-a"]}
    utility = _utility(base, chain, combine="sum")
    state = {k: v.clone() for k, v in utility.state_of({"good", "twin-a"}).items()}
    expected = {
        k: base[k]
        + torch.where(half[k], delta[k], torch.zeros_like(delta[k]))
        + updates["twin-a"][0][k]
        for k in base
    }
    for name in base:
        assert torch.allclose(state[name], expected[name], atol=1e-6)
    result = C.shapley_exact(list(chain), utility)
    assert sum(result.scores.values()) == pytest.approx(
        result.values[frozenset(chain)] - result.values[frozenset()], abs=1e-9
    )


def test_sampled_agrees_with_exact_on_eight_sites_with_fewer_evaluations():
    """Eight sites with label noise from 0% to 100%: the sampled ranking matches the exact one."""
    names = [f"s{i}" for i in range(8)]
    split = demo_split(KEY, names, seed=0)
    sites = {
        s: _noisy(split[s], f, seed=i)
        for i, (s, f) in enumerate(zip(names, np.linspace(0, 1, 8), strict=True))
    }
    base, updates = _round(sites, epochs=5)
    utility = _utility(base, updates)
    exact = C.shapley_exact(names, utility)
    sampled = C.shapley_sampled(names, utility, permutations=32, seed=11)
    rho = spearmanr([exact.scores[s] for s in names], [sampled.scores[s] for s in names]).statistic
    print(
        f"exact: {exact.evaluations} evaluations; sampled: {sampled.evaluations}, "
        f"Spearman {rho:.3f}"
    )
    assert rho >= 0.9
    assert sampled.evaluations < exact.evaluations == 256
    # The clean sites lead in both rankings.
    assert max(exact.scores, key=exact.scores.get) == "s0"
    assert max(sampled.scores, key=sampled.scores.get) == "s0"


def test_auto_samples_ten_sites_and_agrees_with_exact():
    names = [f"s{i}" for i in range(10)]
    split = demo_split(KEY, names, seed=1)
    sites = {
        s: _noisy(split[s], f, seed=i)
        for i, (s, f) in enumerate(zip(names, np.linspace(0, 1, 10), strict=True))
    }
    base, updates = _round(sites, epochs=5, seed=1)
    utility = C.CachedUtility(_utility(base, updates))
    exact = C._exact_scores(tuple(names), utility)  # 1024 coalitions, for comparison only
    sampled = C.compute("auto", names, _utility(base, updates), seed=5)
    assert sampled.method == "shapley_sampled"
    rho = spearmanr([exact[s] for s in names], [sampled.scores[s] for s in names]).statistic
    print(f"10 sites: exact 1024 evaluations; sampled {sampled.evaluations}, Spearman {rho:.3f}")
    assert rho >= 0.9
    assert sampled.evaluations < 1024


def test_segmentation_coalitions_are_valued_by_dice():
    assert metric_for("segmentation") == "dice" and metric_for("image") == "accuracy"
    torch.manual_seed(0)
    model = SmallUNet(input_shape=[1, 32, 32], n_classes=2)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    floating = {k: v for k, v in base.items() if v.is_floating_point()}
    updates = {
        s: ({k: 0.01 * torch.randn_like(v) for k, v in floating.items()}, None, 10)
        for s in ("a", "b")
    }
    x, y = load_validation_set("lesions")
    utility = CoalitionUtility(
        base_state=base,
        updates=updates,
        model=SmallUNet(input_shape=[1, 32, 32], n_classes=2),
        x=x[:20],
        y=y[:20],
        modality="segmentation",
    )
    assert utility.metric == "dice"
    result = C.shapley_exact(["a", "b"], utility)
    assert all(0.0 <= v <= 1.0 for v in result.values.values())
