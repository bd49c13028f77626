"""A contribution report marks a job's models as derived from a withdrawn institution only
when the withdrawal was under the agreement the job ran under (issue 14, defect 1).

The planted job (tests/support/report_fixtures.py) ran under the "Tumour DUA". Hospital B
withdrawing from a second, unrelated agreement says nothing about the tumour models: listing
them as derived from a withdrawn hospital would be false audit evidence. A withdrawal under the
tumour agreement, under any of its versions, is still listed with the models derived from B.
"""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from audit.models import LedgerEntry
from audit.reports.build import build_report
from audit.reports.files import read_document
from audit.reports.scope import institution_scope, job_scope
from consortium.governance.services.withdrawals import consent_withdraw
from tests.support.agreements import amend, publish_agreement
from tests.support.report_fixtures import plant

pytestmark = pytest.mark.django_db

OTHER_REASON = "We leave the imaging study; the tumour study goes on."
OWN_REASON = "The board revoked the tumour study's data-use approval."


@pytest.fixture
def planted(cast):
    """The planted tumour job, with no withdrawal yet, and a second agreement published."""
    planted = plant(cast, withdraw=False)
    planted.imaging = publish_agreement(cast, title="Imaging DUA")
    return planted


def withdraw(planted, agreement, reason):
    return consent_withdraw(
        acting_user=planted.cast.approver_b,
        agreement=agreement,
        institution=planted.cast.hospital_b,
        reason=reason,
    )


def derived(doc) -> list[tuple]:
    return [(d["institution"], d["round"], d["model_digest"]) for d in doc["derived_models"]]


def test_a_withdrawal_under_another_agreement_is_not_in_the_jobs_report(planted):
    withdraw(planted, planted.imaging.agreement, OTHER_REASON)

    doc = build_report(job_scope(planted.job.pk)).document()

    assert doc["withdrawals"] == []
    assert doc["derived_models"] == []
    assert [m["round"] for m in doc["models"]] == [1, 2, 3]  # the models themselves stay


def test_an_institution_report_derives_no_model_from_another_agreements_withdrawal(planted):
    withdraw(planted, planted.imaging.agreement, OTHER_REASON)

    doc = build_report(institution_scope("hospital-b")).document()

    # The withdrawal is the institution's own act and stays listed; the tumour job's models
    # were not derived from a withdrawn contribution.
    assert [w["detail"] for w in doc["withdrawals"]] == [OTHER_REASON]
    assert [m["round"] for m in doc["models"]] == [2, 3]
    assert doc["derived_models"] == []


def test_a_withdrawal_under_the_jobs_agreement_is_listed_with_its_derived_models(planted):
    # Amended after the job ran: the withdrawal, under version 2, is under the same agreement.
    amend(planted.cast, planted.version, purpose="Train tumour classifiers and nothing else.")
    withdraw(planted, planted.imaging.agreement, OTHER_REASON)
    withdraw(planted, planted.version.agreement, OWN_REASON)

    doc = build_report(job_scope(planted.job.pk)).document()

    [withdrawal] = doc["withdrawals"]
    assert (withdrawal["institution"], withdrawal["detail"]) == ("hospital-b", OWN_REASON)
    assert LedgerEntry.objects.get(seq=withdrawal["ledger_seq"]).event == "consent.withdrawn"
    # B's first accepted update was round 2's; each model after it descends from it, once.
    assert derived(doc) == [("hospital-b", r, planted.models[r][0]) for r in (2, 3)]

    institution_doc = build_report(institution_scope("hospital-b")).document()
    assert [w["detail"] for w in institution_doc["withdrawals"]] == [OTHER_REASON, OWN_REASON]
    assert derived(institution_doc) == derived(doc)


@pytest.mark.parametrize("fmt", ["csv", "json", "pdf"])
def test_an_export_with_the_scoped_withdrawals_verifies(planted, tmp_path, fmt):
    """The exported file flags no model, and verify_report, which recomputes the report from
    the ledger by the same rule, finds every figure matching."""
    withdraw(planted, planted.imaging.agreement, OTHER_REASON)
    path = tmp_path / f"report.{fmt}"
    call_command(
        "export_contributions",
        *("--job", str(planted.job.pk), "--format", fmt, "--output", str(path)),
        stderr=io.StringIO(),
    )
    assert read_document(path.read_bytes())[1]["derived_models"] == []
    out = io.StringIO()
    call_command("verify_report", str(path), stdout=out)
    assert "every figure matches the ledger" in out.getvalue()
