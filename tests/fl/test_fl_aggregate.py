"""Streaming, mask-aware FedAvg and the cyclic order (training.fl.aggregate)."""

import pytest
import torch

from training.fl.aggregate import (
    StreamingFedAvg,
    apply_update,
    cyclic_order,
    fedavg,
)
from training.fl.kernels import CHUNK

SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (10, 36), "fc.bias": (10,)}


def _updates(sites, seed, masked=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sites):
        delta = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
        mask = {k: torch.rand(s, generator=g) < 0.5 for k, s in SHAPES.items()} if masked else None
        weight = float(torch.randint(1, 1000, (1,), generator=g))
        out.append((delta, mask, weight))
    return out


@pytest.mark.parametrize("sites", [3, 10, 50])
def test_streaming_equals_naive_weighted_mean(sites):
    updates = _updates(sites, seed=sites)
    template = updates[0][0]
    agg = StreamingFedAvg(template)
    for delta, mask, weight in updates:
        agg.add(delta, mask, weight)
    got = agg.result()
    total = sum(w for _, _, w in updates)
    for name in SHAPES:
        naive = sum(w * d[name].double() for d, _, w in updates) / total
        torch.testing.assert_close(got[name].double(), naive, atol=1e-6, rtol=0)
    assert fedavg(updates).keys() == got.keys()


@pytest.mark.parametrize("sites", [3, 10, 50])
def test_masked_equals_naive_masked_mean(sites):
    updates = _updates(sites, seed=100 + sites, masked=True)
    got = fedavg(updates)
    for name in SHAPES:
        num = sum(w * d[name].double() * m[name] for d, m, w in updates)
        den = sum(w * m[name].double() for d, m, w in updates)
        naive = torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)
        torch.testing.assert_close(got[name].double(), naive, atol=1e-6, rtol=0)


def test_mask_aware_single_and_no_sharer():
    template = {"w": torch.zeros(4)}
    a = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    b = {"w": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    mask_a = {"w": torch.tensor([True, True, False, False])}
    mask_b = {"w": torch.tensor([True, False, False, False])}
    agg = StreamingFedAvg(template)
    agg.add(a, mask_a, 1.0)
    agg.add(b, mask_b, 3.0)
    result = agg.result()["w"]
    # coordinate 0: both (weighted); 1: only a; 2, 3: nobody -> 0, not a's or b's value
    assert result.tolist() == pytest.approx([(1 + 30) / 4, 2.0, 0.0, 0.0])


def test_unmasked_and_masked_sites_mix():
    template = {"w": torch.zeros(3)}
    agg = StreamingFedAvg(template)
    agg.add({"w": torch.tensor([1.0, 1.0, 1.0])}, None, 2.0)
    agg.add({"w": torch.tensor([4.0, 4.0, 4.0])}, {"w": torch.tensor([True, False, True])}, 1.0)
    assert agg.result()["w"].tolist() == pytest.approx([2.0, 1.0, 2.0])


def test_excluded_tensor_not_shared_by_anyone_stays_zero():
    template = {"a": torch.zeros(2), "b": torch.zeros(2)}
    out = fedavg(
        [({"a": torch.ones(2)}, None, 1.0), ({"a": 3 * torch.ones(2)}, None, 1.0)],
        template=template,
    )
    assert out["a"].tolist() == [2.0, 2.0]
    assert out["b"].tolist() == [0.0, 0.0]


def test_buffers_independent_of_site_count_and_reset():
    template = {"w": torch.zeros(1000)}
    agg = StreamingFedAvg(template)
    ids = {id(t) for t in agg._sum.values()}
    for delta, _, weight in _updates(1, seed=1) * 0 + [({"w": torch.randn(1000)}, None, 1.0)] * 20:
        agg.add(delta, None, weight)
    assert {id(t) for t in agg._sum.values()} == ids
    assert agg.sites == 20
    agg.reset()
    assert agg.sites == 0 and float(agg._sum["w"].abs().sum()) == 0.0


def test_float64_accumulator_matches():
    updates = _updates(10, seed=5, masked=True)
    a = fedavg(updates)
    agg = StreamingFedAvg(updates[0][0], dtype=torch.float64)
    for u in updates:
        agg.add(*u)
    for name, value in agg.result().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, a[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_add_across_chunks_equals_naive(dtype):
    # A tensor spanning several kernel CHUNKs (and a ragged last one), masks as sent on the
    # wire (bool), as uint8 and as float, one non-contiguous: the chunked add must not depend on
    # where the chunks fall or on how the mask is stored.
    shape = (5, CHUNK // 2 + 3)
    g = torch.Generator().manual_seed(42)
    updates = []
    for i, kind in enumerate(["bool", "uint8", "float", "transposed", None]):
        delta = {"w": torch.randn(shape, generator=g), "b": torch.randn(7, generator=g)}
        keep = torch.rand(shape, generator=g) < 0.4
        if kind == "uint8":
            keep = keep.to(torch.uint8)
        elif kind == "float":
            keep = keep.float()
        elif kind == "transposed":
            keep = (torch.rand(shape[::-1], generator=g) < 0.4).t()
        mask = None if kind is None else {"w": keep}
        updates.append((delta, mask, float(i + 1)))
    agg = StreamingFedAvg(updates[0][0], dtype=dtype)
    for u in updates:
        agg.add(*u)
    got = agg.result()
    for name in ("w", "b"):
        num = sum(
            w * d[name].double() * (m[name].double() if m and name in m else 1.0)
            for d, m, w in updates
        )
        den = sum(
            w * (m[name].double() if m and name in m else torch.ones(d[name].shape).double())
            for d, m, w in updates
        )
        naive = torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)
        torch.testing.assert_close(got[name].double(), naive, atol=1e-6, rtol=0)
    # the masked coordinates of the first site's mask really were left out: a coordinate only the
    # unmasked last site shared keeps its value exactly
    alone = ~(
        updates[0][1]["w"]
        | updates[1][1]["w"].bool()
        | updates[2][1]["w"].bool()
        | updates[3][1]["w"]
    )
    torch.testing.assert_close(got["w"][alone], updates[4][0]["w"][alone])


@pytest.mark.parametrize(
    ("delta", "mask", "weight", "message"),
    [
        ({"w": torch.zeros(3)}, None, 0.0, "positive"),
        ({"w": torch.zeros(3)}, None, float("nan"), "positive"),
        ({"w": torch.zeros(3)}, None, True, "number"),
        ({"x": torch.zeros(3)}, None, 1.0, "does not"),
        ({"w": torch.zeros(4)}, None, 1.0, "shape"),
        ({"w": torch.zeros(3)}, {"w": torch.ones(4, dtype=torch.bool)}, 1.0, "shape"),
        ({"w": torch.zeros(3)}, {"v": torch.ones(3, dtype=torch.bool)}, 1.0, "not in the update"),
    ],
)
def test_add_validates(delta, mask, weight, message):
    agg = StreamingFedAvg({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match=message):
        agg.add(delta, mask, weight)
    assert agg.sites == 0


def test_apply_update():
    state = {"w": torch.ones(2), "steps": torch.tensor(5), "b": torch.zeros(1)}
    new = apply_update(state, {"w": torch.tensor([0.5, -1.0])})
    assert new["w"].tolist() == [1.5, 0.0]
    assert new["steps"].item() == 5 and new["b"].tolist() == [0.0]
    assert state["w"].tolist() == [1.0, 1.0]  # not modified
    with pytest.raises(ValueError, match="does not have"):
        apply_update(state, {"nope": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        apply_update(state, {"w": torch.ones(3)})


def test_cyclic_order_rotates():
    sites = ["c-site", "a-site", "b-site"]
    assert cyclic_order(sites, 0) == ["a-site", "b-site", "c-site"]
    assert cyclic_order(sites, 1) == ["b-site", "c-site", "a-site"]
    assert cyclic_order(sites, 2) == ["c-site", "a-site", "b-site"]
    assert cyclic_order(sites, 3) == cyclic_order(sites, 0)
    firsts = {cyclic_order(sites, r)[0] for r in range(3)}
    assert firsts == set(sites)
    for bad in ([], ["a", "a"]):
        with pytest.raises(ValueError):
            cyclic_order(bad, 0)
    with pytest.raises(ValueError):
        cyclic_order(sites, -1)
