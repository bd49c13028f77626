#!/usr/bin/env python
"""A surrogate with a control variate for Shapley on real federated training (issue 15).

    .venv/bin/python benchmarks/science/shapley_surrogate.py [--quick] [--sites 6 8]
        [--seeds K] [--seed S] [--rounds R] [--values metric loss] [--json FILE]

The research behind contribution estimator 3: its ``quad + paired`` is what the product now
runs (``training/fl/coalition_surrogate.py`` makes the surrogate, ``training.fl.contribution``
the scores; ``shapley_on_training.py`` measures that code). The other surrogates and
corrections stay here, measured beside it. ``shapley_on_training.py`` showed estimators 1 and 2
missing the target (error at most 0.05 of the total at a third of the evaluations) on real
FedAvg rounds at 6 sites. This script tests a control variate: a cheap surrogate ``u(S)`` of
the coalition value ``v(S)``, computed for all 2^n coalitions from a few derivatives of the
full coalition's model, whose Shapley value is exact, plus an estimate of the Shapley value of
the residual game ``v − u`` from the real coalition evaluations the budget allows.

A coalition's model is ``θ_S = θ_0 + Σ_{i∈S} w_i Δ_i / Σ_{i∈S} w_i`` (the record-weighted mean
of the members' deltas, no masks here), so ``θ_S = θ_N + Σ_i c_i(S) Δ_i`` with
``c_i(S) = w_i [i∈S] / W_S − w_i / W_N``: every coalition lies in the n-dimensional span of the
deltas around the full model ``θ_N``. With ``F(c)`` the validation logits at ``θ_N + Σ c_i Δ_i``:

* ``lin``: the linearised model, logits ``F(0) + J c`` (``J = ∂F/∂c``: n Jacobian-vector
  products), valued by accuracy or minus the loss of those logits, per coalition;
* ``quad``: logits to second order, ``F(0) + J c + ½ cᵀ H c`` (``H``: n(n+1)/2 second
  directional derivatives; for a one-hidden-layer ReLU MLP this is exact while no hidden unit
  changes sign), valued the same way;
* ``taylor1`` / ``taylor2`` (loss only): minus the validation loss to first / second order in
  ``c`` (a gradient and an n×n Hessian in the deltas' span: n + n(n+1)/2 numbers, all a ledger
  would need to recompute ``u`` for every coalition).

Corrections (the residual ``r = v − u``; ``u(N) = v(N)`` by construction):

* ``none``: the surrogate's exact Shapley value alone (no coalition evaluated but the round's
  model, which the coordinator evaluates anyway);
* ``extremes``: + estimator 2 on ``r`` at the budget of its extremes only (∅, N, singletons,
  complements of one: 2n + 2);
* ``interp``: + each site's residual score the mean of its first and last marginal of ``r``
  (the same extremes), shifted equally so they add up to ``r(N) − r(∅)``;
* ``paired``: + estimator 2 on ``r`` at its default budget (a third of 2^n);
* ``paired-β``: as ``paired`` but with ``β u`` for ``u``, β the least-squares slope of ``v`` on
  ``u`` over the coalitions evaluated (a fitted control-variate coefficient).

Printed per n and value, over the seeds: the error of the scores summed over the rounds (mean
and worst), the median per-round error (rounds that moved the value beyond the threshold), the
real coalition evaluations per round as a share of 2^n (cost) and the surrogate's own cost in
forward-pass equivalents (its wall time, derivatives and all 2^n surrogate values, over the
mean wall time of one real coalition evaluation in the same round). Estimators 1 and 2 on ``v``
alone are printed for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacfwd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

import contribution_worth as worth  # noqa: E402
import shapley_on_training as sot  # noqa: E402

from training.fl import contribution as C  # noqa: E402
from training.fl.coalition import CoalitionUtility  # noqa: E402

SURROGATES = {"metric": ("lin", "quad"), "loss": ("lin", "quad", "taylor1", "taylor2")}
CORRECTIONS = ("none", "extremes", "interp", "paired", "paired-β")
BASELINES = {"estimator 1": C.ESTIMATOR_PERMUTATIONS, "estimator 2": C.ESTIMATOR_PAIRED}


# --- the surrogate ------------------------------------------------------------------------------


def _coalitions(players: Sequence[str]) -> list[frozenset[str]]:
    n = len(players)
    return [frozenset(p for j, p in enumerate(players) if k >> j & 1) for k in range(2**n)]


def _coefficients(
    players: Sequence[str], weights: dict[str, float], coalitions: list[frozenset[str]]
) -> torch.Tensor:
    """``c_i(S) = w_i [i∈S] / W_S − w_i / W_N`` for every coalition (rows) and site (columns)."""
    w_full = sum(weights[p] for p in players)
    rows = []
    for s in coalitions:
        w_s = sum(weights[p] for p in s)
        rows.append([(weights[p] / w_s if p in s else 0.0) - weights[p] / w_full for p in players])
    return torch.tensor(rows, dtype=torch.float32)


def _value_of_logits(logits: torch.Tensor, y: torch.Tensor, value: str) -> torch.Tensor:
    """``logits``: [coalitions, records, classes] -> accuracy or minus the mean loss each."""
    if value == "metric":
        return (logits.argmax(-1) == y).float().mean(-1)
    k = logits.shape[0]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.repeat(k), reduction="none"
    ).reshape(k, -1)
    return -ce.mean(-1)


def surrogates(
    utility: CoalitionUtility,
    updates: dict[str, tuple[dict[str, torch.Tensor], Any, float]],
    players: Sequence[str],
    value: str,
) -> tuple[dict[str, dict[frozenset[str], float]], dict[str, float]]:
    """Every surrogate's value of every coalition, and each one's wall time (seconds)."""
    model = utility.model
    full = {k: t.detach().clone() for k, t in utility.state_of(frozenset(players)).items()}
    names = [k for k, _p in model.named_parameters()]
    deltas = [{k: updates[p][0][k].to(full[k].dtype) for k in names} for p in players]
    x, y = utility.x.to(torch.float32), utility.y.to(torch.int64)
    weights = {p: float(updates[p][2]) for p in players}
    coalitions = _coalitions(players)
    coeffs = _coefficients(players, weights, coalitions)
    n = len(players)

    def logits_at(c: torch.Tensor) -> torch.Tensor:
        params = {k: full[k] + sum(c[i] * deltas[i][k] for i in range(n)) for k in names}
        return functional_call(model, params, (x,))

    def neg_loss_at(c: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(logits_at(c), y)

    zero = torch.zeros(n)
    was_training = model.training
    model.eval()
    out: dict[str, dict[frozenset[str], float]] = {}
    seconds: dict[str, float] = {}
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            z0 = logits_at(zero)
            base_time = time.perf_counter() - t0
        # lin: F(0) + J c.
        t0 = time.perf_counter()
        jac = jacfwd(logits_at)(zero).detach()  # [R, K, n]
        with torch.no_grad():
            lin_logits = z0.unsqueeze(0) + torch.einsum("kn,rcn->krc", coeffs, jac)
            u = _value_of_logits(lin_logits, y, value)
        jac_time = time.perf_counter() - t0
        seconds["lin"] = base_time + jac_time
        out["lin"] = dict(zip(coalitions, u.tolist(), strict=True))
        # quad: + ½ cᵀ H c.
        t0 = time.perf_counter()
        hess = jacfwd(jacfwd(logits_at))(zero).detach()  # [R, K, n, n]
        with torch.no_grad():
            outer = torch.einsum("ki,kj->kij", coeffs, coeffs).reshape(len(coalitions), -1)
            second = outer @ hess.reshape(*hess.shape[:2], -1).reshape(-1, n * n).T
            quad_logits = lin_logits + 0.5 * second.reshape(len(coalitions), *z0.shape)
            u = _value_of_logits(quad_logits, y, value)
        seconds["quad"] = seconds["lin"] + time.perf_counter() - t0
        out["quad"] = dict(zip(coalitions, u.tolist(), strict=True))
        if value == "loss":
            t0 = time.perf_counter()
            with torch.no_grad():
                v0 = float(neg_loss_at(zero))
            grad = jacfwd(neg_loss_at)(zero).detach()
            with torch.no_grad():
                u1 = v0 + coeffs @ grad
            seconds["taylor1"] = time.perf_counter() - t0
            out["taylor1"] = dict(zip(coalitions, u1.tolist(), strict=True))
            t0 = time.perf_counter()
            h = hessian(neg_loss_at)(zero).detach()
            with torch.no_grad():
                u2 = u1 + 0.5 * torch.einsum("ki,ij,kj->k", coeffs, h, coeffs)
            seconds["taylor2"] = seconds["taylor1"] + time.perf_counter() - t0
            out["taylor2"] = dict(zip(coalitions, u2.tolist(), strict=True))
    finally:
        model.train(was_training)
    return out, seconds


# --- the corrections ----------------------------------------------------------------------------


class _Residual:
    """``r(S) = v(S) − β u(S)``, counting the real evaluations it asks for."""

    def __init__(self, v, u: dict[frozenset[str], float], beta: float = 1.0):
        self.v, self.u, self.beta = v, u, beta
        self.asked: set[frozenset[str]] = set()

    def __call__(self, coalition) -> float:
        key = frozenset(coalition)
        self.asked.add(key)
        return self.v(key) - self.beta * self.u[key]


def _interp(players: Sequence[str], r) -> dict[str, float]:
    full, empty = frozenset(players), frozenset()
    raw = {p: ((r(frozenset({p})) - r(empty)) + (r(full) - r(full - {p}))) / 2 for p in players}
    excess = (r(full) - r(empty) - sum(raw.values())) / len(players)
    return {p: raw[p] + excess for p in players}


def _paired(players, r, budget: int, seed: int) -> dict[str, float]:
    return dict(
        C.compute(
            "shapley_sampled",
            players,
            r,
            estimator=C.ESTIMATOR_PAIRED,
            budget=budget,
            truncation=0.0,
            resolution=0.0,
            seed=seed,
        ).scores
    )


def _beta(v, u: dict[frozenset[str], float], coalitions: list[frozenset[str]]) -> float:
    """Least-squares slope of v on u over ``coalitions`` (each centred), 1 if degenerate."""
    xs = [u[c] for c in coalitions]
    ys = [v(c) for c in coalitions]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    if sxx <= 0:
        return 1.0
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sxx


def corrected(
    players: Sequence[str], v, u: dict[frozenset[str], float], seed: int
) -> dict[str, tuple[dict[str, float], int]]:
    """Each correction's scores and real evaluations (besides v(N)) over surrogate ``u``."""
    n = len(players)
    phi_u = dict(
        C.shapley_exact(
            players, lambda s: u[frozenset(s)], max_players=sot.REFERENCE_MAX_PLAYERS
        ).scores
    )
    out: dict[str, tuple[dict[str, float], int]] = {"none": (phi_u, 0)}
    budget = C.default_budget(n)
    for name in ("extremes", "interp", "paired"):
        r = _Residual(v, u)
        if name == "interp":
            phi_r = _interp(players, r)
        else:
            phi_r = _paired(players, r, 2 * n + 2 if name == "extremes" else budget, seed)
        out[name] = ({p: phi_u[p] + phi_r[p] for p in players}, len(r.asked))
    # β fitted on the coalitions estimator 2 evaluates (the same plan, so no more evaluations).
    extremes, middle = C.paired_plan(players, budget, seed)
    planned = list(extremes) + [
        c for t in middle for s in middle[t] for c in (s, frozenset(players) - s)
    ]
    beta = _beta(v, u, planned)
    r = _Residual(v, u, beta)
    phi_r = _paired(players, r, budget, seed)
    out["paired-β"] = (
        {p: beta * phi_u[p] + phi_r[p] for p in players},
        len(r.asked | set(planned)),
    )
    return out


# --- one round ----------------------------------------------------------------------------------


def score_round(base_state, updates, validation, first, seed, value="metric") -> dict[str, Any]:
    """Exact Shapley, the baselines and every surrogate × correction on one round."""
    x, y = validation
    utility = CoalitionUtility(
        base_state=base_state,
        updates=updates,
        model=worth._model(0, first),
        x=x,
        y=y,
        modality="tabular",
        combine="mean",
        value=value,
        loss=worth.CFG.loss,
    )
    players = sorted(updates)
    v = worth._Memo(utility)
    t0 = time.perf_counter()
    for s in _coalitions(players):
        v(s)
    per_eval = (time.perf_counter() - t0) / 2 ** len(players)
    settings = dict(worth.CONTRIBUTION_DEFAULTS)
    args = {
        "permutations": settings["permutations"],
        "truncation": settings["truncation"],
        "tolerance": settings["tolerance"],
        "seed": seed,
        "resolution": utility.resolution,
    }
    scores = {
        "exact": dict(C.shapley_exact(players, v, max_players=sot.REFERENCE_MAX_PLAYERS).scores)
    }
    evaluations = {"exact": 2 ** len(players)}
    for name, estimator in BASELINES.items():
        r = C.compute("shapley_sampled", players, v, **args, estimator=estimator)
        scores[name], evaluations[name] = dict(r.scores), r.evaluations
    tables, seconds = surrogates(utility, updates, players, value)
    surrogate_error = {}
    for s_name, u in tables.items():
        surrogate_error[s_name] = {
            "value_rmse": statistics.fmean([(u[c] - v(c)) ** 2 for c in u]) ** 0.5,
            "empty_gap": u[frozenset()] - v(frozenset()),
        }
        for c_name, (sc, evals) in corrected(players, v, u, seed).items():
            key = f"{s_name}+{c_name}"
            scores[key], evaluations[key] = sc, evals
    # contribution_worth sums every method of either value: the other value's names as NaN.
    for name in {m for val in SURROGATES for m in methods_for(val)} - set(scores):
        scores[name], evaluations[name] = dict.fromkeys(players, float("nan")), 0
    return {
        "v_full": v(frozenset(players)),
        "v_empty": v(frozenset()),
        "resolution": utility.resolution,
        "threshold": max(settings["truncation"], utility.resolution),
        "scores": scores,
        "evaluations": evaluations,
        "surrogate_seconds": seconds,
        "eval_seconds": per_eval,
        "surrogate_error": surrogate_error,
        "params": {},
    }


# --- measuring ----------------------------------------------------------------------------------


def methods_for(value: str) -> list[str]:
    return [*BASELINES] + [f"{s}+{c}" for s in SURROGATES[value] for c in CORRECTIONS]


def measure(n: int, seeds: Sequence[int], rounds: int, values: Sequence[str]) -> dict[str, Any]:
    """Train once per seed (``shapley_on_training``'s sites), score every value; the errors."""
    saved = (worth.known_worth_sites, worth.score_round, worth.METHODS)
    worth.known_worth_sites, worth.score_round = sot.sites_for(n), score_round
    names = sorted({m for value in values for m in methods_for(value)} | {"exact"})
    worth.METHODS = tuple((m, m) for m in names)
    try:
        runs = [worth.run_seed(seed, rounds, worth.DEFAULT_NOISE, list(values)) for seed in seeds]
    finally:
        worth.known_worth_sites, worth.score_round, worth.METHODS = saved
    out: dict[str, Any] = {}
    for value in values:
        found: dict[str, Any] = {}
        for name in methods_for(value):
            summed, per_round, evaluations, fpe = [], [], [], []
            for run in runs:
                r = run["by_value"][value]
                summed.append(
                    worth.normalised_error(r["totals"][name], r["totals"]["exact"], r["total"])
                )
                for rnd in r["rounds"]:
                    total = rnd["v_full"] - rnd["v_empty"]
                    if abs(total) > rnd["threshold"]:
                        per_round.append(
                            worth.normalised_error(
                                rnd["scores"][name], rnd["scores"]["exact"], total
                            )
                        )
                    evaluations.append(rnd["evaluations"][name])
                    surrogate = name.split("+")[0]
                    if surrogate in rnd["surrogate_seconds"]:
                        fpe.append(rnd["surrogate_seconds"][surrogate] / rnd["eval_seconds"])
            found[name] = {
                "summed_mean": statistics.fmean(summed),
                "summed_max": max(summed),
                "per_round_median": statistics.median(per_round) if per_round else None,
                "rounds_moved": len(per_round),
                "cost": statistics.fmean(evaluations) / 2**n,
                "surrogate_fpe": statistics.median(fpe) if fpe else None,
            }
        rmse = {}
        for s_name in SURROGATES[value]:
            rel = []
            for run in runs:
                for rnd in run["by_value"][value]["rounds"]:
                    total = abs(rnd["v_full"] - rnd["v_empty"])
                    if total > rnd["threshold"]:
                        rel.append(rnd["surrogate_error"][s_name]["value_rmse"] / total)
            rmse[s_name] = statistics.median(rel) if rel else None
        out[value] = {"methods": found, "value_rmse_over_total": rmse}
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI: 6 sites, 1 seed, 2 rounds")
    parser.add_argument("--sites", type=int, nargs="+", default=None, help="n (default 6 8)")
    parser.add_argument("--seeds", type=int, default=None, help="how many seeds (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 10)")
    parser.add_argument("--values", nargs="+", choices=worth.VALUES, default=list(worth.VALUES))
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    args.sites = args.sites or ([6] if args.quick else [6, 8])
    args.seeds = args.seeds or (1 if args.quick else 10)
    args.rounds = args.rounds or (2 if args.quick else 10)
    bad = [n for n in args.sites if not 6 <= n <= sot.REFERENCE_MAX_PLAYERS]
    if bad:
        parser.error(f"--sites must be between 6 and {sot.REFERENCE_MAX_PLAYERS} (exact Shapley)")
    return args


def main(argv: Sequence[str] | None = None, *, log=print) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    seeds = list(range(args.seed, args.seed + args.seeds))
    log(
        f"seeds {seeds}, {args.rounds} rounds; error = Σ|φ̂−φ| / |v(N)−v(∅)| against exact "
        "Shapley; target: error <= 0.05 at cost <= 0.333 (cost: real coalition evaluations / "
        "2^n; surrogate: its own cost in forward-pass equivalents)"
    )
    log(
        "| sites | value | method | error of the summed scores: mean (worst) "
        "| per-round error, median (rounds) | cost | surrogate cost (fwd eq.) |"
    )
    log("|---|---|---|---|---|---|---|")
    results: dict[str, Any] = {}
    for n in args.sites:
        found = measure(n, seeds, args.rounds, args.values)
        for value in args.values:
            results[f"{n}/{value}"] = found[value]
            for name, f in found[value]["methods"].items():
                med = "-" if f["per_round_median"] is None else f"{f['per_round_median']:.3f}"
                fpe = "-" if f["surrogate_fpe"] is None else f"{f['surrogate_fpe']:.0f}"
                log(
                    f"| {n} | {value} | {name} | {f['summed_mean']:.3f} ({f['summed_max']:.3f}) "
                    f"| {med} ({f['rounds_moved']}) | {f['cost']:.2f} | {fpe} |"
                )
        for value in args.values:
            rm = found[value]["value_rmse_over_total"]
            log(
                f"  {n} sites, {value}: surrogate RMS error of v over |v(N)−v(∅)| (median "
                "round): " + ", ".join(f"{k} {x:.3f}" for k, x in rm.items() if x is not None)
            )
    log(f"\nrun time {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(results, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
