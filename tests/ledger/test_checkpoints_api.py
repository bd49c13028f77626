"""The ledger's signed checkpoints, served to sites and auditors: the proofs verify with the
RFC 9162 verifiers, the sites' cosignatures are checked and stored, and a ledger rewritten by
a database administrator who recomputed every hash (so the chain still says intact) is caught
by a saved checkpoint and by the proofs from it."""

from __future__ import annotations

import json

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from audit.ledger.chain import append_entry, verify_chain
from audit.ledger.checkpoint import (
    Checkpoint,
    NoteSignature,
    checkpoint_from_json,
    cosign_checkpoint,
    verify_checkpoint,
    verify_cosignature,
)
from audit.ledger.checkpoints import checkpoint_publish
from audit.ledger.keys import ledger_origin, public_key_pem
from audit.ledger.merkle import (
    ProofError,
    entry_leaf,
    proof_from_hex,
    verify_consistency,
    verify_inclusion,
)
from audit.models import CheckpointWitness, LedgerCheckpoint, LedgerEntry
from tests.rounds.test_site_api import make_site
from tests.support.ledger_checks import rewrite_ledger_consistently, tamper_ledger
from training.fl.signing import generate_keypair

pytestmark = pytest.mark.django_db

CHECKPOINT = "/api/site/v1/ledger/checkpoint/"
WITNESS = "/api/site/v1/ledger/checkpoint/witness/"


def grow(n: int, consortium: str = "") -> None:
    for i in range(n):
        append_entry(event="test.entry", payload={"i": i}, consortium_slug=consortium)


def fetch(site, since: int = 0):
    response = site.client().get(CHECKPOINT, {"since": since})
    assert response.status_code == 200, response.json()
    return response.json()


def verified(answer: dict):
    """The served checkpoint, its signature checked with the centre's public key."""
    signed = checkpoint_from_json(answer["checkpoint"])
    origin = ledger_origin()
    return verify_checkpoint(signed, origin=origin, name=origin, public_pem=public_key_pem())


@pytest.fixture
def site(cast):
    return make_site(cast)


def test_a_site_gets_a_signed_checkpoint_and_a_consistency_proof_that_verifies(site):
    old = verified(fetch(site)).checkpoint
    assert old.tree_size == LedgerEntry.objects.count() > 0
    assert old.origin == "127.0.0.1:8000/ledger"  # SITE_URL's host: the default origin
    grow(5)
    answer = fetch(site, since=old.tree_size)
    new = verified(answer).checkpoint
    assert new.tree_size == old.tree_size + 5 and answer["since"] == old.tree_size
    proof = proof_from_hex(answer["consistency_proof"])
    assert proof
    verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, proof)
    # The same head is served from the same row, not signed again.
    assert fetch(site, since=new.tree_size)["checkpoint"] == answer["checkpoint"]
    assert fetch(site, since=new.tree_size)["consistency_proof"] == []
    assert LedgerCheckpoint.objects.count() == 2


@pytest.mark.parametrize("since", ["-1", "abc", "1.5", "99999999999999999999999"])
def test_a_since_that_is_not_a_size_is_refused_saying_why(site, since):
    response = site.client().get(CHECKPOINT, {"since": since})
    assert response.status_code == 400
    assert response.json()["code"] == "bad_since"
    assert "whole number" in response.json()["detail"]


def test_a_site_that_saw_a_longer_ledger_is_told_it_was_rolled_back(site):
    size = fetch(site)["checkpoint"]["tree_size"]
    response = site.client().get(CHECKPOINT, {"since": size + 3})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "since_ahead"
    assert "rolled back" in body["detail"] and str(size + 3) in body["detail"]


def cosign(site, answer: dict, *, private_pem=None, name=None) -> dict:
    checkpoint = checkpoint_from_json(answer["checkpoint"]).checkpoint
    signature = cosign_checkpoint(
        checkpoint,
        name=name or site.credential.institution.slug,
        private_pem=private_pem or site.private_pem,
    )
    return {
        "tree_size": checkpoint.tree_size,
        "root_hash": checkpoint.root_hash.hex(),
        "cosignature": signature.to_json(),
    }


def test_a_sites_cosignature_is_verified_and_stored_once(site):
    answer = fetch(site)
    body = cosign(site, answer)
    first = site.client().post(WITNESS, body, format="json")
    assert first.status_code == 201, first.json()
    assert first.json()["duplicate"] is False
    assert first.json()["site"] == site.credential.institution.slug
    again = site.client().post(WITNESS, body, format="json")
    assert again.status_code == 200 and again.json()["duplicate"] is True
    (witness,) = CheckpointWitness.objects.all()
    assert witness.institution_id == site.credential.institution_id
    assert witness.credential_id == site.credential.pk
    # The stored line proves itself with the stored key.
    verify_cosignature(
        checkpoint_from_json(answer["checkpoint"]).checkpoint,
        NoteSignature.from_line(witness.signature_line),
        name=witness.key_name,
        public_pem=witness.public_key,
    )


def test_a_forged_or_misnamed_cosignature_is_refused(site, cast):
    answer = fetch(site)
    other_key, _ = generate_keypair()
    forged = site.client().post(WITNESS, cosign(site, answer, private_pem=other_key), "json")
    assert forged.status_code == 400 and forged.json()["code"] == "bad_cosignature"
    # Signed with the site's own key, but in another institution's name.
    other = site.client().post(WITNESS, cosign(site, answer, name=cast.hospital_b.slug), "json")
    assert other.status_code == 400 and other.json()["code"] == "bad_cosignature"
    assert not CheckpointWitness.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_witness_outside_a_transaction_is_one_insert_and_a_second_one_is_answered(site):
    """The upload's witness is recorded after its update committed, in autocommit: the insert is
    tried first, with no BEGIN and COMMIT around it, and the same site's second cosignature of
    that checkpoint meets the unique constraint and gets the first one back."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from audit.ledger.checkpoints import witness_record

    answer = fetch(site)
    body = cosign(site, answer)
    institution = site.credential.institution
    record = lambda: witness_record(  # noqa: E731
        tree_size=body["tree_size"],
        root_hash=body["root_hash"],
        cosignature=NoteSignature.from_json(body["cosignature"]),
        institution_id=institution.pk,
        institution_slug=institution.slug,
        credential_id=site.credential.pk,
        public_key=site.credential.public_key,
    )
    with CaptureQueriesContext(connection) as first_queries:
        first = record()
    assert first.created
    statements = [q["sql"].split()[0].upper() for q in first_queries.captured_queries]
    assert statements == ["SELECT", "INSERT"], statements
    again = record()
    assert not again.created and again.witness.pk == first.witness.pk
    assert CheckpointWitness.objects.count() == 1


def test_a_witness_of_a_checkpoint_the_centre_never_signed_is_refused(site):
    answer = fetch(site)
    body = cosign(site, answer)
    unknown = site.client().post(WITNESS, {**body, "tree_size": body["tree_size"] + 7}, "json")
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_checkpoint"
    other_root = site.client().post(WITNESS, {**body, "root_hash": "ab" * 32}, "json")
    assert other_root.status_code == 409 and other_root.json()["code"] == "root_mismatch"
    malformed = site.client().post(WITNESS, {**body, "cosignature": {"name": "x"}}, "json")
    assert malformed.status_code == 400 and malformed.json()["code"] == "bad_request"
    no_root = site.client().post(WITNESS, {**body, "root_hash": "XYZ"}, "json")
    assert no_root.status_code == 400 and "root_hash" in no_root.json()["detail"]
    assert not CheckpointWitness.objects.exists()


def test_only_a_site_token_reaches_the_site_endpoints(cast, client):
    assert APIClient().get(CHECKPOINT).status_code == 401
    assert APIClient().post(WITNESS, {}, format="json").status_code == 401
    client.force_login(cast.auditor)  # a browser session is not a site
    assert client.get(CHECKPOINT).status_code == 401


def test_a_consistent_rewrite_is_caught_by_a_saved_checkpoint_and_the_proofs(site, tmp_path):
    grow(6)
    saved = tmp_path / "checkpoint.note"
    call_command("verify_ledger", save_checkpoint=str(saved))
    old = verified(fetch(site)).checkpoint
    assert saved.read_text() == LedgerCheckpoint.objects.get(tree_size=old.tree_size).note
    call_command("verify_ledger", checkpoint=str(saved))  # holds before the rewrite
    grow(2)

    rewrite_ledger_consistently(3, {"i": "rewritten"})
    assert verify_chain().ok  # the chain alone cannot tell

    # The centre will not sign over the history it already signed differently ...
    refused = site.client().get(CHECKPOINT, {"since": old.tree_size})
    assert refused.status_code == 409
    assert refused.json()["code"] == "ledger_rewritten"
    assert "rewritten" in refused.json()["detail"]
    # ... the auditor's saved checkpoint no longer holds ...
    with pytest.raises(CommandError, match=f"root differs at size {old.tree_size}"):
        call_command("verify_ledger", checkpoint=str(saved))
    # ... and an administrator who also deletes the checkpoints gets a new head signed, which
    # no proof joins to the one the site kept.
    LedgerCheckpoint.objects.all().delete()
    answer = fetch(site, since=old.tree_size)
    new = verified(answer).checkpoint
    with pytest.raises(ProofError):
        verify_consistency(
            old.tree_size,
            new.tree_size,
            old.root_hash,
            new.root_hash,
            proof_from_hex(answer["consistency_proof"]),
        )


def test_a_saved_checkpoint_in_json_holds_and_names_what_fails(site, tmp_path, cast):
    grow(3)
    answer = fetch(site)
    saved = tmp_path / "checkpoint.json"
    saved.write_text(json.dumps(answer))
    call_command("verify_ledger", checkpoint=str(saved))

    _, stranger_public = generate_keypair()
    stranger = tmp_path / "stranger.pem"
    stranger.write_text(stranger_public)
    with pytest.raises(CommandError, match="bad signature"):
        call_command("verify_ledger", checkpoint=str(saved), public_key=str(stranger))
    centre = tmp_path / "centre.pem"
    centre.write_text(public_key_pem())
    call_command("verify_ledger", checkpoint=str(saved), public_key=str(centre))

    altered = dict(answer["checkpoint"])
    altered["note"] = altered["note"].replace(
        f"\n{altered['tree_size']}\n", f"\n{altered['tree_size'] - 1}\n"
    )
    (tmp_path / "altered.note").write_text(altered["note"])
    with pytest.raises(CommandError, match="bad signature"):
        call_command("verify_ledger", checkpoint=str(tmp_path / "altered.note"))

    size = answer["checkpoint"]["tree_size"]
    table = LedgerEntry._meta.db_table
    tamper_ledger(f"DELETE FROM {table} WHERE seq = %s", [size])  # noqa: S608
    with pytest.raises(CommandError, match=f"only {size - 1} entries"):
        call_command("verify_ledger", checkpoint=str(saved))


def test_a_malformed_checkpoint_file_is_refused_saying_why(tmp_path, db):
    bad = tmp_path / "bad.note"
    bad.write_text("not a checkpoint\n")
    with pytest.raises(CommandError, match="is not a signed checkpoint"):
        call_command("verify_ledger", checkpoint=str(bad))
    with pytest.raises(CommandError, match="cannot read"):
        call_command("verify_ledger", checkpoint=str(tmp_path / "missing.note"))


# --- The governance API: auditors ------------------------------------------------------------


def test_an_auditor_reads_the_checkpoint_and_its_witnesses(site, cast):
    answer = fetch(site)
    site.client().post(WITNESS, cosign(site, answer), format="json")
    auditor = APIClient()
    auditor.force_authenticate(cast.auditor)
    response = auditor.get("/api/ledger/checkpoint/")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["checkpoint"] == answer["checkpoint"]
    assert [w["site"] for w in body["witnesses"]] == [site.credential.institution.slug]


def test_who_may_read_the_checkpoint(cast):
    assert APIClient().get("/api/ledger/checkpoint/").status_code in (401, 403)
    outsider = APIClient()
    outsider.force_authenticate(cast.outsider)
    assert outsider.get("/api/ledger/checkpoint/").status_code == 404
    assert outsider.get("/api/ledger/proof/inclusion/", {"seq": 1}).status_code == 404


def test_an_inclusion_proof_verifies_against_a_signed_checkpoint(cast):
    grow(4, consortium=cast.consortium.slug)
    row = checkpoint_publish()
    entry = LedgerEntry.objects.filter(consortium_slug=cast.consortium.slug).order_by("seq")[2]
    auditor = APIClient()
    auditor.force_authenticate(cast.auditor)
    response = auditor.get(
        "/api/ledger/proof/inclusion/", {"seq": entry.seq, "tree_size": row.tree_size}
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["root_hash"] == row.root_hash and body["entry_hash"] == entry.entry_hash
    verify_inclusion(
        entry_leaf(entry.entry_hash),
        entry.seq - 1,
        row.tree_size,
        proof_from_hex(body["inclusion_proof"]),
        bytes.fromhex(row.root_hash),
    )
    assert auditor.get("/api/ledger/proof/inclusion/", {"seq": "x"}).status_code == 400
    too_small = auditor.get(
        "/api/ledger/proof/inclusion/", {"seq": entry.seq, "tree_size": entry.seq - 1}
    )
    assert too_small.status_code == 409
    assert too_small.json()["code"] == "tree_size_unproven"
    # A size the ledger has not reached: the same, the question is well formed.
    beyond = auditor.get("/api/ledger/proof/inclusion/", {"seq": entry.seq, "tree_size": 2**63 - 2})
    assert beyond.status_code == 409 and "beyond" in beyond.json()["detail"]
    assert auditor.get("/api/ledger/proof/inclusion/", {"seq": 2**63}).status_code == 400
    # An entry of a consortium the auditor does not audit is the same 404 as none at all.
    append_entry(event="test.entry", consortium_slug="another-consortium")
    elsewhere = LedgerEntry.objects.get(consortium_slug="another-consortium").seq
    assert auditor.get("/api/ledger/proof/inclusion/", {"seq": elsewhere}).status_code == 404
    assert auditor.get("/api/ledger/proof/inclusion/", {"seq": 10**6}).status_code == 404


def test_the_checkpoint_text_is_a_c2sp_checkpoint(site):
    answer = fetch(site)
    signed = verified(answer)
    assert signed.checkpoint == Checkpoint(
        ledger_origin(), answer["checkpoint"]["tree_size"], signed.checkpoint.root_hash
    )
    assert answer["checkpoint"]["note"].startswith(f"{ledger_origin()}\n")
