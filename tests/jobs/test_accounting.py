"""The privacy accountant: closed forms, event mapping, JSON, and budget projections.

Plain pytest, no database. The Gaussian checks compare against formulas written out here rather
than against the module's own helpers, so a wrong composition or conversion fails.
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from training.jobs.accounting import (
    RDP_ORDERS,
    BudgetProjection,
    PrivacyEvent,
    accountant_version,
    as_dp_event,
    epsilon_spent,
    events_for_pipeline,
    project_budget,
)

DELTA = 1e-5


def gaussian(z, count=1):
    return PrivacyEvent("gaussian", {"noise_multiplier": z}, count, "gaussian_noise")


def sampled(z, q, steps, count=1):
    params = {"noise_multiplier": z, "sample_rate": q, "steps": steps}
    return PrivacyEvent("sampled_gaussian", params, count, "dp_sgd")


def gaussian_epsilon_closed_form(z, k, delta, orders=RDP_ORDERS):
    """ε(δ) of k Gaussian releases: RDP k·α/(2z²), converted as dp_accounting does.

    The conversion is Balle et al. 2020, Prop. 12: ε = R(α) + log(1 - 1/α) - log(δ·α)/(α - 1),
    minimised over the orders (and never below 0).
    """
    return max(
        0.0,
        min(
            k * a / (2 * z * z) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1) for a in orders
        ),
    )


def gaussian_epsilon_classical(z, k, delta, orders=RDP_ORDERS):
    """The classical RDP conversion (Mironov 2017): min_α k·α/(2z²) + log(1/δ)/(α - 1)."""
    return min(k * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in orders)


# --- pure ε: basic composition ------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 7, 40])
def test_k_laplace_events_cost_exactly_k_epsilon(k):
    events = [PrivacyEvent("laplace", {"epsilon": 0.25}) for _ in range(k)]
    assert epsilon_spent(events, delta=DELTA) == k * 0.25
    # The same history recorded as one event with a count costs the same.
    assert epsilon_spent([PrivacyEvent("laplace", {"epsilon": 0.25}, k)], delta=DELTA) == k * 0.25


def test_pure_epsilon_does_not_depend_on_delta():
    events = [PrivacyEvent("pure_epsilon", {"epsilon": 1.5}, 2)]
    assert epsilon_spent(events, delta=1e-3) == epsilon_spent(events, delta=1e-9) == 3.0


def test_laplace_and_svt_with_passes_add_up():
    pipeline = [
        {"filter": "laplace_noise", "epsilon": 0.5, "sensitivity": 1.0},
        {"filter": "svt", "epsilon": 0.25, "threshold": 0.1, "fraction": 0.1, "max_passes": 3},
    ]
    events = events_for_pipeline(pipeline, rounds=4, local_epochs=1, batch_size=32, num_records=100)
    # 4 rounds x 0.5 (Laplace) + 4 rounds x 3 passes x 0.25 (sparse vector technique)
    assert epsilon_spent(events, delta=DELTA) == 4 * 0.5 + 4 * 3 * 0.25 == 5.0


def test_no_events_cost_nothing():
    assert epsilon_spent([], delta=DELTA) == 0.0
    assert epsilon_spent(iter(()), delta=DELTA) == 0.0


# --- the Gaussian mechanism under RDP ----------------------------------------------------------


@pytest.mark.parametrize("z", [0.7, 1.0, 3.0])
def test_dp_accounting_gaussian_rdp_is_alpha_over_two_z_squared(z):
    orders = [1.5, 2.0, 8.0, 32.0, 256.0]
    accountant = RdpAccountant(orders=orders)
    accountant.compose(dp_accounting.GaussianDpEvent(z))
    for order, rdp in zip(orders, accountant._rdp, strict=True):
        assert rdp == pytest.approx(order / (2 * z * z), rel=1e-12)
    # The accountant's own per-mechanism curve over its fixed orders is the same closed form.
    from training.jobs.accounting import _unit_rdp

    for order, rdp in zip(RDP_ORDERS, _unit_rdp(("gaussian", float(z))), strict=True):
        assert rdp == pytest.approx(order / (2 * z * z), rel=1e-12)


@pytest.mark.parametrize(
    ("z", "k", "delta"),
    [(1.0, 1, 1e-5), (1.1, 10, 1e-5), (2.5, 50, 1e-6), (5.0, 200, 1e-5), (0.8, 3, 1e-3)],
)
def test_gaussian_epsilon_matches_the_closed_form(z, k, delta):
    expected = gaussian_epsilon_closed_form(z, k, delta)
    assert expected > 0
    assert epsilon_spent([gaussian(z, k)], delta=delta) == pytest.approx(expected, rel=1e-9)
    # k separate one-round events are the same history as one event with count k.
    spread = [gaussian(z) for _ in range(k)]
    assert epsilon_spent(spread, delta=delta) == pytest.approx(expected, rel=1e-9)
    # The improved conversion is never worse than the classical one, and here strictly better.
    assert expected < gaussian_epsilon_classical(z, k, delta)


def test_gaussian_epsilon_grows_with_rounds_and_falls_with_noise():
    by_rounds = [epsilon_spent([gaussian(1.2, k)], delta=DELTA) for k in range(1, 60)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:], strict=False))
    by_noise = [epsilon_spent([gaussian(z, 20)], delta=DELTA) for z in (0.6, 0.9, 1.3, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:], strict=False))


def test_rdp_parts_are_composed_not_summed():
    one = epsilon_spent([gaussian(1.0, 10)], delta=DELTA)
    two = epsilon_spent([gaussian(1.0, 10), gaussian(1.0, 10)], delta=DELTA)
    assert two == pytest.approx(gaussian_epsilon_closed_form(1.0, 20, DELTA), rel=1e-9)
    assert one < two < 2 * one


def test_gaussians_with_different_noise_share_one_rdp_curve():
    # RDP adds per order: 10 rounds at z=1 and 30 at z=2 have RDP (10/1 + 30/4)·α/2, which is
    # the RDP of 17.5 rounds at z=1; summing the two ε's would overcharge.
    mixed = epsilon_spent([gaussian(1.0, 10), gaussian(2.0, 30)], delta=DELTA)
    assert mixed == pytest.approx(gaussian_epsilon_closed_form(1.0, 17.5, DELTA), rel=1e-9)
    apart = epsilon_spent([gaussian(1.0, 10)], delta=DELTA) + epsilon_spent(
        [gaussian(2.0, 30)], delta=DELTA
    )
    assert mixed < apart


def test_replay_equals_one_rdp_accountant_over_everything():
    history = [
        gaussian(1.1, 5),
        sampled(1.0, 0.02, 300),
        gaussian(2.0, 3),
        sampled(1.0, 0.02, 200, count=2),
        sampled(1.3, 0.05, 100),
        PrivacyEvent("laplace", {"epsilon": 0.2}, 5),
    ]
    accountant = RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.1), 5),
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.0)),
                    300 + 2 * 200,
                ),
                dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 3),
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.3)),
                    100,
                ),
            ]
        )
    )
    expected = 5 * 0.2 + accountant.get_epsilon(DELTA)
    # Version 1 is dp_accounting's curves exactly.
    with accountant_version(1):
        assert epsilon_spent(history, delta=DELTA) == pytest.approx(expected, rel=1e-12)
    # as_dp_event hands the same Gaussian history to any dp_accounting accountant.
    again = RdpAccountant(orders=list(RDP_ORDERS)).compose(as_dp_event(history))
    assert again.get_epsilon(DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-12)
    # The current version computes the sampled Gaussian's fractional orders exactly, where
    # dp_accounting sums an upper bound: the same history never costs more, and here a little
    # less (the optimum is at a fractional order).
    current = epsilon_spent(history, delta=DELTA)
    assert expected * (1 - 0.01) < current < expected
    # Order of the history does not matter.
    assert epsilon_spent(history[::-1], delta=DELTA) == pytest.approx(current, rel=1e-12)


def test_an_unknown_accountant_version_is_refused():
    with pytest.raises(ValueError, match="unknown accountant version 7"), accountant_version(7):
        pass


def test_zero_noise_is_refused_as_unbounded():
    with pytest.raises(ValueError, match="noise multiplier 0.*unbounded"):
        epsilon_spent([gaussian(0.0)], delta=DELTA)
    with pytest.raises(ValueError, match="noise multiplier 0"):
        epsilon_spent([sampled(0.0, 0.1, 10)], delta=DELTA)


@pytest.mark.parametrize("delta", [0, 1, -1e-5, 1.5, float("nan")])
def test_delta_must_be_a_probability_strictly_inside_0_1(delta):
    with pytest.raises(ValueError, match="delta"):
        epsilon_spent([gaussian(1.0)], delta=delta)


# --- sampled Gaussian (DP-SGD) -----------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 10, 250])
def test_sampled_gaussian_with_rate_one_is_the_plain_gaussian(steps):
    plain = epsilon_spent([gaussian(1.3, steps)], delta=DELTA)
    full = epsilon_spent([sampled(1.3, 1.0, steps)], delta=DELTA)
    assert full == pytest.approx(plain, rel=1e-12)
    assert full == pytest.approx(gaussian_epsilon_closed_form(1.3, steps, DELTA), rel=1e-9)


@pytest.mark.parametrize("q", [0.5, 0.1, 0.01])
def test_subsampling_amplifies_privacy(q):
    plain = epsilon_spent([gaussian(1.3, 100)], delta=DELTA)
    assert epsilon_spent([sampled(1.3, q, 100)], delta=DELTA) < plain


def test_smaller_sample_rate_costs_less():
    costs = [epsilon_spent([sampled(1.1, q, 1000)], delta=DELTA) for q in (0.2, 0.05, 0.01)]
    assert costs[0] > costs[1] > costs[2] > 0


# --- events_for_pipeline -----------------------------------------------------------------------


def test_non_dp_filters_give_no_events():
    pipeline = [
        {"filter": "exclude_layers", "layers": ["head.weight"]},
        {"filter": "partial_sharing", "fraction": 0.1, "strategy": "largest"},
        {"filter": "percentile_clipping", "percentile": 95},
    ]
    events = events_for_pipeline(pipeline, rounds=5, local_epochs=1, batch_size=8, num_records=9)
    assert events == []


def test_each_dp_filter_maps_to_its_event():
    pipeline = [
        {"filter": "percentile_clipping", "percentile": 99},
        {"filter": "laplace_noise", "epsilon": 0.3, "sensitivity": 2.0},
        {"filter": "gaussian_noise", "noise_multiplier": 1.5, "clip_norm": 1.0},
        {"filter": "svt", "epsilon": 0.1, "threshold": 0.5, "fraction": 0.05},
        {"filter": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 1.0},
    ]
    events = events_for_pipeline(
        pipeline, rounds=12, local_epochs=3, batch_size=64, num_records=1000
    )
    assert events == [
        PrivacyEvent("laplace", {"epsilon": 0.3}, 12, "laplace_noise"),
        PrivacyEvent("gaussian", {"noise_multiplier": 1.5}, 12, "gaussian_noise"),
        PrivacyEvent("pure_epsilon", {"epsilon": 0.1}, 12, "svt"),  # max_passes defaults to 1
        PrivacyEvent(
            "sampled_gaussian",
            # q = 64/1000; steps = 12 rounds x 3 epochs x ceil(1000/64) = 36 x 16
            {"noise_multiplier": 1.1, "sample_rate": 0.064, "steps": 576},
            1,
            "dp_sgd",
        ),
    ]


def test_svt_charges_every_pass():
    svt = {"filter": "svt", "epsilon": 0.2, "threshold": 0.5, "fraction": 0.05, "max_passes": 4}
    (event,) = events_for_pipeline([svt], rounds=3, local_epochs=1, batch_size=1, num_records=1)
    assert event.params == {"epsilon": 0.8}
    assert event.count == 3


def test_svt_split_and_bound_do_not_change_the_charge():
    """The split moves ε between the threshold, the queries and the release of one pass; the
    pass's ε, and so ε x max_passes, is what it was. Laplace's clip changes no event either."""
    svt = {"filter": "svt", "epsilon": 0.2, "threshold": 0.5, "fraction": 0.05, "max_passes": 4}
    tuned = {**svt, "selection_share": 0.9, "threshold_share": 0.1, "bound": 3.0}
    laplace = {"filter": "laplace_noise", "epsilon": 0.3, "sensitivity": 2.0}
    kwargs = {"rounds": 3, "local_epochs": 1, "batch_size": 1, "num_records": 1}
    assert events_for_pipeline([tuned, {**laplace, "clip": 0.5}], **kwargs) == events_for_pipeline(
        [svt, laplace], **kwargs
    )


def test_dp_sgd_sample_rate_is_capped_at_one():
    dp_sgd = {"filter": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    (event,) = events_for_pipeline(
        [dp_sgd], rounds=2, local_epochs=5, batch_size=128, num_records=50
    )
    assert event.params == {"noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 10}


def test_unknown_filter_is_named():
    pipeline = [{"filter": "homomorphic_magic", "strength": 11}]
    with pytest.raises(ValueError, match="'homomorphic_magic'"):
        events_for_pipeline(pipeline, rounds=1, local_epochs=1, batch_size=1, num_records=1)


def test_malformed_pipeline_entries_are_refused():
    with pytest.raises(ValueError, match="no 'filter'"):
        events_for_pipeline([{"epsilon": 1}], rounds=1, local_epochs=1, batch_size=1, num_records=1)
    with pytest.raises(ValueError, match="'laplace_noise' is missing 'epsilon'"):
        events_for_pipeline(
            [{"filter": "laplace_noise", "sensitivity": 1}],
            rounds=1,
            local_epochs=1,
            batch_size=1,
            num_records=1,
        )
    with pytest.raises(ValueError, match="num_records must be at least 1"):
        events_for_pipeline([], rounds=1, local_epochs=1, batch_size=1, num_records=0)


# --- JSON --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        PrivacyEvent("laplace", {"epsilon": 0.5}, 3, "laplace_noise"),
        PrivacyEvent("gaussian", {"noise_multiplier": 1.1}, 20, "gaussian_noise"),
        sampled(0.9, 0.064, 576),
        PrivacyEvent("pure_epsilon", {"epsilon": 0.2}),
    ],
)
def test_json_round_trip(event):
    data = json.loads(json.dumps(event.to_json()))
    again = PrivacyEvent.from_json(data)
    assert again == event
    assert hash(again) == hash(event)
    assert epsilon_spent([again], delta=DELTA) == epsilon_spent([event], delta=DELTA)


def test_from_json_defaults_count_and_source():
    event = PrivacyEvent.from_json({"mechanism": "laplace", "params": {"epsilon": 1}})
    assert (event.count, event.source, event.params) == (1, "", {"epsilon": 1.0})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mechanism": "exponential", "params": {"epsilon": 1}}, "unknown privacy mechanism"),
        ({"params": {"epsilon": 1}}, "missing 'mechanism'"),
        ({"mechanism": "laplace"}, "missing 'params'"),
        ({"mechanism": "laplace", "params": {}}, "laplace event is missing epsilon"),
        (
            {"mechanism": "sampled_gaussian", "params": {"noise_multiplier": 1, "steps": 3}},
            "missing sample_rate",
        ),
        ({"mechanism": "laplace", "params": {"epsilon": -0.1}}, "epsilon must not be negative"),
        (
            {"mechanism": "gaussian", "params": {"noise_multiplier": -1}},
            "noise_multiplier must not be negative",
        ),
        (
            {
                "mechanism": "sampled_gaussian",
                "params": {"noise_multiplier": 1, "sample_rate": 1.5, "steps": 3},
            },
            "sample_rate must be at most 1",
        ),
        (
            {
                "mechanism": "sampled_gaussian",
                "params": {"noise_multiplier": 1, "sample_rate": 0.1, "steps": 2.5},
            },
            "steps must be a whole number",
        ),
        ({"mechanism": "laplace", "params": {"epsilon": "1"}}, "epsilon must be a number"),
        ({"mechanism": "laplace", "params": {"epsilon": True}}, "epsilon must be a number"),
        ({"mechanism": "laplace", "params": {"epsilon": float("inf")}}, "must be finite"),
        ({"mechanism": "laplace", "params": {"epsilon": 1, "delta": 0}}, "unknown params delta"),
        ({"mechanism": "laplace", "params": {"epsilon": 1}, "count": 0}, "count must be at least"),
        ({"mechanism": "laplace", "params": {"epsilon": 1}, "round": 3}, "unknown keys round"),
        ("laplace", "must be an object"),
    ],
)
def test_from_json_rejects_bad_events_with_a_message(data, message):
    with pytest.raises(ValueError, match=message):
        PrivacyEvent.from_json(data)


def test_event_keeps_its_own_copy_of_params():
    params = {"epsilon": 1.0}
    event = PrivacyEvent("laplace", params)
    params["epsilon"] = 100.0
    assert epsilon_spent([event], delta=DELTA) == 1.0


# --- budget projections ------------------------------------------------------------------------


def test_projection_that_exceeds_the_cap_says_so():
    projection = project_budget(
        institution="Hospital A",
        past_events=[PrivacyEvent("pure_epsilon", {"epsilon": 4.1})],
        job_events=[PrivacyEvent("laplace", {"epsilon": 0.51}, 10)],
        cap=8.0,
        delta=DELTA,
    )
    assert projection.already_spent == pytest.approx(4.1)
    assert projection.job_cost == pytest.approx(5.1)
    assert projection.projected == pytest.approx(9.2)
    assert not projection.fits
    assert projection.explain() == (
        "Hospital A: projected ε 9.20 exceeds its cap 8.00 at δ=1e-05 "
        "(already spent 4.10, this job 5.10)"
    )


def test_projection_within_the_cap_fits():
    projection = project_budget(
        institution="Hospital B",
        past_events=[gaussian(6.0, 10)],
        job_events=[gaussian(6.0, 10)],
        cap=8.0,
        delta=DELTA,
    )
    assert projection.fits
    # Replayed together, the Gaussian parts compose sub-additively.
    assert projection.projected < projection.already_spent + projection.job_cost
    assert projection.projected == pytest.approx(
        gaussian_epsilon_closed_form(6.0, 20, DELTA), rel=1e-9
    )
    text = projection.explain()
    assert text.startswith("Hospital B: projected ε ")
    assert f"{projection.projected:.2f} is within its cap 8.00 at δ=1e-05" in text
    assert f"already spent {projection.already_spent:.2f}" in text


def test_projection_at_the_cap_fits_and_just_over_is_shown_with_enough_digits():
    at_cap = BudgetProjection("H", 3.0, 5.0, 8.0, 8.0, DELTA)
    assert at_cap.fits
    over = BudgetProjection("H", 3.0, 5.004, 8.004, 8.0, DELTA)
    assert not over.fits
    assert "projected ε 8.004 exceeds its cap 8.000" in over.explain()


def test_projection_refuses_a_negative_cap():
    with pytest.raises(ValueError, match="cap"):
        project_budget(institution="H", past_events=[], job_events=[], cap=-1, delta=DELTA)


# --- cost and isolation ------------------------------------------------------------------------


def test_fifty_event_replay_is_fast_once_mechanisms_are_known():
    history = [gaussian(1.0 + (i % 5) / 10) for i in range(40)]
    history += [sampled(1.1, 0.01, 100) for _ in range(5)]
    history += [PrivacyEvent("laplace", {"epsilon": 0.1}) for _ in range(5)]
    epsilon_spent(history, delta=DELTA)  # warms the per-mechanism RDP curves
    start = time.perf_counter()
    for i in range(20):
        # a different δ each time, so the final ε is never served from the cache
        epsilon_spent(history, delta=DELTA * (1 + i / 100))
    assert (time.perf_counter() - start) / 20 < 0.05


def test_module_imports_neither_django_nor_torch():
    code = (
        "import sys\n"
        "from training.jobs.accounting import PrivacyEvent, epsilon_spent\n"
        "epsilon_spent([PrivacyEvent('gaussian', {'noise_multiplier': 1.0})], delta=1e-5)\n"
        "bad = sorted(m for m in ('django', 'torch') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)


def test_a_job_without_a_guarantee_is_projected_as_unbounded_and_fits_no_cap():
    """SVT at an ε of a thousand per pass: the samplers' cut tails void the guarantee at δ
    (epsilon_spent says so); a projection refuses the job in words instead of failing."""
    svt = PrivacyEvent("pure_epsilon", {"epsilon": 1000.0}, 5, "svt")
    with pytest.raises(ValueError, match="no guarantee"):
        epsilon_spent([svt], delta=DELTA)
    projection = project_budget(
        institution="Barts", past_events=[], job_events=[svt], cap=100000.0, delta=DELTA
    )
    assert math.isinf(projection.projected) and not projection.fits
    assert projection.remaining == 0.0
    assert "no finite ε" in projection.explain() and "Barts" in projection.explain()
    with pytest.raises(ValueError, match="delta"):
        project_budget(institution="H", past_events=[], job_events=[svt], cap=8.0, delta=2.0)
