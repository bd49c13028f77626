"""The site side of the privacy audit (training/site/audit.py): what a site worker does when the
centre asks it to audit a proposed job before its approvers decide.

The site is a demo hospital holding its share of the bundled digits set (no file under its data
folder: the demo split stands in for its records); the centre is a stand-in that answers as the
site API's contract says (``GET``/``POST .../jobs/<id>/audit/``) and keeps what the site sent.
What is checked: the report the site posts parses, verifies with the site's public key, names
the job, site and spec digest, and holds figures only; a model beyond the audit's reach is
still reported, with its reason; nothing asked is nothing done; a task whose digest the centre
does not share, or for another site, is refused; the model attacked is the job's initial model.
The last test runs the site's code against the real site API (Django's test client, as
tests/support/coordinator_harness.py does for training) on a proposed job of three hospitals.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from tests.support.coordinator_harness import InProcessClient, job_payloads
from tests.support.fl_harness import job_spec
from training import queues
from training.fl.audit_report import MAX_RECORDS, parse_report, summary_of
from training.fl.data import DEMO_SITES, load_site_data
from training.fl.signing import BadSignature, generate_keypair, verify_update
from training.jobs.proposals import job_propose
from training.jobs.spec import canonical_spec_text, spec_digest, validate_spec
from training.models import JobState, PrivacyAudit
from training.site.audit import initial_model, initial_seed, run_site_audit
from training.site.client import CentralError, WorkerConfig
from training.site.worker import IntegrityFailure, JobSpec, WrongSite

SITE = DEMO_SITES[0]
JOB_ID = 41


def digits_spec(**overrides) -> dict:
    """A valid spec on the bundled digits set asking for an audit of two records."""
    raw = {
        "purpose": "classification",
        "participants": [SITE, DEMO_SITES[1]],
        "dataset_key": "digits",
        "model": {"name": "logistic_regression"},
        "rounds": 2,
        "local_epochs": 1,
        "batch_size": 16,
        "optimizer": {"name": "sgd", "lr": 0.1},
        "privacy_pipeline": [{"filter": "partial_sharing", "fraction": 0.5}],
        "privacy_audit": {"records": 2, "seed": 3},
    }
    raw.update(overrides)
    return validate_spec(raw)


class FakeCentral:
    """The site API as its contract answers, keeping what the site asked and posted."""

    def __init__(self, spec: dict, *, site: str = SITE, conflict: str | None = None, **answer):
        self.spec_text = canonical_spec_text(spec)
        self.digest = spec_digest(spec)
        audit = spec.get("privacy_audit") or {"records": 8, "seed": 0}
        self.answer = {
            "job": JOB_ID,
            "site": site,
            "spec_digest": self.digest,
            "records": audit["records"],
            "seed": audit["seed"],
            **answer,
        }
        self.conflict = conflict
        self.calls: list[str] = []
        self.posted: list[dict] = []
        self.repeat = False

    def job(self, job_id):
        self.calls.append("job")
        return {
            "id": job_id,
            "spec_text": self.spec_text,
            "spec_digest": self.digest,
            "dataset": {"key": "digits", "input_shape": [64], "n_classes": 10},
        }

    def audit_request(self, job_id):
        self.calls.append("audit_request")
        assert job_id == JOB_ID
        if self.conflict:
            body = {"detail": f"nothing asked ({self.conflict})", "code": self.conflict}
            raise CentralError(f"HTTP 409: {body}", status=409, body=body)
        return dict(self.answer)

    def upload_audit(self, job_id, *, report, signature):
        self.calls.append("upload_audit")
        assert job_id == JOB_ID
        self.posted.append({"report": report, "signature": signature})
        return (200, {"duplicate": True}) if self.repeat else (201, {"recorded": True})


@pytest.fixture(autouse=True)
def ledger_checks(monkeypatch):
    """The centre's ledger check before the task (``witness_ledger``, tested against real
    checkpoints in tests/ledger/test_site_witness.py), recorded here: the fake centre signs no
    checkpoint. Each entry: what the fake centre had been asked by then."""
    from training.site import audit

    seen: list[list[str]] = []
    real = audit.witness_ledger

    def witness(client, config):
        if not isinstance(client, FakeCentral):
            return real(client, config)  # the site API for real (InProcessClient)
        seen.append(list(client.calls))
        return None

    monkeypatch.setattr(audit, "witness_ledger", witness)
    return seen


@pytest.fixture
def site(tmp_path: Path):
    """The demo site's worker configuration (its own key; no file under its data folder, so
    its records are its share of the bundled set) and its public key."""
    private_pem, public_pem = generate_keypair()
    key = tmp_path / "site.pem"
    key.write_bytes(private_pem)
    root = tmp_path / "data"
    root.mkdir()
    config = WorkerConfig(
        site_slug=SITE,
        central_url="http://central.invalid",
        token="unused",
        signing_key_path=key,
        data_root=root,
    )
    return SimpleNamespace(config=config, public_key=public_pem)


def _audit(site, central, **kwargs):
    return run_site_audit(
        job_id=JOB_ID,
        site=kwargs.pop("slug", SITE),
        spec_digest=kwargs.pop("digest", central.digest),
        config=site.config,
        client=central,
    )


def test_the_site_audits_the_proposal_and_posts_a_signed_report_of_figures_only(site, caplog):
    spec = digits_spec()
    central = FakeCentral(spec)
    with caplog.at_level(logging.INFO, logger="training.site.audit"):
        summary = _audit(site, central)

    assert summary == {
        "status": "reported",
        "job_id": JOB_ID,
        "site": SITE,
        "spec_digest": central.digest,
        "outcome": "measured",
        "records": 2,
    }
    assert central.calls == ["audit_request", "job", "upload_audit"]
    (posted,) = central.posted
    # The text posted is what the site signed, with the key it registered.
    verify_update(site.public_key, posted["report"].encode(), posted["signature"])
    with pytest.raises(BadSignature):
        verify_update(site.public_key, posted["report"].replace("41", "42").encode(),
                      posted["signature"])  # fmt: skip
    report = parse_report(posted["report"])
    assert (report.job_id, report.site, report.spec_digest) == (JOB_ID, SITE, central.digest)
    assert report.outcome == "measured" and report.reason == ""
    result = report.result
    assert result is not None
    # Tabular records (the digits' 64 features), the spec's records, seed and pipeline.
    assert result["modality"] == "tabular"
    assert len(result["records"]) == 2 and result["seed"] == 3
    assert result["settings"]["pipeline"] == spec["privacy_pipeline"]
    assert result["settings"]["optimizer"] == spec["optimizer"]
    assert result["shared_fraction"] == pytest.approx(0.5, abs=0.05)
    # Figures only: nowhere in the report a list that could hold a record's 64 features.
    data = load_site_data(data_root=site.config.data_root, dataset_key="digits", site_slug=SITE)
    features = data.x_train.shape[1]
    assert features == 64

    def longest_list(value) -> int:
        if isinstance(value, dict):
            return max((longest_list(v) for v in value.values()), default=0)
        if isinstance(value, list):
            return max([len(value), *(longest_list(v) for v in value)])
        return 0

    assert longest_list(json.loads(posted["report"])) < features
    for figures in result["records"]:
        assert set(figures) <= {
            "record", "attack", "success", "label_inferred", "ssim", "psnr", "dice",
            "relative_error", "features_within", "by_attack",
        }  # fmt: skip
        assert figures["relative_error"] is not None
    # One log line: the outcome and the summary in words, no record.
    lines = [r.getMessage() for r in caplog.records if "privacy audit" in r.getMessage()]
    assert len(lines) == 1
    assert "measured" in lines[0] and "reported" in lines[0]
    assert "median relative error" in lines[0]
    assert summary_of(result)["success_rate"] is not None


def test_a_report_posted_again_counts_as_a_duplicate(site):
    central = FakeCentral(digits_spec(privacy_audit={"records": 1, "seed": 0}))
    central.repeat = True
    assert _audit(site, central)["status"] == "duplicate"


def test_a_model_beyond_the_audits_reach_is_reported_with_its_reason(site):
    # ~595,000 weights: above the audit's limit of 500,000.
    spec = digits_spec(model={"name": "mlp", "params": {"hidden_sizes": [1024, 512]}})
    central = FakeCentral(spec)
    summary = _audit(site, central)
    assert summary["status"] == "reported" and summary["outcome"] == "out_of_reach"
    (posted,) = central.posted
    verify_update(site.public_key, posted["report"].encode(), posted["signature"])
    report = parse_report(posted["report"])
    assert report.outcome == "out_of_reach" and report.result is None
    assert "trainable parameters" in report.reason and "500,000" in report.reason
    assert report.spec_digest == central.digest


def test_fewer_records_than_asked_audits_every_one_there_is(site, monkeypatch):
    import training.fl.data as fl_data

    full = fl_data.demo_split("digits", DEMO_SITES)[SITE]
    few = fl_data.SiteData(
        x_train=full.x_train[:3],
        y_train=full.y_train[:3],
        num_records=3,
        modality=full.modality,
        input_shape=list(full.input_shape),
        n_classes=full.n_classes,
    )
    monkeypatch.setattr(fl_data, "load_site_data", lambda **_kwargs: few)
    spec = digits_spec(privacy_audit={"records": MAX_RECORDS, "seed": 1}, privacy_pipeline=[])
    central = FakeCentral(spec)
    summary = _audit(site, central)
    assert summary["records"] == 3
    result = parse_report(central.posted[0]["report"]).result
    assert result is not None and len(result["records"]) == 3


@pytest.mark.parametrize("code", ["not_asked", "already_reported", "not_awaiting_approval"])
def test_nothing_asked_of_the_site_is_nothing_done(site, code):
    central = FakeCentral(digits_spec(), conflict=code)
    summary = _audit(site, central)
    assert summary == {"status": "skipped", "job_id": JOB_ID, "site": SITE, "code": code}
    assert central.calls == ["audit_request"] and central.posted == []


def test_another_conflict_or_error_of_the_centre_is_raised(site):
    central = FakeCentral(digits_spec(), conflict="job_not_running")
    with pytest.raises(CentralError):
        _audit(site, central)
    assert central.posted == []


def test_a_task_whose_digest_the_centre_does_not_share_is_refused(site):
    central = FakeCentral(digits_spec(), spec_digest="0" * 64)
    with pytest.raises(IntegrityFailure, match="spec digest"):
        _audit(site, central)
    assert central.calls == ["audit_request"] and central.posted == []


def test_an_audit_other_than_the_specs_is_refused(site):
    central = FakeCentral(digits_spec(), records=32)
    with pytest.raises(IntegrityFailure, match="the job's spec says"):
        _audit(site, central)
    assert central.posted == []
    central = FakeCentral(digits_spec(privacy_audit=None))
    with pytest.raises(IntegrityFailure, match="asks for no privacy audit"):
        _audit(site, central)
    assert central.posted == []


def test_a_task_for_another_site_is_refused(site):
    central = FakeCentral(digits_spec())
    with pytest.raises(WrongSite):
        _audit(site, central, slug=DEMO_SITES[1])
    assert central.calls == []


def test_the_site_attacks_the_very_model_the_job_starts_from(site):
    """The weights the site rebuilds are those of the coordinator's round-0 state."""
    import torch

    from training.rounds.states import initial_state

    spec = digits_spec(model={"name": "mlp", "params": {"hidden_sizes": [16]}})
    digest = spec_digest(spec)
    job = JobSpec(spec_text=canonical_spec_text(spec), input_shape=(64,), n_classes=10)
    data = load_site_data(data_root=site.config.data_root, dataset_key="digits", site_slug=SITE)
    assert initial_seed(digest) == int(digest[:15], 16)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    rebuilt = initial_model(job, data, digest).state_dict()
    # The global random state is left alone.
    assert torch.equal(torch.rand(3), before)
    central = initial_state(
        spec, SimpleNamespace(input_shape=[64], n_classes=10), initial_seed(digest)
    )
    assert sorted(rebuilt) == sorted(central)
    for name, tensor in central.items():
        assert torch.equal(rebuilt[name].float(), tensor), name
    # Another digest, other weights: the seed matters.
    other = initial_model(job, data, "f" * 64).state_dict()
    assert not all(torch.equal(other[name], rebuilt[name]) for name in rebuilt)


def test_a_site_audits_a_proposed_job_through_the_site_api(c3, broker):
    slugs = sorted(s.slug for s in c3.sites)
    spec = job_spec(slugs, dataset_key=c3.dataset_key, privacy_audit={"records": 2, "seed": 5})
    job = broker.run(
        job_propose,
        acting_user=c3.scene.cast.researcher,
        consortium=c3.scene.cast.consortium,
        title="Breast cancer classifier",
        spec=spec,
    )
    assert job.state == JobState.AWAITING_APPROVAL
    tasks = [m for m in broker.messages if m["name"] == queues.SITE_AUDIT.name]
    assert sorted(m["kwargs"]["site"] for m in tasks) == slugs
    task = tasks[0]["kwargs"]
    assert task == {"job_id": job.pk, "site": task["site"], "spec_digest": job.spec_digest}
    site = c3.site(task["site"])

    summary = broker.run(
        run_site_audit, **task, config=site.config(), client=InProcessClient(site.token)
    )
    assert summary["status"] == "reported" and summary["outcome"] == "measured"
    assert summary["records"] == 2

    row = PrivacyAudit.objects.get(
        job=job, institution=site.institution, spec_digest=job.spec_digest
    )
    assert row.status == PrivacyAudit.Status.REPORTED
    assert row.outcome == "measured" and row.reason == ""
    assert 0.0 <= row.summary["success_rate"] <= 1.0
    assert row.summary["modality"] == "tabular"
    (entry,) = job_payloads(ledger_events.PRIVACY_AUDIT_REPORTED, job)
    assert entry["site"] == site.slug and entry["spec_digest"] == job.spec_digest
    assert entry["outcome"] == "measured"
    # The ledger keeps the text the site signed, verbatim, and its signature verifies.
    assert entry["report"] == row.report_text
    public_key = site.institution.site_credentials.get().public_key
    verify_update(public_key, entry["report"].encode(), entry["signature"])
    report = parse_report(entry["report"])
    assert (report.job_id, report.site) == (job.pk, site.slug)
    # The other sites are still asked; a second delivery of this task has nothing to do.
    others = PrivacyAudit.objects.filter(job=job).exclude(institution=site.institution)
    assert {r.status for r in others} == {PrivacyAudit.Status.ASKED}
    again = broker.run(
        run_site_audit, **task, config=site.config(), client=InProcessClient(site.token)
    )
    assert again["status"] == "skipped" and again["code"] == "already_reported"
    assert len(job_payloads(ledger_events.PRIVACY_AUDIT_REPORTED, job)) == 1
    assert verify_chain().ok


def test_the_centres_ledger_is_checked_before_anything_is_asked(site, ledger_checks):
    central = FakeCentral(digits_spec())
    _audit(site, central)
    assert ledger_checks == [[]]  # once, before the audit request and the job
    assert central.calls[0] == "audit_request"
