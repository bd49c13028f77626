#!/usr/bin/env python
"""Contribution scores on sites of known worth, through real federated training (issue 15).

    .venv/bin/python benchmarks/science/contribution_worth.py [--quick] [--seeds K] [--seed S]
        [--rounds R] [--noise SHARE] [--json FILE]

Digits, five sites built so that their worth is known before any training:

* ``a`` and ``a-copy``: the *same* 300 records (classes 0 to 8), two identical sites;
* ``b``: 300 other records of classes 0 to 8, a plain site;
* ``noisy``: 300 other records of classes 0 to 8 whose labels are, for a share ``--noise``
  (default 0.8) of them, replaced by a class drawn uniformly from 0 to 8;
* ``small-9``: 60 records, all of class 9, the only site that holds that class (a tenth of the
  validation set).

The records are drawn anew for every seed from the training part of the bundled set (the union
of :func:`training.fl.data.demo_split`'s sites); the consortium validation set
(:func:`~training.fl.data.load_validation_set`, 360 records) values every coalition.

Training is FedAvg as :mod:`experiments` runs it (the same MLP, SGD lr 0.05 momentum 0.9, batch
32, one local epoch per round, momentum restart): each site :func:`~training.fl.local.
train_local`, :func:`~training.fl.filters.apply_pipeline` with no filter,
:class:`~training.fl.aggregate.StreamingFedAvg` weighted by record counts. Every round is
scored as the coordinator scores it (``training.rounds.contributions.round_contributions``): a
:class:`~training.fl.coalition.CoalitionUtility` over the round's input model and the updates
shared, valued by validation accuracy, and :func:`training.fl.contribution.compute` with

* ``leave_one_out`` (6 models per round), ``shapley_exact`` (all 32 coalitions);
* ``shapley_sampled`` at the platform's defaults (``contribution_settings``: 100 permutations,
  tolerance 0.02, truncation 0.005) with the utility's ``resolution`` (one validation record),
  as the coordinator runs it on such a round: estimator 3, with the surrogate
  ``CoalitionUtility.surrogate`` makes; and, for comparison, estimator 1 (the permutation walk,
  the default below 8 sites where no surrogate can be made) and estimator 2 (the paired kernel
  estimator alone), each at its defaults.

Both coalition values the spec allows are scored on the same training (``--values``):
``metric`` (validation accuracy, the platform's default; it moves in steps of one record) and
``loss`` (minus the validation loss, which moves with every change of the model).

A site's score is the sum of its per-round scores, as ``contribution.job_scored`` sums them.
Printed per value: per site and method, mean ± standard deviation over the seeds; the other
methods' error against exact, Σ_i |φ̂_i − φ_i| / |v(N) − v(∅)| (per round, over the rounds whose
value moved by more than the estimator's own threshold, max(truncation, one record); and on the
summed scores) and their evaluations per round; the federated model's accuracy and its recall of
class 9; and in how many seeds each expected property holds (:data:`PROPERTIES`, and two on
leave-one-out and the copies). ``--quick`` (CI): 2 seeds, 3 rounds; the default 10 seeds, 10
rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
for _path in (ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from experiments import CONFIGS, _float_state, _mean_std  # noqa: E402

from training.fl.aggregate import StreamingFedAvg, apply_update  # noqa: E402
from training.fl.baseline import pool_site_data  # noqa: E402
from training.fl.coalition import CoalitionUtility  # noqa: E402
from training.fl.contribution import (  # noqa: E402
    ESTIMATOR_CONTROL_VARIATE,
    ESTIMATOR_PAIRED,
    ESTIMATOR_PERMUTATIONS,
    compute,
    leave_one_out,
    shapley_exact,
)
from training.fl.data import DEMO_SITES, SiteData, demo_split, load_validation_set  # noqa: E402
from training.fl.evaluate import NEG_LOSS, evaluate  # noqa: E402
from training.fl.filters import apply_pipeline  # noqa: E402
from training.fl.local import train_local  # noqa: E402
from training.fl.models import build_model  # noqa: E402
from training.jobs.spec import CONTRIBUTION_DEFAULTS  # noqa: E402

CFG = CONFIGS["digits"]
#: The sites, in the order of the tables: (slug, records).
SITES: tuple[tuple[str, int], ...] = (
    ("a", 300),
    ("a-copy", 300),
    ("b", 300),
    ("small-9", 60),
    ("noisy", 300),
)
UNIQUE_CLASS = 9
DEFAULT_NOISE = 0.8
#: The methods of the tables: (key, label).
METHODS: tuple[tuple[str, str], ...] = (
    ("loo", "leave-one-out"),
    ("exact", "exact Shapley"),
    ("sampled", "sampled Shapley (the coordinator's default here: estimator 3)"),
    ("walk", "sampled Shapley, estimator 1"),
    ("paired", "sampled Shapley, estimator 2"),
)
#: What a coalition is valued by (the spec's ``contribution.value``): the metric (accuracy, the
#: platform's default) and minus the validation loss.
VALUES: tuple[str, ...] = ("metric", "loss")
#: Identical sites count as equal when their scores differ by at most this share of the total.
DUPLICATE_TOLERANCE = 0.05


# --- the sites ----------------------------------------------------------------------------------


def _site(x: torch.Tensor, y: torch.Tensor) -> SiteData:
    return SiteData(
        x_train=x.clone(),
        y_train=y.clone(),
        num_records=len(y),
        modality="tabular",
        input_shape=list(x.shape[1:]),
        n_classes=10,
        source="digits, known worth",
    )


def known_worth_sites(seed: int, noise: float = DEFAULT_NOISE) -> dict[str, SiteData]:
    """The five sites of the module docstring, drawn from the training part with ``seed``."""
    pooled = pool_site_data(demo_split("digits", DEMO_SITES, seed=0))  # the whole training part
    x, y = pooled.x_train, pooled.y_train
    g = torch.Generator().manual_seed(seed)
    common = torch.nonzero(y != UNIQUE_CLASS).flatten()
    common = common[torch.randperm(len(common), generator=g)]
    unique = torch.nonzero(y == UNIQUE_CLASS).flatten()
    unique = unique[torch.randperm(len(unique), generator=g)]
    sizes = dict(SITES)
    taken = 0

    def draw(n: int) -> torch.Tensor:
        nonlocal taken
        out = common[taken : taken + n].sort().values
        taken += n
        return out

    a = draw(sizes["a"])
    b = draw(sizes["b"])
    noisy = draw(sizes["noisy"])
    small = unique[: sizes["small-9"]].sort().values
    y_noisy = y[noisy].clone()
    flip = torch.rand(len(noisy), generator=g) < noise
    y_noisy[flip] = torch.randint(0, UNIQUE_CLASS, (int(flip.sum()),), generator=g)
    sites = {
        "a": _site(x[a], y[a]),
        "a-copy": _site(x[a], y[a]),
        "b": _site(x[b], y[b]),
        "small-9": _site(x[small], y[small]),
        "noisy": _site(x[noisy], y_noisy),
    }
    return {slug: sites[slug] for slug, _n in SITES}


# --- one seed -----------------------------------------------------------------------------------


class _Memo:
    """Each coalition's value measured once and shared by every method (each method still counts
    its own evaluations: ``compute`` wraps the utility in its own cache)."""

    def __init__(self, utility: CoalitionUtility):
        self.utility = utility
        self.values: dict[frozenset[str], float] = {}

    def __call__(self, coalition: frozenset[str]) -> float:
        key = frozenset(coalition)
        if key not in self.values:
            self.values[key] = self.utility(key)
        return self.values[key]


def _model(seed: int, first: SiteData) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(
        CFG.model, input_shape=first.input_shape, n_classes=CFG.n_classes, params=CFG.params
    )


def score_round(
    base_state: dict[str, torch.Tensor],
    updates: dict[str, tuple[dict[str, torch.Tensor], Any, float]],
    validation: tuple[torch.Tensor, torch.Tensor],
    first: SiteData,
    seed: int,
    value: str = "metric",
) -> dict[str, Any]:
    """Every method on one round's updates, over one shared table of coalition values."""
    x, y = validation
    utility = CoalitionUtility(
        base_state=base_state,
        updates=updates,
        model=_model(0, first),
        x=x,
        y=y,
        modality="tabular",
        combine="mean",
        value=value,
        loss=CFG.loss,
    )
    v = _Memo(utility)
    players = list(updates)
    settings = dict(CONTRIBUTION_DEFAULTS)
    sampled_args = {
        "permutations": settings["permutations"],
        "truncation": settings["truncation"],
        "tolerance": settings["tolerance"],
        "seed": seed,
        "resolution": utility.resolution,
    }
    results = {
        "loo": leave_one_out(players, v),
        "exact": shapley_exact(players, v),
        # As training.rounds.contributions scores a sampled round on the coordinator.
        "sampled": compute(
            "shapley_sampled",
            players,
            v,
            **sampled_args,
            estimator=ESTIMATOR_CONTROL_VARIATE,
            surrogate=utility.surrogate(),
        ),
        "walk": compute(
            "shapley_sampled", players, v, **sampled_args, estimator=ESTIMATOR_PERMUTATIONS
        ),
        "paired": compute(
            "shapley_sampled", players, v, **sampled_args, estimator=ESTIMATOR_PAIRED
        ),
    }
    full, empty = frozenset(players), frozenset()
    return {
        "v_full": v(full),
        "v_empty": v(empty),
        "resolution": utility.resolution,
        "scores": {k: dict(r.scores) for k, r in results.items()},
        "evaluations": {k: r.evaluations for k, r in results.items()},
        "params": {k: dict(r.params) for k, r in results.items()},
    }


def run_seed(
    seed: int, rounds: int, noise: float, values: Sequence[str] = VALUES
) -> dict[str, Any]:
    """FedAvg on the known-worth sites for ``rounds`` rounds, every round scored once per
    coalition value in ``values`` (the same training for all)."""
    sites = known_worth_sites(seed, noise)
    validation = load_validation_set("digits")
    first = next(iter(sites.values()))
    model = _model(seed, first)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    template = _float_state(model)
    generator = torch.Generator().manual_seed(seed * 7919 + 1)
    per_round: dict[str, list[dict[str, Any]]] = {value: [] for value in values}
    curve = []
    for r in range(rounds):
        agg = StreamingFedAvg(template)
        updates = {}
        for index, (slug, data) in enumerate(sites.items()):
            model.load_state_dict(global_state)
            result = train_local(
                model,
                data,
                epochs=1,
                batch_size=CFG.batch_size,
                optimizer=CFG.optimizer,
                momentum_restart=True,
                seed=seed * 1000 + r * 10 + index,
                loss=CFG.loss,
            )
            shared = apply_pipeline(result.delta, [], generator=generator)
            updates[slug] = (shared.delta, shared.mask, float(result.samples))
            agg.add(shared.delta, shared.mask, result.samples)
        scored = {
            value: score_round(global_state, updates, validation, first, seed * 1000 + r, value)
            for value in values
        }
        global_state = apply_update(global_state, agg.result())
        model.load_state_dict(global_state)
        metrics = evaluate(
            model, *validation, modality="tabular", loss=CFG.loss, negative_loss=True
        )
        for value in values:
            # The utility's full coalition is the round's model, as the coordinator's is (up
            # to the order of a float sum, which can move a record on the boundary).
            reached = float(metrics[NEG_LOSS if value == "loss" else "accuracy"])
            slack = 1e-5 if value == "loss" else 1.5 / len(validation[1])
            assert abs(scored[value]["v_full"] - reached) <= slack, (value, reached)
            per_round[value].append(scored[value])
        curve.append(float(metrics["accuracy"]))
    with torch.no_grad():
        x, y = validation
        predicted = model(x).argmax(dim=1)
    unique = y == UNIQUE_CLASS
    by_value = {}
    for value, scored_rounds in per_round.items():
        by_value[value] = {
            "initial": scored_rounds[0]["v_empty"],
            "final": scored_rounds[-1]["v_full"],
            # v(N) - v(∅) summed over the rounds: what the summed scores add up to.
            "total": sum(rnd["v_full"] - rnd["v_empty"] for rnd in scored_rounds),
            "totals": {
                method: {
                    slug: sum(rnd["scores"][method][slug] for rnd in scored_rounds)
                    for slug in sites
                }
                for method, _label in METHODS
            },
            "rounds": scored_rounds,
        }
    return {
        "seed": seed,
        "records": {slug: d.num_records for slug, d in sites.items()},
        "curve": curve,
        "recall_unique": float((predicted[unique] == UNIQUE_CLASS).float().mean()),
        "by_value": by_value,
    }


# --- what is measured ---------------------------------------------------------------------------


def normalised_error(estimate: dict[str, float], exact: dict[str, float], total: float) -> float:
    """Σ_i |φ̂_i − φ_i| / |v(N) − v(∅)| (infinite when the total is 0 and they differ)."""
    diff = sum(abs(estimate[k] - exact[k]) for k in exact)
    if total == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / abs(total)


def _duplicates_equal(s: dict[str, float], total: float) -> bool:
    return abs(s["a"] - s["a-copy"]) <= DUPLICATE_TOLERANCE * abs(total)


def _noisy_lowest(s: dict[str, float], total: float) -> bool:
    return all(s["noisy"] < s[k] for k in s if k != "noisy")


def _small_above_size(s: dict[str, float], total: float, records: dict[str, int]) -> bool:
    return total != 0 and s["small-9"] / total > records["small-9"] / sum(records.values())


#: name -> (description, test of one method's totals given the run's total and records).
PROPERTIES: dict[str, tuple[str, Callable[..., bool]]] = {
    "duplicates-equal": (
        f"a and a-copy within {DUPLICATE_TOLERANCE} of the total of each other",
        lambda s, t, _n: _duplicates_equal(s, t),
    ),
    "noisy-lowest": ("noisy scores lowest of the five", lambda s, t, _n: _noisy_lowest(s, t)),
    "small-above-size": (
        "small-9's share of the total above its share of the records (60/1260)",
        _small_above_size,
    ),
}


def summarise(seed_runs: list[dict[str, Any]], value: str) -> dict[str, Any]:
    """Mean ± std over the seeds of what ``value``'s scores say (module docstring)."""
    runs = [{**run, **run["by_value"][value]} for run in seed_runs]
    sites = list(runs[0]["records"])
    records = runs[0]["records"]
    scores: dict[str, Any] = {}
    for method, _label in METHODS:
        scores[method] = {}
        for slug in sites:
            mean, std = _mean_std([run["totals"][method][slug] for run in runs])
            scores[method][slug] = {"mean": mean, "std": std}
    estimators: dict[str, Any] = {}
    for method in ("loo", "sampled", "walk", "paired"):
        per_round, moved, totals, evaluations = [], 0, [], []
        for run in runs:
            for rnd in run["rounds"]:
                evaluations.append(rnd["evaluations"][method])
                total = rnd["v_full"] - rnd["v_empty"]
                # As the estimator itself counts a move: beyond its truncation and one step of
                # the metric (a round that moved one validation record is noise, and its error,
                # divided by one record, would swamp the mean).
                threshold = max(rnd["params"]["sampled"]["truncation"], rnd["resolution"])
                if abs(total) > threshold:
                    moved += 1
                    per_round.append(
                        normalised_error(rnd["scores"][method], rnd["scores"]["exact"], total)
                    )
            totals.append(
                normalised_error(run["totals"][method], run["totals"]["exact"], run["total"])
            )
        estimators[method] = {
            "round_error_mean": statistics.fmean(per_round) if per_round else None,
            "round_error_median": statistics.median(per_round) if per_round else None,
            "round_error_max": max(per_round) if per_round else None,
            "rounds_moved": moved,
            "rounds": sum(len(run["rounds"]) for run in runs),
            "total_error": _mean_std(totals),
            "evaluations": statistics.fmean(evaluations),
        }
    properties: dict[str, dict[str, int]] = {}
    for name, (_text, test) in PROPERTIES.items():
        properties[name] = {
            method: sum(
                bool(test(run["totals"][method], run["total"], run["records"])) for run in runs
            )
            for method, _label in METHODS
        }
    # LOO's known failure with duplicates: each copy can be left out, so each looks worthless.
    copies = ("a", "a-copy")
    properties["loo-copies-below-shapley"] = {
        "loo": sum(
            all(run["totals"]["loo"][k] < run["totals"]["exact"][k] for k in copies) for run in runs
        )
    }
    properties["loo-copies-below-b"] = {
        "loo": sum(
            all(run["totals"]["loo"][k] < run["totals"]["loo"]["b"] for k in copies) for run in runs
        )
    }
    accuracy = _mean_std([run["curve"][-1] for run in runs])
    initial = _mean_std([run["initial"] for run in runs])
    return {
        "value": value,
        "final": _mean_std([run["final"] for run in runs]),
        "recall_unique": _mean_std([run["recall_unique"] for run in runs]),
        "sites": sites,
        "records": records,
        "scores": scores,
        "estimators": estimators,
        "properties": properties,
        "accuracy": accuracy,
        "initial": initial,
        "total": _mean_std([run["total"] for run in runs]),
    }


# --- tables -------------------------------------------------------------------------------------


def tables(summary: dict[str, Any], seeds: list[int], rounds: int) -> str:
    records = summary["records"]
    n_seeds = len(seeds)
    acc, acc_sd = summary["accuracy"]
    recall, recall_sd = summary["recall_unique"]
    init, _ = summary["initial"]
    final, final_sd = summary["final"]
    total, total_sd = summary["total"]
    name = "minus the validation loss" if summary["value"] == "loss" else "validation accuracy"
    lines = [
        f"Coalitions valued by {name} (contribution.value = {summary['value']!r}); seeds "
        f"{seeds}, {rounds} rounds.",
        f"The federated model: accuracy {acc:.3f} ± {acc_sd:.3f}, recall of class "
        f"{UNIQUE_CLASS} {recall:.2f} ± {recall_sd:.2f}; the value went from {init:.3f} to "
        f"{final:.3f} ± {final_sd:.3f} (v(N) − v(∅) summed over the rounds {total:.3f} ± "
        f"{total_sd:.3f}).",
        "",
        "Scores summed over the rounds (mean ± std over seeds):",
        "",
        "| site | records | " + " | ".join(label for _k, label in METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for slug in summary["sites"]:
        cells = [
            f"{summary['scores'][m][slug]['mean']:.3f} ± {summary['scores'][m][slug]['std']:.3f}"
            for m, _label in METHODS
        ]
        lines.append(f"| {slug} | {records[slug]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Against exact Shapley (32 coalitions per round); error = Σ|φ̂−φ| / |v(N)−v(∅)|:",
        "",
        "| method | evaluations per round | error per round: mean / median / max "
        "(rounds that moved the value) | error of the summed scores |",
        "|---|---|---|---|",
    ]
    labels = dict(METHODS)
    for method, est in summary["estimators"].items():
        if est["round_error_mean"] is None:
            per_round = f"- (0/{est['rounds']})"
        else:
            per_round = (
                f"{est['round_error_mean']:.3f} / {est['round_error_median']:.3f} / "
                f"{est['round_error_max']:.3f} ({est['rounds_moved']}/{est['rounds']})"
            )
        err, err_sd = est["total_error"]
        lines.append(
            f"| {labels[method]} | {est['evaluations']:.1f} | {per_round} | "
            f"{err:.3f} ± {err_sd:.3f} |"
        )
    lines += [
        "",
        f"Expected properties, seeds (of {n_seeds}) where each holds:",
        "",
        "| property | " + " | ".join(label for _k, label in METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    texts = {name: text for name, (text, _t) in PROPERTIES.items()}
    texts["loo-copies-below-shapley"] = "LOO of both copies below their exact Shapley value"
    texts["loo-copies-below-b"] = "LOO of both copies below LOO of b (as many records, unique)"
    for name, counts in summary["properties"].items():
        cells = [str(counts[m]) if m in counts else "-" for m, _label in METHODS]
        lines.append(f"| {texts[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI: 2 seeds, 3 rounds")
    parser.add_argument("--seeds", type=int, default=None, help="how many seeds (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 10)")
    parser.add_argument(
        "--noise",
        type=float,
        default=DEFAULT_NOISE,
        help="share of the noisy site's labels replaced by a random class",
    )
    parser.add_argument(
        "--values",
        nargs="+",
        choices=VALUES,
        default=list(VALUES),
        help="what coalitions are valued by (the spec's contribution.value; default both)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 10
    if args.rounds is None:
        args.rounds = 3 if args.quick else 10
    if args.seeds < 1 or args.rounds < 1:
        parser.error("--seeds and --rounds must be at least 1")
    if not 0.0 <= args.noise <= 1.0:
        parser.error("--noise is a share, between 0 and 1")
    return args


def main(
    argv: Sequence[str] | None = None, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train, score and print; returns ``{"summaries": {value: ...}, "tables", "runs", ...}``."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    seeds = list(range(args.seed, args.seed + args.seeds))
    values = list(dict.fromkeys(args.values))
    started = time.perf_counter()
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        runs.append(run_seed(seed, args.rounds, args.noise, values))
        log(
            f"  seed {seed}: accuracy {runs[-1]['curve'][-1]:.3f} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    summaries = {value: summarise(runs, value) for value in values}
    texts = {value: tables(summaries[value], seeds, args.rounds) for value in values}
    for value in values:
        log("")
        log(texts[value])
    seconds = time.perf_counter() - started
    log(f"\nrun time {seconds:.0f} s")
    out = {
        "command": " ".join(["benchmarks/science/contribution_worth.py", *(argv or sys.argv[1:])]),
        "seeds": seeds,
        "rounds": args.rounds,
        "noise": args.noise,
        "summaries": summaries,
        "tables": texts,
        "runs": runs,
        "seconds": seconds,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(out, default=str) + "\n")
    return out


if __name__ == "__main__":
    main()
