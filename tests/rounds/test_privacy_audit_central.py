"""The privacy audit's central side (training/jobs/privacy_audits.py, training/rounds/
audit_intake.py, training/rounds/site_api_audit.py): a proposal that asks for the audit asks
every site for it and queues their tasks, the site API answers what is asked and takes a signed
report only when it can count, a lost task is sent again, and the ledger's reports verify.

The three hospitals of tests/support/fl_harness.py (``c3``) and the in-memory broker
(``broker``) come from tests/rounds/conftest.py; the sites' reports are built here from a
hand-made audit result, as a site's worker would build them (training.fl.audit_report).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json

import pytest
from django.db import connection
from django.test import Client

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.ledger.words import entry_sentence
from audit.models import LedgerEntry
from audit.reports.scope import job_scope, ledger_head
from audit.reports.verify import Outcome, _check_privacy_audits
from tests.support.coordinator_harness import job_payloads
from tests.support.fl_harness import job_spec
from tests.support.ledger_checks import with_ledger_guard_off
from training import queues
from training.fl.audit_report import report_text, summary_of
from training.fl.signing import generate_keypair, sign_update, verify_update
from training.jobs.privacy_audits import (
    RESEND_FIRST,
    audit_of,
    audit_request,
    audits_for,
    audits_tick,
)
from training.jobs.proposals import job_propose, job_update_spec
from training.models import AuditPicture, JobState, PrivacyAudit
from training.rounds import coordinator
from training.site.protocol import SITE_PROTOCOL

AUDIT = {"records": 4, "seed": 7}


def _result(*, seed=7, records=4, success=0.25, **extra) -> dict:
    """A measured tabular audit's result (``AuditResult.to_json()``) with plausible figures."""
    rows = [
        {
            "record": i,
            "attack": "analytic",
            "success": i < round(success * records),
            "label_inferred": True,
            "relative_error": 0.05 if i < round(success * records) else 0.6,
            "features_within": 0.9 if i < round(success * records) else 0.2,
            "by_attack": {"analytic": {"relative_error": 0.05}, "dlg": {"relative_error": 0.8}},
        }
        for i in range(records)
    ]
    return {
        "modality": "tabular",
        "summary": {
            "success_rate": success,
            "median_relative_error": 0.6,
            "median_features_within": 0.2,
            "label_inference_rate": 1.0,
        },
        "records": rows,
        "settings": {"records": records, "seed": seed, "pipeline": [], "distance": "relative"},
        "seed": seed,
        "shared_fraction": 1.0,
        "label_inference": "ran",
        "seconds_per_record": 0.4,
        "calibration": {"records": 2, "success_rate": 1.0, "median": 0.05},
        "conclusive": True,
        **extra,
    }


def _report(job, site, *, key_path=None, digest=None, slug=None, result=None, **outcome):
    """A site's canonical report and its signature (by its own key unless ``key_path``)."""
    if "outcome" not in outcome:
        outcome = {"outcome": "measured", "result": result or _result()}
    text = report_text(
        job_id=job.pk,
        site=slug or site.slug,
        spec_digest=digest or job.spec_digest,
        **outcome,
    )
    signature = sign_update((key_path or site.key_path).read_bytes(), text.encode())
    return text, signature


def _client(site) -> tuple[Client, dict]:
    auth = {"HTTP_AUTHORIZATION": f"Site {site.token}", "HTTP_X_SITE_PROTOCOL": str(SITE_PROTOCOL)}
    return Client(), auth


def _get(site, job):
    client, auth = _client(site)
    return client.get(f"/api/site/v1/jobs/{job.pk}/audit/", **auth)


def _post(site, job, text, signature):
    client, auth = _client(site)
    return client.post(
        f"/api/site/v1/jobs/{job.pk}/audit/",
        data=json.dumps({"report": text, "signature": signature}),
        content_type="application/json",
        **auth,
    )


def _propose(c3, broker, *, sites=None, **overrides):
    """A job over ``sites`` (all three by default), proposed: it awaits approval."""
    spec = job_spec([s.slug for s in (sites or c3.sites)], dataset_key=c3.dataset_key, **overrides)
    job = broker.run(
        job_propose,
        acting_user=c3.scene.cast.researcher,
        consortium=c3.scene.cast.consortium,
        title="Audited classifier",
        spec=spec,
    )
    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL
    return job


def _sent(broker, name):
    return [m for m in broker.log if m["name"] == name]


def _audits_checked(job) -> Outcome:
    scope = job_scope(job.pk)
    outcome = Outcome(fmt="json", scope=scope, head=ledger_head())
    _check_privacy_audits(outcome, scope, ledger_head())
    return outcome


# --- Asking the sites ------------------------------------------------------------------------


def test_a_proposal_that_asks_for_the_audit_asks_every_site_and_queues_their_tasks(c3, broker):
    job = _propose(c3, broker, privacy_audit=AUDIT)
    slugs = sorted(s.slug for s in c3.sites)

    rows = audits_for(job)
    assert [r.institution.slug for r in rows] == slugs
    assert {(r.status, r.spec_digest) for r in rows} == {
        (PrivacyAudit.Status.ASKED, job.spec_digest)
    }
    assert audit_of(job, c3.sites[0].institution) == rows[0]

    (requested,) = job_payloads(ledger_events.PRIVACY_AUDIT_REQUESTED, job)
    assert requested == {
        "job_id": job.pk,
        "spec_digest": job.spec_digest,
        "sites": slugs,
        "records": 4,
        "seed": 7,
    }
    entry = LedgerEntry.objects.get(event=ledger_events.PRIVACY_AUDIT_REQUESTED)
    assert entry.actor_id == c3.scene.cast.researcher.pk

    site_tasks = _sent(broker, queues.SITE_AUDIT.name)
    assert sorted((m["queue"], m["kwargs"]["site"]) for m in site_tasks) == [
        (queues.site_queue(slug), slug) for slug in slugs
    ]
    assert {m["kwargs"]["job_id"] for m in site_tasks} == {job.pk}
    assert {m["kwargs"]["spec_digest"] for m in site_tasks} == {job.spec_digest}
    (picture_task,) = _sent(broker, queues.AUDIT_PICTURE.name)
    assert picture_task["queue"] == "central"
    assert picture_task["kwargs"] == {"job_id": job.pk, "spec_digest": job.spec_digest}
    picture = AuditPicture.objects.get(job=job, spec_digest=job.spec_digest)
    assert bytes(picture.png) == b"" and picture.drawn_at is None  # "being drawn"
    assert verify_chain().ok


def test_a_spec_without_the_audit_asks_nothing(c3, broker):
    job = _propose(c3, broker)
    assert audits_for(job) == []
    assert audit_of(job, c3.sites[0].institution) is None
    assert not job_payloads(ledger_events.PRIVACY_AUDIT_REQUESTED, job)
    assert not _sent(broker, queues.SITE_AUDIT.name)
    assert not _sent(broker, queues.AUDIT_PICTURE.name)
    assert not AuditPicture.objects.filter(job=job).exists()
    # Asking again by hand asks nothing either.
    assert broker.run(audit_request, job) is False
    assert not PrivacyAudit.objects.filter(job=job).exists()


def test_asking_twice_for_one_digest_asks_once(c3, broker):
    job = _propose(c3, broker, privacy_audit=AUDIT)
    before = len(_sent(broker, queues.SITE_AUDIT.name))
    assert broker.run(audit_request, job) is True
    assert PrivacyAudit.objects.filter(job=job).count() == 3
    assert len(job_payloads(ledger_events.PRIVACY_AUDIT_REQUESTED, job)) == 1
    assert AuditPicture.objects.filter(job=job).count() == 1
    assert len(_sent(broker, queues.AUDIT_PICTURE.name)) == 1
    # Still-asked sites are sent their task again (their last one may have been for another
    # digest); none is asked twice in the ledger.
    assert len(_sent(broker, queues.SITE_AUDIT.name)) == before + 3


def test_a_changed_spec_is_audited_anew_and_the_old_audits_stay(c3, broker):
    job = _propose(c3, broker, privacy_audit=AUDIT)
    old_digest = job.spec_digest
    site = c3.sites[0]
    text, signature = _report(job, site)
    assert _post(site, job, text, signature).status_code == 201

    changed = dict(job.spec, privacy_audit={"records": 4, "seed": 8})
    broker.run(job_update_spec, acting_user=c3.scene.cast.researcher, job=job, spec=changed)
    job.refresh_from_db()
    assert job.spec_digest != old_digest

    rows = audits_for(job)
    assert len(rows) == 3 and {r.spec_digest for r in rows} == {job.spec_digest}
    assert {r.status for r in rows} == {PrivacyAudit.Status.ASKED}
    old = PrivacyAudit.objects.filter(job=job, spec_digest=old_digest)
    assert old.count() == 3
    assert old.get(institution=site.institution).status == PrivacyAudit.Status.REPORTED
    requested = job_payloads(ledger_events.PRIVACY_AUDIT_REQUESTED, job)
    assert [p["spec_digest"] for p in requested] == [old_digest, job.spec_digest]
    assert requested[-1]["seed"] == 8
    new_tasks = [
        m
        for m in _sent(broker, queues.SITE_AUDIT.name)
        if m["kwargs"]["spec_digest"] == job.spec_digest
    ]
    assert len(new_tasks) == 3
    assert AuditPicture.objects.filter(job=job).count() == 2

    # The site is asked again, for the new digest, and its old report does not count for it.
    answer = _get(site, job)
    assert answer.status_code == 200 and answer.json()["spec_digest"] == job.spec_digest
    assert answer.json()["seed"] == 8
    stale = _post(site, job, text, signature)
    assert stale.status_code == 400 and stale.json()["code"] == "bad_report"
    assert "spec digest" in stale.json()["detail"]


# --- GET: what is asked ---------------------------------------------------------------------------


def test_the_site_is_told_what_is_asked_and_why_nothing_is(c3, broker):
    job = _propose(c3, broker, privacy_audit=AUDIT)
    site = c3.sites[1]
    # The spec itself, which the site needs to rebuild the model, is served before approval.
    client, auth = _client(site)
    spec = client.get(f"/api/site/v1/jobs/{job.pk}/", **auth)
    assert spec.status_code == 200 and spec.json()["state"] == JobState.AWAITING_APPROVAL

    answer = _get(site, job)
    assert answer.status_code == 200, answer.content
    assert answer.json() == {
        "job": job.pk,
        "site": site.slug,
        "spec_digest": job.spec_digest,
        "records": 4,
        "seed": 7,
    }
    text, signature = _report(job, site)
    assert _post(site, job, text, signature).status_code == 201
    done = _get(site, job)
    assert done.status_code == 409 and done.json()["code"] == "already_reported"

    other = c3.sites[2]
    c3.scene.decide(job, other.institution, decision="rejected", reason="Too risky for us.")
    job.refresh_from_db()
    assert job.state == JobState.REJECTED
    decided = _get(other, job)
    assert decided.status_code == 409 and decided.json()["code"] == "not_awaiting_approval"


def test_a_job_without_an_audit_or_without_the_site_is_nothing_or_404(c3, broker):
    plain = _propose(c3, broker)
    answer = _get(c3.sites[0], plain)
    assert answer.status_code == 409 and answer.json()["code"] == "not_asked"

    job = _propose(c3, broker, sites=c3.sites[:2], privacy_audit=AUDIT)
    outsider = c3.sites[2]
    assert _get(outsider, job).status_code == 404
    text, signature = _report(job, outsider)
    assert _post(outsider, job, text, signature).status_code == 404
    assert not PrivacyAudit.objects.filter(job=job, institution=outsider.institution).exists()
    missing = _get(c3.sites[0], type(job)(pk=job.pk + 1000))
    assert missing.status_code == 404


# --- POST: the report ----------------------------------------------------------------------------


def test_a_signed_report_is_recorded_once_verbatim_and_verifies(c3, broker):
    job = _propose(c3, broker, privacy_audit=AUDIT)
    site = c3.sites[1]
    text, signature = _report(job, site)
    first = _post(site, job, text, signature)
    assert first.status_code == 201, first.content
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert first.json() == {
        "job": job.pk,
        "site": site.slug,
        "spec_digest": job.spec_digest,
        "outcome": "measured",
        "report_digest": digest,
        "duplicate": False,
    }
    row = audit_of(job, site.institution)
    assert row.status == PrivacyAudit.Status.REPORTED and row.outcome == "measured"
    assert row.summary == summary_of(_result())
    assert row.summary["success_rate"] == 0.25 and row.summary["conclusive"] is True
    assert (row.report_text, row.report_digest, row.signature) == (text, digest, signature)
    assert row.reported_at is not None

    (entry,) = job_payloads(ledger_events.PRIVACY_AUDIT_REPORTED, job)
    public_key = site.institution.site_credentials.get().public_key
    assert entry == {
        "job_id": job.pk,
        "spec_digest": job.spec_digest,
        "site": site.slug,
        "outcome": "measured",
        "summary": row.summary,
        "report": text,
        "report_digest": digest,
        "signature": signature,
        "public_key": public_key,
    }
    verify_update(public_key, entry["report"].encode(), entry["signature"])
    ledger_row = LedgerEntry.objects.get(event=ledger_events.PRIVACY_AUDIT_REPORTED)
    assert ledger_row.institution_slug == site.slug
    assert ledger_row.actor_repr.startswith(f"site {site.slug} worker")
    outcome = _audits_checked(job)
    assert outcome.ok and outcome.matched == [
        "1 signed privacy audit report(s) in the ledger verify"
    ]
    assert verify_chain().ok

    again = _post(site, job, text, signature)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    other_text, other_signature = _report(job, site, result=_result(success=0.75))
    changed = _post(site, job, other_text, other_signature)
    assert changed.status_code == 409 and changed.json()["code"] == "already_reported"
    assert len(job_payloads(ledger_events.PRIVACY_AUDIT_REPORTED, job)) == 1
    assert audit_of(job, site.institution).report_text == text


def test_an_audit_out_of_reach_is_recorded_with_its_reason(c3, broker):
    job = _propose(c3, broker, privacy_audit=AUDIT)
    site = c3.sites[0]
    reason = "the model has 2,000,000 trainable parameters, more than the audit's limit"
    text, signature = _report(job, site, outcome="out_of_reach", reason=reason)
    assert _post(site, job, text, signature).status_code == 201
    row = audit_of(job, site.institution)
    assert (row.outcome, row.summary, row.reason) == ("out_of_reach", None, reason)
    (entry,) = job_payloads(ledger_events.PRIVACY_AUDIT_REPORTED, job)
    assert entry["outcome"] == "out_of_reach" and entry["summary"] is None
    assert _audits_checked(job).ok


def test_a_forged_or_wrong_report_is_refused_with_its_reason_and_nothing_recorded(
    c3, broker, tmp_path
):
    job = _propose(c3, broker, privacy_audit=AUDIT)
    site = c3.sites[1]

    def refused(text, signature, code):
        response = _post(site, job, text, signature)
        assert response.status_code == 400, response.content
        assert response.json()["code"] == code, response.json()
        return response.json()["detail"]

    other_key = tmp_path / "other.pem"
    other_key.write_bytes(generate_keypair()[0])
    detail = refused(*_report(job, site, key_path=other_key), "bad_signature")
    assert "credential 'worker'" in detail
    # Signed with another site's registered key: not this credential's.
    refused(*_report(job, site, key_path=c3.sites[0].key_path), "bad_signature")
    text, _signature = _report(job, site)
    refused(text, "not base64!", "bad_signature")

    # More than figures: a field an audit does not produce, or a list no audit makes.
    sneaky = report_text(
        job_id=job.pk,
        site=site.slug,
        spec_digest=job.spec_digest,
        outcome="measured",
        result=_result(),
    ).replace('"conclusive":true', '"conclusive":true,"pixels":[0.1,0.2]')
    detail = refused(sneaky, sign_update(site.key_path.read_bytes(), sneaky.encode()), "bad_report")
    assert "pixels" in detail
    huge = _result()
    huge["calibration"]["losses"] = [0.5] * 5000
    raw = json.loads(text)
    raw["result"] = huge
    huge_text = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    detail = refused(
        huge_text, sign_update(site.key_path.read_bytes(), huge_text.encode()), "bad_report"
    )
    assert "5000 items" in detail
    detail = refused(text.replace('"kind"', ' "kind"', 1), _signature, "bad_report")
    assert "canonical" in detail

    # Another audit than the one asked: another digest, another site, another seed, more records.
    detail = refused(*_report(job, site, digest="a" * 64), "bad_report")
    assert "spec digest" in detail and "a" * 64 in detail
    detail = refused(*_report(job, site, slug=c3.sites[0].slug), "bad_report")
    assert f"site {c3.sites[0].slug!r}" in detail
    detail = refused(*_report(job, site, result=_result(seed=8)), "bad_report")
    assert "seed 8" in detail
    detail = refused(*_report(job, site, result=_result(records=5)), "bad_report")
    assert "5 records" in detail

    bad_body = _client(site)[0].post(
        f"/api/site/v1/jobs/{job.pk}/audit/",
        data=json.dumps({"report": text}),
        content_type="application/json",
        **_client(site)[1],
    )
    assert bad_body.status_code == 400 and bad_body.json()["code"] == "bad_request"

    assert not job_payloads(ledger_events.PRIVACY_AUDIT_REPORTED, job)
    assert audit_of(job, site.institution).status == PrivacyAudit.Status.ASKED


def test_a_report_after_the_decision_is_refused(c3, broker):
    job = _propose(c3, broker, privacy_audit=AUDIT)
    late = c3.sites[2]
    text, signature = _report(job, late)
    for site in c3.sites:
        broker.run(c3.scene.decide, job, site.institution)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED
    response = _post(late, job, text, signature)
    assert response.status_code == 409 and response.json()["code"] == "not_awaiting_approval"
    assert audit_of(job, late.institution).status == PrivacyAudit.Status.ASKED
    assert not job_payloads(ledger_events.PRIVACY_AUDIT_REPORTED, job)


# --- The periodic pass ---------------------------------------------------------------------------


def test_a_lost_audit_task_is_sent_again_after_the_interval_with_back_off(c3, broker):
    job = _propose(c3, broker, privacy_audit=AUDIT)
    reported, silent = c3.sites[0], c3.sites[1]
    text, signature = _report(job, reported)
    assert _post(reported, job, text, signature).status_code == 201
    row = audit_of(job, silent.institution)
    asked_at = row.asked_at

    def resend(seconds):
        broker.log.clear()
        outcome = broker.run(audits_tick, now=asked_at + dt.timedelta(seconds=seconds))
        return outcome, [m["kwargs"]["site"] for m in _sent(broker, queues.SITE_AUDIT.name)]

    assert resend(RESEND_FIRST.total_seconds() - 1) == ([], [])
    pending = sorted(r.pk for r in audits_for(job) if r.status == PrivacyAudit.Status.ASKED)
    outcome, sites = resend(RESEND_FIRST.total_seconds())
    assert outcome == pending and sorted(sites) == sorted(s.slug for s in c3.sites[1:])
    assert reported.slug not in sites
    row.refresh_from_db()
    assert row.sent_at == asked_at + RESEND_FIRST
    # Then after as long again as it has waited so far: 120 s after it was asked, then 240 s.
    assert resend(119) == ([], [])
    assert sorted(resend(120)[1]) == sorted(s.slug for s in c3.sites[1:])
    assert resend(239) == ([], [])
    outcome, sites = resend(240)
    assert outcome == pending
    tasks = _sent(broker, queues.SITE_AUDIT.name)
    assert sorted((m["queue"], json.dumps(m["kwargs"], sort_keys=True)) for m in tasks) == sorted(
        (
            queues.site_queue(s.slug),
            json.dumps(
                {"job_id": job.pk, "site": s.slug, "spec_digest": job.spec_digest}, sort_keys=True
            ),
        )
        for s in c3.sites[1:]
    )
    # A day later the interval is at its cap (an hour), not a day.
    row.refresh_from_db()
    row.sent_at = asked_at + dt.timedelta(days=1)
    row.save(update_fields=["sent_at"])
    assert silent.slug in resend(24 * 3600 + 3600)[1]


def test_the_coordinators_tick_sends_them_again_and_not_for_a_decided_job(c3, broker):
    job = _propose(c3, broker, privacy_audit=AUDIT)
    later = audit_of(job, c3.sites[0].institution).asked_at + dt.timedelta(minutes=5)
    report = broker.run(coordinator.rounds_tick, now=later)
    assert sorted(report.audits_resent) == sorted(r.pk for r in audits_for(job))
    assert not [e for e in report.errors if "privacy audits" in e]

    c3.scene.decide(job, c3.sites[0].institution, decision="rejected", reason="Not this one.")
    broker.log.clear()
    report = broker.run(coordinator.rounds_tick, now=later + dt.timedelta(hours=2))
    assert report.audits_resent == []
    assert not _sent(broker, queues.SITE_AUDIT.name)


def test_an_old_digests_audits_are_not_sent_again(c3, broker):
    job = _propose(c3, broker, privacy_audit=AUDIT)
    old = list(PrivacyAudit.objects.filter(job=job))
    broker.run(
        job_update_spec,
        acting_user=c3.scene.cast.researcher,
        job=job,
        spec=dict(job.spec, privacy_audit={"records": 3, "seed": 7}),
    )
    job.refresh_from_db()
    later = max(r.asked_at for r in audits_for(job)) + dt.timedelta(minutes=5)
    resent = broker.run(audits_tick, now=later)
    assert sorted(resent) == sorted(r.pk for r in audits_for(job))
    assert not set(resent) & {r.pk for r in old}


# --- The ledger ----------------------------------------------------------------------------------


def _rewrite(entry, change) -> None:
    """Rewrite a ledger entry's payload in place (someone with write access to the database)."""
    payload = json.loads(entry.payload_text)
    change(payload)
    with with_ledger_guard_off(), connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {LedgerEntry._meta.db_table} SET payload_text = %s WHERE seq = %s",
            [json.dumps(payload, sort_keys=True, separators=(",", ":")), entry.seq],
        )


@pytest.fixture
def reported(c3, broker):
    """A job whose second site reported its audit: ``(job, ledger entry)``."""
    job = _propose(c3, broker, privacy_audit=AUDIT)
    site = c3.sites[1]
    assert _post(site, job, *_report(job, site)).status_code == 201
    assert _audits_checked(job).ok
    return job, LedgerEntry.objects.get(event=ledger_events.PRIVACY_AUDIT_REPORTED)


def test_a_rewritten_audit_report_is_caught_by_its_signature(reported):
    job, entry = reported

    def better_figures(payload):
        report = json.loads(payload["report"])
        report["result"]["summary"]["success_rate"] = 0.0
        payload["report"] = json.dumps(report, sort_keys=True, separators=(",", ":"))
        payload["report_digest"] = hashlib.sha256(payload["report"].encode()).hexdigest()

    _rewrite(entry, better_figures)
    outcome = _audits_checked(job)
    assert not outcome.ok
    (failure,) = outcome.failed
    assert failure.startswith(
        f"the privacy audit report in ledger entry #{entry.seq} does not verify"
    )
    assert "signature" in failure


def test_a_rewritten_summary_is_caught_against_the_signed_text(reported):
    job, entry = reported

    def safer(payload):
        payload["summary"] = {**payload["summary"], "success_rate": 0.0}

    _rewrite(entry, safer)
    outcome = _audits_checked(job)
    assert not outcome.ok
    assert "outcome or summary is not what the signed report says" in outcome.failed[0]


def test_a_report_resigned_with_a_key_the_site_never_registered_is_caught(reported):
    job, entry = reported
    private_pem, public_pem = generate_keypair()

    def resign(payload):
        payload["public_key"] = public_pem
        payload["signature"] = sign_update(private_pem, payload["report"].encode())

    _rewrite(entry, resign)
    outcome = _audits_checked(job)
    assert not outcome.ok
    assert "never registered" in outcome.failed[0]


def test_the_audit_entries_read_as_sentences():
    requested = {"job_id": 4, "spec_digest": "d" * 64, "sites": ["a", "b"], "records": 8, "seed": 0}
    assert (
        entry_sentence(ledger_events.PRIVACY_AUDIT_REQUESTED, requested)
        == "Privacy audit of job #4 asked of 2 sites"
    )
    summary = copy.deepcopy(summary_of(_result()))
    measured = {"job_id": 4, "site": "barts", "outcome": "measured", "summary": summary}
    assert (
        entry_sentence(
            ledger_events.PRIVACY_AUDIT_REPORTED, measured, name_of=lambda s: "Barts Health"
        )
        == "Barts Health reported its privacy audit of job #4: 25% of the records audited rebuilt"
    )
    summary["conclusive"] = False
    assert entry_sentence(ledger_events.PRIVACY_AUDIT_REPORTED, measured).endswith(
        "rebuilt (inconclusive)"
    )
    out = {"job_id": 4, "site": "barts", "outcome": "out_of_reach", "summary": None}
    assert entry_sentence(ledger_events.PRIVACY_AUDIT_REPORTED, out).endswith(
        "the model is out of the audit's reach"
    )
