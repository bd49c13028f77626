"""Evaluation at the sites (training/rounds/site_evaluation.py): a consortium whose data set the
centre has no copy of still gets a validation metric per round and contribution scores, both
from the sites' signed evaluation reports on their own validation shares, and every figure can
be recomputed from the ledger. Jobs run through the real coordinator and site-worker code (the
in-memory broker of tests/support/coordinator_harness.py) on three hospitals that hold their
records as their own CSV files under a key that is not a bundled set.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.urls import reverse

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from audit.reports.scope import job_scope, ledger_head
from audit.reports.verify import Outcome, _check_site_evaluations
from tests.support.coordinator_harness import InProcessClient, job_payloads, propose_and_start
from tests.support.fl_harness import make_consortium3, use_artifact_folder
from tests.support.ledger_checks import with_ledger_guard_off
from training.fl.contribution import scores_from_coalitions
from training.fl.evaluation_report import combine, parse_report, report_text
from training.fl.holdout import training_count, validation_count
from training.fl.signing import generate_keypair, sign_update, verify_update
from training.jobs.spec import evaluation_settings
from training.models import (
    ContributionScore,
    GlobalModel,
    JobState,
    RoundEvaluation,
    SiteEvaluation,
    SiteUpdate,
)
from training.rounds import contributions
from training.rounds.live import job_live_state
from training.site.client import CentralError

OWN_KEY = "own-records"


@pytest.fixture
def c3(cast, tmp_path, settings):
    """The three hospitals, holding their records under a key the centre has no copy of."""
    use_artifact_folder(settings, tmp_path / "artifacts")
    return make_consortium3(cast, tmp_path, dataset_key=OWN_KEY)


def _run(c3, broker, **spec):
    job = propose_and_start(c3, broker, **spec)
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.end_reason
    return job


def test_a_job_on_the_sites_own_data_evaluates_at_the_sites_by_default(c3, broker):
    job = _run(c3, broker, rounds=2)
    assert evaluation_settings(job.spec) == {
        "where": "sites",
        "validation_fraction": 0.2,
        "max_models": 256,
    }
    slugs = sorted(s.slug for s in c3.sites)
    # Each site trained on its records less its validation share, never on the share.
    for site in c3.sites:
        samples = set(
            SiteUpdate.objects.filter(
                round__job=job, institution=site.institution, status="accepted"
            ).values_list("samples", flat=True)
        )
        assert samples == {training_count(site.num_records, 0.2)}

    for index in (1, 2):
        evaluation = RoundEvaluation.objects.get(round__job=job, round__index=index)
        assert evaluation.state == RoundEvaluation.State.CLOSED
        rows = list(evaluation.site_evaluations.order_by("institution__slug"))
        assert [r.institution.slug for r in rows] == slugs
        assert {r.status for r in rows} == {SiteEvaluation.Status.REPORTED}
        model = GlobalModel.objects.get(job=job, round_index=index)
        assert 0.0 <= model.metrics["validation_accuracy"] <= 1.0
        assert model.metrics["validation_loss"] > 0
        assert model.metrics["validation_sites"] == 3
        assert model.metrics["validation_records"] == sum(
            validation_count(s.num_records, 0.2) for s in c3.sites
        )
    # The model learns: the sites' pooled accuracy after two rounds beats a coin.
    assert GlobalModel.objects.get(job=job, round_index=2).metrics["validation_accuracy"] > 0.7


def test_the_ledger_holds_every_report_and_every_figure_recomputes_from_it(c3, broker):
    job = _run(c3, broker, rounds=2)
    keys = {s.slug: s.institution for s in c3.sites}
    public_keys = {
        slug: institution.site_credentials.get().public_key for slug, institution in keys.items()
    }
    requested = {p["round"]: p for p in job_payloads(ledger_events.EVALUATION_REQUESTED, job)}
    reported = job_payloads(ledger_events.EVALUATION_REPORTED, job)
    evaluated = {p["round"]: p for p in job_payloads(ledger_events.ROUND_EVALUATED, job)}
    scored = {p["round"]: p for p in job_payloads(ledger_events.CONTRIBUTION_SCORED, job)}
    assert sorted(requested) == sorted(evaluated) == sorted(scored) == [1, 2]
    assert len(reported) == 6
    for payload in reported:
        # The text in the ledger is exactly what the site signed, with the key it registered.
        verify_update(
            public_keys[payload["site"]], payload["report"].encode(), payload["signature"]
        )
    for index in (1, 2):
        reports = [parse_report(p["report"]) for p in reported if p["round"] == index]
        digest_of = {
            frozenset(m["sites"]): m["digest"]
            for m in requested[index]["models"]
            if m["role"] == "coalition"
        }
        values = combine(reports, "accuracy")
        entry = scored[index]
        assert entry["evaluated_at"] == "sites"
        assert entry["missing"] == []
        assert entry["site_records"] == {r.site: r.records for r in reports}
        for row in entry["coalitions"]:
            assert row["value"] == values[digest_of[frozenset(row["sites"])]]
        assert (
            scores_from_coalitions(entry["method"], entry["params"], entry["coalitions"])
            == entry["scores"]
        )
        assert entry["method"] == "shapley_exact"  # 2^3 models fit the default 256
        global_digest = requested[index]["global_digest"]
        assert evaluated[index]["metrics"]["validation_accuracy"] == values[global_digest]
    assert ContributionScore.objects.filter(job=job).count() == 6
    totals = job_payloads(ledger_events.CONTRIBUTION_JOB_SCORED, job)
    assert len(totals) == 1 and totals[0]["rounds"] == dict.fromkeys(sorted(keys), 2)
    assert verify_chain().ok


def test_a_site_that_never_reports_is_named_and_the_scores_rest_on_the_others(c3, broker):
    silent = c3.sites[2].slug
    job = propose_and_start(c3, broker, rounds=1)
    broker.deliver(drop_evaluations=(silent,))
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED
    evaluation = RoundEvaluation.objects.get(round__job=job, round__index=1)
    assert evaluation.state == RoundEvaluation.State.COLLECTING  # waits for the third site
    assert not job_payloads(ledger_events.CONTRIBUTION_SCORED, job)

    late = evaluation.deadline + dt.timedelta(seconds=1)
    broker.run(contributions.scores_tick, now=late)
    broker.deliver()  # the close sent the round to the scoring queue
    evaluation.refresh_from_db()
    assert evaluation.state == RoundEvaluation.State.CLOSED
    assert evaluation.site_evaluations.get(institution__slug=silent).status == "missing"
    (entry,) = job_payloads(ledger_events.CONTRIBUTION_SCORED, job)
    assert entry["missing"] == [silent]
    assert sorted(entry["site_records"]) == sorted(s.slug for s in c3.sites if s.slug != silent)
    # The silent site still trained: it is scored, on the other two sites' records.
    assert sorted(entry["scores"]) == sorted(s.slug for s in c3.sites)
    (evaluated,) = job_payloads(ledger_events.ROUND_EVALUATED, job)
    assert evaluated["missing"] == [silent]
    assert evaluated["metrics"]["validation_sites"] == 2


def test_a_lost_evaluation_task_is_sent_again(c3, broker, settings):
    settings.FL_REDISPATCH_AFTER_SECONDS = 60
    silent = c3.sites[0].slug
    job = propose_and_start(c3, broker, rounds=1)
    broker.deliver(drop_evaluations=(silent,))
    evaluation = RoundEvaluation.objects.get(round__job=job, round__index=1)
    row = evaluation.site_evaluations.get(institution__slug=silent)
    later = row.sent_at + dt.timedelta(seconds=61)
    outcome = broker.run(contributions.scores_tick, now=later)
    assert outcome["resent"] == [row.pk]
    broker.deliver()
    evaluation.refresh_from_db()
    assert evaluation.state == RoundEvaluation.State.CLOSED
    (entry,) = job_payloads(ledger_events.CONTRIBUTION_SCORED, job)
    assert entry["missing"] == []


def test_sampled_scores_stay_within_the_specs_model_bound(c3, broker):
    job = _run(
        c3,
        broker,
        rounds=1,
        evaluation={"where": "sites", "max_models": 6},
    )
    (requested,) = job_payloads(ledger_events.EVALUATION_REQUESTED, job)
    # At most 6 coalition models, and the round's own model.
    coalitions = [m for m in requested["models"] if m["role"] == "coalition"]
    assert len(coalitions) <= 6
    (entry,) = job_payloads(ledger_events.CONTRIBUTION_SCORED, job)
    # 2^3 coalitions do not fit: auto samples instead, as many permutations as fit.
    assert entry["method"] == "shapley_sampled"
    assert 1 <= entry["params"]["permutations"] < 100
    assert (
        scores_from_coalitions(entry["method"], entry["params"], entry["coalitions"])
        == entry["scores"]
    )


# --- The report endpoint refuses what it cannot verify, and records nothing -----------------------


def _asked(c3, broker, silent):
    """A running one-round job whose evaluation waits for ``silent``'s report."""
    job = propose_and_start(c3, broker, rounds=1)
    broker.deliver(drop_evaluations=(silent.slug,))
    evaluation = RoundEvaluation.objects.get(round__job=job, round__index=1)
    assert evaluation.state == RoundEvaluation.State.COLLECTING
    return job, evaluation


def _report(
    job, site, evaluation, *, records=10, key_path=None, models=None, value=0.5, surrogate=None
):
    text = report_text(
        job_id=job.pk,
        round_index=1,
        site=site.slug,
        records=records,
        results={d: {"accuracy": value, "loss": 0.7} for d in (models or evaluation.digests)},
        surrogate=surrogate,
    )
    signature = sign_update((key_path or site.key_path).read_bytes(), text.encode())
    return text, signature


def _post(site, job, text, signature):
    return InProcessClient(site.token).client.post(
        f"/api/site/v1/jobs/{job.pk}/rounds/1/evaluation/",
        data=json.dumps({"report": text, "signature": signature}),
        content_type="application/json",
        **InProcessClient(site.token).auth,
    )


def test_a_forged_or_wrong_report_is_refused_with_its_reason(c3, broker, tmp_path):
    site = c3.sites[1]
    job, evaluation = _asked(c3, broker, site)
    before = job_payloads(ledger_events.EVALUATION_REPORTED, job)

    other_key = tmp_path / "other.pem"
    other_key.write_bytes(generate_keypair()[0])
    text, signature = _report(job, site, evaluation, key_path=other_key)
    response = _post(site, job, text, signature)
    assert response.status_code == 400 and response.json()["code"] == "bad_signature"

    text, signature = _report(job, site, evaluation, models=evaluation.digests[:-1])
    response = _post(site, job, text, signature)
    assert response.status_code == 400 and response.json()["code"] == "wrong_models"
    assert "missing" in response.json()["detail"]

    text, signature = _report(job, site, evaluation, records=site.num_records + 1)
    response = _post(site, job, text, signature)
    assert response.status_code == 400 and response.json()["code"] == "bad_records"

    response = _post(site, job, text.replace('"kind"', ' "kind"', 1), signature)
    assert response.status_code == 400 and response.json()["code"] == "bad_report"

    # Exact Shapley's plan asks for no surrogate: a report carrying one is refused.
    assert "surrogate" not in evaluation.plan
    text, signature = _report(job, site, evaluation, surrogate=[0.5] * 8)
    response = _post(site, job, text, signature)
    assert response.status_code == 400 and response.json()["code"] == "bad_surrogate"
    assert "none was asked for" in response.json()["detail"]

    # Another site's report posted with this site's token is refused too.
    text, signature = _report(job, c3.sites[0], evaluation)
    response = _post(site, job, text, signature)
    assert response.status_code == 400 and response.json()["code"] == "bad_report"

    assert job_payloads(ledger_events.EVALUATION_REPORTED, job) == before
    assert evaluation.site_evaluations.get(institution=site.institution).status == "asked"


def test_a_report_is_taken_once_and_a_repeat_is_harmless(c3, broker):
    site = c3.sites[1]
    job, evaluation = _asked(c3, broker, site)
    text, signature = _report(job, site, evaluation)
    first = _post(site, job, text, signature)
    assert first.status_code == 201, first.content
    again = _post(site, job, text, signature)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    other, other_signature = _report(job, site, evaluation, value=0.9)
    changed = _post(site, job, other, other_signature)
    assert changed.status_code == 409 and changed.json()["code"] == "already_reported"
    assert len(job_payloads(ledger_events.EVALUATION_REPORTED, job)) == 3
    # The worker then has nothing left to do.
    asked = InProcessClient(site.token)
    with pytest.raises(CentralError) as caught:
        asked.evaluation_request(job.pk, 1)
    assert caught.value.status == 409 and caught.value.body["code"] == "already_reported"


def test_a_site_may_read_a_coalition_model_only_while_it_is_asked_to_evaluate_it(c3, broker):
    site = c3.sites[1]
    job, evaluation = _asked(c3, broker, site)
    coalition = next(
        m["digest"]
        for m in evaluation.asked_models
        if m["role"] == "coalition" and len(m["sites"]) == 1
    )
    client = InProcessClient(site.token)
    assert client.model(job.pk, coalition)  # asked: served
    text, signature = _report(job, site, evaluation)
    assert _post(site, job, text, signature).status_code == 201
    with pytest.raises(CentralError) as caught:
        client.model(job.pk, coalition)  # reported: no longer
    assert caught.value.status == 404


# --- The auditors' report verifies the sites' figures from the ledger alone ---------------------


def _export_and_verify(tmp_path, job) -> tuple[int, str]:
    path = tmp_path / "report.json"
    call_command(
        "export_contributions",
        "--job",
        str(job.pk),
        "--format",
        "json",
        "--output",
        str(path),
        stderr=io.StringIO(),
    )
    out = io.StringIO()
    try:
        call_command("verify_report", str(path), stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def test_the_contribution_report_scores_every_site_and_verifies_their_reports(c3, broker, tmp_path):
    job = _run(c3, broker, rounds=2)
    code, text = _export_and_verify(tmp_path, job)
    assert code == 0, text
    assert "2 round(s) valued at the sites recompute from 6 signed evaluation report(s)" in text


def _rewrite(entry, change) -> None:
    """Rewrite a ledger entry's payload in place (what someone with write access to the
    database could do; the chain's own check is issue 16's; here the signatures must catch it)."""
    payload = json.loads(entry.payload_text)
    change(payload)
    with with_ledger_guard_off(), connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {LedgerEntry._meta.db_table} SET payload_text = %s WHERE seq = %s",
            [json.dumps(payload, sort_keys=True, separators=(",", ":")), entry.seq],
        )


def _site_checks(job) -> Outcome:
    scope = job_scope(job.pk)
    outcome = Outcome(fmt="json", scope=scope, head=ledger_head())
    _check_site_evaluations(outcome, scope, ledger_head())
    return outcome


def test_a_rewritten_evaluation_report_or_value_is_caught_by_the_signatures(c3, broker):
    job = _run(c3, broker, rounds=1)
    assert _site_checks(job).ok
    entry = LedgerEntry.objects.filter(event=ledger_events.EVALUATION_REPORTED).order_by("seq")[0]

    def better_figure(payload):
        report = json.loads(payload["report"])
        report["results"][0]["metrics"]["accuracy"] = 1.0
        payload["report"] = json.dumps(report, sort_keys=True, separators=(",", ":"))
        payload["report_digest"] = hashlib.sha256(payload["report"].encode()).hexdigest()

    _rewrite(entry, better_figure)
    outcome = _site_checks(job)
    assert not outcome.ok
    assert (
        f"the evaluation report in ledger entry #{entry.seq} does not verify" in outcome.failed[0]
    )


def test_a_coalition_value_that_does_not_follow_from_the_reports_is_caught(c3, broker):
    job = _run(c3, broker, rounds=1)
    entry = LedgerEntry.objects.get(event=ledger_events.CONTRIBUTION_SCORED)

    def inflate(payload):
        payload["coalitions"][-1]["value"] += 0.25

    _rewrite(entry, inflate)
    outcome = _site_checks(job)
    assert not outcome.ok
    assert "do not follow from the sites' reports" in outcome.failed[0]


def test_a_report_signed_with_a_key_the_site_never_registered_is_caught(c3, broker):
    job = _run(c3, broker, rounds=1)
    entry = LedgerEntry.objects.filter(event=ledger_events.EVALUATION_REPORTED).order_by("seq")[0]
    private_pem, public_pem = generate_keypair()

    def resign(payload):
        payload["public_key"] = public_pem
        payload["signature"] = sign_update(private_pem, payload["report"].encode())

    _rewrite(entry, resign)
    outcome = _site_checks(job)
    assert not outcome.ok
    assert "never registered" in outcome.failed[0]


# --- What people see -------------------------------------------------------------------------


def test_the_approver_reads_that_the_models_are_evaluated_at_the_sites(c3, broker):
    job = broker.run(c3.propose_and_approve, rounds=1)
    slug = c3.scene.cast.consortium.slug
    html = (
        c3.scene.cast.client_for("approver")
        .get(reverse("training:job-review", args=[slug, job.pk]))
        .content.decode()
    )
    assert 'id="evaluation-where"' in html
    assert "evaluated at the sites" in html and "keeps 20% of its own records aside" in html


def test_the_job_page_charts_the_metric_the_sites_measured_each_round(c3, broker):
    job = _run(c3, broker, rounds=2)
    series = job_live_state(job)["series"]
    assert series["metric"] == "validation_accuracy"
    measured = [v for v in series["validation"] if v is not None]
    assert measured == [
        GlobalModel.objects.get(job=job, round_index=i).metrics["validation_accuracy"]
        for i in (1, 2)
    ]
    slug = c3.scene.cast.consortium.slug
    html = (
        c3.scene.cast.client_for("researcher")
        .get(reverse("training:job-detail", args=[slug, job.pk]))
        .content.decode()
    )
    assert "measured by the sites on their own validation shares" in html


def test_an_evaluation_never_asked_for_is_asked_after_the_tick_sends_the_round_again(
    c3, broker, settings
):
    # The scoring worker, which asks the sites, never ran the rounds' messages (lost with it).
    settings.FL_REDISPATCH_AFTER_SECONDS = 60
    job = propose_and_start(c3, broker, rounds=2)
    broker.deliver(drop_scoring=True)
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED
    assert not RoundEvaluation.objects.filter(round__job=job).exists()

    later = max(job.rounds.values_list("lease_expires_at", flat=True)) + dt.timedelta(seconds=1)
    outcome = broker.run(contributions.scores_tick, now=later)
    assert sorted(outcome["scoring_resent"]) == sorted(job.rounds.values_list("pk", flat=True))
    assert not RoundEvaluation.objects.filter(round__job=job).exists()  # not on central
    broker.deliver()  # the scoring worker asks the sites; their evaluations' close scores
    assert RoundEvaluation.objects.filter(round__job=job).count() == 2
    assert len(job_payloads(ledger_events.CONTRIBUTION_SCORED, job)) == 2
    assert len(job_payloads(ledger_events.CONTRIBUTION_JOB_SCORED, job)) == 1
    # A second pass finds nothing left to send.
    assert broker.run(contributions.scores_tick, now=later)["scoring_resent"] == []


# --- Contribution estimator 3 at the sites: each site makes the surrogate on its own share -----


def test_sampled_scores_at_the_sites_are_corrected_by_the_sites_own_surrogates(c3, broker):
    job = _run(c3, broker, rounds=1, contribution={"method": "shapley_sampled"})
    slugs = sorted(s.slug for s in c3.sites)
    (requested,) = job_payloads(ledger_events.EVALUATION_REQUESTED, job)
    ask = requested["plan"]["surrogate"]
    by_sites = {
        tuple(m["sites"]): m["digest"] for m in requested["models"] if m["role"] == "coalition"
    }
    # What a site needs: the players, the weights, and models it evaluates anyway.
    assert ask["players"] == slugs and len(ask["weights"]) == 3
    assert ask["base"] == by_sites[()]
    assert ask["singletons"] == {s: by_sites[(s,)] for s in slugs}
    reports = [
        parse_report(e["report"]) for e in job_payloads(ledger_events.EVALUATION_REPORTED, job)
    ]
    assert len(reports) == 3 and all(len(r.surrogate) == 8 for r in reports)
    (entry,) = job_payloads(ledger_events.CONTRIBUTION_SCORED, job)
    assert entry["evaluated_at"] == "sites" and entry["params"]["estimator"] == 3
    from training.fl.evaluation_report import combine_surrogates

    surrogate = entry["params"]["surrogate"]
    assert surrogate == combine_surrogates(reports)
    # At the round's model the sites' surrogate is their measured accuracy (up to a record
    # on a decision boundary: each site rebuilt the model from the updates itself).
    full = next(c["value"] for c in entry["coalitions"] if c["sites"] == slugs)
    records = sum(entry["site_records"].values())
    assert abs(surrogate[-1] - full) <= 1.01 / records
    assert (
        scores_from_coalitions(entry["method"], entry["params"], entry["coalitions"])
        == entry["scores"]
    )
    assert _site_checks(job).ok

    # A surrogate rewritten in the entry no longer follows from the signed reports.
    scored = LedgerEntry.objects.get(event=ledger_events.CONTRIBUTION_SCORED)
    _rewrite(scored, lambda p: p["params"]["surrogate"].__setitem__(0, 0.123))
    outcome = _site_checks(job)
    assert not outcome.ok
    assert any("surrogate" in f and "does not follow" in f for f in outcome.failed)


def test_a_surrogate_of_the_wrong_size_is_refused(c3, broker):
    site = c3.sites[1]
    job = propose_and_start(c3, broker, rounds=1, contribution={"method": "shapley_sampled"})
    broker.deliver(drop_evaluations=(site.slug,))
    evaluation = RoundEvaluation.objects.get(round__job=job, round__index=1)
    assert evaluation.plan["surrogate"]["players"] == sorted(s.slug for s in c3.sites)
    text, signature = _report(job, site, evaluation, surrogate=[0.5] * 4)
    response = _post(site, job, text, signature)
    assert response.status_code == 400 and response.json()["code"] == "bad_surrogate"
    assert "holds 4 values; the round's 3 sites have 8 coalitions" in response.json()["detail"]
    # Without one, the report is taken (the scores then rest on the sample alone).
    text, signature = _report(job, site, evaluation)
    assert _post(site, job, text, signature).status_code == 201
