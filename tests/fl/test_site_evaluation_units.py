"""The pieces of evaluation at the sites that need no database: the validation share a site keeps
aside (training/fl/holdout.py, training/fl/data.split_holdout), the signed report's canonical
form (training/fl/evaluation_report.py), the plan of coalitions within a bound
(training/fl/contribution.plan_coalitions), and the spec's ``evaluation`` field
(training/jobs/spec.py) with what it changes for the privacy accountant and the approver."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from training.fl.contribution import (
    CoalitionMissing,
    compute,
    plan_coalitions,
    sampled_kwargs,
    scores_from_coalitions,
)
from training.fl.data import SiteData, split_holdout
from training.fl.evaluation_report import (
    ReportError,
    combine,
    combine_surrogates,
    parse_report,
    report_text,
)
from training.fl.holdout import holdout_seed, training_count, validation_count
from training.jobs.accounting import epsilon_spent, events_for_pipeline
from training.jobs.describe import describe_contribution, describe_evaluation
from training.jobs.spec import SpecError, evaluation_settings, training_records, validate_spec

DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


# --- the validation share --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "kept"),
    [(100, 0.2, 20), (2, 0.2, 1), (3, 0.5, 2), (10, 0.05, 1), (1000, 0.5, 500), (7, 0.2, 1)],
)
def test_a_site_keeps_a_share_and_still_trains(n, fraction, kept):
    assert validation_count(n, fraction) == kept
    assert training_count(n, fraction) == n - kept >= 1


def test_a_site_with_one_record_cannot_keep_a_share():
    with pytest.raises(ValueError, match="at least 2 records"):
        validation_count(1, 0.2)


def _data(n: int) -> SiteData:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1).repeat(1, 3)
    return SiteData(
        x_train=x,
        y_train=torch.arange(n) % 2,
        num_records=n,
        modality="tabular",
        input_shape=[3],
        n_classes=2,
    )


def test_the_split_is_disjoint_complete_and_the_same_every_time():
    data = _data(50)
    seed = holdout_seed("d" * 64, "barts")
    train, x_val, y_val = split_holdout(data, fraction=0.2, seed=seed)
    again, x_again, _ = split_holdout(data, fraction=0.2, seed=seed)
    assert torch.equal(train.x_train, again.x_train) and torch.equal(x_val, x_again)
    held = {int(v) for v in x_val[:, 0]}
    kept = {int(v) for v in train.x_train[:, 0]}
    assert len(held) == 10 and len(kept) == 40 == train.num_records
    assert held.isdisjoint(kept) and held | kept == set(range(50))
    assert torch.equal(y_val, x_val[:, 0].long() % 2)  # labels travel with their records
    # Another site, or another job, keeps other records aside.
    other, _, _ = split_holdout(data, fraction=0.2, seed=holdout_seed("d" * 64, "maudsley"))
    assert not torch.equal(other.x_train, train.x_train)


# --- the report ------------------------------------------------------------------------------


def _text(**overrides):
    fields = dict(
        job_id=7,
        round_index=2,
        site="barts",
        records=40,
        results={DIGEST_B: {"accuracy": 0.5, "loss": 0.7}, DIGEST_A: {"accuracy": 1, "loss": 0.1}},
    )
    fields.update(overrides)
    return report_text(**fields)


def test_the_report_is_canonical_and_parses_back():
    text = _text()
    assert text.startswith('{"job_id":7,"kind":"evaluation","records":40,"results":[{"metrics"')
    assert text.index(DIGEST_A) < text.index(DIGEST_B)  # sorted by model
    report = parse_report(text)
    assert report.results[DIGEST_A] == {"accuracy": 1.0, "loss": 0.1}
    assert (report.job_id, report.round_index, report.site, report.records) == (7, 2, "barts", 40)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(kind="update"), "kind must be 'evaluation'"),
        (lambda d: d.update(records=0), "records must be an integer of at least 1"),
        (lambda d: d.update(extra=1), "unknown: extra"),
        (lambda d: d.pop("site"), "missing: site"),
        (lambda d: d["results"][0]["metrics"].update(accuracy=None), "is not a number"),
        (lambda d: d["results"].append(dict(d["results"][0])), "reported twice"),
        (lambda d: d["results"][0].update(model="XYZ"), "SHA-256 hex digest"),
        (lambda d: d.update(results=[]), "results must be a list of 1"),
        (lambda d: d.update(surrogate=[0.1, 0.2, 0.3]), "surrogate must be a list of 2\\^n"),
        (lambda d: d.update(surrogate=[0.1, None]), "surrogate value 1 is not a number"),
        (lambda d: d.update(surrogate="0.1"), "surrogate must be a list"),
    ],
)
def test_a_malformed_report_says_what_is_wrong(mutate, message):
    raw = json.loads(_text())
    mutate(raw)
    with pytest.raises(ReportError, match=message):
        parse_report(json.dumps(raw, sort_keys=True, separators=(",", ":")))


def test_a_surrogate_travels_in_the_signed_text_and_combines_by_records():
    plain = _text()
    assert "surrogate" not in plain  # reports without one keep their bytes
    text = _text(surrogate=[0.25, 0.5, 0.75, 1])
    report = parse_report(text)
    assert report.surrogate == (0.25, 0.5, 0.75, 1.0)
    assert parse_report(plain).surrogate is None
    other = parse_report(_text(site="leeds", records=10, surrogate=[1, 1, 1, 1]))
    # Weighted by records, as the values are: (40 x 0.25 + 10 x 1) / 50 for the first.
    assert combine_surrogates([report, other]) == pytest.approx([0.4, 0.6, 0.8, 1.0])
    assert combine_surrogates([other, report]) == combine_surrogates([report, other])
    assert combine_surrogates([report, parse_report(plain)]) is None  # not every site sent one
    longer = parse_report(_text(site="leeds", surrogate=[0.0] * 8))
    assert combine_surrogates([report, longer]) is None
    with pytest.raises(ReportError, match="surrogate value 2 is not finite"):
        _text(surrogate=[0.0, 1.0, float("inf"), 0.0])


def test_a_report_not_in_canonical_form_is_refused():
    with pytest.raises(ReportError, match="canonical form"):
        parse_report(json.dumps(json.loads(_text()), indent=1))
    with pytest.raises(ReportError, match="not finite"):
        report_text(
            job_id=1, round_index=1, site="a", records=1, results={DIGEST_A: {"loss": float("nan")}}
        )


def test_values_are_weighted_by_each_sites_records():
    one = parse_report(_text(site="a", records=30))
    two = parse_report(
        _text(
            site="b", records=10, results={DIGEST_A: {"accuracy": 0.0}, DIGEST_B: {"accuracy": 1.0}}
        )
    )
    values = combine([one, two], "accuracy")
    assert values == {DIGEST_A: (30 * 1.0 + 0) / 40, DIGEST_B: (30 * 0.5 + 10 * 1.0) / 40}
    with pytest.raises(ReportError, match="no 'dice'"):
        combine([one], "dice")


# --- the plan of coalitions ------------------------------------------------------------------


def _value(coalition) -> float:
    """Any deterministic utility: the plan must not depend on the values."""
    return sum(ord(c[0]) for c in coalition) / 1000 + 0.01 * len(coalition) ** 2


@pytest.mark.parametrize(
    ("method", "n", "bound", "resolved", "count"),
    [
        ("leave_one_out", 5, 6, "leave_one_out", 6),
        ("shapley_exact", 4, 16, "shapley_exact", 16),
        ("auto", 4, 16, "shapley_exact", 16),
        ("auto", 4, 15, "shapley_sampled", None),
        ("shapley_sampled", 10, 40, "shapley_sampled", None),
    ],
)
def test_the_plan_fits_the_bound_and_covers_what_the_method_needs(
    method, n, bound, resolved, count
):
    players = [chr(ord("a") + i) for i in range(n)]
    got, params, coalitions = plan_coalitions(
        method, players, max_models=bound, permutations=100, truncation=0.0, seed=3
    )
    assert got == resolved
    assert len(coalitions) <= bound and len(set(coalitions)) == len(coalitions)
    if count is not None:
        assert len(coalitions) == count
    table = {c: _value(c) for c in coalitions}
    # Running the method over the planned coalitions alone never needs another one.
    sampled = got == "shapley_sampled"
    kwargs = sampled_kwargs(params) if sampled else {"seed": int(params["seed"])}
    result = compute(got, players, lambda c: table[frozenset(c)], **kwargs)
    assert set(result.values) <= set(coalitions)
    assert scores_from_coalitions(got, params, result.coalitions()) == result.scores
    if got == "shapley_sampled" and "budget" in params:
        # Estimator 2: a planned budget of coalitions within the bound.
        assert params["estimator"] == 2 and params["budget"] <= bound
    elif got == "shapley_sampled":
        assert 1 <= params["permutations"] < 100  # as many whole permutations as fit


def test_a_bound_below_the_smallest_plan_is_refused():
    with pytest.raises(ValueError, match="at most 3 are allowed"):
        plan_coalitions("leave_one_out", ["a", "b", "c"], max_models=3)
    with pytest.raises(ValueError, match="one permutation"):
        plan_coalitions("shapley_sampled", list("abcdef"), max_models=4)


def test_a_missing_coalition_is_an_error_not_a_guess():
    players = list("abc")
    _, params, coalitions = plan_coalitions("shapley_exact", players, max_models=8)
    rows = [{"sites": sorted(c), "value": _value(c)} for c in coalitions[:-2]]
    with pytest.raises(CoalitionMissing):
        scores_from_coalitions("shapley_exact", params, rows + [{"sites": players, "value": 1.0}])


# --- the spec --------------------------------------------------------------------------------


def _spec(**overrides):
    spec = {
        "purpose": "classification",
        "participants": ["a", "b", "c"],
        "dataset_key": "own-records",
        "model": {"name": "mlp"},
        "rounds": 5,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "privacy_pipeline": [{"filter": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}],
    }
    spec.update(overrides)
    return spec


def test_a_data_set_the_consortium_has_no_copy_of_is_evaluated_at_the_sites_by_default():
    normal = validate_spec(_spec())
    assert "evaluation" not in normal  # the default is left out, so old digests stand
    assert evaluation_settings(normal) == {
        "where": "sites",
        "validation_fraction": 0.2,
        "max_models": 256,
    }
    bundled = validate_spec(_spec(dataset_key="breast-cancer"))
    assert evaluation_settings(bundled) == {"where": "central"}
    chosen = validate_spec(_spec(evaluation={"where": "sites", "validation_fraction": 0.3}))
    assert chosen["evaluation"] == {"where": "sites", "validation_fraction": 0.3, "max_models": 256}
    assert validate_spec(chosen) == chosen


@pytest.mark.parametrize(
    ("evaluation", "extra", "path", "message"),
    [
        ({"where": "moon"}, {}, "evaluation.where", 'must be one of "sites", "central"'),
        ({"validation_fraction": 0.9}, {}, "evaluation.validation_fraction", "at most 0.5"),
        ({"max_models": 1}, {}, "evaluation.max_models", "from 2 to 4096"),
        ({"where": "sites", "colour": 1}, {}, "evaluation.colour", "unknown field"),
        (
            {"max_models": 4},
            {"contribution": {"method": "shapley_exact"}},
            "contribution.method",
            "need 8 models evaluated at every site",
        ),
        ("everywhere", {}, "evaluation", "must be an object"),
    ],
)
def test_a_wrong_evaluation_says_where_and_why(evaluation, extra, path, message):
    with pytest.raises(SpecError) as caught:
        validate_spec(_spec(evaluation=evaluation, **extra))
    assert path in caught.value.errors, caught.value.errors
    assert message in caught.value.errors[path]


def test_central_evaluation_takes_no_site_fields():
    with pytest.raises(SpecError) as caught:
        validate_spec(_spec(dataset_key="digits", evaluation={"where": "central", "max_models": 8}))
    assert "applies only when models are evaluated" in caught.value.errors["evaluation.max_models"]


def test_the_accountant_projects_dp_sgd_on_the_records_a_site_trains_on():
    sites = validate_spec(_spec())
    central = validate_spec(_spec(dataset_key="breast-cancer"))
    assert training_records(100, sites) == 80 and training_records(100, central) == 100

    def epsilon(spec):
        events = events_for_pipeline(
            spec["privacy_pipeline"],
            rounds=spec["rounds"],
            local_epochs=1,
            batch_size=32,
            num_records=training_records(100, spec),
        )
        return epsilon_spent(events, delta=1e-5)

    # Fewer records to sample from: a higher sampling rate, more ε for the same job.
    assert epsilon(sites) > epsilon(central)


def test_the_approver_reads_where_the_models_are_evaluated():
    sites = describe_evaluation(validate_spec(_spec()))
    assert "keeps 20% of its own records aside" in sites
    assert "at most 256 models" in sites
    assert "built from other sites' shared updates" in sites
    assert "measured by the sites on their own validation shares" in describe_contribution(
        validate_spec(_spec())
    )
    central = describe_evaluation(validate_spec(_spec(dataset_key="breast-cancer")))
    assert "evaluated centrally" in central and "no site's records" in central


def test_the_plan_of_a_default_job_is_exact_shapley_up_to_eight_sites():
    for n in (1, 2, 3, 8):
        players = [f"s{i}" for i in range(n)]
        method, _params, coalitions = plan_coalitions("auto", players, max_models=256)
        assert method == "shapley_exact" and len(coalitions) == 2**n
        assert frozenset() in coalitions and frozenset(players) in coalitions
        assert all(frozenset(c) in coalitions for c in itertools.combinations(players, 1))
