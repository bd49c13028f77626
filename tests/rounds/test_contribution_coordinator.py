"""Contribution scores in the running platform (training/contributions.py): a closed round
writes the ``contribution.scored`` ledger entry of the contract and the ``ContributionScore``
rows, a completed job its ``contribution.job_scored`` total, and the job and institution pages
show them. Jobs run through the real coordinator and site-worker code (the in-memory broker
of tests/support/coordinator_harness.py) on three hospitals holding the breast-cancer set.
"""

from __future__ import annotations

import io
import json
import math

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from tests.support.coordinator_harness import job_payloads, propose_and_start
from training.fl.contribution import scores_from_coalitions
from training.models import ContributionScore, GlobalModel, JobState, Round
from training.rounds import contributions

CONTRACT_KEYS = {
    "job_id",
    "round",
    "method",
    "params",
    "metric",
    "sites",
    "coalitions",
    "scores",
    "evaluations",
}


def _run(c3, broker, **spec):
    job = propose_and_start(c3, broker, **spec)
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.end_reason
    return job


def _scored(job):
    return [
        (e, json.loads(e.payload_text))
        for e in LedgerEntry.objects.filter(event=ledger_events.CONTRIBUTION_SCORED).order_by("seq")
        if json.loads(e.payload_text)["job_id"] == job.pk
    ]


def _verify_with_a_forged_round_entry(job, entry, forged: dict, tmp_path):
    """Append ``forged`` as a later round entry, export the job's report and run verify_report,
    which must fail: returns the forged entry and what the command said."""
    from django.core.management.base import CommandError

    from audit.ledger.chain import append_entry

    bad = append_entry(
        event=ledger_events.CONTRIBUTION_SCORED,
        consortium_slug=entry.consortium_slug,
        payload=forged,
    )
    later = tmp_path / "later.json"
    call_command(
        "export_contributions", "--job", str(job.pk), "--format", "json", "--output", str(later)
    )
    out = io.StringIO()
    with pytest.raises(CommandError):
        call_command("verify_report", str(later), stdout=out)
    return bad, out.getvalue()


def test_closed_rounds_write_the_contract_entry_and_the_rows(c3, broker):
    job = _run(c3, broker, rounds=2)
    slugs = sorted(s.slug for s in c3.sites)
    scored = _scored(job)
    assert [p["round"] for _e, p in scored] == [1, 2]
    closed = {e["round"]: e for e in job_payloads("round.closed", job)}
    for entry, payload in scored:
        rnd = Round.objects.get(job=job, index=payload["round"])
        assert (entry.subject_type, entry.subject_id) == ("training.round", str(rnd.pk))
        assert entry.seq > LedgerEntry.objects.get(event="round.closed", subject_id=str(rnd.pk)).seq
        assert set(payload) == CONTRACT_KEYS
        assert payload["method"] == "shapley_exact"  # auto, three sites
        assert payload["params"] == {"seed": contributions.round_seed(job, rnd.index)}
        assert payload["metric"] == "accuracy"
        assert payload["sites"] == slugs
        coalitions = {tuple(c["sites"]): c["value"] for c in payload["coalitions"]}
        assert len(coalitions) == payload["evaluations"] == 8
        assert () in coalitions and tuple(slugs) in coalitions
        assert all(math.isfinite(v) for v in [*coalitions.values(), *payload["scores"].values()])
        # Anyone can recompute the scores from the coalition values, exactly.
        assert (
            scores_from_coalitions(payload["method"], payload["params"], payload["coalitions"])
            == payload["scores"]
        )
        # The full set is the round's model; the empty one its input model.
        assert coalitions[tuple(slugs)] == closed[rnd.index]["metrics"]["validation_accuracy"]
        if rnd.index > 1:
            previous = GlobalModel.objects.get(job=job, round_index=rnd.index - 1)
            assert coalitions[()] == previous.metrics["validation_accuracy"]
        assert sum(payload["scores"].values()) == pytest.approx(
            coalitions[tuple(slugs)] - coalitions[()], abs=1e-9
        )
        # The rows for the pages: one per site, pointing at the entry.
        rows = {
            r.institution.slug: r
            for r in ContributionScore.objects.filter(round=rnd).select_related("institution")
        }
        assert sorted(rows) == slugs
        for slug, row in rows.items():
            assert row.score == payload["scores"][slug]
            assert (row.method, row.metric, row.ledger_seq) == (
                "shapley_exact",
                "accuracy",
                entry.seq,
            )
            assert row.round_index == rnd.index and row.job_id == job.pk

    (total,) = [
        json.loads(e.payload_text)
        for e in LedgerEntry.objects.filter(
            event=ledger_events.CONTRIBUTION_JOB_SCORED, subject_id=str(job.pk)
        )
    ]
    assert total == {
        "job_id": job.pk,
        "method": "shapley_exact",
        "metric": "accuracy",
        "scores": {s: sum(p["scores"][s] for _e, p in scored) for s in slugs},
        "rounds": dict.fromkeys(slugs, 2),
    }
    assert verify_chain().ok

    # Scoring a round again does nothing.
    rnd = Round.objects.get(job=job, index=1)
    assert contributions.round_score(rnd.pk) == "already"
    assert len(_scored(job)) == 2 and ContributionScore.objects.filter(job=job).count() == 6


def test_a_cyclic_round_is_scored_from_the_deltas_its_sites_handed_on(c3, broker):
    job = _run(c3, broker, rounds=1, topology="cyclic")
    ((_entry, payload),) = _scored(job)
    (closed,) = job_payloads("round.closed", job)
    full = next(c for c in payload["coalitions"] if len(c["sites"]) == 3)
    # The sum of the masked deltas is the chain's model (up to float addition order).
    assert abs(full["value"] - closed["metrics"]["validation_accuracy"]) <= 1 / 114
    assert (
        scores_from_coalitions("shapley_exact", payload["params"], payload["coalitions"])
        == (payload["scores"])
    )


def test_the_spec_chooses_leave_one_out(c3, broker):
    job = _run(c3, broker, rounds=1, contribution={"method": "leave_one_out"})
    ((_entry, payload),) = _scored(job)
    assert payload["method"] == "leave_one_out"
    assert payload["evaluations"] == 4  # the full set and each set of two
    assert [] not in [c["sites"] for c in payload["coalitions"]]
    assert (
        scores_from_coalitions("leave_one_out", payload["params"], payload["coalitions"])
        == (payload["scores"])
    )


def test_sampled_rounds_are_corrected_by_a_recorded_surrogate_that_verify_report_replays(
    c3, broker, tmp_path
):
    """Sampled Shapley on the coordinator: estimator 3, its surrogate recorded with the entry,
    the scores recomputed from both by an auditor; a truncated surrogate is caught."""

    job = _run(c3, broker, rounds=1, contribution={"method": "shapley_sampled"})
    ((entry, payload),) = _scored(job)
    params = payload["params"]
    assert payload["method"] == "shapley_sampled" and params["estimator"] == 3
    coalitions = {tuple(c["sites"]): c["value"] for c in payload["coalitions"]}
    slugs = tuple(payload["sites"])
    # One surrogate value per coalition, by bit mask; at the round's model it is the model's
    # own accuracy (the surrogate's logits there are the model's).
    assert len(params["surrogate"]) == 2 ** len(slugs)
    assert params["surrogate"][-1] == coalitions[slugs]
    assert (
        scores_from_coalitions(payload["method"], params, payload["coalitions"])
        == payload["scores"]
    )
    path = tmp_path / "report.json"
    call_command(
        "export_contributions", "--job", str(job.pk), "--format", "json", "--output", str(path)
    )
    out = io.StringIO()
    call_command("verify_report", str(path), stdout=out)
    assert "the scores of 1 scored round(s) recompute from their coalition values" in (
        out.getvalue()
    )
    # At three sites the plan holds every coalition, so any surrogate gives these scores
    # (tests/fl/test_control_variate.py shows a changed one caught at ten); a surrogate that
    # does not cover the coalitions cannot be replayed, and says so.
    forged = dict(payload, params=dict(params, surrogate=params["surrogate"][:-1]))
    bad, said = _verify_with_a_forged_round_entry(job, entry, forged, tmp_path)
    assert f"ledger entry #{bad.seq} cannot be recomputed" in said
    assert "holds 7 values; 3 sites have 8 coalitions" in said


def test_without_a_validation_set_the_round_closes_and_says_why(c3, broker, monkeypatch):
    from training.fl import data

    def missing(key):
        raise ValueError(f"no validation set for {key}")

    monkeypatch.setattr(data, "load_validation_set", missing)
    job = _run(c3, broker, rounds=1)
    assert _scored(job) == []
    (entry,) = LedgerEntry.objects.filter(event=ledger_events.CONTRIBUTION_UNAVAILABLE)
    assert "no validation set for breast-cancer" in json.loads(entry.payload_text)["reason"]
    assert not ContributionScore.objects.exists()
    assert not LedgerEntry.objects.filter(event=ledger_events.CONTRIBUTION_JOB_SCORED).exists()


def test_rounds_left_unscored_are_scored_by_the_command(c3, broker):
    # The rounds' scoring messages lost (no scoring worker ran them).
    job = propose_and_start(c3, broker, rounds=2)
    broker.deliver(drop_scoring=True)
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED
    assert _scored(job) == []
    call_command("score_contributions", "--job", str(job.pk), stdout=io.StringIO())
    assert [p["round"] for _e, p in _scored(job)] == [1, 2]
    assert LedgerEntry.objects.filter(
        event=ledger_events.CONTRIBUTION_JOB_SCORED, subject_id=str(job.pk)
    ).exists()
    assert contributions.job_score_missing(job.pk) == {1: "already", 2: "already"}
    assert LedgerEntry.objects.filter(event=ledger_events.CONTRIBUTION_JOB_SCORED).count() == 1


# --- the pages ----------------------------------------------------------------------------


def _get(client, url):
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx.captured_queries), response.content.decode()


def test_job_and_institution_pages_show_contributions_in_constant_queries(c3, broker):
    cast = c3.scene.cast
    client = cast.client_for("auditor")
    slug = cast.consortium.slug
    institution_url = reverse(
        "consortium:institution-detail", kwargs={"slug": slug, "inst_slug": cast.hospital_a.slug}
    )

    short = _run(c3, broker, rounds=1)
    short_queries, html = _get(client, reverse("training:job-detail", args=[slug, short.pk]))
    inst_queries, inst_html = _get(client, institution_url)
    assert 'id="contribution-table"' in html and 'id="contribution-rounds"' in html
    assert "<caption>Per institution: contribution score" in html
    score = ContributionScore.objects.get(job=short, institution=cast.hospital_a).score
    assert f"{score:.4f}" in html and f"{score:.4f}" in inst_html
    assert 'id="institution-contributions"' in inst_html and f"Job #{short.pk}" in inst_html

    longer = _run(c3, broker, rounds=3)
    long_queries, html = _get(client, reverse("training:job-detail", args=[slug, longer.pk]))
    assert long_queries == short_queries  # whatever the number of rounds
    assert html.count('<th scope="row">3</th>') == 1  # round 3 in the per-round table
    more_inst_queries, inst_html = _get(client, institution_url)
    assert more_inst_queries == inst_queries  # whatever the number of jobs
    assert f"Job #{longer.pk}" in inst_html and f"Job #{short.pk}" in inst_html


def test_job_accountability_figures(c3, broker):
    from training.jobs.selectors import job_accountability

    job = _run(c3, broker, rounds=2)
    job = type(job).objects.select_related("agreement_version").get(pk=job.pk)
    table = job_accountability(job)
    assert table.rounds == [1, 2] and table.methods == ["shapley_exact"]
    by_slug = {row.institution.slug: row for row in table.rows}
    for site in c3.sites:
        row = by_slug[site.slug]
        assert row.rounds == 2 and row.rejected == 0
        assert row.samples == 2 * site.num_records
        assert row.score == sum(
            ContributionScore.objects.filter(job=job, institution=site.institution).values_list(
                "score", flat=True
            )
        )
        assert row.epsilon_job == 0.0  # no DP filter in this job: nothing spent
        assert row.cap == float(job.agreement_version.epsilon_cap)


def test_a_report_of_a_scored_job_verifies_and_a_forged_round_score_is_caught(
    c3,
    broker,
    tmp_path,
):
    """End to end: rounds scored by the coordinator, the auditor's report made from the ledger,
    verify_report recomputing each round's scores from its recorded coalition values."""

    job = _run(c3, broker, rounds=2)
    path = tmp_path / "report.json"
    call_command(
        "export_contributions", "--job", str(job.pk), "--format", "json", "--output", str(path)
    )
    report = json.loads(path.read_text())
    out = io.StringIO()
    call_command("verify_report", str(path), stdout=out)
    assert "the scores of 2 scored round(s) recompute from their coalition values" in out.getvalue()
    assert "every figure matches the ledger" in out.getvalue()
    summed = {r["institution"]: r["score"] for r in report["summary"]}
    recorded = json.loads(
        LedgerEntry.objects.filter(event=ledger_events.CONTRIBUTION_JOB_SCORED).get().payload_text
    )["scores"]
    assert summed == recorded

    # A round entry whose scores do not follow from its coalition values: a report made after
    # it fails, naming the entry.
    entry, payload = _scored(job)[0]
    forged = dict(payload, scores={s: 1.0 for s in payload["scores"]})
    bad, said = _verify_with_a_forged_round_entry(job, entry, forged, tmp_path)
    assert f"ledger entry #{bad.seq}" in said
