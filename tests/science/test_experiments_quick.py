"""The science harness's ``--quick`` mode, as CI runs it (benchmarks/science/experiments.py).

Runs every data set with one seed and two rounds, in-process (no database), and checks the shape
and the sanity of what comes back: the figures a reader of docs/science.md relies on are finite
scores in [0, 1], shares as configured, an ε wherever a DP mechanism runs, and a centralised
model that is not worse than the sites alone.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "benchmarks" / "science" / "experiments.py"


def _load():
    spec = importlib.util.spec_from_file_location("science_experiments", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    harness = _load()
    out = tmp_path_factory.mktemp("science")
    lines = []
    results = harness.main(["--quick", "--out", str(out)], log=lines.append)
    return harness, results, out, "\n".join(lines)


def test_every_arm_of_every_data_set_has_a_finite_score(quick):
    harness, results, _out, _log = quick
    assert set(results["datasets"]) == {"digits", "breast-cancer", "lesions"}
    assert results["seeds"] == [0] and results["rounds"] == 2
    for key, data in results["datasets"].items():
        assert data["metric"] == ("dice" if key == "lesions" else "accuracy")
        assert set(data["arms"]) == set(harness.QUICK_ARMS)
        for name, arm in data["arms"].items():
            assert math.isfinite(arm["metric_mean"]) and 0.0 <= arm["metric_mean"] <= 1.0, name
            assert arm["metric_std"] == 0.0  # one seed
            if arm["curve_mean"] is not None:
                assert len(arm["curve_mean"]) == 2
                assert arm["curve_mean"][-1] == pytest.approx(arm["metric_mean"])


def test_centralised_is_not_worse_than_the_sites_alone_on_digits(quick):
    _harness, results, _out, _log = quick
    arms = results["datasets"]["digits"]["arms"]
    assert arms["centralised"]["metric_mean"] >= arms["local"]["metric_mean"] - 0.05
    # Four non-IID sites alone are far from the pooled model: a broken baseline would not be.
    assert arms["centralised"]["metric_mean"] > 0.5


def test_shared_fractions_are_as_configured(quick):
    _harness, results, _out, _log = quick
    for key, data in results["datasets"].items():
        arms = data["arms"]
        assert arms["fedavg"]["shared_fraction"] == 1.0
        assert arms["cyclic"]["shared_fraction"] == 1.0
        assert arms["laplace-mid"]["shared_fraction"] == 1.0
        # Partial sharing keeps round(fraction * m) of m coordinates: within one coordinate.
        m = data["calibration"][0]["m"]
        assert arms["topk-10"]["shared_fraction"] == pytest.approx(0.1, abs=1 / m), key
        assert arms["random-40"]["shared_fraction"] == pytest.approx(0.4, abs=1 / m), key
        # SVT selects at most its share, in one pass.
        for name in ("svt-noise-mid-40", "svt-eps-mid-10"):
            arm = arms[name]
            assert 0.0 <= arm["shared_fraction"] <= arm["configured_share"] + 1 / m, (key, name)
            assert arm["svt_passes"] <= 1


def test_momentum_restart_is_switched_per_arm(quick):
    _harness, results, _out, _log = quick
    arms = results["datasets"]["digits"]["arms"]
    assert arms["fedavg"]["momentum_restart"] is True
    assert arms["fedavg-keep"]["momentum_restart"] is False
    assert arms["local"]["momentum_restart"] is None  # one uninterrupted run per site


def test_dp_arms_carry_the_accountants_epsilon(quick):
    _harness, results, _out, _log = quick
    data = results["datasets"]["digits"]
    gamma, m = data["calibration"][0]["gamma"], data["calibration"][0]["m"]
    arms = data["arms"]
    assert arms["fedavg"]["epsilon"] is None and arms["topk-10"]["epsilon"] is None
    nu = results["noise_levels"]["mid"]
    laplace = arms["laplace-mid"]
    # Lap(b) with b = nu * gamma on every coordinate: epsilon = m * gamma / b per round.
    assert laplace["epsilon"]["per_round"] == pytest.approx(m / nu)
    assert laplace["pipeline"][0]["clip"] == pytest.approx(gamma)
    # Equal total epsilon: the SVT arm spends what the Laplace arm spends.
    assert arms["svt-eps-mid-10"]["epsilon"]["per_round"] == pytest.approx(m / nu)
    # Equal per-coordinate noise: release Lap(c gamma / (eps / 2)) = Lap(b), c = round(0.4 m).
    assert arms["svt-noise-mid-40"]["epsilon"]["per_round"] == pytest.approx(
        2 * round(0.4 * m) / nu
    )
    for name in ("laplace-mid", "svt-eps-mid-10", "svt-noise-mid-40"):
        eps = arms[name]["epsilon"]
        assert eps["basic_composition"] == pytest.approx(2 * eps["per_round"])
        assert (eps["total"] is None) == (eps["refused"] is not None)


def test_outputs_results_json_figures_and_tables(quick):
    _harness, results, out, log = quick
    written = json.loads((out / "results.json").read_text())
    assert (
        written["datasets"]["digits"]["arms"].keys() == results["datasets"]["digits"]["arms"].keys()
    )
    svgs = sorted(p.name for p in out.glob("*.svg"))
    assert "digits-topology.svg" in svgs and "lesions-noise-equal-eps.svg" in svgs
    assert (out / "digits-topology.svg").read_text().startswith("<svg")
    assert "| arm | accuracy (mean ± std) |" in log and "| arm | dice (mean ± std) |" in log
