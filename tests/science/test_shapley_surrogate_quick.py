"""``benchmarks/science/shapley_surrogate.py --quick``: the surrogate with a control variate on a
real FedAvg round (a few seconds). The surrogates equal the round's value at the full coalition
by construction, and the second-order one is far closer to exact Shapley than estimator 2."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "science" / "shapley_surrogate.py"


@pytest.fixture(scope="module")
def quick():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("shapley_surrogate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines: list[str] = []
    return module.main(["--quick"], log=lines.append), lines


def test_every_method_is_measured_for_both_values(quick):
    results, lines = quick
    assert set(results) == {"6/metric", "6/loss"}
    for found in results.values():
        methods = found["methods"]
        assert {"estimator 1", "estimator 2", "quad+paired"} <= set(methods)
        assert methods["quad+paired"]["cost"] <= 1 / 3
        assert methods["quad+none"]["cost"] == 0
    assert any("| 6 | metric | quad+paired |" in line for line in lines)


def test_the_second_order_surrogate_beats_the_plain_estimator(quick):
    results, _lines = quick
    for found in results.values():
        methods = found["methods"]
        assert methods["quad+paired"]["summed_mean"] < methods["estimator 2"]["summed_mean"]
