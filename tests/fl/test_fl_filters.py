"""The site privacy pipeline (training.fl.filters)."""

import math
import time

import numpy as np
import pytest
import torch

from training.fl import filters, selection
from training.fl.filters import FilteredUpdate, apply_pipeline, svt_budget, svt_gamma
from training.fl.noise import NOISE_CHUNK, gaussian_noise_, laplace_noise_, uniform_keys_
from training.fl.params import validate_filter
from training.fl.pipeline_state import PipelineState, Workspace
from training.fl.selection import EXACT_BELOW
from training.jobs.accounting import PrivacyEvent, events_for_pipeline


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def update(seed=0, sizes=None):
    g = gen(seed)
    sizes = sizes or {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 72)}
    return {k: torch.randn(s, generator=g) for k, s in sizes.items()}


def flat(tensors, names=None):
    names = names or list(tensors)
    return torch.cat([tensors[n].reshape(-1) for n in names])


def run(delta, pipeline, seed=1, **kw):
    return apply_pipeline(delta, pipeline, generator=gen(seed), **kw)


# --- structure, exclude_layers, dp_sgd ----------------------------------------------------


def test_empty_pipeline_shares_everything_unchanged():
    delta = update()
    out = run(delta, [])
    assert isinstance(out, FilteredUpdate)
    assert out.mask is None and out.events == [] and out.shared_fraction == 1.0
    for name, value in delta.items():
        assert torch.equal(out.delta[name], value)


def test_input_is_not_modified():
    delta = update()
    before = {k: v.clone() for k, v in delta.items()}
    run(delta, [{"filter": "gaussian_noise", "noise_multiplier": 1.0, "clip_norm": 0.1}])
    for k in delta:
        assert torch.equal(delta[k], before[k])


def test_exclude_layers_removes_parameters():
    delta = update()
    out = run(delta, [{"filter": "exclude_layers", "layers": ["conv."]}])
    assert set(out.delta) == {"fc.weight"}
    assert out.mask is None and out.events == []
    assert out.shared_fraction == pytest.approx(720 / (216 + 8 + 720))
    assert torch.equal(out.delta["fc.weight"], delta["fc.weight"])


def test_exclude_layers_applies_first_wherever_it_stands():
    delta = update()
    pipeline = [
        {"filter": "partial_sharing", "fraction": 0.5, "strategy": "topk"},
        {"filter": "exclude_layers", "layers": ["fc"]},
    ]
    out = run(delta, pipeline)
    assert set(out.delta) == {"conv.weight", "conv.bias"}
    assert sum(int(m.sum()) for m in out.mask.values()) == round(0.5 * 224)


def test_exclude_layers_matching_nothing_is_refused():
    with pytest.raises(ValueError, match="no parameter name starts with 'head'"):
        run(update(), [{"filter": "exclude_layers", "layers": ["head"]}])


def test_dp_sgd_is_skipped_here():
    delta = update()
    out = run(delta, [{"filter": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}])
    assert out.events == [] and out.mask is None
    assert torch.equal(out.delta["fc.weight"], delta["fc.weight"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"filter": "nope"}, "unknown privacy filter"),
        ({"filter": "partial_sharing", "fraction": 0}, "fraction"),
        ({"filter": "partial_sharing", "fraction": 1.5}, "fraction"),
        ({"filter": "partial_sharing", "fraction": 0.5, "strategy": "best"}, "strategy"),
        ({"filter": "percentile_clipping", "percentile": 0}, "percentile"),
        ({"filter": "percentile_clipping"}, "percentile: required"),
        ({"filter": "laplace_noise", "epsilon": -1, "sensitivity": 1}, "epsilon"),
        ({"filter": "laplace_noise", "epsilon": 1, "sensitivity": float("inf")}, "sensitivity"),
        ({"filter": "gaussian_noise", "noise_multiplier": True, "clip_norm": 1}, "noise_mult"),
        ({"filter": "gaussian_noise", "noise_multiplier": 1, "clip_norm": 1, "x": 1}, "unknown"),
        ({"filter": "svt", "epsilon": 1, "threshold": -1, "fraction": 0.1}, "threshold"),
        ({"filter": "svt", "epsilon": 1, "threshold": 0, "fraction": 0.1}, "svt.threshold"),
        ({"filter": "svt", "epsilon": 1, "threshold": 1, "fraction": 0.1, "bound": 0.5}, "bound"),
        (
            {"filter": "svt", "epsilon": 1, "threshold": 1, "fraction": 0.1, "selection_share": 1},
            "selection_share",
        ),
        (
            {"filter": "svt", "epsilon": 1, "threshold": 1, "fraction": 0.1, "threshold_share": 0},
            "threshold_share",
        ),
        ({"filter": "laplace_noise", "epsilon": 1, "sensitivity": 1, "clip": 2}, "clip"),
        ({"filter": "laplace_noise", "epsilon": 1, "sensitivity": 1, "clip": -1}, "clip"),
        ({"filter": "svt", "epsilon": 1, "threshold": 1, "fraction": 0.1, "max_passes": 11}, "max"),
        ({"filter": "exclude_layers", "layers": []}, "layers"),
        ({"filter": "exclude_layers", "layers": [3]}, "layers"),
        ("gaussian_noise", "object"),
    ],
)
def test_bad_params_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        run(update(), [spec])


def test_validate_fills_defaults():
    assert validate_filter({"filter": "partial_sharing", "fraction": 1})["strategy"] == "topk"
    svt = validate_filter({"filter": "svt", "epsilon": 1, "threshold": 0.1, "fraction": 0.1})
    assert svt["max_passes"] == 1 and svt["epsilon"] == 1.0
    assert svt["selection_share"] == 0.5 and svt["threshold_share"] == 0.5
    assert svt["bound"] == svt_gamma(0.1) == 0.2
    laplace = validate_filter({"filter": "laplace_noise", "epsilon": 1, "sensitivity": 1})
    assert laplace["clip"] is None


# --- partial sharing -----------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.25, 0.4, 0.5, 0.999, 1.0])
def test_topk_shares_exactly_round_fraction_largest(fraction):
    delta = update(3)
    out = run(delta, [{"filter": "partial_sharing", "fraction": fraction, "strategy": "topk"}])
    n = sum(v.numel() for v in delta.values())
    k = round(fraction * n)
    if k == n:
        assert out.mask is None
        return
    mask = flat(out.mask, list(delta))
    values = flat(delta)
    assert int(mask.sum()) == k
    assert out.shared_fraction == k / n
    # the kept coordinates are exactly the k largest |values| (global, across tensors)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[values.abs().topk(k).indices] = True
    assert torch.equal(mask, expected)
    sent = flat(out.delta, list(delta))
    assert torch.equal(sent[mask], values[mask])
    assert torch.count_nonzero(sent[~mask]) == 0  # unshared values never travel


def test_topk_breaks_ties_exactly():
    delta = {"w": torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0, 0.5])}
    out = run(delta, [{"filter": "partial_sharing", "fraction": 0.5, "strategy": "topk"}])
    mask = out.mask["w"]
    assert int(mask.sum()) == 3 and not mask[0] and not mask[5]


def test_random_sharing_exact_count_and_differs_across_generators():
    delta = update(4)
    spec = [{"filter": "partial_sharing", "fraction": 0.3, "strategy": "random"}]
    n = sum(v.numel() for v in delta.values())
    a = flat(run(delta, spec, seed=1).mask, list(delta))
    b = flat(run(delta, spec, seed=2).mask, list(delta))
    a2 = flat(run(delta, spec, seed=1).mask, list(delta))
    assert int(a.sum()) == int(b.sum()) == round(0.3 * n)
    assert not torch.equal(a, b)
    assert torch.equal(a, a2)  # reproducible from the generator


def test_random_sharing_is_uniform():
    delta = {"w": torch.arange(1000, dtype=torch.float32)}
    spec = [{"filter": "partial_sharing", "fraction": 0.2, "strategy": "random"}]
    hits = sum(run(delta, spec, seed=s).mask["w"].float() for s in range(200))
    # no bias to large values or low indices: each coordinate ~ 40 of 200
    assert abs(float(hits[:500].mean()) - float(hits[500:].mean())) < 2.0


def test_chained_fractions_multiply():
    delta = update(5)
    n = sum(v.numel() for v in delta.values())
    out = run(
        delta,
        [
            {"filter": "partial_sharing", "fraction": 0.5, "strategy": "random"},
            {"filter": "partial_sharing", "fraction": 0.5, "strategy": "topk"},
        ],
    )
    first = round(0.5 * n)
    assert int(flat(out.mask, list(delta)).sum()) == round(0.5 * first)
    # the second stage picks among the first stage's coordinates only
    values = flat(out.delta, list(delta))
    assert torch.count_nonzero(values) == round(0.5 * first)


# --- large updates: the sampled bracket and its exact fallback ------------------------------

LARGE = {"a.weight": (3, EXACT_BELOW // 2 + 11), "a.bias": (EXACT_BELOW // 4 + 1,)}


@pytest.fixture(params=["bracket", "fallback"])
def bracket_path(request, monkeypatch):
    """Run a test with the sampled bracket, and again with a bracket that always misses (its
    edges inverted), which must fall back to the exact full partition with the same result."""
    if request.param == "fallback":
        monkeypatch.setattr(selection, "BRACKET_SIGMAS", -1e9)
    return request.param


@pytest.mark.parametrize("fraction", [0.003, 0.4, 0.97])
def test_topk_large_update_is_exact(bracket_path, fraction):
    delta = update(20, LARGE)
    n = sum(v.numel() for v in delta.values())
    assert n > EXACT_BELOW
    out = run(delta, [{"filter": "partial_sharing", "fraction": fraction, "strategy": "topk"}])
    k = round(fraction * n)
    mask = flat(out.mask, list(delta))
    expected = torch.zeros(n, dtype=torch.bool)
    expected[flat(delta).abs().topk(k).indices] = True
    assert int(mask.sum()) == k and out.shared_fraction == k / n
    assert torch.equal(mask, expected)  # continuous values: no ties, one right answer
    sent = flat(out.delta, list(delta))
    assert torch.equal(sent[mask], flat(delta)[mask])
    assert torch.count_nonzero(sent[~mask]) == 0


def test_topk_large_update_with_ties_is_exact(bracket_path):
    values = torch.randn(EXACT_BELOW * 2, generator=gen(21))
    values[::3] = 0.7  # a third of the coordinates tie, right at the boundary for 0.5
    values[1::3] = -0.7
    k = round(0.5 * values.numel())
    kth = float(values.abs().topk(k).values[-1])
    assert kth == pytest.approx(0.7)
    masks = []
    for seed in (1, 2):
        out = run({"w": values}, [{"filter": "partial_sharing", "fraction": 0.5}], seed=seed)
        mask = out.mask["w"]
        assert int(mask.sum()) == k
        assert bool((values.abs()[mask] >= kth).all())
        assert bool((values.abs()[~mask] <= kth).all())
        masks.append(mask)
    assert not torch.equal(masks[0], masks[1])  # ties broken at random


@pytest.mark.parametrize("strategy", ["topk", "random"])
def test_percentile_large_update_after_sharing_is_exact(bracket_path, strategy):
    delta = update(22, LARGE)
    out = run(
        delta,
        [
            {"filter": "partial_sharing", "fraction": 0.4, "strategy": strategy},
            {"filter": "percentile_clipping", "percentile": 90},
        ],
    )
    mask = flat(out.mask, list(delta))
    q = out.notes["steps"][1]["clip_value"]
    expected = np.percentile(flat(delta)[mask].abs().numpy(), 90)
    assert q == pytest.approx(float(expected), rel=1e-6)
    sent = flat(out.delta, list(delta))
    assert torch.equal(sent[mask], flat(delta)[mask].clamp(-q, q))


def test_random_sharing_large_update_exact_and_uniform(bracket_path):
    values = torch.arange(EXACT_BELOW * 2, dtype=torch.float32)
    out = run({"w": values}, [{"filter": "partial_sharing", "fraction": 0.3, "strategy": "random"}])
    mask = out.mask["w"]
    assert int(mask.sum()) == round(0.3 * values.numel())
    half = values.numel() // 2
    assert abs(float(mask[:half].float().mean()) - float(mask[half:].float().mean())) < 0.01


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("noise", ["gaussian_noise", "laplace_noise"])
def test_topk_then_clip_then_noise_norms_are_exact(bracket_path, ties, noise):
    """The clip's norms come from the scans' sums (no pass of their own): they must equal the
    norms of the values actually clipped and shared, ties at the top-k threshold included."""
    values = torch.randn(EXACT_BELOW * 3 + 17, generator=gen(24))
    if ties:
        values[::5] = 0.9  # ties right at the 0.4 boundary (the 60th percentile of |N(0,1)|)
    k = round(0.4 * values.numel())
    spec = [
        {"filter": "partial_sharing", "fraction": 0.4, "strategy": "topk"},
        {"filter": "percentile_clipping", "percentile": 80},
        {"filter": noise, "epsilon": 1e13, "sensitivity": 1e-9}
        if noise == "laplace_noise"
        else {"filter": noise, "noise_multiplier": 1e-12, "clip_norm": 1e-9},
    ]
    out = run({"w": values}, spec)
    mask = out.mask["w"]
    assert int(mask.sum()) == k
    q = out.notes["steps"][1]["clip_value"]
    shared = values[mask].double()
    assert q == pytest.approx(float(np.percentile(shared.abs().numpy(), 80)), rel=1e-6)
    clipped = shared.clamp(-q, q)
    step = out.notes["steps"][2]
    if noise == "laplace_noise":
        assert step["l1_before"] == pytest.approx(float(clipped.abs().sum()), rel=1e-9)
        expected = clipped * (1e-9 / float(clipped.abs().sum()))
    else:
        assert step["l2_before"] == pytest.approx(float(clipped.norm()), rel=1e-9)
        expected = clipped * (1e-9 / float(clipped.norm()))
    sent = out.delta["w"]
    assert torch.count_nonzero(sent[~mask]) == 0
    assert torch.allclose(sent[mask].double(), expected, rtol=1e-5, atol=1e-20)


@pytest.mark.parametrize("first", ["topk", "random"])
def test_chained_sharing_on_a_large_update_is_exact(bracket_path, first):
    """A second top-k picks among the first stage's coordinates only, whether the first left a
    mask (random) or only its threshold (top-k), and then clips and adds noise to those."""
    delta = update(26, LARGE)
    spec = [
        {"filter": "partial_sharing", "fraction": 0.5, "strategy": first},
        {"filter": "partial_sharing", "fraction": 0.5, "strategy": "topk"},
        {"filter": "percentile_clipping", "percentile": 50},
    ]
    out = run(delta, spec)
    values = flat(delta)
    n = values.numel()
    first_kept = round(0.5 * n)
    k = round(0.5 * first_kept)
    mask = flat(out.mask, list(delta))
    assert int(mask.sum()) == k
    if first == "topk":
        expected = torch.zeros(n, dtype=torch.bool)
        expected[values.abs().topk(k).indices] = True
        assert torch.equal(mask, expected)
    q = out.notes["steps"][2]["clip_value"]
    assert q == pytest.approx(float(np.percentile(values[mask].abs().numpy(), 50)), rel=1e-6)
    sent = flat(out.delta, list(delta))
    assert torch.equal(sent[mask], values[mask].clamp(-q, q))
    assert torch.count_nonzero(sent[~mask]) == 0


def test_many_threads_small_chunks_same_result(monkeypatch):
    """Split into many chunks on a many-thread pool, the per-chunk counts from the scan must
    still line up with the final pass, and the answer must not depend on the chunking (the
    noise is drawn by position, not by chunk)."""
    from concurrent.futures import ThreadPoolExecutor

    from training.fl import kernels

    values = torch.randn(EXACT_BELOW * 3 + 5, generator=gen(27))
    spec = [
        {"filter": "partial_sharing", "fraction": 0.4, "strategy": "topk"},
        {"filter": "percentile_clipping", "percentile": 90},
        {"filter": "gaussian_noise", "noise_multiplier": 1.0, "clip_norm": 1.0},
    ]
    two = run({"w": values}, spec, seed=3)
    with ThreadPoolExecutor(max_workers=16) as pool:
        monkeypatch.setattr(kernels, "_pool", pool)
        monkeypatch.setattr(kernels, "CHUNK", 1 << 16)  # 13 chunks instead of one
        many = run({"w": values}, spec, seed=3)
    assert torch.equal(two.mask["w"], many.mask["w"])
    # Sums over other chunk boundaries may round differently in their last bits.
    torch.testing.assert_close(two.delta["w"], many.delta["w"], rtol=1e-6, atol=0)
    for a, b in zip(two.notes["steps"], many.notes["steps"], strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[key], rel=1e-12), key
            else:
                assert value == b[key], key


def test_topk_looks_ahead_for_the_percentile(monkeypatch):
    """top-k followed by percentile_clipping on a large update: one scan finds both."""
    calls = []
    real = selection._bands
    monkeypatch.setattr(
        selection, "_bands", lambda *a, **kw: calls.append(len(a[2])) or real(*a, **kw)
    )
    values = torch.randn(EXACT_BELOW * 2, generator=gen(25))
    spec = [
        {"filter": "partial_sharing", "fraction": 0.4, "strategy": "topk"},
        {"filter": "percentile_clipping", "percentile": 95},
    ]
    out = run({"w": values}, spec)
    assert calls == [2]  # one scan, two brackets
    mask = out.mask["w"]
    q = out.notes["steps"][1]["clip_value"]
    assert q == pytest.approx(float(np.percentile(values[mask].abs().numpy(), 95)), rel=1e-6)
    assert torch.equal(out.delta["w"][mask], values[mask].clamp(-q, q))
    # with another filter in between, the percentile scans on its own
    calls.clear()
    laplace = {"filter": "laplace_noise", "epsilon": 1.0, "sensitivity": 1.0}
    run({"w": values}, [spec[0], laplace, spec[1]])
    assert calls == [1, 1]


def test_target_pipeline_above_torch_quantile_limit():
    # partial_sharing + percentile + Gaussian noise on more than 2**24 values (odd count: a
    # ragged last noise chunk): no size may fail.
    n = 2**24 + 3
    values = torch.randn(n, generator=gen(23))
    spec = [
        {"filter": "partial_sharing", "fraction": 0.4, "strategy": "topk"},
        {"filter": "percentile_clipping", "percentile": 90},
        {"filter": "gaussian_noise", "noise_multiplier": 1.0, "clip_norm": 1.0},
    ]
    out = run({"w": values}, spec)
    mask = out.mask["w"]
    assert int(mask.sum()) == round(0.4 * n)
    q = out.notes["steps"][1]["clip_value"]
    assert q == pytest.approx(float(np.percentile(values[mask].abs().numpy(), 90)), rel=1e-6)
    sent = out.delta["w"]
    assert torch.count_nonzero(sent[~mask]) == 0 and bool(torch.isfinite(sent).all())
    assert float(sent[mask].double().std()) == pytest.approx(1.0, rel=0.01)  # noise dominates


# --- clipping ------------------------------------------------------------------------------


@pytest.mark.parametrize("percentile", [1.0, 37.5, 50.0, 90.0, 100.0])
def test_percentile_clipping_bound_and_value(percentile):
    delta = update(6)
    out = run(delta, [{"filter": "percentile_clipping", "percentile": percentile}])
    q = out.notes["steps"][0]["clip_value"]
    expected = torch.quantile(flat(delta).abs(), percentile / 100)
    assert q == pytest.approx(float(expected), rel=1e-6)
    values = flat(out.delta)
    assert float(values.abs().max()) <= q
    assert torch.equal(values, flat(delta).clamp(-q, q))


def test_percentile_interpolates_between_true_order_statistics():
    # After numpy partitions at k, the element at k + 1 is usually, not always, the next order
    # statistic: on this array it is not (found by search), and interpolating with it gave a
    # wrong percentile.
    values = torch.from_numpy(
        np.abs(np.random.default_rng(909969229).standard_normal(1946).astype(np.float32))
    )
    p = (594 + 0.5) / (1946 - 1) * 100  # halfway between ranks 594 and 595
    out = run({"w": values}, [{"filter": "percentile_clipping", "percentile": p}])
    expected = np.percentile(values.numpy().astype(np.float64), p)
    assert out.notes["steps"][0]["clip_value"] == pytest.approx(float(expected), rel=1e-6)


def test_percentile_among_shared_coordinates_only():
    delta = update(7)
    out = run(
        delta,
        [
            {"filter": "partial_sharing", "fraction": 0.3, "strategy": "random"},
            {"filter": "percentile_clipping", "percentile": 50},
        ],
    )
    mask = flat(out.mask, list(delta))
    q = out.notes["steps"][1]["clip_value"]
    assert q == pytest.approx(float(torch.quantile(flat(delta)[mask].abs(), 0.5)), rel=1e-6)
    assert float(flat(out.delta).abs().max()) <= q
    # after top-k (cached partition path)
    out = run(
        delta,
        [
            {"filter": "partial_sharing", "fraction": 0.3, "strategy": "topk"},
            {"filter": "percentile_clipping", "percentile": 80},
        ],
    )
    mask = flat(out.mask, list(delta))
    q = out.notes["steps"][1]["clip_value"]
    assert q == pytest.approx(float(torch.quantile(flat(delta)[mask].abs(), 0.8)), rel=1e-6)


def test_percentile_beyond_torch_quantile_limit():
    n = 2**24 + 2**20  # 17.8M: torch.quantile refuses it
    values = torch.randn(n, generator=gen(8))
    started = time.perf_counter()
    out = run({"w": values}, [{"filter": "percentile_clipping", "percentile": 95}])
    elapsed = time.perf_counter() - started
    q = out.notes["steps"][0]["clip_value"]
    expected = np.percentile(values.abs().numpy(), 95)
    assert q == pytest.approx(float(expected), rel=1e-6)
    assert float(out.delta["w"].abs().max()) <= q
    assert q == pytest.approx(1.959964, rel=2e-3)  # |N(0,1)| 95th percentile
    assert elapsed < 10


def test_laplace_clips_l1_before_noise():
    delta = update(9)
    out = run(delta, [{"filter": "laplace_noise", "epsilon": 1e9, "sensitivity": 2.0}])
    assert out.notes["steps"][0]["l1_clipped"] == 2.0
    assert float(flat(out.delta).abs().sum()) <= 2.0 * (1 + 1e-6)  # noise ~ 2e-9


def test_laplace_clip_clamps_each_coordinate_before_noise():
    delta = {"w": torch.tensor([3.0, -2.0, 0.05, -0.01, 0.5])}
    # The L1 bound is far away: only the per-coordinate clamp acts; noise ~ 1e-9.
    spec = {"filter": "laplace_noise", "epsilon": 1e9, "sensitivity": 10.0, "clip": 0.1}
    out = run(delta, [spec])
    torch.testing.assert_close(
        out.delta["w"], torch.tensor([0.1, -0.1, 0.05, -0.01, 0.1]), atol=1e-6, rtol=0
    )
    note = out.notes["steps"][0]
    assert note["clip"] == 0.1 and note["l1_bound_of_clip"] == pytest.approx(0.5)
    assert note["l1_clipped"] == pytest.approx(0.36)
    # the clamp comes first, then the L1 clip to the sensitivity
    out = run(delta, [{**spec, "sensitivity": 0.18, "clip": 0.1}])
    torch.testing.assert_close(
        out.delta["w"], torch.tensor([0.1, -0.1, 0.05, -0.01, 0.1]) * 0.5, atol=1e-6, rtol=0
    )
    # and before the noise: the noise is not clamped (mean |out - clamped| ~ b, far above 0.1)
    big = {"w": torch.full((200_000,), 5.0)}
    out = run(big, [{"filter": "laplace_noise", "epsilon": 1.0, "sensitivity": 1e6, "clip": 0.1}])
    residual = out.delta["w"].double() - 0.1
    b = 1e6
    assert float(residual.abs().mean()) == pytest.approx(b, rel=0.05)


def test_laplace_clip_after_a_tighter_percentile_clip_keeps_the_tighter_one():
    delta = update(9)
    pct = {"filter": "percentile_clipping", "percentile": 50}
    both = run(
        delta, [pct, {"filter": "laplace_noise", "epsilon": 1e9, "sensitivity": 1e6, "clip": 1e3}]
    )
    only = run(delta, [pct, {"filter": "laplace_noise", "epsilon": 1e9, "sensitivity": 1e6}])
    torch.testing.assert_close(flat(both.delta), flat(only.delta), atol=1e-5, rtol=0)


def test_gaussian_clips_l2_before_noise():
    delta = update(10)
    step = run(delta, [{"filter": "gaussian_noise", "noise_multiplier": 1.0, "clip_norm": 0.5}])
    assert step.notes["steps"][0]["l2_before"] > 0.5
    # noise-free view of the clip: tiny multiplier, so output == clipped update
    out = run(delta, [{"filter": "gaussian_noise", "noise_multiplier": 1e-12, "clip_norm": 0.5}])
    assert float(torch.linalg.vector_norm(flat(out.delta).double())) <= 0.5
    direction = flat(delta) / torch.linalg.vector_norm(flat(delta))
    torch.testing.assert_close(flat(out.delta), direction * 0.5, atol=1e-6, rtol=1e-5)


def test_small_update_is_not_scaled():
    delta = {"w": torch.tensor([0.1, -0.2])}
    out = run(delta, [{"filter": "gaussian_noise", "noise_multiplier": 1e-12, "clip_norm": 10}])
    torch.testing.assert_close(out.delta["w"], delta["w"])


# --- noise statistics ----------------------------------------------------------------------


def test_gaussian_noise_scale():
    delta = {"w": torch.zeros(1_000_000)}
    out = run(delta, [{"filter": "gaussian_noise", "noise_multiplier": 1.3, "clip_norm": 0.7}])
    noise = out.delta["w"].double()
    assert float(noise.std()) == pytest.approx(1.3 * 0.7, rel=0.05)
    assert abs(float(noise.mean())) < 0.01


def test_laplace_noise_scale():
    delta = {"w": torch.zeros(1_000_000)}
    out = run(delta, [{"filter": "laplace_noise", "epsilon": 0.5, "sensitivity": 2.0}])
    noise = out.delta["w"].double()
    b = 2.0 / 0.5
    assert float(noise.abs().mean()) == pytest.approx(b, rel=0.05)
    assert float(noise.std()) == pytest.approx(math.sqrt(2) * b, rel=0.05)
    assert abs(float(noise.mean())) < 0.05
    assert torch.isfinite(noise).all()


@pytest.mark.parametrize("n", [1, 2, 3, 1_000_001])
def test_gaussian_sampler_moments_and_tails(n):
    out = gaussian_noise_(torch.empty(n), 2.5, gen(30))
    assert bool(torch.isfinite(out).all())
    if n < 1000:
        return
    z = out.double() / 2.5
    assert abs(float(z.mean())) < 0.006  # 6 standard errors
    assert float(z.std()) == pytest.approx(1.0, rel=0.005)
    assert float((z**4).mean()) == pytest.approx(3.0, rel=0.03)  # kurtosis of a normal
    assert float((z**3).mean()) == pytest.approx(0.0, abs=0.02)
    # wide radius uniforms: |z| <= 37.7 (tests/fl/test_noise_tails.py); P(|z| > 4) = 6.3e-5
    assert float(z.abs().max()) <= 37.7
    assert 20 < int((z.abs() > 4).sum()) < 110
    # both halves of each Box-Muller pair are normal (cos half, sin half)
    for half in (z[: n // 2], z[n // 2 :]):
        assert float(half.std()) == pytest.approx(1.0, rel=0.01)


def test_laplace_sampler_moments_and_symmetry():
    b = 0.8
    x = laplace_noise_(torch.empty(1_000_001), b, gen(31)).double()
    assert bool(torch.isfinite(x).all())
    assert float(x.abs().mean()) == pytest.approx(b, rel=0.01)
    assert float(x.std()) == pytest.approx(math.sqrt(2) * b, rel=0.01)
    assert abs(float((x > 0).double().mean()) - 0.5) < 0.003
    assert abs(float(x.mean())) < 0.01
    # P(|x| > 3b) = e^-3
    assert float((x.abs() > 3 * b).double().mean()) == pytest.approx(math.exp(-3), rel=0.03)
    assert float(x.abs().max()) <= 743.1 * b  # wide uniforms (tests/fl/test_noise_tails.py)


def test_uniform_keys_range_and_mean():
    u = uniform_keys_(torch.empty(500_001), gen(32)).double()
    assert float(u.min()) > 0.0 and float(u.max()) <= 1.0
    assert float(u.mean()) == pytest.approx(0.5, abs=0.003)
    assert float(u.var()) == pytest.approx(1 / 12, rel=0.01)


def test_noise_depends_only_on_the_generator():
    a = gaussian_noise_(torch.empty(700_001), 1.0, gen(33))
    b = gaussian_noise_(torch.empty(700_001), 1.0, gen(33))
    c = gaussian_noise_(torch.empty(700_001), 1.0, gen(34))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a shorter draw is a prefix of a longer one: chunks depend on position, not on threads
    d = gaussian_noise_(torch.empty(300_000), 1.0, gen(33))
    assert torch.equal(d[:NOISE_CHUNK], a[:NOISE_CHUNK])


def test_noise_only_on_shared_coordinates():
    delta = update(11)
    out = run(
        delta,
        [
            {"filter": "partial_sharing", "fraction": 0.2, "strategy": "topk"},
            {"filter": "gaussian_noise", "noise_multiplier": 1.0, "clip_norm": 1.0},
            {"filter": "laplace_noise", "epsilon": 1.0, "sensitivity": 1.0},
        ],
    )
    mask = flat(out.mask, list(delta))
    values = flat(out.delta, list(delta))
    assert torch.count_nonzero(values[~mask]) == 0
    assert torch.count_nonzero(values[mask]) == int(mask.sum())


def test_noise_is_reproducible_and_generator_dependent():
    delta = {"w": torch.zeros(3_000_000)}  # several noise chunks
    spec = [{"filter": "gaussian_noise", "noise_multiplier": 1.0, "clip_norm": 1.0}]
    a, b, c = run(delta, spec, 5), run(delta, spec, 5), run(delta, spec, 6)
    assert torch.equal(a.delta["w"], b.delta["w"])
    assert not torch.equal(a.delta["w"], c.delta["w"])


def test_workspace_reuse_gives_same_result():
    delta = update(12)
    spec = [
        {"filter": "partial_sharing", "fraction": 0.4, "strategy": "topk"},
        {"filter": "percentile_clipping", "percentile": 90},
        {"filter": "gaussian_noise", "noise_multiplier": 1.0, "clip_norm": 1.0},
    ]
    ws = Workspace()
    first = {k: v.clone() for k, v in run(delta, spec, 3, workspace=ws).delta.items()}
    second = run(delta, spec, 3, workspace=ws)
    fresh = run(delta, spec, 3)
    for k in delta:
        assert torch.equal(first[k], second.delta[k])
        assert torch.equal(first[k], fresh.delta[k])


# --- SVT -----------------------------------------------------------------------------------


def svt(fraction=0.1, epsilon=1e4, threshold=0.5, max_passes=1):
    return {
        "filter": "svt",
        "epsilon": epsilon,
        "threshold": threshold,
        "fraction": fraction,
        "max_passes": max_passes,
    }


def test_svt_selected_fraction_and_clip():
    delta = update(13)
    n = sum(v.numel() for v in delta.values())
    out = run(delta, [svt(fraction=0.1, max_passes=3)])
    mask = flat(out.mask, list(delta))
    note = out.notes["steps"][0]
    assert int(mask.sum()) == note["selected"] <= round(0.1 * n)
    assert out.shared_fraction <= 0.1 + 1e-12
    values = flat(out.delta, list(delta))
    assert float(values.abs().max()) <= svt_gamma(0.5)
    assert torch.count_nonzero(values[~mask]) == 0
    assert note["gamma"] == 1.0


def test_svt_passes_charged_equal_passes_used():
    delta = update(14)
    # A threshold no value reaches and little noise: passes end without filling the quota.
    out = run(delta, [svt(fraction=0.5, epsilon=1e6, threshold=100.0, max_passes=4)])
    note = out.notes["steps"][0]
    assert note["passes"] == 4 and len(note["per_pass"]) == 4
    assert out.events == [
        {"mechanism": "pure_epsilon", "params": {"epsilon": 4e6}, "count": 1, "source": "svt"}
    ]
    # an easy threshold fills the quota in the first pass: one pass charged of three allowed
    out = run(delta, [svt(fraction=0.1, epsilon=2.0, threshold=0.0001, max_passes=3)])
    note = out.notes["steps"][0]
    assert note["passes"] == len(note["per_pass"])
    assert out.events[0]["params"]["epsilon"] == 2.0 * note["passes"]


def test_svt_no_coordinate_selected_twice():
    delta = update(15)
    n = sum(v.numel() for v in delta.values())
    out = run(delta, [svt(fraction=0.3, epsilon=50.0, threshold=0.8, max_passes=10)])
    note = out.notes["steps"][0]
    mask = flat(out.mask, list(delta))
    # per-pass selections are disjoint: their sum is the size of the selected set
    assert sum(note["per_pass"]) == int(mask.sum()) == note["selected"] <= round(0.3 * n)


def test_svt_prefers_large_values():
    g = gen(16)
    delta = {"w": torch.randn(4000, generator=g) * 0.5}
    big = delta["w"].abs()
    # about 7% of |values| exceed 0.9; query noise scale 8 c gamma / eps ~ 0.03
    out = run(delta, [svt(fraction=0.05, epsilon=1e5, threshold=0.9, max_passes=1)])
    mask = out.mask["w"]
    assert int(mask.sum()) == 200
    assert float((big[mask] > 0.85).float().mean()) > 0.95
    assert float((big > 0.85).float().mean()) < 0.1
    assert float(big[mask].mean()) > 2 * float(big[~mask].mean())
    # and with a tiny budget the selection is close to uniform (noise dominates)
    out = run(delta, [svt(fraction=0.05, epsilon=0.1, threshold=0.9, max_passes=1)])
    mask = out.mask["w"]
    ratio = float(big[mask].mean()) / float(big[~mask].mean())
    assert 0.7 < ratio < 1.4


def test_svt_threshold_zero_is_refused_by_the_engine():
    """Threshold 0 once gave bound 0: an all-zero update whose mask said "shared", ε charged."""
    spec = {"filter": "svt", "epsilon": 1.0, "threshold": 0, "fraction": 0.5}
    with pytest.raises(ValueError, match=r"svt\.threshold: must be a number greater than 0"):
        run(update(), [spec])
    # and the filter itself, for a caller that skips validate_filter
    st_spec = {**spec, "max_passes": 1, "selection_share": 0.5, "threshold_share": 0.5}
    with pytest.raises(ValueError, match=r"svt\.threshold"):
        filters._FILTERS["svt"](_state(update()), {**st_spec, "bound": None}, {})


def _state(delta):
    values = flat(delta).clone()
    return PipelineState(values, Workspace(), gen(0))


def test_svt_budget_split_adds_up_and_defaults_are_the_old_split():
    assert svt_budget(1.0, 0.5, 0.5) == (0.25, 0.25, 0.5)
    for eps, s, t in [(0.3, 0.2, 0.9), (7.0, 0.9, 0.1), (1e-3, 0.5, 0.25)]:
        e1, e2, e3 = svt_budget(eps, s, t)
        assert e1 + e2 + e3 == pytest.approx(eps, rel=1e-12)
        assert e1 == pytest.approx(eps * s * t) and e3 == pytest.approx(eps * (1 - s))


def test_svt_default_split_and_bound_give_the_same_draws_as_written_out():
    delta = update(21)
    plain = run(delta, [svt(fraction=0.2, epsilon=3.0, threshold=0.4, max_passes=3)])
    spelled = {"selection_share": 0.5, "threshold_share": 0.5, "bound": 0.8}
    written = run(
        delta, [{**svt(fraction=0.2, epsilon=3.0, threshold=0.4, max_passes=3), **spelled}]
    )
    for k in plain.delta:
        assert torch.equal(plain.delta[k], written.delta[k])
    assert plain.notes["steps"][0]["epsilon_split"] == [0.75, 0.75, 1.5]


def _release_noise(selection_share, seed=1, n=200_000):
    """The released values of a zero update at a share of 100% in one pass: the release noise
    ``Lap(c * bound / eps3)``, clipped to ``[-bound, bound]``. With ``c = n`` and
    ``eps = 20 n`` the release scale is ``bound / 10 / (1 - selection_share) * 0.5``."""
    delta = {"w": torch.zeros(n)}
    spec = {
        **svt(fraction=1.0, epsilon=20.0 * n, threshold=1e-9, max_passes=1),
        "selection_share": selection_share,
        "bound": 1.0,
    }
    out = run(delta, [spec], seed=seed)
    return out, out.delta["w"][out.mask["w"]].double()


def test_svt_release_noise_follows_the_split():
    out, default_release = _release_noise(0.5)
    _, small_release = _release_noise(0.9)
    note = out.notes["steps"][0]
    n = note["target"]
    assert note["epsilon_split"] == [5.0 * n, 5.0 * n, 10.0 * n]
    # the query noise Lap(2 n / eps2) = Lap(0.4) passes about half of the zeros
    assert 0.45 * n < int(out.mask["w"].sum()) < 0.55 * n
    for values, scale in ((default_release, 0.1), (small_release, 0.5)):
        # mean |Lap(b)| clipped at 1 is b (1 - e^(-1/b)); its std over the ~1e5 draws is < 0.3%
        expected = scale * (1 - math.exp(-1 / scale))
        assert float(values.abs().mean()) == pytest.approx(expected, rel=0.02)
        assert abs(float(values.mean())) < 0.01
    # a larger release share, smaller noise, with the same generator
    assert float(default_release.abs().mean()) < float(small_release.abs().mean()) / 3


def test_svt_query_and_threshold_noise_follow_the_split(monkeypatch):
    """The noise scales the filter asks the samplers for, pass by pass."""
    scalar_scales, array_scales = [], []
    real_scalar, real_array = filters.laplace_scalar, filters.laplace_noise_

    def scalar(scale, generator):
        scalar_scales.append(scale)
        return real_scalar(scale, generator)

    def array(out, scale, generator):
        array_scales.append(scale)
        return real_array(out, scale, generator)

    monkeypatch.setattr(filters, "laplace_scalar", scalar)
    monkeypatch.setattr(filters, "laplace_noise_", array)
    delta = {"w": torch.linspace(-1, 1, 1000)}
    spec = {
        **svt(fraction=0.1, epsilon=2.0, threshold=0.5, max_passes=1),
        "selection_share": 0.8,
        "threshold_share": 0.25,
        "bound": 0.75,
    }
    out = run(delta, [spec])
    c = 100
    e1, e2, e3 = 2.0 * 0.8 * 0.25, 2.0 * 0.8 * 0.75, 2.0 * 0.2
    assert scalar_scales == [pytest.approx(0.75 / e1)]
    assert array_scales[0] == pytest.approx(2 * c * 0.75 / e2)
    if out.notes["steps"][0]["selected"]:
        assert array_scales[-1] == pytest.approx(c * 0.75 / e3)
    assert out.notes["steps"][0]["gamma"] == 0.75
    assert float(out.delta["w"].abs().max()) <= 0.75
    assert out.events[0]["params"] == {"epsilon": 2.0}  # the split never changes the charge


def test_svt_stops_when_the_selection_is_complete():
    """At a share of 100% passes run until every coordinate is selected, and no further:
    with little noise one pass selects all of them, and one pass of ten is charged."""
    delta = {"w": torch.linspace(0.5, 1.0, 500)}
    out = run(delta, [svt(fraction=1.0, epsilon=1e9, threshold=0.1, max_passes=10)])
    note = out.notes["steps"][0]
    assert note["passes"] == 1 and note["per_pass"] == [500]
    assert out.shared_fraction == 1.0
    assert out.events[0]["params"]["epsilon"] == 1e9
    # With real noise each pass takes a part of what is left (more as c, and with it the query
    # noise, shrinks): here the selection completes in a few passes of ten (four with these
    # draws), and stops there.
    out = run(delta, [svt(fraction=1.0, epsilon=1e3, threshold=0.1, max_passes=10)], seed=3)
    note = out.notes["steps"][0]
    assert note["selected"] == sum(note["per_pass"]) == 500
    assert 2 <= note["passes"] == len(note["per_pass"]) < 10
    assert out.events[0]["params"]["epsilon"] == 1e3 * note["passes"]


def test_svt_with_nothing_shared_runs_no_pass():
    delta = update(22)
    out = run(
        delta,
        [
            {"filter": "exclude_layers", "layers": ["conv", "fc"]},
            svt(fraction=1.0, epsilon=1.0, threshold=0.1, max_passes=5),
        ],
    )
    assert out.notes["steps"][1]["passes"] == 0
    assert out.events[0]["params"]["epsilon"] == 0.0


def test_svt_reported_within_projection():
    delta = update(17)
    for passes in (1, 3, 10):
        spec = [svt(fraction=0.2, epsilon=0.5, threshold=0.3, max_passes=passes)]
        out = run(delta, spec)
        projected = events_for_pipeline(
            spec, rounds=1, local_epochs=1, batch_size=8, num_records=100
        )
        reported = [PrivacyEvent.from_json(e) for e in out.events]
        assert len(reported) == len(projected) == 1
        assert reported[0].mechanism == projected[0].mechanism
        assert reported[0].params["epsilon"] <= projected[0].params["epsilon"]


# --- events against the accountant ---------------------------------------------------------


@pytest.mark.parametrize(
    "pipeline",
    [
        [],
        [{"filter": "laplace_noise", "epsilon": 0.7, "sensitivity": 1}],
        [{"filter": "gaussian_noise", "noise_multiplier": 1.1, "clip_norm": 2}],
        [
            {"filter": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0},
            {"filter": "exclude_layers", "layers": ["conv.bias"]},
            {"filter": "partial_sharing", "fraction": 0.4, "strategy": "topk"},
            {"filter": "percentile_clipping", "percentile": 95},
            {"filter": "gaussian_noise", "noise_multiplier": 0.8, "clip_norm": 1.0},
            {"filter": "laplace_noise", "epsilon": 2, "sensitivity": 0.5},
        ],
    ],
)
def test_events_equal_one_round_projection(pipeline):
    out = run(update(18), pipeline)
    projected = [
        e
        for e in events_for_pipeline(
            pipeline, rounds=1, local_epochs=1, batch_size=8, num_records=100
        )
        if e.source != "dp_sgd"  # spent during local training, reported by local.py
    ]
    assert [PrivacyEvent.from_json(e) for e in out.events] == projected
    assert all(e["count"] == 1 for e in out.events)


def test_events_projection_equals_sum_of_rounds():
    pipeline = [
        {"filter": "gaussian_noise", "noise_multiplier": 1.1, "clip_norm": 2},
        {"filter": "laplace_noise", "epsilon": 0.3, "sensitivity": 1},
    ]
    rounds = 4
    reported = []
    for r in range(rounds):
        reported += run(update(r), pipeline, seed=r).events
    projected = events_for_pipeline(
        pipeline, rounds=rounds, local_epochs=1, batch_size=8, num_records=100
    )
    for event in projected:
        same = [e for e in reported if e["source"] == event.source]
        assert sum(e["count"] for e in same) == event.count
        assert all(PrivacyEvent.from_json(e).params == event.params for e in same)
