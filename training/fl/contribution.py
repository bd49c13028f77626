"""Contribution scores over a utility of coalitions: leave-one-out and Shapley values (no Django,
no torch).

Hand-written, as docs/architecture.md (section 7) says for contribution scoring: the well-kept
Shapley libraries
(shap, for one) explain a model's *features* and sample with their own generators, whereas here
the players are sites, a coalition's value is the validation metric (or minus the validation
loss) of a model built from their updates (:mod:`training.fl.coalition`), and every score must
be recomputable by anyone from the coalition values recorded in the ledger. So this module
never imports torch or numpy: the web process and the auditors' tools can replay it.

A *utility* maps a coalition (a ``frozenset`` of site ids) to a finite float; the empty coalition
is the round's input model and the full set the round's model. :class:`CachedUtility` makes sure no
coalition is evaluated twice and counts the evaluations. The methods:

* ``leave_one_out``: ``v(N) - v(N \\ {i})``; ``n + 1`` evaluations. Cheap, but two sites with the
  same data each look worthless (either one can be left out).
* ``shapley_exact``: ``φ_i = Σ_{S ⊆ N\\{i}} |S|! (n-|S|-1)! / n! · (v(S ∪ {i}) - v(S))``, every one
  of the ``2^n`` coalitions evaluated (up to :data:`EXACT_MAX_PLAYERS` sites). Efficient (the
  scores sum to ``v(N) - v(∅)``), symmetric, and a site that changes nothing scores 0.
* ``shapley_sampled``: GTG-Shapley style (Liu et al., 2022) Monte Carlo over permutations:

  - *between-round truncation*: when ``|v(N) - v(∅)| <= truncation`` the round changed nothing
    worth sharing out, and every score is 0 (two evaluations);
  - *guided permutations*: permutation ``k`` puts ``players[k mod n]`` first (every site leads
    equally often) and shuffles the rest with a Fisher-Yates shuffle whose random numbers are
    ``int(sha256("<seed>:<k>:<j>")) mod (j + 1)``: fully specified, so the permutations can be
    regenerated in any language from the recorded seed;
  - *within-round truncation*: walking a permutation, once ``|v(N) - v(prefix)| < truncation``
    the remaining sites' marginal gains are taken as 0 and not evaluated;
  - *convergence*: after each full cycle of ``n`` permutations (from the second on) the run stops
    when ``Σ_i |φ_i - φ_i(previous cycle)| <= tolerance · Σ_i |φ_i|``, and in any case after
    ``permutations`` permutations.

  The estimate is the mean marginal gain over the permutations run, and it is deterministic
  given the seed and the coalition values. This is *estimator 1*: every entry whose params
  hold no ``estimator`` was made by it, and is still recomputed by it.

  *Estimator 2* (params ``{"estimator": 2, "budget", "resolution", "seed", "truncation"}``,
  the default since issue 15 from :data:`PAIRED_MIN_PLAYERS` sites on; below that the walk is
  the default, being the more accurate there at its cost) is a paired kernel estimator for
  consortium-sized games. Measured on digits, estimator 1 had a normalised error of 0.22 at
  only 2.3x fewer evaluations than exact at 6 sites, and its between-round truncation zeroed
  half the rounds (``benchmarks/science/shapley_estimator.py``, docs/science.md). Estimator 2:

  - evaluates the *extremes* (∅, N, every singleton and every complement of one: ``2n + 2``),
    which give every site's first and last marginal gains exactly, then complementary pairs
    ``(S, N \\ S)`` of the middle sizes, the same number per size ``t`` (2 to n/2), drawn
    without repetition from the seed (:func:`paired_plan`), up to ``budget`` coalitions
    (:func:`default_budget`: a third of ``2^n``). The plan depends on no value, so the sites
    can be asked for it up front (:func:`plan_coalitions`);
  - works on the self-dual game ``g(S) = (v(S) - v(N \\ S) + v(N) - v(∅)) / 2``, which has
    the same Shapley values as ``v`` and is additive whenever ``v`` has no interaction of more
    than two sites, so a pair is one equation and pairwise interactions cost nothing;
  - fits ``g(S) ≈ Σ_{i∈S} β_i`` by least squares weighted by the Shapley kernel's mass per
    size, subject to ``Σ β_i = v(N) - v(∅)`` (a ``(n+1)``-square system solved by Gaussian
    elimination in plain floats), then adds the Shapley value of the residual game estimated
    by stratified means per size, and shares what that correction moved back out equally:
    the scores sum to ``v(N) - v(∅)`` (up to float rounding), and with every coalition drawn
    they are the exact values.
  - *truncation against the metric's resolution*: the coordinator passes the value's step
    (``resolution``: ``1/V`` for accuracy on ``V`` records, 0 for Dice or the loss) and the
    threshold is ``max(truncation, resolution)``, differences being counted in whole steps.
    The round scores 0 for everyone only when *no extreme coalition* (no site alone, no site
    left out, nor the round) moved the metric by more than that threshold: a converged round
    whose total moved by nothing while single sites still moved it is scored, not zeroed,
    and a move of one record, which a small validation set makes on noise, is not a move.
    There is no within-round truncation and no convergence rule (``tolerance`` is not used):
    the coalitions are planned, and skipping some by their values would bias the fit.

  Estimator 1 is still used, with these params, when even ``2n + 2`` models do not fit the
  sites' ``max_models``.

  *Estimator 3* (params as estimator 2's, with ``"estimator": 3`` and ``"surrogate"``: a value
  for every one of the ``2^n`` coalitions, the coalition with bit ``j`` set for the ``j``-th
  sorted player at index :func:`surrogate_index`) is estimator 2 with a control variate. On
  real FedAvg rounds estimator 2 alone errs by 0.26-0.35 of the round's change at 6 sites and
  0.06-0.11 at 8-10 valued by accuracy (docs/science.md): a coalition's model averages its
  members' updates, so adding a site changes every other's weight, and the values interact at
  every order. The coordinator, which holds the round's model and its validation set, makes a
  cheap surrogate ``u`` of every coalition's value (:mod:`training.fl.coalition_surrogate`:
  the logits to second order along the updates), and the scores are ``u``'s exact Shapley
  values plus estimator 2's estimate of the residual game ``v − u`` on estimator 2's own plan
  (never truncated: the residual is small by design). The round is zeroed by ``v``'s extremes
  as estimator 2 zeroes it. The scores sum to ``v(N) − v(∅)`` whatever ``u`` is, a perfect
  ``u`` gives the exact values, and with every coalition drawn any ``u`` does; the recorded
  ``u`` is what a replay needs besides the coalition values (it does not recompute ``u``,
  which needs the model and the validation set). At most :data:`SURROGATE_MAX_PLAYERS` sites.

:func:`scores_from_coalitions` recomputes the scores from the recorded coalition values alone by
running the very same code with a lookup table as the utility, so the recomputed floats are
bit-identical to the recorded ones (a missing coalition is an error).

Why one module: every method, both estimators, the coalition plans sent to the sites and the
replay of a ledger entry must be the same code, since an auditor's ``verify_report`` reruns an
entry with whatever method and params it names; spread over modules, a plan and its replay
could drift apart, and the one module the web process and the auditors' tools import (no torch,
no numpy) would become several.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, TypedDict

__all__ = [
    "DEFAULT_ESTIMATOR",
    "PAIRED_MIN_PLAYERS",
    "default_estimator",
    "DEFAULT_PERMUTATIONS",
    "DEFAULT_TOLERANCE",
    "DEFAULT_TRUNCATION",
    "ESTIMATORS",
    "SURROGATE_MAX_PLAYERS",
    "EXACT_MAX_PLAYERS",
    "METHODS",
    "CachedUtility",
    "Contributions",
    "compute",
    "default_budget",
    "leave_one_out",
    "paired_plan",
    "plan_coalitions",
    "resolve_method",
    "sampled_kwargs",
    "scores_from_coalitions",
    "shapley_exact",
    "shapley_sampled",
]

LEAVE_ONE_OUT = "leave_one_out"
SHAPLEY_EXACT = "shapley_exact"
SHAPLEY_SAMPLED = "shapley_sampled"
METHODS = (LEAVE_ONE_OUT, SHAPLEY_EXACT, SHAPLEY_SAMPLED)

#: 2^8 = 256 coalitions: beyond this, exact values cost too many model evaluations per round.
EXACT_MAX_PLAYERS = 8
DEFAULT_PERMUTATIONS = 100
DEFAULT_TRUNCATION = 0.005
DEFAULT_TOLERANCE = 0.02
#: The sampled method's estimators: 1 the GTG-Shapley permutation walk (what every entry
#: without an ``estimator`` param was made with), 2 the paired kernel estimator.
ESTIMATOR_PERMUTATIONS = 1
ESTIMATOR_PAIRED = 2
#: Estimator 2 on the residual of a surrogate whose Shapley value is exact (module docstring).
ESTIMATOR_CONTROL_VARIATE = 3
ESTIMATORS = (ESTIMATOR_PERMUTATIONS, ESTIMATOR_PAIRED, ESTIMATOR_CONTROL_VARIATE)
#: Estimator 3 records its surrogate's value of every one of the 2^n coalitions: 4,096 floats
#: at 12 sites. Above that estimator 2 alone meets the error target on real training
#: (docs/science.md), and the table would outgrow a ledger entry.
SURROGATE_MAX_PLAYERS = 12
DEFAULT_ESTIMATOR = ESTIMATOR_PAIRED
#: Below this many sites the walk is the default: with a third of 2^n coalitions the paired
#: estimator has too few middle pairs (docs/science.md: at 6 sites it errs 0.10 of the total
#: where the walk, evaluating nearly every coalition, errs 0.05); from 8 on it is the better.
PAIRED_MIN_PLAYERS = 8


def default_estimator(n_players: int) -> int:
    """The sampled method's estimator for ``n_players`` sites when none is asked for."""
    return DEFAULT_ESTIMATOR if n_players >= PAIRED_MIN_PLAYERS else ESTIMATOR_PERMUTATIONS


#: The paired estimator's default budget is at most this share of the 2^n coalitions.
BUDGET_SHARE = 1 / 3

#: A set of players: site ids (institution slugs).
Coalition = frozenset[str]
#: The value of a coalition: the validation metric (or minus the validation loss) of the model
#: its updates make; higher is better, and nothing here depends on which.
Utility = Callable[[Coalition], float]


class CoalitionRow(TypedDict):
    """One recorded coalition value, as the ledger holds it."""

    sites: list[str]
    value: float


class CoalitionMissing(ValueError):
    """A recomputation needed a coalition value that was not recorded."""


def resolve_method(method: str, n_players: int) -> str:
    """``auto`` is exact Shapley up to :data:`EXACT_MAX_PLAYERS` players, sampled above."""
    if method == "auto":
        return SHAPLEY_EXACT if n_players <= EXACT_MAX_PLAYERS else SHAPLEY_SAMPLED
    if method not in METHODS:
        raise ValueError(f"unknown contribution method {method!r} (auto or {', '.join(METHODS)})")
    return method


class CachedUtility:
    """A utility that evaluates each coalition at most once.

    ``values`` keeps every coalition evaluated (what the ledger records) and ``evaluations``
    counts the calls to the wrapped utility. A non-finite value is refused at once: canonical
    JSON cannot record it, and a NaN would poison every score it touches.
    """

    def __init__(self, utility: Utility):
        self._utility = utility
        self.values: dict[Coalition, float] = {}

    @property
    def evaluations(self) -> int:
        return len(self.values)

    def __call__(self, coalition: Iterable[str]) -> float:
        key = frozenset(coalition)
        value = self.values.get(key)
        if value is None:
            value = self._utility(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"utility of {sorted(key)} is not a number: {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"utility of {sorted(key)} is not finite: {value!r}")
            self.values[key] = value
        return value


class _Table:
    """Recorded coalition values as a utility (for recomputation)."""

    def __init__(self, values: Mapping[Coalition, float]):
        self.values = dict(values)

    def __call__(self, coalition: Iterable[str]) -> float:
        key = frozenset(coalition)
        if key not in self.values:
            raise CoalitionMissing(f"the coalition {sorted(key)} was not recorded")
        return self.values[key]


@dataclass(frozen=True)
class Contributions:
    """The outcome of one scoring: the method actually used, its parameters, a score per
    player, every coalition value evaluated, and how many evaluations that took."""

    method: str
    params: dict[str, Any]
    players: tuple[str, ...]
    scores: dict[str, float]
    values: dict[Coalition, float] = field(repr=False)
    evaluations: int = 0

    def coalitions(self) -> list[CoalitionRow]:
        """Every evaluated coalition as ``{"sites": sorted ids, "value": v}``, smallest first."""
        rows: list[CoalitionRow] = [
            {"sites": sorted(c), "value": v} for c, v in self.values.items()
        ]
        rows.sort(key=lambda r: (len(r["sites"]), r["sites"]))
        return rows


def _players(players: Iterable[str]) -> tuple[str, ...]:
    out = tuple(sorted(players))
    if not out:
        raise ValueError("contribution scoring needs at least one player")
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate players: {list(out)}")
    return out


# --- the methods, written over any utility (live or recorded) ---------------------------------


def _loo_scores(players: tuple[str, ...], v: Utility) -> dict[str, float]:
    full = frozenset(players)
    total = v(full)
    return {p: total - v(full - {p}) for p in players}


def _exact_scores(players: tuple[str, ...], v: Utility) -> dict[str, float]:
    n = len(players)
    # weight[s] = s! (n - s - 1)! / n!, the share of permutations where a given coalition of
    # size s precedes the player.
    weight = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    scores: dict[str, float] = {}
    for p in players:
        others = [q for q in players if q != p]
        total = 0.0
        for size in range(n):
            w = weight[size]
            for subset in combinations(others, size):
                s = frozenset(subset)
                total += w * (v(s | {p}) - v(s))
        scores[p] = total
    return scores


def _draw(seed: int, k: int, j: int) -> int:
    digest = hashlib.sha256(f"{seed}:{k}:{j}".encode("ascii")).digest()
    return int.from_bytes(digest, "big") % (j + 1)


def guided_permutation(players: Sequence[str], k: int, seed: int) -> list[str]:
    """Permutation ``k`` of the sampled method: ``players[k mod n]`` first, the rest shuffled
    (Fisher-Yates from the end, ``j`` from ``len(rest) - 1`` down to 1)."""
    n = len(players)
    first = players[k % n]
    rest = [p for p in players if p != first]
    for j in range(len(rest) - 1, 0, -1):
        i = _draw(seed, k, j)
        rest[i], rest[j] = rest[j], rest[i]
    return [first, *rest]


def _sampled_scores(
    players: tuple[str, ...], v: Utility, params: Mapping[str, Any]
) -> dict[str, float]:
    permutations = int(params["permutations"])
    truncation = float(params["truncation"])
    tolerance = float(params["tolerance"])
    seed = int(params["seed"])
    n = len(players)
    empty: Coalition = frozenset()
    full = frozenset(players)
    v_empty, v_full = v(empty), v(full)
    sums = dict.fromkeys(players, 0.0)
    if abs(v_full - v_empty) <= truncation:
        return dict(sums)  # between-round truncation: nothing worth sharing out
    previous: dict[str, float] | None = None
    estimate = dict(sums)
    for k in range(permutations):
        prefix, v_prefix = empty, v_empty
        for p in guided_permutation(players, k, seed):
            if abs(v_full - v_prefix) < truncation:
                break  # within-round truncation: the rest add (about) nothing
            prefix = prefix | {p}
            v_next = v(prefix)
            sums[p] += v_next - v_prefix
            v_prefix = v_next
        runs = k + 1
        estimate = {p: sums[p] / runs for p in players}
        if runs % n == 0:
            if previous is not None:
                change = sum(abs(estimate[p] - previous[p]) for p in players)
                scale = sum(abs(x) for x in estimate.values())
                if change <= tolerance * scale:
                    break
            previous = estimate
    return estimate


# --- the paired estimator (estimator 2) -------------------------------------------------------


def _moved(a: float, b: float, threshold: float, resolution: float) -> bool:
    """Whether ``a`` and ``b`` differ by more than ``threshold``, differences being counted in
    whole steps of ``resolution`` when it is positive (so that float rounding of values that
    are multiples of one step cannot decide the comparison)."""
    diff = abs(a - b)
    if resolution > 0:
        diff = round(diff / resolution) * resolution
    return diff > threshold


def _pair_strata(n: int) -> list[tuple[int, int, float]]:
    """``(t, pairs, mass)`` for each middle stratum ``2 <= t <= n/2``: the coalitions of sizes
    ``t`` and ``n - t``, as complementary pairs (``C(n, t)`` of them, half that when
    ``2t = n``), and their total Shapley-kernel weight ``(n - 1) / (t (n - t))`` per size."""
    out = []
    for t in range(2, n // 2 + 1):
        pairs = math.comb(n, t) if 2 * t != n else math.comb(n, t) // 2
        sizes = 2 if 2 * t != n else 1
        out.append((t, pairs, sizes * (n - 1) / (t * (n - t))))
    return out


def _extremes(players: tuple[str, ...]) -> list[Coalition]:
    """∅, N, every singleton and every complement of one: the coalitions always evaluated."""
    full = frozenset(players)
    out: list[Coalition] = [frozenset(), full]
    for p in players:
        for c in (frozenset({p}), full - {p}):
            if c not in out:
                out.append(c)
    return out


def _allocate(pairs_left: int, strata: list[tuple[int, int, float]]) -> dict[int, int]:
    """How many pairs each middle stratum gets: the same number each (the Shapley value weighs
    every coalition size alike, and the correction averages within each), one at a time,
    the stratum with the fewest first and the larger ``t`` on ties, never more than a stratum
    holds."""
    out = {t: 0 for t, _pairs, _mass in strata}
    caps = {t: pairs for t, pairs, _mass in strata}
    while pairs_left > 0:
        open_ = [t for t in out if out[t] < caps[t]]
        if not open_:
            break
        t = min(open_, key=lambda x: (out[x], -x))
        out[t] += 1
        pairs_left -= 1
    return {t: k for t, k in out.items() if k}


def _canonical(players: tuple[str, ...], coalition: Coalition) -> Coalition:
    """The side of a complementary pair that stands for it: the smaller, or, for two halves,
    the one holding the first player."""
    n = len(players)
    if 2 * len(coalition) > n or (2 * len(coalition) == n and players[0] not in coalition):
        return frozenset(players) - coalition
    return coalition


def paired_plan(
    players: Sequence[str], budget: int, seed: int
) -> tuple[list[Coalition], dict[int, list[Coalition]]]:
    """The coalitions estimator 2 evaluates, from the players, the budget and the seed alone.

    Returns ``(extremes, middle)``: the extremes (:func:`_extremes`, always all of them) and,
    per middle stratum ``t``, the canonical sides of the pairs drawn (:func:`_allocate` says how
    many). A stratum drawn whole is enumerated; otherwise its pairs are drawn without
    repetition, draw ``k`` being a partial Fisher-Yates shuffle of the sorted players whose
    random numbers are ``int(sha256("<seed>:pair:<t>:<k>:<j>")) mod (j + 1)`` for ``j`` from
    ``n - 1`` down to ``n - t`` (the last ``t`` places are the coalition), a repeat being
    drawn again."""
    ps = tuple(sorted(players))
    n = len(ps)
    extremes = _extremes(ps)
    pairs_left = max(0, (budget - len(extremes)) // 2)
    strata = _pair_strata(n)
    middle: dict[int, list[Coalition]] = {}
    for t, count in _allocate(pairs_left, strata).items():
        pairs = dict((s[0], s[1]) for s in strata)[t]
        if count >= pairs:
            middle[t] = [
                frozenset(c)
                for c in combinations(ps, t)
                if _canonical(ps, frozenset(c)) == frozenset(c)
            ]
            continue
        seen: set[Coalition] = set()
        drawn: list[Coalition] = []
        k = 0
        while len(drawn) < count:
            order = list(ps)
            for j in range(n - 1, n - t - 1, -1):
                digest = hashlib.sha256(f"{seed}:pair:{t}:{k}:{j}".encode("ascii")).digest()
                i = int.from_bytes(digest, "big") % (j + 1)
                order[i], order[j] = order[j], order[i]
            side = _canonical(ps, frozenset(order[n - t :]))
            if side not in seen:
                seen.add(side)
                drawn.append(side)
            k += 1
        middle[t] = drawn
    return extremes, middle


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (plain floats, a fixed order of operations,
    so the same inputs give the same bits anywhere)."""
    size = len(rhs)
    a = [row[:] + [rhs[r]] for r, row in enumerate(matrix)]
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(a[r][col]))
        if a[pivot][col] == 0.0:
            raise ValueError("the paired estimator's equations are singular")
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, size):
            factor = a[r][col] / a[col][col]
            if factor != 0.0:
                for c in range(col, size + 1):
                    a[r][c] -= factor * a[col][c]
    out = [0.0] * size
    for r in range(size - 1, -1, -1):
        acc = a[r][size]
        for c in range(r + 1, size):
            acc -= a[r][c] * out[c]
        out[r] = acc / a[r][r]
    return out


def _paired_scores(
    players: tuple[str, ...], v: Utility, params: Mapping[str, Any], *, truncate: bool = True
) -> dict[str, float]:
    budget = int(params["budget"])
    seed = int(params["seed"])
    threshold = max(float(params["truncation"]), float(params["resolution"]))
    resolution = float(params["resolution"])
    n = len(players)
    full = frozenset(players)
    extremes, middle = paired_plan(players, budget, seed)
    values = {c: v(c) for c in extremes}
    v_empty, v_full = values[frozenset()], values[full]
    total = v_full - v_empty
    if truncate and not any(_moved(x, v_empty, threshold, resolution) for x in values.values()):
        # Between-round truncation: no site, alone or left out, moved the metric.
        return dict.fromkeys(players, 0.0)
    if n == 1:
        return {players[0]: total}
    # Equations: for each pair (S, N \\ S), the self-dual game g(S) = (v(S) - v(N \\ S) +
    # v(N) - v(∅)) / 2 ≈ Σ_{i∈S} φ_i, weighted by its stratum's kernel mass over the pairs
    # drawn from it.
    rows: list[tuple[Coalition, float, float]] = []
    singles = [frozenset({p}) for p in players]
    # Stratum t = 1: sizes 1 and n - 1, mass 2 (n - 1) / (n - 1) = 2 over n pairs (for n = 2,
    # one pair of mass 1).
    weight = 2 / n if n > 2 else 1.0
    for s in singles if n != 2 else singles[:1]:
        g = (values[s] - values[full - s] + total) / 2
        rows.append((s, g, weight))
    masses = {t: mass for t, _pairs, mass in _pair_strata(n)}
    for t in sorted(middle):
        drawn = middle[t]
        weight = masses[t] / len(drawn)
        for s in drawn:
            g = (v(s) - v(full - s) + total) / 2
            rows.append((s, g, weight))
    index = {p: i for i, p in enumerate(players)}
    # The constrained weighted least squares: [2AᵀWA 1; 1ᵀ 0] [φ; λ] = [2AᵀWg; v(N) - v(∅)].
    size = n + 1
    matrix = [[0.0] * size for _ in range(size)]
    rhs = [0.0] * size
    for s, g, weight in rows:
        members = sorted(index[p] for p in s)
        for a in members:
            rhs[a] += 2 * weight * g
            for b in members:
                matrix[a][b] += 2 * weight
    for i in range(n):
        matrix[i][n] = 1.0
        matrix[n][i] = 1.0
    rhs[n] = total
    solution = _solve(matrix, rhs)
    beta = {p: solution[index[p]] for p in players}
    # The correction: the Shapley value of the residual r(S) = g(S) - Σ_{i∈S} β_i, a self-dual
    # game with r(N) = 0, is (2/n) Σ_{k=1}^{n-1} A_i(k), A_i(k) the mean of r over the
    # coalitions of size k holding i; each pair (S, N \ S) gives r(S) to the members of S (at
    # size |S|) and -r(S) to the others (at size n - |S|). Sizes never drawn count 0: there the
    # regression is taken as right.
    sums = {p: [[0.0, 0] for _k in range(n + 1)] for p in players}
    pairs = [frozenset({p}) for p in players] if n > 2 else [singles[0]]
    pairs += [s for t in sorted(middle) for s in middle[t]]
    for s in pairs:
        r = (v(s) - v(full - s) + total) / 2 - sum(beta[p] for p in players if p in s)
        for p in players:
            cell = sums[p][len(s)] if p in s else sums[p][n - len(s)]
            cell[0] += r if p in s else -r
            cell[1] += 1
    scores = {}
    for p in players:
        correction = 0.0
        for k in range(1, n):
            acc, count = sums[p][k]
            if count:
                correction += acc / count
        scores[p] = beta[p] + 2 * correction / n
    # The correction's parts need not sum to 0: share what it moved back out equally, so that
    # the scores still sum to v(N) - v(∅).
    excess = (total - sum(scores[p] for p in players)) / n
    return {p: scores[p] + excess for p in players}


# --- the control variate (estimator 3) ---------------------------------------------------------


def surrogate_index(players: Sequence[str], coalition: Iterable[str]) -> int:
    """Where a coalition's surrogate value sits in estimator 3's table: bit ``j`` set for the
    ``j``-th of the sorted players (so ∅ is 0 and the full set ``2^n - 1``)."""
    ps = tuple(sorted(players))
    members = set(coalition)
    return sum(1 << j for j, p in enumerate(ps) if p in members)


def _surrogate_table(players: tuple[str, ...], surrogate: Any) -> _Table:
    n = len(players)
    if isinstance(surrogate, str | bytes) or not isinstance(surrogate, Sequence):
        raise ValueError("estimator 3 needs its surrogate: a list of 2^n coalition values")
    if len(surrogate) != 2**n:
        raise ValueError(
            f"estimator 3's surrogate holds {len(surrogate)} values; {n} sites have "
            f"{2**n} coalitions"
        )
    values: dict[Coalition, float] = {}
    for index, value in enumerate(surrogate):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"surrogate value {index} is not a number: {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"surrogate value {index} is not finite: {value!r}")
        key = frozenset(p for j, p in enumerate(players) if index >> j & 1)
        values[key] = float(value)
    return _Table(values)


def _control_variate_params(
    budget: int, truncation: float, resolution: float, seed: int, surrogate: Any, n: int
) -> dict[str, Any]:
    params: dict[str, Any] = _paired_params(budget, truncation, resolution, seed)
    params["estimator"] = ESTIMATOR_CONTROL_VARIATE
    if n > SURROGATE_MAX_PLAYERS:
        raise ValueError(
            f"estimator 3 records a surrogate value for each of the 2^n coalitions: at most "
            f"{SURROGATE_MAX_PLAYERS} sites (estimator 2 above)"
        )
    _surrogate_table(tuple(f"{j}" for j in range(n)), surrogate)  # refuses a malformed one
    params["surrogate"] = [float(x) for x in surrogate]
    return params


def _control_variate_scores(
    players: tuple[str, ...], v: Utility, params: Mapping[str, Any]
) -> dict[str, float]:
    """``φ(u) + φ̂(v − u)``: the surrogate's exact Shapley value plus estimator 2's estimate of
    the residual game's, on estimator 2's plan (so the same coalitions are evaluated). The
    round is zeroed as estimator 2 zeroes it, by ``v``'s extremes; the residual is estimated
    on the whole plan, never truncated (it is small by design: a residual whose extremes do
    not move may still move in the middle)."""
    u = _surrogate_table(players, params["surrogate"])
    threshold = max(float(params["truncation"]), float(params["resolution"]))
    resolution = float(params["resolution"])
    extremes = _extremes(players)
    v_empty = v(frozenset())
    if not any(_moved(v(c), v_empty, threshold, resolution) for c in extremes):
        return dict.fromkeys(players, 0.0)
    exact_u = _exact_scores(players, u)

    def residual(coalition: Iterable[str]) -> float:
        key = frozenset(coalition)
        return v(key) - u(key)

    residual_params = {"budget": int(params["budget"]), "seed": int(params["seed"])}
    estimated = _paired_scores(
        players, residual, residual_params | {"truncation": 0.0, "resolution": 0.0}, truncate=False
    )
    return {p: exact_u[p] + estimated[p] for p in players}


# --- public entry points ----------------------------------------------------------------------


def leave_one_out(players: Iterable[str], utility: Utility) -> Contributions:
    """Leave-one-out scores: what the full set loses without each player."""
    ps = _players(players)
    v = utility if isinstance(utility, CachedUtility) else CachedUtility(utility)
    scores = _loo_scores(ps, v)
    return Contributions(LEAVE_ONE_OUT, {}, ps, scores, dict(v.values), v.evaluations)


def shapley_exact(
    players: Iterable[str], utility: Utility, *, max_players: int = EXACT_MAX_PLAYERS
) -> Contributions:
    """Exact Shapley values (``2^n`` evaluations; at most ``max_players`` players).

    The product keeps the default (:data:`EXACT_MAX_PLAYERS`); the science benchmarks raise it
    to take exact Shapley as the reference the sampled estimators are measured against."""
    ps = _players(players)
    if len(ps) > max_players:
        raise ValueError(
            f"exact Shapley values for {len(ps)} players would evaluate 2^{len(ps)} coalitions; "
            f"at most {max_players} players (use shapley_sampled)"
        )
    v = utility if isinstance(utility, CachedUtility) else CachedUtility(utility)
    scores = _exact_scores(ps, v)
    return Contributions(SHAPLEY_EXACT, {}, ps, scores, dict(v.values), v.evaluations)


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and not negative, got {value!r}")


def _check_count(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")


def _sampled_params(
    permutations: int, truncation: float, tolerance: float, seed: int
) -> dict[str, int | float]:
    """Estimator 1's params: exactly the keys entries made before estimators existed hold."""
    _check_count("permutations", permutations, 1)
    _check_number("truncation", truncation)
    _check_number("tolerance", tolerance)
    _check_count("seed", seed, 0)
    return {
        "permutations": permutations,
        "seed": seed,
        "tolerance": float(tolerance),
        "truncation": float(truncation),
    }


def default_budget(n_players: int, permutations: int = DEFAULT_PERMUTATIONS) -> int:
    """Estimator 2's budget when none is given: a third of the ``2^n`` coalitions (rounded
    down), never more than ``permutations`` walks of estimator 1 could evaluate
    (``(n - 1) · permutations + 2``, so the spec's ``permutations`` still bounds the cost),
    and never less than the extremes (``2n + 2``)."""
    n = n_players
    share = math.floor(2**n * BUDGET_SHARE) if n < 64 else 2**63
    return max(2 * n + 2, min(share, (n - 1) * permutations + 2))


def _paired_params(
    budget: int, truncation: float, resolution: float, seed: int
) -> dict[str, int | float]:
    _check_count("budget", budget, 2)
    _check_number("truncation", truncation)
    _check_number("resolution", resolution)
    _check_count("seed", seed, 0)
    return {
        "budget": budget,
        "estimator": ESTIMATOR_PAIRED,
        "resolution": float(resolution),
        "seed": seed,
        "truncation": float(truncation),
    }


def _check_estimator(estimator: Any) -> int:
    if isinstance(estimator, bool) or estimator not in ESTIMATORS:
        raise ValueError(f"unknown sampled estimator {estimator!r} (one of {ESTIMATORS})")
    return int(estimator)


def shapley_sampled(
    players: Iterable[str],
    utility: Utility,
    *,
    permutations: int = DEFAULT_PERMUTATIONS,
    truncation: float = DEFAULT_TRUNCATION,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    estimator: int | None = None,
    budget: int | None = None,
    resolution: float = 0.0,
    surrogate: Sequence[float] | None = None,
) -> Contributions:
    """Sampled Shapley values (see the module docstring): estimator 1, the GTG-Shapley walk
    (``permutations``, ``truncation``, ``tolerance``), 2, the paired kernel estimator
    (``budget``, by default :func:`default_budget`; ``truncation`` and ``resolution``), or 3,
    estimator 2 with the control variate ``surrogate`` (every coalition's surrogate value,
    indexed by :func:`surrogate_index`)."""
    ps = _players(players)
    v = utility if isinstance(utility, CachedUtility) else CachedUtility(utility)
    if estimator is None:
        estimator = default_estimator(len(ps))
    chosen_estimator = _check_estimator(estimator)
    if chosen_estimator != ESTIMATOR_CONTROL_VARIATE and surrogate is not None:
        raise ValueError(f"estimator {chosen_estimator} takes no surrogate (estimator 3 does)")
    params: dict[str, Any]
    if chosen_estimator == ESTIMATOR_PERMUTATIONS:
        params = _sampled_params(permutations, truncation, tolerance, seed)
        scores = _sampled_scores(ps, v, params)
    else:
        _check_count("permutations", permutations, 1)
        _check_number("tolerance", tolerance)
        chosen = default_budget(len(ps), permutations) if budget is None else budget
        if chosen_estimator == ESTIMATOR_PAIRED:
            params = _paired_params(chosen, truncation, resolution, seed)
            scores = _paired_scores(ps, v, params)
        else:
            params = _control_variate_params(
                chosen, truncation, resolution, seed, surrogate, len(ps)
            )
            scores = _control_variate_scores(ps, v, params)
    return Contributions(SHAPLEY_SAMPLED, params, ps, scores, dict(v.values), v.evaluations)


def compute(
    method: str,
    players: Iterable[str],
    utility: Utility,
    *,
    permutations: int = DEFAULT_PERMUTATIONS,
    truncation: float = DEFAULT_TRUNCATION,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    estimator: int | None = None,
    budget: int | None = None,
    resolution: float = 0.0,
    surrogate: Sequence[float] | None = None,
) -> Contributions:
    """Score ``players`` with ``method`` (``auto`` resolved by the number of players).

    The seed is recorded in the params of every method (only the sampled one uses it), so a
    record always says which seed its run had. ``estimator``, ``budget`` and ``resolution``
    concern the sampled method only (:func:`shapley_sampled`).
    """
    ps = _players(players)
    resolved = resolve_method(method, len(ps))
    if resolved == SHAPLEY_SAMPLED:
        return shapley_sampled(
            ps,
            utility,
            permutations=permutations,
            truncation=truncation,
            tolerance=tolerance,
            seed=seed,
            estimator=estimator,
            budget=budget,
            resolution=resolution,
            surrogate=surrogate,
        )
    result = leave_one_out(ps, utility) if resolved == LEAVE_ONE_OUT else shapley_exact(ps, utility)
    return Contributions(
        result.method,
        {"seed": seed},
        result.players,
        result.scores,
        result.values,
        result.evaluations,
    )


def sampled_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`compute` that rerun a recorded or planned sampled
    method's params (either estimator; an absent ``estimator`` is estimator 1)."""
    estimator = int(params.get("estimator", ESTIMATOR_PERMUTATIONS))
    out: dict[str, Any] = {
        "estimator": estimator,
        "seed": int(params["seed"]),
        "truncation": float(params.get("truncation", 0.0)),
    }
    if estimator == ESTIMATOR_PERMUTATIONS:
        out["permutations"] = int(params.get("permutations", 1))
        out["tolerance"] = float(params.get("tolerance", 0.0))
    else:
        out["budget"] = int(params["budget"])
        out["resolution"] = float(params.get("resolution", 0.0))
    if estimator == ESTIMATOR_CONTROL_VARIATE:
        out["surrogate"] = params["surrogate"]
    return out


def plan_coalitions(
    method: str,
    players: Iterable[str],
    *,
    max_models: int,
    permutations: int = DEFAULT_PERMUTATIONS,
    truncation: float = DEFAULT_TRUNCATION,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    estimator: int | None = None,
    budget: int | None = None,
) -> tuple[str, dict[str, int | float], list[Coalition]]:
    """The coalitions a method will need, chosen before any is valued, at most ``max_models``.

    When the sites value the coalitions (each evaluates every model on its own records), they
    must all be known when the sites are asked, and their number bounds each site's work:
    ``leave_one_out`` needs ``n + 1``, ``shapley_exact`` ``2^n`` (``auto`` samples instead when
    that exceeds ``max_models``), ``shapley_sampled`` every prefix of its guided permutations,
    with estimator 2 the paired plan (:func:`paired_plan`) of ``min(budget, max_models)``
    coalitions (``params["budget"]``), and with estimator 1, or when not even estimator 2's
    extremes (``2n + 2``) fit, every prefix of the guided permutations, as many whole
    permutations as fit (``params["permutations"]`` is then the number that fit, which the
    record keeps). ``params["resolution"]`` is planned as 0: the scorer sets it once it knows
    how many records the values were measured on (``training.rounds.contributions``). Running
    the method with the returned params over any values of these coalitions needs no other
    coalition: truncation and convergence only ever skip.

    Returns ``(method, params, coalitions)``; ``ValueError`` when not even the method's
    smallest plan fits."""
    ps = _players(players)
    n = len(ps)
    if estimator is None:
        estimator = default_estimator(n)
    full: Coalition = frozenset(ps)
    empty: Coalition = frozenset()
    resolved = resolve_method(method, n)
    if method == "auto" and resolved == SHAPLEY_EXACT and 2**n > max_models:
        resolved = SHAPLEY_SAMPLED
    if resolved == SHAPLEY_SAMPLED and _check_estimator(estimator) == ESTIMATOR_CONTROL_VARIATE:
        raise ValueError(
            "estimator 3 needs the coordinator's surrogate of every coalition, made from the "
            "validation set it holds: it cannot be planned for evaluation at the sites"
        )
    needed: set[Coalition]
    if resolved == LEAVE_ONE_OUT:
        needed = {full} | {full - {p} for p in ps}
        params: dict[str, Any] = {"seed": seed}
    elif resolved == SHAPLEY_EXACT:
        needed = {frozenset(c) for size in range(n + 1) for c in combinations(ps, size)}
        params = {"seed": seed}
    elif _check_estimator(estimator) == ESTIMATOR_PAIRED and (
        min(default_budget(n, permutations) if budget is None else budget, max_models)
        >= len(_extremes(ps))
    ):
        chosen = min(default_budget(n, permutations) if budget is None else budget, max_models)
        params = _paired_params(chosen, truncation, 0.0, seed)
        extremes, middle = paired_plan(ps, chosen, seed)
        needed = set(extremes)
        for drawn in middle.values():
            needed |= set(drawn) | {full - c for c in drawn}
    else:
        needed = {empty, full}
        used = 0
        for k in range(permutations):
            prefix: Coalition = empty
            mine: set[Coalition] = set()
            for p in guided_permutation(ps, k, seed):
                prefix = prefix | {p}
                mine.add(prefix)
            if len(needed | mine) > max_models:
                break
            needed |= mine
            used = k + 1
        if used == 0:
            raise ValueError(
                f"sampled Shapley values for {n} sites need at least {n + 1} models per round "
                f"(one permutation); at most {max_models} are allowed"
            )
        params = _sampled_params(used, truncation, tolerance, seed)
    if len(needed) > max_models:
        raise ValueError(
            f"{resolved} for {n} sites needs {len(needed)} models per round; at most "
            f"{max_models} are allowed"
        )
    return resolved, params, sorted(needed, key=lambda c: (len(c), sorted(c)))


def scores_from_coalitions(
    method: str, params: Mapping[str, Any], coalitions: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
    """Recompute the scores of a record from its coalition values alone.

    ``coalitions`` is the recorded list of ``{"sites": [...], "value": v}``; the players are
    the sites of the largest (the full set, always evaluated). The same code as the live run,
    fed the recorded values, gives bit-identical floats; a coalition the method needs but the
    record lacks raises :class:`CoalitionMissing`.
    """
    values: dict[Coalition, float] = {}
    for row in coalitions:
        key = frozenset(row["sites"])
        if key in values:
            raise ValueError(f"the coalition {sorted(key)} is recorded twice")
        values[key] = float(row["value"])
    if not values:
        raise ValueError("no coalition values recorded")
    largest: Coalition = max(values, key=len)
    players = _players(largest)
    table = _Table(values)
    if method == LEAVE_ONE_OUT:
        return _loo_scores(players, table)
    if method == SHAPLEY_EXACT:
        return _exact_scores(players, table)
    if method == SHAPLEY_SAMPLED:
        estimator = _check_estimator(params.get("estimator", ESTIMATOR_PERMUTATIONS))
        if estimator == ESTIMATOR_PAIRED:
            return _paired_scores(players, table, params)
        if estimator == ESTIMATOR_CONTROL_VARIATE:
            return _control_variate_scores(players, table, params)
        return _sampled_scores(players, table, params)
    raise ValueError(f"unknown contribution method {method!r} ({', '.join(METHODS)})")
