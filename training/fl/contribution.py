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
  given the seed and the coalition values.

:func:`scores_from_coalitions` recomputes the scores from the recorded coalition values alone by
running the very same code with a lookup table as the utility, so the recomputed floats are
bit-identical to the recorded ones (a missing coalition is an error).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, TypedDict

__all__ = [
    "DEFAULT_PERMUTATIONS",
    "DEFAULT_TOLERANCE",
    "DEFAULT_TRUNCATION",
    "EXACT_MAX_PLAYERS",
    "METHODS",
    "CachedUtility",
    "Contributions",
    "compute",
    "leave_one_out",
    "plan_coalitions",
    "resolve_method",
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
    params: dict[str, int | float]
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


# --- public entry points ----------------------------------------------------------------------


def leave_one_out(players: Iterable[str], utility: Utility) -> Contributions:
    """Leave-one-out scores: what the full set loses without each player."""
    ps = _players(players)
    v = utility if isinstance(utility, CachedUtility) else CachedUtility(utility)
    scores = _loo_scores(ps, v)
    return Contributions(LEAVE_ONE_OUT, {}, ps, scores, dict(v.values), v.evaluations)


def shapley_exact(players: Iterable[str], utility: Utility) -> Contributions:
    """Exact Shapley values (``2^n`` evaluations; at most :data:`EXACT_MAX_PLAYERS` players)."""
    ps = _players(players)
    if len(ps) > EXACT_MAX_PLAYERS:
        raise ValueError(
            f"exact Shapley values for {len(ps)} players would evaluate 2^{len(ps)} coalitions; "
            f"at most {EXACT_MAX_PLAYERS} players (use shapley_sampled)"
        )
    v = utility if isinstance(utility, CachedUtility) else CachedUtility(utility)
    scores = _exact_scores(ps, v)
    return Contributions(SHAPLEY_EXACT, {}, ps, scores, dict(v.values), v.evaluations)


def _sampled_params(
    permutations: int, truncation: float, tolerance: float, seed: int
) -> dict[str, int | float]:
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be a positive integer, got {permutations!r}")
    for name, value in (("truncation", truncation), ("tolerance", tolerance)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and not negative, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return {
        "permutations": permutations,
        "seed": seed,
        "tolerance": float(tolerance),
        "truncation": float(truncation),
    }


def shapley_sampled(
    players: Iterable[str],
    utility: Utility,
    *,
    permutations: int = DEFAULT_PERMUTATIONS,
    truncation: float = DEFAULT_TRUNCATION,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> Contributions:
    """GTG-Shapley style sampled Shapley values (see the module docstring)."""
    ps = _players(players)
    params = _sampled_params(permutations, truncation, tolerance, seed)
    v = utility if isinstance(utility, CachedUtility) else CachedUtility(utility)
    scores = _sampled_scores(ps, v, params)
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
) -> Contributions:
    """Score ``players`` with ``method`` (``auto`` resolved by the number of players).

    The seed is recorded in the params of every method (only the sampled one uses it), so a
    record always says which seed its run had.
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


def plan_coalitions(
    method: str,
    players: Iterable[str],
    *,
    max_models: int,
    permutations: int = DEFAULT_PERMUTATIONS,
    truncation: float = DEFAULT_TRUNCATION,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> tuple[str, dict[str, int | float], list[Coalition]]:
    """The coalitions a method will need, chosen before any is valued, at most ``max_models``.

    When the sites value the coalitions (each evaluates every model on its own records), they
    must all be known when the sites are asked, and their number bounds each site's work:
    ``leave_one_out`` needs ``n + 1``, ``shapley_exact`` ``2^n`` (``auto`` samples instead when
    that exceeds ``max_models``), ``shapley_sampled`` every prefix of its guided permutations,
    as many whole permutations as fit (``params["permutations"]`` is then the number that fit,
    which the record keeps). Running the method with the returned params over any values of
    these coalitions needs no other coalition: truncation and convergence only ever skip.

    Returns ``(method, params, coalitions)``; ``ValueError`` when not even the method's
    smallest plan fits."""
    ps = _players(players)
    n = len(ps)
    full: Coalition = frozenset(ps)
    empty: Coalition = frozenset()
    resolved = resolve_method(method, n)
    if method == "auto" and resolved == SHAPLEY_EXACT and 2**n > max_models:
        resolved = SHAPLEY_SAMPLED
    needed: set[Coalition]
    if resolved == LEAVE_ONE_OUT:
        needed = {full} | {full - {p} for p in ps}
        params: dict[str, int | float] = {"seed": seed}
    elif resolved == SHAPLEY_EXACT:
        needed = {frozenset(c) for size in range(n + 1) for c in combinations(ps, size)}
        params = {"seed": seed}
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
        return _sampled_scores(players, table, params)
    raise ValueError(f"unknown contribution method {method!r} ({', '.join(METHODS)})")
