"""``benchmarks/science/shapley_on_training.py --quick``: the sampled Shapley estimators on a real
FedAvg round's coalition values, against exact Shapley, in-process (a few seconds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "science" / "shapley_on_training.py"


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("shapley_on_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_measures_the_three_estimators_against_exact(script):
    lines: list[str] = []
    results = script.main(["--quick"], log=lines.append)
    assert set(results) == {"6/metric", "6/loss"}
    for found in results.values():
        assert set(found) == {"estimator 1", "estimator 2", "estimator 3"}
        # Estimators 2 and 3 read the same third of the 64 coalitions; the walk nearly all.
        assert found["estimator 2"]["cost"] == found["estimator 3"]["cost"] <= 1 / 3
        assert found["estimator 1"]["cost"] > found["estimator 2"]["cost"]
        # The surrogate's compute is counted for estimator 3 only.
        assert found["estimator 3"]["compute"] > found["estimator 3"]["cost"]
        assert found["estimator 2"]["compute"] == found["estimator 2"]["cost"]
        # On this real training the control variate is what brings the error down.
        assert found["estimator 3"]["summed_mean"] < found["estimator 2"]["summed_mean"]
        for figures in found.values():
            assert 0 <= figures["summed_mean"] <= figures["summed_max"]
    assert any(line.startswith("| 6 | metric | estimator 3 |") for line in lines), lines


def test_the_borrowed_training_loop_is_given_back(script):
    """measure() lends contribution_worth's loop other sites and scoring: afterwards the five
    sites of known worth are back."""
    import contribution_worth as worth

    script.main(["--quick", "--values", "loss"], log=lambda _line: None)
    assert worth.known_worth_sites is script.FIVE_SITES
    assert [slug for slug, _n in worth.SITES] == ["a", "a-copy", "b", "small-9", "noisy"]
    assert worth.METHODS[0][0] == "loo"


def test_more_sites_than_the_exact_reference_allows_are_refused(script):
    assert script.parse_args(["--sites", "12"]).sites == [12]
    with pytest.raises(SystemExit):
        script.parse_args(["--sites", "13"])
