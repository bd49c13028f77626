"""Contribution scores on sites of known worth, ``--quick`` as CI runs it
(benchmarks/science/contribution_worth.py).

Two seeds, three rounds of FedAvg on digits, every round scored by leave-one-out, exact and
sampled Shapley over :class:`training.fl.coalition.CoalitionUtility`, in-process (no
database). Checks the tables' shape and what the sites were built to show: the identical sites
score alike under exact Shapley, the noisy site lowest, exact Shapley is efficient, and
leave-one-out undervalues a duplicated site.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "science" / "contribution_worth.py"


def _load():
    spec = importlib.util.spec_from_file_location("science_contribution_worth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick():
    script = _load()
    lines = []
    out = script.main(["--quick"], log=lines.append)
    return script, out, "\n".join(lines)


def test_the_tables_have_every_site_and_method(quick):
    script, out, log = quick
    assert out["seeds"] == [0, 1] and out["rounds"] == 3
    assert set(out["summaries"]) == {"metric", "loss"}
    sites = [slug for slug, _n in script.SITES]
    methods = [key for key, _label in script.METHODS]
    for value, summary in out["summaries"].items():
        assert summary["sites"] == sites
        assert summary["records"]["a"] == summary["records"]["a-copy"] == 300
        assert summary["records"]["small-9"] == 60
        for method in methods:
            for slug in sites:
                cell = summary["scores"][method][slug]
                assert math.isfinite(cell["mean"]) and math.isfinite(cell["std"]), (value, slug)
        for key in ("loo", "sampled", "paired"):
            assert summary["estimators"][key]["evaluations"] > 0
        # Exact Shapley evaluates all 2^5 coalitions; leave-one-out n + 1.
        assert summary["estimators"]["loo"]["evaluations"] == 6
        table = out["tables"][value]
        for slug in sites:
            assert f"| {slug} | " in table
        assert "exact Shapley" in table and "leave-one-out" in table
        # A table row has as many cells as its header: no stray "|" in a label.
        for block in table.split("\n\n"):
            rows = [r for r in block.splitlines() if r.startswith("|")]
            if rows:
                assert len({r.count("|") for r in rows}) == 1, block
    assert "run time" in log


def test_exact_shapley_is_efficient_every_round(quick):
    _script, out, _log = quick
    for run in out["runs"]:
        for value, scored in run["by_value"].items():
            for rnd in scored["rounds"]:
                total = rnd["v_full"] - rnd["v_empty"]
                assert sum(rnd["scores"]["exact"].values()) == pytest.approx(total, abs=1e-9)
                assert rnd["evaluations"]["exact"] == 32, value


def test_sites_of_known_worth_rank_as_built_under_exact_shapley(quick):
    """Valued by the loss (which moves with every change of the model), the two identical sites
    get nearly the same exact Shapley value and the noisy site the lowest, in every seed."""
    _script, out, _log = quick
    for run in out["runs"]:
        loss = run["by_value"]["loss"]
        exact, total = loss["totals"]["exact"], loss["total"]
        assert total > 0  # training lowered the validation loss
        assert abs(exact["a"] - exact["a-copy"]) <= 0.1 * total, (run["seed"], exact)
        assert exact["noisy"] == min(exact.values()), (run["seed"], exact)
        assert exact["noisy"] < 0


def test_leave_one_out_undervalues_a_duplicated_site(quick):
    """LOO's known failure: either copy can be left out, so each looks worth less than its
    Shapley value, and less than the plain site of the same size."""
    _script, out, _log = quick
    for run in out["runs"]:
        for value, scored in run["by_value"].items():
            totals = scored["totals"]
            for copy in ("a", "a-copy"):
                assert totals["loo"][copy] < totals["exact"][copy], (run["seed"], value, copy)
                assert totals["loo"][copy] < totals["loo"]["b"], (run["seed"], value, copy)
