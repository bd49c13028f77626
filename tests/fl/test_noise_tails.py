"""The noise samplers' tails (issue 15): wide uniforms, a statistical test of the tails, and the
δ the accountant charges for what is still cut (see the docstring of training.fl.noise)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from training.fl import kernels, noise
from training.fl.local import add_gaussian_noise
from training.fl.noise import (
    GAUSSIAN_SMALLEST_U,
    LAPLACE_SMALLEST_U,
    NOISE_CHUNK,
    TAIL_MASS,
    gaussian_max_draw,
    gaussian_noise_,
    laplace_max_draw,
    laplace_noise_,
    laplace_scalar,
    wide_uniform,
)
from training.jobs import accounting
from training.jobs.accounting import PrivacyEvent, epsilon_spent, sampler_delta

OLD_GAUSSIAN_MAX = math.sqrt(2 * 24 * math.log(2))  # 24-bit uniforms: 5.77 σ
OLD_LAPLACE_MAX = 24 * math.log(2)  # 16.6 b


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _zero_extra(_j, count):
    return [0] * count


def _q(x):
    """Standard normal upper tail."""
    return 0.5 * math.erfc(x / math.sqrt(2))


def _within_binomial(count, n, p, z=5.0):
    """``count`` within ``z`` standard deviations (plus one for the discreteness) of ``n p``."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


# --- the transforms at the smallest uniform -------------------------------------------------


def test_smallest_uniforms_and_largest_draws():
    assert wide_uniform([0] * 16, 64, 16) == GAUSSIAN_SMALLEST_U == 2.0**-1025
    assert wide_uniform([0] * 17, 63, 17) == LAPLACE_SMALLEST_U == 2.0**-1072
    assert gaussian_max_draw() == pytest.approx(37.6955, abs=1e-4)
    assert laplace_max_draw() == pytest.approx(743.054, abs=1e-3)
    # an extension block: u = (w + 0.5) 2**-(64 (k + 1)) at the first nonzero block
    assert wide_uniform([0, 0, 5], 64, 16) == (5.5) * 2.0**-192
    assert wide_uniform([7], 64, 16) == 7.5 * 2.0**-64
    with pytest.raises(ValueError):
        wide_uniform([0, 0], 64, 16)


def test_gaussian_transform_at_the_smallest_uniform_is_beyond_30_sigma():
    # All-zero keystream words: every radius uniform needs the extension, which is all zeros too.
    h, std = 3, 2.0
    words = np.zeros(3 * h, dtype=np.uint32)
    radius, angle = np.empty(h, dtype=np.float32), np.empty(h, dtype=np.float32)
    zeros = kernels.box_muller_wide_uniforms(words, radius, angle)
    assert zeros == h
    noise._wide_logs(radius, zeros, _zero_extra, 64, 16)
    assert (radius == np.float32(math.log(GAUSSIAN_SMALLEST_U))).all()
    kernels.box_muller_radius(radius, std)
    assert (radius / std > 30).all() and OLD_GAUSSIAN_MAX < 5.8
    assert float(radius[0]) == pytest.approx(std * gaussian_max_draw(), rel=1e-6)
    # the smallest one-block uniform, 1.5 * 2**-64, is exact enough in float32: 9.4 std
    words[:] = 0
    words[1] = 1
    assert kernels.box_muller_wide_uniforms(words, radius, angle) == h - 1
    assert radius[0] == np.float32(1.5 * 2.0**-64)
    # the largest word gives the smallest radius: 0, not a NaN
    words[:] = 0xFFFFFFFF
    assert kernels.box_muller_wide_uniforms(words, radius, angle) == 0
    noise._wide_logs(radius, 0, _zero_extra, 64, 16)
    kernels.box_muller_radius(radius, std)
    assert (radius == 0).all()


def test_laplace_transform_at_the_smallest_uniform_is_beyond_700_scales():
    m, scale = 4, 0.5
    words = np.zeros(2 * m, dtype=np.uint32)
    words[0::4] = 0x80000000  # sign bits only: the 63-bit blocks are still 0
    out = np.empty(m, dtype=np.float32)
    zeros = kernels.laplace_wide_uniforms(words, out)
    assert zeros == m
    noise._wide_logs(out, zeros, _zero_extra, 63, 17)
    kernels.laplace_magnitudes(words, out, scale, out)
    assert np.abs(out).min() / scale > 700 > OLD_LAPLACE_MAX
    assert float(np.abs(out).max()) == pytest.approx(scale * laplace_max_draw(), rel=1e-6)
    assert (out[0::2] < 0).all() and (out[1::2] > 0).all()


def test_the_extension_uses_fresh_words_at_its_position():
    u = np.array([0.5, 0.0, 0.25, 0.0], dtype=np.float32)
    asked = []

    def extra(j, count):
        asked.append((j, count))
        return [0, 9 << 1] + [0] * (count - 2)

    noise._wide_logs(u, 2, extra, 63, 17)
    assert asked == [(1, 16), (3, 16)]
    expected = np.float32(math.log(wide_uniform([0, 0, 9 << 1], 63, 17)))
    assert u[1] == u[3] == expected and u[0] == np.float32(math.log(0.5))


def test_laplace_scalar_is_wide_and_deterministic(monkeypatch):
    assert laplace_scalar(2.0, gen(5)) == laplace_scalar(2.0, gen(5))
    assert laplace_scalar(2.0, gen(5)) != laplace_scalar(2.0, gen(6))
    monkeypatch.setattr(noise, "_aes_blocks", lambda key, counter, count: [1 << 63] + [0] * 16)
    assert laplace_scalar(2.0, gen(5)) == pytest.approx(-2.0 * laplace_max_draw())


# --- the tails, statistically -----------------------------------------------------------------


def test_gaussian_tails_on_ten_million_draws():
    n, std = 10_000_000, 1.5
    z = gaussian_noise_(torch.empty(n), std, gen(40)).numpy().astype(np.float64) / std
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert z.var() == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    a = np.abs(z)
    for t in (3.0, 4.0, 5.0):
        assert _within_binomial(int((a > t).sum()), n, 2 * _q(t)), t
    # both halves of the Box-Muller pairs (cos, sin) are normal
    for half in (z[: n // 2], z[n // 2 :]):
        assert half.var() == pytest.approx(1.0, abs=5 * math.sqrt(4 / n))


def test_laplace_tails_on_ten_million_draws():
    n, b = 10_000_000, 0.7
    x = laplace_noise_(torch.empty(n), b, gen(41)).numpy().astype(np.float64) / b
    assert abs(x.mean()) < 5 * math.sqrt(2 / n)
    assert x.var() == pytest.approx(2.0, abs=5 * math.sqrt(20 / n))  # Var of X**2 is 20
    assert _within_binomial(int((x > 0).sum()), n, 0.5)
    a = np.abs(x)
    for t in (4.0, 8.0, 12.0):
        assert _within_binomial(int((a > t).sum()), n, math.exp(-t)), t


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [gaussian_noise_, laplace_noise_])
def test_draws_depend_only_on_the_generator_and_position(sampler, monkeypatch):
    n = 2 * NOISE_CHUNK + 3
    a = sampler(torch.empty(n), 1.0, gen(7))
    assert torch.equal(a, sampler(torch.empty(n), 1.0, gen(7)))
    assert not torch.equal(a, sampler(torch.empty(n), 1.0, gen(8)))
    # another thread count: the same draws
    monkeypatch.setattr(kernels, "_pool", ThreadPoolExecutor(max_workers=5))
    assert torch.equal(a, sampler(torch.empty(n), 1.0, gen(7)))
    # a shorter draw is a prefix: chunks depend on position only
    assert torch.equal(
        sampler(torch.empty(NOISE_CHUNK + 1), 1.0, gen(7))[:NOISE_CHUNK], a[:NOISE_CHUNK]
    )


def test_dp_sgd_noise_comes_from_the_wide_sampler():
    summed = {"w": torch.zeros(30, 7), "b": torch.full((5,), 2.0, dtype=torch.float64)}
    noisy = add_gaussian_noise(summed, noise_multiplier=1.5, max_grad_norm=0.4, generator=gen(9))
    flat = gaussian_noise_(torch.empty(215), 1.5 * 0.4, gen(9))
    assert torch.equal(noisy["w"], flat[:210].view(30, 7))
    assert noisy["b"].dtype == torch.float64
    assert torch.equal(noisy["b"], 2.0 + flat[210:].double())
    again = add_gaussian_noise(summed, noise_multiplier=1.5, max_grad_norm=0.4, generator=gen(9))
    assert all(torch.equal(noisy[k], again[k]) for k in summed)


# --- the accountant's δ term ----------------------------------------------------------------


def test_accountant_uses_the_samplers_tail_mass():
    assert accounting.SAMPLER_TAIL_MASS == TAIL_MASS == noise.tail_mass()
    assert TAIL_MASS < 1e-300
    # the Gaussian tail beyond the largest draw is below the bound used
    assert 2 * _q(gaussian_max_draw()) <= TAIL_MASS
    assert math.exp(-laplace_max_draw()) <= TAIL_MASS * (1 + 1e-9)


def test_sampler_delta_is_the_total_variation_bound():
    draws = accounting.MAX_DRAWS_PER_APPLICATION
    # moderate ε: (1 + e**ε) d η, directly (no overflow at these values)
    events = [PrivacyEvent("laplace", {"epsilon": 640.0}, 3)]
    expected = 3 * (1 + math.exp(640.0)) * draws * TAIL_MASS
    assert sampler_delta(events, rdp_epsilon=0.0) == pytest.approx(expected, rel=1e-9)
    g = [
        PrivacyEvent("sampled_gaussian", {"noise_multiplier": 1, "sample_rate": 0.1, "steps": 7}, 2)
    ]
    expected = 14 * (1 + math.exp(650.0)) * draws * TAIL_MASS
    assert sampler_delta(g, rdp_epsilon=650.0) == pytest.approx(expected, rel=1e-9)
    # a huge ε is capped at 1, not an overflow
    assert sampler_delta([PrivacyEvent("pure_epsilon", {"epsilon": 4e6})], rdp_epsilon=0) == 1.0


def test_realistic_cut_is_below_the_float_resolution_of_delta():
    events = [
        PrivacyEvent("gaussian", {"noise_multiplier": 0.8}, 200),
        PrivacyEvent("laplace", {"epsilon": 50.0}, 10_000),
        PrivacyEvent(
            "sampled_gaussian", {"noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 10**6}
        ),
    ]
    for delta in (1e-3, 1e-5, 1e-12):
        eps = epsilon_spent(events, delta=delta)
        assert 500_000 < eps < 500_600  # the Laplace events' 500,000 plus the Gaussian part
        cut = sampler_delta(events, rdp_epsilon=eps - 500_000)
        assert cut < 1e-100 and delta + cut == delta
        # so the figure is the accountant's plain one
        pure, gaussian = accounting._split(events)
        assert eps == pure + accounting._rdp_epsilon(tuple(sorted(gaussian.items())), delta)


def test_a_cut_that_shows_is_taken_out_of_delta():
    delta = 1e-5
    big = PrivacyEvent("pure_epsilon", {"epsilon": 655.0})
    gauss = PrivacyEvent("gaussian", {"noise_multiplier": 1.0}, 50)
    cut = sampler_delta([big], rdp_epsilon=0.0)
    assert 1e-12 < cut < delta / 2  # visible at δ's resolution
    key = ((("gaussian", 1.0), 50),)
    plain = 655.0 + accounting._rdp_epsilon(key, delta)
    eps = epsilon_spent([big, gauss], delta=delta)
    upper = accounting._rdp_epsilon(key, delta / 2)
    taken = sampler_delta([big, gauss], rdp_epsilon=upper)
    assert eps == 655.0 + accounting._rdp_epsilon(key, delta - taken)
    assert eps > plain
    # pure alone: the figure stands, at δ' = cut < δ
    assert epsilon_spent([big], delta=delta) == 655.0


def test_no_guarantee_where_the_cut_takes_delta():
    with pytest.raises(ValueError, match="cut tails"):
        epsilon_spent([PrivacyEvent("pure_epsilon", {"epsilon": 4e6})], delta=1e-5)
    with pytest.raises(ValueError, match="cut tails"):
        epsilon_spent([PrivacyEvent("laplace", {"epsilon": 720.0})], delta=1e-5)
