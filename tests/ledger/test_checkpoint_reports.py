"""Reports name the ledger's newest signed checkpoint and its witnesses, and prove the report's
head entry is in that checkpoint's tree (``audit.reports.anchoring``): on the report page, in
``export_contributions``' answer and in ``verify_report``, which fails when the ledger was
rewritten under the checkpoint even though the report itself still matches the chain."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import CommandError, call_command

from audit.ledger.checkpoint import cosign_checkpoint
from audit.ledger.checkpoints import checkpoint_latest, signed_checkpoint_of, witness_record
from audit.models import LedgerEntry
from tests.rounds.test_site_api import make_site
from tests.support.ledger_checks import rewrite_ledger_consistently
from tests.support.report_fixtures import plant

pytestmark = pytest.mark.django_db


@pytest.fixture
def planted(cast):
    return plant(cast)


def export(tmp_path, job_id: int):
    path = tmp_path / "report.csv"
    err = io.StringIO()
    call_command(
        "export_contributions",
        "--job",
        str(job_id),
        "--format",
        "csv",
        "--output",
        str(path),
        stderr=err,
    )
    return path, err.getvalue()


def verify(path) -> tuple[int, str]:
    out = io.StringIO()
    try:
        call_command("verify_report", str(path), stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def witness(site) -> None:
    row = checkpoint_latest()
    checkpoint = signed_checkpoint_of(row).checkpoint
    slug = site.credential.institution.slug
    witness_record(
        tree_size=row.tree_size,
        root_hash=row.root_hash,
        cosignature=cosign_checkpoint(checkpoint, name=slug, private_pem=site.private_pem),
        institution_id=site.credential.institution_id,
        institution_slug=slug,
        credential_id=site.credential.pk,
        public_key=site.credential.public_key,
    )


def test_an_export_and_its_verification_name_the_witnessed_checkpoint(planted, tmp_path):
    path, said = export(tmp_path, planted.job.pk)
    row = checkpoint_latest()
    assert row is not None and row.tree_size == LedgerEntry.objects.count()  # signed on export
    assert f"ledger checkpoint: {row.tree_size} entries, root {row.root_hash}" in said
    assert "head entry proven to be in it" in said
    assert "witnessed by no site yet" in said

    witness(make_site(planted.cast))
    code, text = verify(path)
    assert code == 0, text
    assert "head entry proven to be in it" in text
    assert re.search(r"witnessed by hospital-a at \d{4}-\d\d-\d\d", text), text


def test_verify_report_fails_when_the_ledger_was_rewritten_under_the_checkpoint(planted, tmp_path):
    path, _ = export(tmp_path, planted.job.pk)
    row = checkpoint_latest()
    assert verify(path)[0] == 0
    # The export's own entry comes after the report's head: rewriting it (and the head) leaves
    # the report matching the chain, but not the checkpoint the centre signed over it.
    rewrite_ledger_consistently(row.tree_size, {"rewritten": True})
    code, text = verify(path)
    assert code == 1, text
    assert "every figure matches the ledger" in text
    assert f"is NOT in the tree of the signed checkpoint {row.tree_size}" in text


def test_the_report_page_shows_the_checkpoint_and_its_witnesses(planted, client, tmp_path):
    export(tmp_path, planted.job.pk)
    witness(make_site(planted.cast))
    row = checkpoint_latest()
    client.force_login(planted.cast.auditor)
    page = client.get(f"/consortia/{planted.cast.consortium.slug}/jobs/{planted.job.pk}/report/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Signed checkpoint" in html and row.root_hash in html
    assert re.search(r'id="report-witnesses">hospital-a \(', html), html
