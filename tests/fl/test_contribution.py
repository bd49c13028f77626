"""Contribution scoring, the pure part (training/fl/contribution.py) and its spec
(training/spec.py ``contribution``). No database, no torch: games with known values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random

import pytest
from scipy.stats import spearmanr

from training.fl import contribution as C
from training.jobs.describe import describe_contribution
from training.jobs.spec import (
    CONTRIBUTION_DEFAULTS,
    SpecError,
    contribution_settings,
    spec_digest,
    validate_spec,
)


class Counting:
    """A utility that counts how often each coalition is asked for."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: dict[frozenset, int] = {}

    def __call__(self, coalition):
        self.calls[coalition] = self.calls.get(coalition, 0) + 1
        return self.fn(coalition)


def additive(weights, interactions=()):
    """v(S) = sum of member weights + a bonus for each interacting pair inside S."""

    def v(coalition):
        # In sorted order: a set's own order follows string hashing, which changes from one
        # process to the next, and float sums depend on their order.
        value = sum(weights[p] for p in sorted(coalition))
        for (a, b), bonus in interactions:
            if a in coalition and b in coalition:
                value += bonus
        return value

    return v


def random_game(players, seed):
    """A game with arbitrary (seeded) coalition values, v(∅) = 0."""
    rng = random.Random(seed)
    values = {frozenset(): 0.0}
    for size in range(1, len(players) + 1):
        for subset in itertools.combinations(players, size):
            values[frozenset(subset)] = rng.uniform(-1, 2)
    return values.__getitem__


# --- exact Shapley ------------------------------------------------------------------------


def test_exact_shapley_of_a_game_with_known_values():
    # Additive weights, plus a bonus of 2 that a and c make together (split equally).
    v = additive({"a": 3.0, "b": 3.0, "c": 1.0, "d": 0.0}, [(("a", "c"), 2.0)])
    result = C.shapley_exact("abcd", v)
    assert result.method == "shapley_exact"
    assert result.scores == pytest.approx({"a": 4.0, "b": 3.0, "c": 2.0, "d": 0.0}, abs=1e-12)
    assert result.evaluations == 16 == len(result.values)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_shapley_axioms_on_arbitrary_games(seed):
    players = ["p1", "p2", "p3", "p4", "p5", "p6"]
    base = random_game(players, seed)

    # Make p5 and p6 symmetric and add a null player p7.
    def v(coalition):
        key = set(coalition) - {"p7"}
        if "p6" in key and "p5" not in key:
            key = (key - {"p6"}) | {"p5"}
        return base(frozenset(key))

    everyone = [*players, "p7"]
    result = C.shapley_exact(everyone, v)
    full, empty = frozenset(everyone), frozenset()
    # Efficiency: the scores share out exactly what the full coalition adds.
    assert sum(result.scores.values()) == pytest.approx(v(full) - v(empty), abs=1e-9)
    # Symmetry: interchangeable players get equal scores.
    assert result.scores["p5"] == pytest.approx(result.scores["p6"], abs=1e-12)
    # Null player: one that changes no coalition scores zero.
    assert result.scores["p7"] == pytest.approx(0.0, abs=1e-12)


def test_exact_refuses_more_than_eight_players():
    with pytest.raises(ValueError, match="at most 8"):
        C.shapley_exact([f"s{i}" for i in range(9)], lambda s: 0.0)


def test_each_coalition_is_evaluated_once():
    counting = Counting(additive({"a": 1.0, "b": 2.0, "c": 3.0}))
    result = C.shapley_exact("abc", counting)
    assert set(counting.calls.values()) == {1}
    assert result.evaluations == len(counting.calls) == 8


def test_non_finite_and_non_numeric_utilities_are_refused():
    with pytest.raises(ValueError, match="not finite"):
        C.shapley_exact("ab", lambda s: math.nan)
    with pytest.raises(ValueError, match="not a number"):
        C.shapley_exact("ab", lambda s: None)


# --- leave-one-out --------------------------------------------------------------------------


def test_leave_one_out_is_what_the_full_set_loses_without_each():
    v = additive({"a": 3.0, "b": 3.0, "c": 1.0}, [(("a", "c"), 2.0)])
    result = C.leave_one_out("abc", v)
    assert result.scores == {"a": 5.0, "b": 3.0, "c": 3.0}
    assert result.evaluations == 4  # N and N minus each site
    # A lone site is compared with the input model (the empty coalition).
    assert C.leave_one_out(["solo"], lambda s: 1.0 + len(s)).scores == {"solo": 1.0}


# --- sampled (GTG-Shapley style) ------------------------------------------------------------


def test_guided_permutations_follow_the_documented_recipe():
    players = ["a", "b", "c", "d", "e"]
    firsts = []
    for k in range(10):
        perm = C.guided_permutation(players, k, seed=42)
        assert sorted(perm) == players
        firsts.append(perm[0])
        # Rebuilt from the module docstring's recipe alone.
        rest = [p for p in players if p != players[k % 5]]
        for j in range(len(rest) - 1, 0, -1):
            digest = hashlib.sha256(f"42:{k}:{j}".encode()).digest()
            i = int.from_bytes(digest, "big") % (j + 1)
            rest[i], rest[j] = rest[j], rest[i]
        assert perm == [players[k % 5], *rest]
    assert firsts == players * 2  # every site leads equally often


def test_sampled_is_reproducible_from_its_seed():
    players = [f"s{i}" for i in range(7)]
    v = random_game(players, 5)
    walk = {"permutations": 30, "truncation": 0.0, "tolerance": 0.0, "estimator": 1}
    one = C.shapley_sampled(players, v, seed=9, **walk)
    two = C.shapley_sampled(players, v, seed=9, **walk)
    other = C.shapley_sampled(players, v, seed=10, **walk)
    assert one.scores == two.scores and one.values == two.values
    assert one.scores != other.scores
    assert one.params == {"permutations": 30, "seed": 9, "tolerance": 0.0, "truncation": 0.0}


def test_sampled_axioms_efficiency_within_truncation_null_player_and_symmetry():
    weights = {f"s{i}": w for i, w in enumerate([0.30, 0.20, 0.20, 0.10, 0.05, 0.0])}
    v = additive(weights, [(("s0", "s3"), 0.04)])
    result = C.shapley_sampled(list(weights), v, permutations=60, truncation=0.01, seed=3)
    players = frozenset(weights)
    # Each permutation's gains telescope to v(last prefix) - v(∅), within the truncation of
    # v(N) - v(∅).
    assert abs(sum(result.scores.values()) - (v(players) - v(frozenset()))) <= 0.01
    # Null player: every marginal gain is 0 (up to the float rounding of the game's sums, whose
    # order follows set iteration, i.e. the hash seed).
    assert result.scores["s5"] == pytest.approx(0.0, abs=1e-12)
    assert result.scores["s1"] == pytest.approx(result.scores["s2"], abs=0.02)


def test_between_round_truncation_scores_nothing_when_the_round_changed_nothing():
    counting = Counting(lambda s: 0.5 if len(s) in (0, 4) else 0.9)
    result = C.shapley_sampled("abcd", counting, truncation=0.01, seed=1, estimator=1)
    assert result.scores == dict.fromkeys("abcd", 0.0)
    assert result.evaluations == 2


def test_within_round_truncation_skips_what_cannot_matter():
    # Only "a" matters: once a prefix holds it, v(prefix) = v(N) and the rest is not evaluated.
    counting = Counting(lambda s: 1.0 if "a" in s else 0.0)
    result = C.shapley_sampled("abcdef", counting, permutations=12, truncation=0.001, seed=0)
    assert result.scores["a"] == pytest.approx(1.0)
    assert all(result.scores[p] == 0.0 for p in "bcdef")
    assert result.evaluations < 2**6
    assert set(counting.calls.values()) == {1}


def test_sampled_agrees_with_exact_with_far_fewer_evaluations():
    players = [f"s{i:02d}" for i in range(12)]
    rng = random.Random(4)
    weights = {p: rng.uniform(0, 1) * (i + 1) for i, p in enumerate(players)}

    def v(coalition):  # diminishing returns: a concave function of the total
        return math.sqrt(sum(weights[p] for p in coalition))

    exact = C._exact_scores(tuple(players), C.CachedUtility(v))  # 4096 coalitions
    sampled = C.compute("auto", players, v, seed=11)
    assert sampled.method == "shapley_sampled"
    rho = spearmanr([exact[p] for p in players], [sampled.scores[p] for p in players]).statistic
    assert rho >= 0.9
    assert sampled.evaluations <= 2**12 / 3  # estimator 2's default budget
    total = v(frozenset(players)) - v(frozenset())
    assert sum(abs(sampled.scores[p] - exact[p]) for p in players) <= 0.05 * total


def test_auto_is_exact_up_to_eight_and_sampled_above():
    assert C.resolve_method("auto", 8) == "shapley_exact"
    assert C.resolve_method("auto", 9) == "shapley_sampled"
    assert C.resolve_method("leave_one_out", 20) == "leave_one_out"
    with pytest.raises(ValueError, match="unknown"):
        C.resolve_method("banzhaf", 3)
    result = C.compute("auto", "abc", additive({"a": 1.0, "b": 1.0, "c": 1.0}), seed=5)
    assert result.method == "shapley_exact" and result.params == {"seed": 5}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"permutations": 0},
        {"permutations": 2.5},
        {"truncation": -0.1},
        {"tolerance": math.inf},
        {"seed": -1},
    ],
)
def test_sampled_parameters_are_checked(kwargs):
    with pytest.raises(ValueError):
        C.shapley_sampled("ab", lambda s: float(len(s)), **kwargs)


# --- recomputation from the recorded coalitions ---------------------------------------------


@pytest.mark.parametrize(
    "method, players",
    [
        ("leave_one_out", "abcde"),
        ("shapley_exact", "abcde"),
        ("shapley_sampled", "abcdefghij"),
    ],
)
def test_scores_recompute_bit_for_bit_from_the_recorded_coalitions(method, players):
    v = random_game(list(players), 7)
    result = C.compute(method, players, v, permutations=20, truncation=0.05, seed=123)
    # As the ledger stores it: canonical JSON text, read back.
    record = json.loads(
        json.dumps(
            {"method": result.method, "params": result.params, "coalitions": result.coalitions()},
            sort_keys=True,
            allow_nan=False,
        )
    )
    assert [] in [c["sites"] for c in record["coalitions"]] or method == "leave_one_out"
    assert sorted(players) in [c["sites"] for c in record["coalitions"]]
    again = C.scores_from_coalitions(record["method"], record["params"], record["coalitions"])
    assert again == result.scores  # exactly equal floats

    # A changed coalition value changes the recomputed scores (or, sampled, may send the walk
    # through coalitions the record lacks): the record binds them.
    tampered = [dict(c) for c in record["coalitions"]]
    tampered[-1]["value"] += 0.25
    try:
        assert C.scores_from_coalitions(method, record["params"], tampered) != result.scores
    except C.CoalitionMissing:
        assert method == "shapley_sampled"


def test_recomputation_names_a_missing_coalition():
    result = C.shapley_exact("abc", additive({"a": 1.0, "b": 2.0, "c": 3.0}))
    rows = [c for c in result.coalitions() if c["sites"] != ["a", "b"]]
    with pytest.raises(C.CoalitionMissing, match=r"\['a', 'b'\]"):
        C.scores_from_coalitions("shapley_exact", {}, rows)
    with pytest.raises(ValueError, match="unknown contribution method"):
        C.scores_from_coalitions("banzhaf", {}, result.coalitions())


def test_the_module_imports_neither_torch_nor_django():
    import subprocess
    import sys

    code = (
        "import sys, training.fl.contribution; "
        "assert 'torch' not in sys.modules and 'django' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('torch', 'django')))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the spec -----------------------------------------------------------------------------


def base_spec(**overrides):
    spec = {
        "purpose": "classification",
        "participants": ["hospital-a", "hospital-b", "hospital-c"],
        "dataset_key": "breast-cancer",
        "model": {"name": "mlp"},
        "rounds": 3,
        "optimizer": {"name": "sgd", "lr": 0.01},
    }
    spec.update(overrides)
    return spec


def test_a_spec_without_contribution_stays_as_it_was():
    spec = validate_spec(base_spec())
    assert "contribution" not in spec  # existing specs keep their digests
    assert contribution_settings(spec) == CONTRIBUTION_DEFAULTS
    # Spelling the defaults out is the same job, with the same digest.
    explicit = validate_spec(base_spec(contribution={"method": "auto", "permutations": 100.0}))
    assert spec_digest(explicit) == spec_digest(spec)


def test_a_contribution_spec_normalises():
    spec = validate_spec(
        base_spec(contribution={"method": "shapley_sampled", "permutations": 40.0, "truncation": 0})
    )
    assert spec["contribution"] == {
        "method": "shapley_sampled",
        "permutations": 40,
        "tolerance": 0.02,
        "truncation": 0.0,
    }
    assert validate_spec(spec) == spec
    assert contribution_settings(spec) == spec["contribution"]
    loo = validate_spec(base_spec(contribution={"method": "leave_one_out"}))
    assert loo["contribution"] == {"method": "leave_one_out"}
    assert contribution_settings(loo) == {"method": "leave_one_out"}


@pytest.mark.parametrize(
    "contribution, path, fragment",
    [
        ("exact", "contribution", "must be an object"),
        ({"method": "banzhaf"}, "contribution.method", "must be one of"),
        ({"method": "auto", "permutations": 0}, "contribution.permutations", "from 1 to 10000"),
        ({"method": "auto", "permutations": True}, "contribution.permutations", "integer"),
        ({"truncation": -0.5}, "contribution.truncation", "at least 0"),
        ({"tolerance": "small"}, "contribution.tolerance", "a number"),
        ({"seed": 3}, "contribution.seed", "unknown field"),
        ({"method": "leave_one_out", "truncation": 0.1}, "contribution.truncation", "only to"),
        ({"method": "shapley_exact", "permutations": 5}, "contribution.permutations", "only to"),
    ],
)
def test_contribution_errors_name_their_path(contribution, path, fragment):
    with pytest.raises(SpecError) as info:
        validate_spec(base_spec(contribution=contribution))
    assert path in info.value.errors, info.value.errors
    assert fragment in info.value.errors[path]


def test_exact_shapley_is_refused_for_more_than_eight_participants():
    many = [f"site-{i}" for i in range(9)]
    with pytest.raises(SpecError) as info:
        validate_spec(base_spec(participants=many, contribution={"method": "shapley_exact"}))
    message = info.value.errors["contribution.method"]
    assert "at most 8 participants (this job has 9)" in message
    # auto samples for them instead.
    assert validate_spec(base_spec(participants=many, contribution={"method": "auto"}))


@pytest.mark.parametrize(
    "contribution, fragments",
    [
        (
            None,
            [
                "exact Shapley values",
                "when at most 8 sites",
                "no more than 100 sampled orderings",
                "at most a third",
            ],
        ),
        ({"method": "leave_one_out"}, ["leave-one-out"]),
        ({"method": "shapley_exact"}, ["every subset of the other sites"]),
        (
            {"method": "shapley_sampled", "permutations": 30, "truncation": 0.01},
            ["at most 30 sampled orderings", "less than 0.01", "less than 2%"],
        ),
    ],
)
def test_describe_contribution_for_the_review_page(contribution, fragments):
    raw = base_spec() if contribution is None else base_spec(contribution=contribution)
    text = describe_contribution(validate_spec(raw))
    assert "accuracy on the consortium's validation set" in text
    for fragment in fragments:
        assert fragment in text
    segmentation = validate_spec(
        base_spec(purpose="segmentation", dataset_key="lesions", model={"name": "small_unet"})
    )
    assert "Dice score" in describe_contribution(segmentation)


def test_the_job_form_keeps_the_contribution_through_an_edit():
    """The web form carries ``contribution`` both ways, so editing a job never drops it."""
    from types import SimpleNamespace

    from training.web.forms import JobForm

    spec = validate_spec(
        base_spec(contribution={"method": "shapley_sampled", "permutations": 40}, rounds=2)
    )
    initial = JobForm.initial_from(SimpleNamespace(spec=spec, title="Scored"))
    assert json.loads(initial["contribution"]) == spec["contribution"]
    institutions = [SimpleNamespace(slug=s, name=s.title()) for s in spec["participants"]]
    data = {k: v for k, v in initial.items() if v is not None}
    form = JobForm(data=data, institutions=institutions)
    assert form.is_valid(), form.errors
    assert validate_spec(form.to_spec()) == spec
    blank = JobForm(data={**data, "contribution": ""}, institutions=institutions)
    assert blank.is_valid() and "contribution" not in blank.to_spec()
    bad = JobForm(data={**data, "contribution": "[1]"}, institutions=institutions)
    assert not bad.is_valid() and "must be a JSON object" in str(bad.errors["contribution"])


def test_describe_names_the_paired_estimator_from_eight_sites():
    many = [f"hospital-{c}" for c in "abcdefghi"]
    spec = validate_spec(
        base_spec(participants=many, contribution={"method": "shapley_sampled"}, rounds=2)
    )
    text = describe_contribution(spec)
    assert "planned sample of coalitions" in text and "at most a third" in text
    assert "GTG-Shapley" not in text


def test_describe_names_the_surrogate_where_it_can_be_made():
    def text(n, **overrides):
        many = [f"hospital-{i:02d}" for i in range(n)]
        spec = base_spec(participants=many, contribution={"method": "shapley_sampled"})
        return describe_contribution(validate_spec({**spec, **overrides}))

    # Breast cancer is bundled: the coordinator values the coalitions on its own copy.
    assert "second-order approximation of every coalition's accuracy" in text(9)
    assert "the sample is used alone" in text(9)
    assert "GTG-Shapley" in text(6)  # below 8 sites, without the approximation: the walk
    assert "second-order" not in text(13)  # beyond the surrogate's 12 sites
    assert "second-order" not in text(9, topology="cyclic")
    at_sites = text(9, evaluation={"where": "sites"})
    assert "measured by the sites" in at_sites
    assert "worked out by each site on its own validation share" in at_sites
    # ... and the evaluation's own sentence says what more the sites then send back.
    from training.jobs.describe import describe_evaluation

    sampled = validate_spec(
        base_spec(contribution={"method": "shapley_sampled"}, evaluation={"where": "sites"})
    )
    assert "an approximation of every coalition's accuracy" in describe_evaluation(sampled)
    exact = validate_spec(base_spec(evaluation={"where": "sites"}))  # auto, 3 sites: exact
    assert "approximation" not in describe_evaluation(exact)
