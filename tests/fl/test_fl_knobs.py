"""The engine's knobs for a privacy researcher (issue 15): the training loss chosen per job
(cross-entropy or Dice + BCE), coalitions valued by the metric or minus the loss, the
zero-filled average beside the mask-aware one, and the centralised baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.fl import contribution as C
from training.fl.aggregate import StreamingFedAvg, fedavg
from training.fl.baseline import baseline_settings, pool_site_data, train_centralised
from training.fl.coalition import CoalitionUtility, metric_for
from training.fl.data import SiteData, demo_split, load_validation_set
from training.fl.evaluate import (
    NEG_LOSS,
    check_loss,
    evaluate,
    loss_per_record,
    task_loss,
)
from training.fl.evaluation_report import combine, parse_report, report_text
from training.fl.local import per_sample_gradients, train_local
from training.fl.models import LogisticRegression, SmallUNet

ADAM = {"name": "adam", "lr": 0.01}


def _logits_for(mask: torch.Tensor, confidence: float = 20.0) -> torch.Tensor:
    """Two-class logits ``[N, 2, H, W]`` that predict ``mask`` with the given confidence."""
    fg = mask.float() * 2 - 1
    return torch.stack([-confidence * fg, confidence * fg], dim=1)


@pytest.fixture(scope="module")
def lesions():
    full = demo_split("lesions", ["a", "b", "c", "d"])["a"]
    return SiteData(
        x_train=full.x_train[:24],
        y_train=full.y_train[:24],
        num_records=24,
        modality="segmentation",
        input_shape=[1, 32, 32],
        n_classes=2,
    )


def _unet(seed=0):
    torch.manual_seed(seed)
    return SmallUNet(input_shape=[1, 32, 32], n_classes=2, base_channels=4, depth=2)


# --- the losses -------------------------------------------------------------------------------


def test_dice_bce_is_about_zero_on_a_perfect_mask_and_high_on_an_empty_prediction():
    mask = torch.zeros(2, 8, 8, dtype=torch.int64)
    mask[:, 2:6, 2:6] = 1
    perfect = loss_per_record(_logits_for(mask), mask, "dice_bce")
    assert perfect.shape == (2,)
    assert perfect.max().item() < 1e-6
    empty = loss_per_record(_logits_for(torch.zeros_like(mask)), mask, "dice_bce")
    # The Dice term alone is 1 - 1/(16 + 1); the BCE of 16 confidently wrong pixels adds more.
    assert empty.min().item() > 1.0 + 16 / 17 - 1e-6
    # An empty mask predicted empty is perfect too (the smoothing: no 0/0).
    nothing = torch.zeros_like(mask)
    assert loss_per_record(_logits_for(nothing), nothing, "dice_bce").max().item() < 1e-6


def test_dice_bce_of_two_classes_is_soft_dice_plus_the_foreground_channels_bce():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 6, 6)
    mask = (torch.rand(3, 6, 6) < 0.3).long()
    p = logits.softmax(dim=1)[:, 1]
    g = mask.float()
    bce = F.binary_cross_entropy(p, g, reduction="none").mean(dim=(1, 2))
    dice = (2 * (p * g).sum(dim=(1, 2)) + 1) / (p.sum(dim=(1, 2)) + g.sum(dim=(1, 2)) + 1)
    expected = bce + 1 - dice
    assert torch.allclose(loss_per_record(logits, mask, "dice_bce"), expected, atol=1e-5)
    assert task_loss(logits, mask, "dice_bce").item() == pytest.approx(expected.mean().item())


def test_cross_entropy_stays_what_it_was():
    torch.manual_seed(1)
    logits, labels = torch.randn(5, 3), torch.randint(0, 3, (5,))
    assert torch.equal(task_loss(logits, labels), F.cross_entropy(logits, labels))
    assert torch.equal(task_loss(logits, labels, "cross_entropy"), F.cross_entropy(logits, labels))


def test_a_loss_is_checked_against_the_data():
    assert check_loss("dice_bce", "segmentation") == "dice_bce"
    with pytest.raises(ValueError, match="for segmentation masks, not tabular"):
        check_loss("dice_bce", "tabular")
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        check_loss("focal", "segmentation")
    site = demo_split("breast-cancer", ["a"])["a"]
    with pytest.raises(ValueError, match="for segmentation masks"):
        train_local(
            LogisticRegression(input_shape=[30], n_classes=2),
            site,
            epochs=1,
            batch_size=32,
            optimizer=ADAM,
            momentum_restart=True,
            loss="dice_bce",
        )


def test_training_with_dice_bce_lowers_that_loss_on_the_lesions(lesions):
    model = _unet()
    before = evaluate(
        model, lesions.x_train, lesions.y_train, modality="segmentation", loss="dice_bce"
    )
    result = train_local(
        model,
        lesions,
        epochs=3,
        batch_size=8,
        optimizer=ADAM,
        momentum_restart=True,
        loss="dice_bce",
    )
    after = evaluate(
        model, lesions.x_train, lesions.y_train, modality="segmentation", loss="dice_bce"
    )
    assert after["loss"] < 0.92 * before["loss"]
    assert result.metrics["train_loss_last_epoch"] < result.metrics["train_loss_first_epoch"]
    # The evaluation reports the training loss the job chose, not cross-entropy.
    ce = evaluate(model, lesions.x_train, lesions.y_train, modality="segmentation")["loss"]
    assert after["loss"] != pytest.approx(ce)


def test_dp_sgd_differentiates_each_records_dice_bce(lesions):
    model = _unet()
    x, y = lesions.x_train[:3], lesions.y_train[:3]
    grads, losses = per_sample_gradients(model, x, y, loss="dice_bce")
    for i in range(3):
        model.zero_grad()
        one = task_loss(model(x[i : i + 1]), y[i : i + 1], "dice_bce")
        one.backward()
        assert losses[i].item() == pytest.approx(one.item(), rel=1e-5)
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name][i], p.grad, atol=1e-5), name
    # And a DP-SGD round with it runs and moves the model.
    result = train_local(
        _unet(),
        lesions,
        epochs=1,
        batch_size=8,
        optimizer=ADAM,
        momentum_restart=True,
        dp_sgd={"noise_multiplier": 1.0, "max_grad_norm": 1.0},
        dp_seed=0,
        loss="dice_bce",
    )
    assert any(d.abs().sum() > 0 for d in result.delta.values())


# --- zero-filled and mask-aware averages ------------------------------------------------------


def test_zero_filled_and_masked_means_on_a_hand_made_example():
    # Two sites, weights 1 and 3, four coordinates; "b" excludes the tensor "t" altogether.
    a = ({"w": torch.tensor([4.0, 4.0, 4.0, 4.0]), "t": torch.tensor([2.0])}, None, 1.0)
    mask_b = {"w": torch.tensor([True, False, True, False])}
    b = ({"w": torch.tensor([8.0, 8.0, 8.0, 8.0])}, mask_b, 3.0)
    masked = fedavg([a, b])
    zero = fedavg([a, b], zero_filled=True)
    # Mask-aware: each coordinate over those who shared it.
    assert masked["w"].tolist() == [7.0, 4.0, 7.0, 4.0]  # (4 + 24) / 4 where b shared
    assert masked["t"].tolist() == [2.0]
    # Zero-filled: what b did not share counts as 0, always over the total weight 4.
    assert zero["w"].tolist() == [7.0, 1.0, 7.0, 1.0]
    assert zero["t"].tolist() == [0.5]
    # With every coordinate shared the two agree.
    full = [(a[0], None, 1.0), ({"w": b[0]["w"], "t": torch.tensor([6.0])}, None, 3.0)]
    assert all(torch.equal(fedavg(full)[k], fedavg(full, zero_filled=True)[k]) for k in ("w", "t"))


def test_the_zero_filled_buffer_resets_between_coalitions():
    template = {"w": torch.zeros(3)}
    agg = StreamingFedAvg(template, zero_filled=True)
    agg.add({"w": torch.ones(3)}, {"w": torch.tensor([True, False, True])}, 2.0)
    agg.reset()
    agg.add({"w": torch.full((3,), 3.0)}, None, 1.0)
    assert agg.result()["w"].tolist() == [3.0, 3.0, 3.0]


# --- coalitions valued by the loss ------------------------------------------------------------


def _round(sites, base):
    updates = {}
    for index, (slug, data) in enumerate(sorted(sites.items())):
        model = LogisticRegression(input_shape=[64], n_classes=10)
        model.load_state_dict(base)
        result = train_local(
            model,
            data,
            epochs=3,
            batch_size=32,
            optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0},
            momentum_restart=True,
            seed=index,
        )
        mask = {k: torch.rand(v.shape) < 0.5 for k, v in result.delta.items()}
        updates[slug] = (result.delta, mask, data.num_records)
    return updates


@pytest.fixture(scope="module")
def digits_round():
    torch.manual_seed(0)
    base = {
        k: v.detach().clone()
        for k, v in LogisticRegression(input_shape=[64], n_classes=10).state_dict().items()
    }
    sites = demo_split("digits", ["s0", "s1", "s2"], seed=0)
    return base, _round(sites, base)


@pytest.mark.parametrize("zero_filled", [False, True])
def test_coalitions_valued_by_minus_the_loss_score_and_recompute(digits_round, zero_filled):
    base, updates = digits_round
    x, y = load_validation_set("digits")
    utility = CoalitionUtility(
        base_state=base,
        updates=updates,
        model=LogisticRegression(input_shape=[64], n_classes=10),
        x=x,
        y=y,
        modality="tabular",
        value="loss",
        zero_filled=zero_filled,
    )
    assert utility.metric == NEG_LOSS == metric_for("tabular", "loss")
    result = C.shapley_exact(list(updates), utility)
    values = result.values
    # Higher is better: the trained full set has a lower loss than the untrained input model.
    assert values[frozenset(updates)] > values[frozenset()]
    # The full set's value is minus the loss of the model the coordinator would make.
    state = dict(base)
    avg = fedavg(list(updates.values()), zero_filled=zero_filled)
    state = {k: base[k] + avg[k] for k in base}
    model = LogisticRegression(input_shape=[64], n_classes=10)
    model.load_state_dict(state)
    loss = evaluate(model, x, y, modality="tabular")["loss"]
    assert values[frozenset(updates)] == pytest.approx(-loss, rel=1e-5)
    # The recorded coalitions recompute the scores bit for bit, as the report verifier does.
    again = C.scores_from_coalitions(result.method, result.params, result.coalitions())
    assert again == result.scores
    # Efficiency: the scores share out the change of minus the loss.
    total = values[frozenset(updates)] - values[frozenset()]
    assert sum(result.scores.values()) == pytest.approx(total)


def test_site_reports_carry_the_figure_a_loss_valued_coalition_recomputes_from(digits_round):
    """The site worker evaluates with ``negative_loss`` for such a job; the verifier recomputes
    each coalition value as the records-weighted ``neg_loss`` of the reports: it is exactly
    minus the weighted loss."""
    base, _updates = digits_round
    x, y = load_validation_set("digits")
    model = LogisticRegression(input_shape=[64], n_classes=10)
    model.load_state_dict(base)
    reports = []
    for site, (lo, hi) in {"a": (0, 37), "b": (37, 100), "c": (100, 171)}.items():
        metrics = evaluate(model, x[lo:hi], y[lo:hi], modality="tabular", negative_loss=True)
        assert metrics[NEG_LOSS] == -metrics["loss"]
        text = report_text(
            job_id=1, round_index=1, site=site, records=hi - lo, results={"a" * 64: metrics}
        )
        reports.append(parse_report(text))
    assert combine(reports, NEG_LOSS)["a" * 64] == -combine(reports, "loss")["a" * 64]
    # Without the flag nothing changes in what a site reports.
    assert set(evaluate(model, x, y, modality="tabular")) == {"loss", "accuracy"}


def test_segmentation_coalitions_valued_by_the_dice_bce_loss(lesions):
    base = {k: v.detach().clone() for k, v in _unet().state_dict().items()}
    model = _unet()
    model.load_state_dict(base)
    result = train_local(
        model,
        lesions,
        epochs=2,
        batch_size=8,
        optimizer=ADAM,
        momentum_restart=True,
        loss="dice_bce",
    )
    utility = CoalitionUtility(
        base_state=base,
        updates={"a": (result.delta, None, lesions.num_records)},
        model=_unet(),
        x=lesions.x_train,
        y=lesions.y_train,
        modality="segmentation",
        value="loss",
        loss="dice_bce",
    )
    trained = evaluate(
        model, lesions.x_train, lesions.y_train, modality="segmentation", loss="dice_bce"
    )
    assert utility(["a"]) == pytest.approx(-trained["loss"], rel=1e-5)
    assert utility(["a"]) > utility([])
    with pytest.raises(ValueError, match="valued by one of"):
        metric_for("segmentation", "entropy")


# --- the centralised baseline -----------------------------------------------------------------


def test_the_centralised_baseline_trains_on_the_pooled_sites():
    sites = demo_split("breast-cancer", ["a", "b", "c"], seed=0)
    pooled = pool_site_data(sites)
    assert pooled.num_records == sum(s.num_records for s in sites.values())
    assert torch.equal(pooled.x_train[: sites["a"].num_records], sites["a"].x_train)
    spec = {
        "rounds": 3,
        "local_epochs": 2,
        "batch_size": 16,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "privacy_pipeline": [],
    }
    settings = baseline_settings(spec)
    assert settings["epochs"] == 6 and settings["loss"] == "cross_entropy"
    x, y = load_validation_set("breast-cancer")
    torch.manual_seed(0)
    model = LogisticRegression(input_shape=[30], n_classes=2)
    untrained = evaluate(model, x, y, modality="tabular")
    result = train_centralised(model, sites, validation=(x, y), seed=3, **settings)
    assert result.samples == pooled.num_records
    assert result.validation is not None
    assert result.validation["accuracy"] > 0.9
    assert result.validation["loss"] < untrained["loss"]
    # Seeded: the same call trains the same model.
    torch.manual_seed(0)
    again = train_centralised(
        LogisticRegression(input_shape=[30], n_classes=2), sites, seed=3, **settings
    )
    assert all(torch.equal(result.state[k], again.state[k]) for k in result.state)


def test_pooling_refuses_data_that_do_not_fit_together(lesions):
    tabular = demo_split("breast-cancer", ["a"])["a"]
    with pytest.raises(ValueError, match="cannot pool"):
        pool_site_data([tabular, lesions])
    with pytest.raises(ValueError, match="at least one"):
        pool_site_data([])
