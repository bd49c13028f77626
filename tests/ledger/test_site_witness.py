"""The site workers witness the centre's ledger: the real worker code
(``training.site.worker.run_site_round`` and ``training.site.ledger_witness``) against the real
site API (through Django's test client, ``InProcessClient``), on a real job.

Every training task checks the newest signed checkpoint against the last one the site saw,
saves and cosigns it; and a database administrator who rewrites an entry between two tasks,
recomputing every hash so that ``verify_ledger`` still says intact, is caught by the first
worker that looks: it refuses to train and says the centre's ledger was rewritten.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import re
from unittest import mock

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.management import call_command
from django.utils import timezone

from audit.ledger.chain import verify_chain
from audit.ledger.checkpoint import NoteSignature, verify_cosignature
from audit.ledger.checkpoints import signed_checkpoint_of
from audit.ledger.keys import public_key_pem
from audit.models import CheckpointWitness, LedgerCheckpoint, LedgerEntry
from tests.support import coordinator_harness
from tests.support.coordinator_harness import InProcessClient, propose_and_start
from tests.support.ledger_checks import rewrite_ledger_consistently
from tests.web.test_site_worker_pages import created_block
from training.fl.signing import generate_keypair
from training.models import SiteUpdate
from training.site import ledger_witness as ledger_witness_module
from training.site import worker as worker_module
from training.site.audit import run_site_audit
from training.site.checks import check_ledger_trust
from training.site.client import CentralError
from training.site.evaluation import run_site_evaluation
from training.site.ledger_witness import (
    LedgerRefused,
    configured_public_key,
    state_path,
    witness_ledger,
)
from training.site.protocol import decode_ledger_header, encode_ledger_header
from training.site.worker import run_site_round

pytestmark = pytest.mark.django_db

# The coordinator tests' fixtures (tests/rounds/conftest.py): three hospitals and the
# in-memory broker whose site tasks run the real worker code.
c3 = coordinator_harness.c3
broker = coordinator_harness.broker


def run_tasks(c3, broker) -> list:
    """Run every queued site task as its site; the central messages stay queued."""
    results = []
    for message in [m for m in broker.messages if m["name"] == "training.site_train"]:
        broker.messages.remove(message)
        site = c3.site(message["kwargs"]["site"])
        results.append(
            broker.run(
                run_site_round,
                **message["kwargs"],
                config=site.config(),
                client=InProcessClient(site.token),
            )
        )
    return results


def saved_size(site) -> int:
    state = json.loads(state_path(site.config()).read_text())
    return state["checkpoint"]["tree_size"]


def second_round_tasks(c3, broker):
    """Round 1 trained and closed; round 2's site tasks queued (not run)."""
    job = propose_and_start(c3, broker, rounds=2, min_participants=2)
    assert {r["status"] for r in run_tasks(c3, broker)} == {"accepted"}
    broker.deliver(only_central=True)
    broker.messages, broker.lost = list(broker.lost), []
    assert len(broker.messages) == 3
    return job


def test_every_task_checks_saves_and_cosigns_the_newest_checkpoint(c3, broker):
    propose_and_start(c3, broker, rounds=2)
    run_tasks(c3, broker)
    witnesses = CheckpointWitness.objects.select_related("checkpoint", "institution")
    assert {w.institution.slug for w in witnesses} == {s.slug for s in c3.sites}
    for witness in witnesses:  # each a real cosignature, by the site's registered key
        verify_cosignature(
            signed_checkpoint_of(witness.checkpoint).checkpoint,
            NoteSignature.from_line(witness.signature_line),
            name=witness.institution.slug,
            public_pem=witness.public_key,
        )
    first = {s.slug: saved_size(s) for s in c3.sites}
    assert all(size > 0 for size in first.values())
    state = json.loads(state_path(c3.sites[0].config()).read_text())
    assert state["key_source"] == "trust-on-first-use"
    assert state["public_key"] == public_key_pem()

    broker.deliver()  # round 1 closes, round 2 trains: the sites look again
    for site in c3.sites:
        assert saved_size(site) > first[site.slug]


def first_training_task(c3, broker):
    """A two-round job started; its first queued site task (not run) and that task's site."""
    propose_and_start(c3, broker, rounds=2)
    message = next(m for m in broker.messages if m["name"] == "training.site_train")
    return message, c3.site(message["kwargs"]["site"])


class RecordingClient(InProcessClient):
    """The in-process client, noting which of the site API's calls the worker made, in order."""

    def __init__(self, token: str):
        super().__init__(token)
        self.calls: list[str] = []

    def __getattribute__(self, name):
        attribute = super().__getattribute__(name)
        if name in {"ledger_checkpoint", "ledger_witness", "round_model", "job", "upload"}:
            self.calls.append(name)
        return attribute


def test_a_training_task_checks_with_its_model_and_cosigns_with_its_upload(c3, broker):
    """The check rides on the round's model request (``?ledger_since=``, answered in
    ``X-Ledger-Checkpoint``) and the cosignature on the upload (``X-Ledger-Witness``): the
    ledger costs the centre no request of its own, and the check still comes before any
    training. A second delivery of the task, which the model request turns away, makes no
    other request at all."""
    message, site = first_training_task(c3, broker)
    client = RecordingClient(site.token)
    result = broker.run(run_site_round, **message["kwargs"], config=site.config(), client=client)
    assert result["status"] == "accepted"
    assert client.calls == ["round_model", "job", "upload"]
    witness = CheckpointWitness.objects.get(institution__slug=site.slug)
    assert witness.checkpoint.tree_size == saved_size(site)

    CheckpointWitness.objects.all().delete()
    seen = saved_size(site)
    again = RecordingClient(site.token)  # a second delivery of the same task: nothing to do
    result = broker.run(run_site_round, **message["kwargs"], config=site.config(), client=again)
    assert result["status"] == "skipped"
    assert again.calls == ["round_model"]
    assert not CheckpointWitness.objects.exists() and saved_size(site) == seen


class OlderCentreClient(RecordingClient):
    """A centre of an earlier release: no checkpoint with the model, the witness header
    ignored."""

    def round_model(self, job_id, round_index, *, ledger_since=None):
        return dataclasses.replace(super().round_model(job_id, round_index), ledger_header=None)

    def upload(self, job_id, round_index, *, witness=None, **update):
        return super().upload(job_id, round_index, **update)


def test_against_an_older_centre_the_worker_asks_and_cosigns_on_its_own(c3, broker):
    message, site = first_training_task(c3, broker)
    client = OlderCentreClient(site.token)
    result = broker.run(run_site_round, **message["kwargs"], config=site.config(), client=client)
    assert result["status"] == "accepted"
    assert client.calls == ["round_model", "ledger_checkpoint", "job", "upload", "ledger_witness"]
    witness = CheckpointWitness.objects.get(institution__slug=site.slug)
    assert witness.checkpoint.tree_size == saved_size(site)


class FailingUploadClient(RecordingClient):
    def upload(self, job_id, round_index, **update):
        raise CentralError("HTTP 503: the centre could not store the update", status=503)


def test_a_task_whose_upload_fails_still_cosigns_what_it_checked(c3, broker):
    """The check passed before the upload failed: the site witnesses the checkpoint with a
    request of its own, as the upload did not say what became of the cosignature."""
    message, site = first_training_task(c3, broker)
    client = FailingUploadClient(site.token)
    with pytest.raises(CentralError, match="could not store"):
        run_site_round(**message["kwargs"], config=site.config(), client=client)
    assert client.calls[-1] == "ledger_witness"
    witness = CheckpointWitness.objects.get(institution__slug=site.slug)
    assert witness.checkpoint.tree_size == saved_size(site)


def test_a_cosignature_the_centre_refuses_is_logged_and_the_update_still_counts(c3, broker, caplog):
    """A witness the centre cannot take (here: signed with a key that is not the site's)
    is answered beside the update, never at its cost; the worker logs the refusal and does
    not post it again."""
    message, site = first_training_task(c3, broker)
    client = RecordingClient(site.token)
    wrong_key, _ = generate_keypair()
    real_body = ledger_witness_module.cosignature_body

    def cosigned_with_another_key(config, signed):
        other = tmp_key(config, wrong_key)
        return real_body(dataclasses.replace(config, signing_key_path=other), signed)

    with (
        mock.patch.object(worker_module, "cosignature_body", cosigned_with_another_key),
        caplog.at_level(logging.WARNING),
    ):
        result = broker.run(
            run_site_round, **message["kwargs"], config=site.config(), client=client
        )
    assert result["status"] == "accepted"
    assert client.calls == ["round_model", "job", "upload"]
    assert "did not take this site's witness" in caplog.text
    assert "does not verify with this credential's registered key" in caplog.text
    assert not CheckpointWitness.objects.exists()
    update = SiteUpdate.objects.get(
        round__index=1, institution__slug=site.slug, round__job_id=message["kwargs"]["job_id"]
    )
    assert update.status == SiteUpdate.Status.ACCEPTED


class UploadWitnessClient(RecordingClient):
    """The recording client, noting the cosignature each upload carried (None: none)."""

    def __init__(self, token: str):
        super().__init__(token)
        self.carried: list[dict | None] = []

    def upload(self, job_id, round_index, *, witness=None, **update):
        self.carried.append(witness)
        return super().upload(job_id, round_index, witness=witness, **update)


def test_a_checkpoint_the_centre_holds_the_cosignature_of_is_not_cosigned_again(
    c3, broker, settings
):
    """The centre serves one checkpoint for ``LEDGER_CHECKPOINT_SECONDS``: a site that checks
    the same one in its next round still checks it (with its model), but carries no
    cosignature the centre said it holds and posts none."""
    settings.LEDGER_CHECKPOINT_SECONDS = 60
    job = second_round_tasks(c3, broker)  # round 1 carried every site's cosignature
    held = {w.institution.slug: w.checkpoint_id for w in CheckpointWitness.objects.all()}
    assert set(held) == {s.slug for s in c3.sites}
    for message in list(broker.messages):
        site = c3.site(message["kwargs"]["site"])
        seen = saved_size(site)
        client = UploadWitnessClient(site.token)
        result = broker.run(
            run_site_round, **message["kwargs"], config=site.config(), client=client
        )
        assert result["status"] == "accepted"
        assert client.calls == ["round_model", "upload"]  # no witness request (spec cached)
        assert client.carried == [None]  # and no cosignature on the upload
        assert saved_size(site) == seen  # the same checkpoint, checked again
    assert {w.institution.slug: w.checkpoint_id for w in CheckpointWitness.objects.all()} == held
    assert SiteUpdate.objects.filter(
        round__job=job, round__index=2, status=SiteUpdate.Status.ACCEPTED
    ).count() == len(c3.sites)


def test_a_cosignature_is_sent_again_until_the_centre_says_it_holds_it(c3, broker, settings):
    """Only an answer that the centre stored (or already had) the cosignature spares the next
    task sending it: a refused or unanswered one is sent again, and a new checkpoint is
    always cosigned."""
    settings.LEDGER_CHECKPOINT_SECONDS = 60
    site = c3.sites[0]

    class WitnessDownClient(RecordingClient):
        def ledger_witness(self, body, **kwargs):
            raise CentralError("HTTP 503: the centre is restarting", status=503)

    refused = witness_ledger(WitnessDownClient(site.token), site.config())
    assert not refused.witnessed and not CheckpointWitness.objects.exists()

    client = RecordingClient(site.token)
    assert witness_ledger(client, site.config()).witnessed  # the same checkpoint, sent again
    assert client.calls == ["ledger_checkpoint", "ledger_witness"]
    stored = CheckpointWitness.objects.get(institution__slug=site.slug)
    assert stored.checkpoint.tree_size == saved_size(site) == refused.tree_size

    again = RecordingClient(site.token)
    assert witness_ledger(again, site.config()).witnessed  # held: checked, not sent
    assert again.calls == ["ledger_checkpoint"]

    LedgerCheckpoint.objects.update(created_at=timezone.now() - dt.timedelta(seconds=61))
    grow_the_ledger = propose_and_start(c3, broker, rounds=1)  # the ledger moves on
    assert grow_the_ledger.pk
    newer = RecordingClient(site.token)
    outcome = witness_ledger(newer, site.config())
    assert outcome.witnessed and outcome.tree_size > stored.checkpoint.tree_size
    assert newer.calls == ["ledger_checkpoint", "ledger_witness"]
    assert CheckpointWitness.objects.filter(institution__slug=site.slug).count() == 2


def tmp_key(config, private_pem: bytes):
    path = config.data_root / "other-key.pem"
    path.write_bytes(private_pem)
    return path


class TamperedHeaderClient(RecordingClient):
    """A centre (or a man in the middle) whose model answer carries a checkpoint header that
    is not one the centre's checkpoint request would give."""

    def __init__(self, token: str, tamper):
        super().__init__(token)
        self.tamper = tamper

    def round_model(self, job_id, round_index, *, ledger_since=None):
        sent = super().round_model(job_id, round_index, ledger_since=ledger_since)
        return dataclasses.replace(sent, ledger_header=self.tamper(sent.ledger_header))


def _proving_from_elsewhere(header: str) -> str:
    answer = decode_ledger_header(header)
    return encode_ledger_header({**answer, "since": answer["since"] + 7})


@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        (lambda header: "%%% not base64 %%%", "malformed (X-Ledger-Checkpoint is not base64"),
        (lambda header: encode_ledger_header({"checkpoint": "x"}), "malformed"),
        (_proving_from_elsewhere, "proves from size"),
    ],
)
def test_a_checkpoint_header_that_is_not_the_centres_answer_stops_the_task(
    c3, broker, tamper, says
):
    job = second_round_tasks(c3, broker)
    site = c3.sites[1]
    seen = saved_size(site)
    message = next(m for m in broker.messages if m["kwargs"]["site"] == site.slug)
    client = TamperedHeaderClient(site.token, tamper)
    with pytest.raises(LedgerRefused, match=re.escape(says)):
        run_site_round(**message["kwargs"], config=site.config(), client=client)
    assert client.calls == ["round_model"]  # nothing trained, nothing uploaded
    update = SiteUpdate.objects.get(round__job=job, round__index=2, institution=site.institution)
    assert update.status == SiteUpdate.Status.DISPATCHED
    assert saved_size(site) == seen


def test_a_ledger_rolled_back_is_refused_by_a_training_task_before_it_trains(c3, broker):
    job = second_round_tasks(c3, broker)
    site = c3.sites[2]
    state = json.loads(state_path(site.config()).read_text())
    state["checkpoint"]["tree_size"] = LedgerEntry.objects.count() + 5
    state_path(site.config()).write_text(json.dumps(state))
    message = next(m for m in broker.messages if m["kwargs"]["site"] == site.slug)
    client = RecordingClient(site.token)
    with pytest.raises(LedgerRefused, match="SHORTER than the checkpoint this site saw"):
        run_site_round(**message["kwargs"], config=site.config(), client=client)
    assert client.calls == ["round_model"]
    update = SiteUpdate.objects.get(round__job=job, round__index=2, institution=site.institution)
    assert update.status == SiteUpdate.Status.DISPATCHED


def test_a_consistent_rewrite_between_two_tasks_stops_the_next_worker(c3, broker, caplog):
    job = second_round_tasks(c3, broker)
    seen = saved_size(c3.sites[0])
    # A database administrator rewrites round 1's start, recomputing every hash after it.
    target = LedgerEntry.objects.filter(event="round.opened").order_by("seq").first()
    assert target is not None and target.seq <= seen
    rewrite_ledger_consistently(target.seq, {"job_id": job.pk, "forged": True})
    assert verify_chain().ok  # the chain alone cannot tell

    site = c3.sites[0]
    message = next(m for m in broker.messages if m["kwargs"]["site"] == site.slug)
    with caplog.at_level(logging.ERROR), pytest.raises(LedgerRefused, match="rewritten"):
        run_site_round(
            **message["kwargs"], config=site.config(), client=InProcessClient(site.token)
        )
    assert "refusing its tasks" in caplog.text
    update = SiteUpdate.objects.get(round__job=job, round__index=2, institution=site.institution)
    assert update.status == SiteUpdate.Status.DISPATCHED  # nothing trained, nothing uploaded
    assert saved_size(site) == seen  # the checkpoint it trusts is kept


def test_a_rewrite_whose_checkpoints_were_deleted_too_is_caught_by_the_proof(c3, broker):
    job = second_round_tasks(c3, broker)
    seen = saved_size(c3.sites[1])
    target = LedgerEntry.objects.filter(event="round.opened").order_by("seq").first()
    rewrite_ledger_consistently(target.seq, {"job_id": job.pk, "forged": True})
    # ... and covers the tracks the centre kept: its checkpoints and the witnesses of them.
    CheckpointWitness.objects.all().delete()
    LedgerCheckpoint.objects.all().delete()

    site = c3.sites[1]
    message = next(m for m in broker.messages if m["kwargs"]["site"] == site.slug)
    with pytest.raises(LedgerRefused, match=f"does not extend checkpoint {seen}"):
        run_site_round(
            **message["kwargs"], config=site.config(), client=InProcessClient(site.token)
        )
    update = SiteUpdate.objects.get(round__job=job, round__index=2, institution=site.institution)
    assert update.status == SiteUpdate.Status.DISPATCHED


def test_an_evaluation_or_a_privacy_audit_is_refused_too_after_a_rewrite(c3, broker):
    """Every task looks first, not only training: a site evaluates and audits nothing for a
    centre whose ledger was rewritten (the refusal comes before any request for the task)."""
    job = second_round_tasks(c3, broker)
    target = LedgerEntry.objects.filter(event="round.opened").order_by("seq").first()
    rewrite_ledger_consistently(target.seq, {"job_id": job.pk, "forged": True})
    site = c3.sites[2]
    client = InProcessClient(site.token)
    with pytest.raises(LedgerRefused, match="rewritten"):
        run_site_evaluation(
            job_id=job.pk,
            round_index=1,
            site=site.slug,
            spec_digest=job.spec_digest,
            config=site.config(),
            client=client,
        )
    with pytest.raises(LedgerRefused, match="rewritten"):
        run_site_audit(
            job_id=job.pk,
            site=site.slug,
            spec_digest=job.spec_digest,
            config=site.config(),
            client=client,
        )


def test_a_ledger_rolled_back_behind_what_the_site_saw_is_refused(c3, broker):
    second_round_tasks(c3, broker)
    site = c3.sites[2]
    state = json.loads(state_path(site.config()).read_text())
    # As if this site had seen a longer ledger than the centre has now.
    size = LedgerEntry.objects.count()
    state["checkpoint"]["tree_size"] = size + 5
    state_path(site.config()).write_text(json.dumps(state))
    with pytest.raises(LedgerRefused, match="SHORTER than the checkpoint this site saw"):
        witness_ledger(InProcessClient(site.token), site.config())


def test_a_checkpoint_signed_by_another_key_is_refused(c3, broker, settings, tmp_path):
    second_round_tasks(c3, broker)
    site = c3.sites[0]
    other = tmp_path / "other-ledger-key.pem"
    other.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    settings.LEDGER_SIGNING_KEY = str(other)  # a centre that now signs with another key
    CheckpointWitness.objects.all().delete()
    LedgerCheckpoint.objects.all().delete()
    with pytest.raises(LedgerRefused, match="not the one it trusts"):
        witness_ledger(InProcessClient(site.token), site.config())


def test_a_configured_centre_key_is_used_instead_of_trust_on_first_use(c3, broker, tmp_path):
    site = c3.sites[0]
    key_file = tmp_path / "central-ledger.pem"
    key_file.write_text(public_key_pem())
    outcome = witness_ledger(
        InProcessClient(site.token),
        site.config(),
        environ={"CENTRAL_LEDGER_PUBLIC_KEY": str(key_file)},
    )
    assert outcome.witnessed and outcome.previous_size == 0
    state = json.loads(state_path(site.config()).read_text())
    assert state["key_source"] == "configured"
    # A configured key that is not the centre's refuses the first checkpoint already.
    state_path(site.config()).unlink()
    stranger = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(LedgerRefused, match="does not verify"):
        witness_ledger(
            InProcessClient(site.token),
            site.config(),
            environ={"CENTRAL_LEDGER_PUBLIC_KEY": stranger.decode()},
        )


# --- The centre's key, as the site is told it ------------------------------------------------


def test_the_key_the_credentials_page_and_command_print_is_the_one_the_worker_reads(cast, settings):
    block, text = created_block(cast, settings)
    line = next(x for x in block.splitlines() if x.startswith("CENTRAL_LEDGER_PUBLIC_KEY="))
    value = line.split("=", 1)[1]
    assert "\n" not in value
    assert configured_public_key({"CENTRAL_LEDGER_PUBLIC_KEY": value}) == public_key_pem()
    assert "checks and countersigns before every task" in text

    err = io.StringIO()
    call_command(
        "create_site_credentials",
        f"--institution={cast.hospital_a.slug}",
        f"--public-key={generate_keypair()[1]}",
        "--label=by-command",
        "--actor=steward",
        stdout=io.StringIO(),
        stderr=err,
    )
    assert f"CENTRAL_LEDGER_PUBLIC_KEY={value}" in err.getvalue()


def test_a_state_file_the_worker_did_not_write_stops_it_saying_where(c3, broker):
    site = c3.sites[0]
    path = state_path(site.config())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"checkpoint": {}}')
    with pytest.raises(LedgerRefused, match="is not one this worker wrote"):
        witness_ledger(InProcessClient(site.token), site.config())
    path.write_text("not json")
    with pytest.raises(LedgerRefused, match="cannot be read"):
        witness_ledger(InProcessClient(site.token), site.config())


def test_the_workers_ledger_check_says_what_a_task_would_find_and_saves_nothing(
    c3, broker, tmp_path
):
    """``run_site_worker --check``'s ``ledger`` line: the same verification a task runs first,
    so a wrong ``CENTRAL_LEDGER_PUBLIC_KEY`` or a rewritten ledger is found before any round
    (each task would be refused); the site's state file is neither written nor moved."""
    site = c3.sites[0]
    client, config = InProcessClient(site.token), site.config()
    path = state_path(config)

    # No key set and nothing seen: said, with what the first task will do.
    check = check_ledger_trust(client, config, environ={})
    assert check.status == "ok" and "CENTRAL_LEDGER_PUBLIC_KEY is not set" in check.message
    assert "will trust the key" in check.message and not path.exists()

    # The centre's key, configured: verified with it.
    check = check_ledger_trust(
        client, config, environ={"CENTRAL_LEDGER_PUBLIC_KEY": public_key_pem()}
    )
    assert check.status == "ok", check.message
    assert "verifies with CENTRAL_LEDGER_PUBLIC_KEY" in check.message
    assert "this site has seen no checkpoint before" in check.message and not path.exists()

    # Another key, or a key file that cannot be read: every task would be refused; said.
    stranger = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    check = check_ledger_trust(client, config, environ={"CENTRAL_LEDGER_PUBLIC_KEY": stranger})
    assert check.status == "failed"
    assert check.message.startswith("every task would be refused")
    assert "does not verify" in check.message
    missing = tmp_path / "no-such-key.pem"
    check = check_ledger_trust(client, config, environ={"CENTRAL_LEDGER_PUBLIC_KEY": str(missing)})
    assert check.status == "failed" and f"{missing}: cannot read" in check.message

    # Once a task pinned the key: checked against what the site saw.
    witness_ledger(client, config, environ={})
    before = path.read_bytes()
    seen = saved_size(site)
    check = check_ledger_trust(client, config, environ={})
    assert check.status == "ok", check.message
    assert "pinned in" in check.message and "on first use" in check.message
    assert f"it extends checkpoint {seen}, the last this site saw" in check.message

    # A consistent rewrite of history at the centre: found by the check, before any task.
    target = LedgerEntry.objects.order_by("seq").first()
    rewrite_ledger_consistently(target.seq, {"forged": True})
    CheckpointWitness.objects.all().delete()
    LedgerCheckpoint.objects.all().delete()
    check = check_ledger_trust(client, config, environ={})
    assert check.status == "failed", check.message
    assert "REWRITTEN: its checkpoint" in check.message
    assert f"does not extend checkpoint {seen}" in check.message
    assert path.read_bytes() == before  # the checkpoint the site trusts is kept
