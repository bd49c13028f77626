"""The sampled Gaussian's RDP at fractional orders (training.jobs.rdp_fractional), against a
numerical integration of its definition: ``A_α = E_{x ~ N(0, z²)}[(μ(x) / μ0(x))^α]`` with
``μ = (1 − q) N(0, z²) + q N(1, z²)`` (Mironov, Talwar and Zhang 2019), an independent route to
the same number; plus the accountant's versions around it."""

from __future__ import annotations

import math

import pytest
from scipy import integrate, stats

from training.jobs.accounting import PrivacyEvent, accountant_version, epsilon_spent
from training.jobs.rdp_fractional import rdp_sampled_gaussian


def integrated_rdp(q: float, z: float, alpha: float) -> float:
    def integrand(x: float) -> float:
        ratio = (1 - q) + q * math.exp((2 * x - 1) / (2 * z * z))
        return stats.norm.pdf(x, scale=z) * ratio**alpha

    value, _error = integrate.quad(
        integrand, -40 * z, 40 * z + 1, limit=400, epsabs=0, epsrel=1e-11
    )
    return math.log(value) / (alpha - 1)


@pytest.mark.parametrize(
    ("q", "z", "alpha"),
    [
        (0.2, 0.7, 1.1),  # where dp-accounting 0.6 gives up (inf)
        (0.2, 0.7, 1.5),
        (0.5, 0.6, 1.3),
        (0.056, 0.8, 2.7),
        (0.01, 1.1, 7.5),
        (0.001, 2.5, 10.9),
        (0.9, 1.0, 1.9),
    ],
)
def test_the_series_matches_the_integral_and_never_undercuts_it(q, z, alpha):
    series = rdp_sampled_gaussian(q, z, alpha)
    integral = integrated_rdp(q, z, alpha)
    assert series == pytest.approx(integral, rel=1e-7)
    assert series >= integral * (1 - 1e-9)  # the remainder's bound keeps it on the safe side


def test_bad_arguments_are_refused_in_words():
    with pytest.raises(ValueError, match="whole number"):
        rdp_sampled_gaussian(0.1, 1.0, 3.0)
    with pytest.raises(ValueError, match="0 < q < 1"):
        rdp_sampled_gaussian(1.0, 1.0, 1.5)
    with pytest.raises(ValueError, match="z > 0"):
        rdp_sampled_gaussian(0.1, 0.0, 1.5)


def test_the_current_accountant_never_charges_more_than_the_first():
    """Version 2 keeps, per order, the smaller of two upper bounds of the same RDP: for any
    history its ε is at most version 1's, and equal where no fractional order is involved."""
    histories = [
        [PrivacyEvent("sampled_gaussian", {"noise_multiplier": z, "sample_rate": q, "steps": n})]
        for z, q, n in ((0.7, 0.2, 500), (1.1, 0.01, 1000), (2.5, 0.1, 50), (0.9, 0.05, 3000))
    ]
    plain = [PrivacyEvent("gaussian", {"noise_multiplier": 1.1}, 10)]
    for history in [*histories, plain]:
        now = epsilon_spent(history, delta=1e-5)
        with accountant_version(1):
            before = epsilon_spent(history, delta=1e-5)
        assert now <= before * (1 + 1e-12), (history, now, before)
    now = epsilon_spent(plain, delta=1e-5)
    with accountant_version(1):
        assert epsilon_spent(plain, delta=1e-5) == now
