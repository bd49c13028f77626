"""The ledger's checkpoint and the site's cosignature carried by the requests a training task
makes anyway: the round's model (``?ledger_since=`` answered in ``X-Ledger-Checkpoint``) and
the upload (``X-Ledger-Witness``, answered in ``ledger_witness``). The worker's side, against
this API, is in tests/ledger/test_site_witness.py."""

# ruff: noqa: F811 - the tests take test_site_api's ``world`` fixture, imported by its name

from __future__ import annotations

from unittest import mock

import pytest
from rest_framework.test import APIClient

from audit.ledger.chain import append_entry
from audit.ledger.checkpoint import checkpoint_from_json
from audit.ledger.merkle import proof_from_hex, verify_consistency
from audit.models import CheckpointWitness, LedgerEntry
from tests.ledger.test_checkpoints_api import cosign, verified
from tests.rounds.test_site_api import site_update, upload, world  # noqa: F401 - the fixture
from training import outbox
from training.fl.signing import generate_keypair
from training.models import SiteUpdate
from training.site.protocol import (
    LEDGER_CHECKPOINT_HEADER,
    SITE_PROTOCOL,
    decode_ledger_header,
    encode_ledger_header,
)

pytestmark = pytest.mark.django_db

CHECKPOINT = "/api/site/v1/ledger/checkpoint/"


def model_with_ledger(world, since):
    return world.site.client().get(
        f"/api/site/v1/jobs/{world.job.pk}/rounds/1/model/", {"ledger_since": since}
    )


def test_the_round_model_carries_what_the_checkpoint_request_answers(world):
    plain = world.site.client().get(f"/api/site/v1/jobs/{world.job.pk}/rounds/1/model/")
    assert LEDGER_CHECKPOINT_HEADER not in plain  # asked for nothing, sent nothing

    first = model_with_ledger(world, 0)
    assert first.status_code == 200 and first.content == plain.content
    answer = decode_ledger_header(first[LEDGER_CHECKPOINT_HEADER])
    assert answer == world.site.client().get(CHECKPOINT, {"since": 0}).json()
    old = verified(answer).checkpoint
    assert old.tree_size == LedgerEntry.objects.count()

    for i in range(3):
        append_entry(event="test.entry", payload={"i": i})
    answer = decode_ledger_header(model_with_ledger(world, old.tree_size)[LEDGER_CHECKPOINT_HEADER])
    new = verified(answer).checkpoint
    assert new.tree_size == old.tree_size + 3 and answer["since"] == old.tree_size
    verify_consistency(
        old.tree_size,
        new.tree_size,
        old.root_hash,
        new.root_hash,
        proof_from_hex(answer["consistency_proof"]),
    )


@pytest.mark.parametrize(
    ("since", "code"), [("-1", "bad_since"), ("x", "bad_since"), ("ahead", "since_ahead")]
)
def test_a_ledger_since_the_centre_cannot_prove_from_sends_no_model(world, since, code):
    if since == "ahead":
        since = str(LedgerEntry.objects.count() + 4)
    response = model_with_ledger(world, since)
    assert response.status_code == 400
    assert response.json()["code"] == code
    assert response["Content-Type"].startswith("application/json")  # no model bytes


def test_a_round_that_asks_nothing_answers_so_before_any_ledger_work(world):
    """A second delivery is turned away by the round, whatever ``ledger_since`` says."""
    with mock.patch.object(outbox.current_app, "send_task"):
        assert upload(world).status_code == 201
    response = model_with_ledger(world, "not a size")
    assert response.status_code == 409 and response.json()["code"] == "already_received"


def witness_client(world, header: str) -> APIClient:
    client = APIClient()
    client.credentials(
        HTTP_AUTHORIZATION=f"Site {world.site.token}",
        HTTP_X_SITE_PROTOCOL=str(SITE_PROTOCOL),
        HTTP_X_LEDGER_WITNESS=header,
    )
    return client


def checked_answer(world) -> dict:
    return decode_ledger_header(model_with_ledger(world, 0)[LEDGER_CHECKPOINT_HEADER])


def test_the_upload_records_the_cosignature_it_carries(world):
    answer = checked_answer(world)
    header = encode_ledger_header(cosign(world.site, answer))
    with mock.patch.object(outbox.current_app, "send_task"):
        response = upload(world, client=witness_client(world, header))
    assert response.status_code == 201, response.json()
    outcome = response.json()["ledger_witness"]
    assert outcome["status"] == 201 and outcome["duplicate"] is False
    (witness,) = CheckpointWitness.objects.all()
    assert (
        witness.checkpoint.tree_size
        == checkpoint_from_json(answer["checkpoint"]).checkpoint.tree_size
    )
    assert witness.institution_id == world.site.credential.institution_id
    assert site_update(world).status == SiteUpdate.Status.ACCEPTED

    with mock.patch.object(outbox.current_app, "send_task"):
        again = upload(world, client=witness_client(world, header))
    assert again.status_code == 200 and again.json()["ledger_witness"]["status"] == 200
    assert CheckpointWitness.objects.count() == 1


@pytest.mark.parametrize(
    ("breakage", "code"),
    [
        ("not base64!", "bad_request"),
        ("forged", "bad_cosignature"),
        ("unsigned", "unknown_checkpoint"),
    ],
)
def test_a_cosignature_the_centre_cannot_take_never_costs_the_update(world, breakage, code):
    answer = checked_answer(world)
    if breakage == "forged":
        other, _ = generate_keypair()
        header = encode_ledger_header(cosign(world.site, answer, private_pem=other))
    elif breakage == "unsigned":
        body = cosign(world.site, answer)
        header = encode_ledger_header({**body, "tree_size": body["tree_size"] + 10})
    else:
        header = breakage
    with mock.patch.object(outbox.current_app, "send_task"):
        response = upload(world, client=witness_client(world, header))
    assert response.status_code == 201, response.json()
    outcome = response.json()["ledger_witness"]
    assert outcome["code"] == code and outcome["status"] in (400, 404)
    assert outcome["detail"]
    assert not CheckpointWitness.objects.exists()
    assert site_update(world).status == SiteUpdate.Status.ACCEPTED


def test_a_refused_update_still_records_the_cosignature_and_says_so(world):
    """The check the site made before training passed, whatever its update: the witness is
    recorded beside the refusal."""
    header = encode_ledger_header(cosign(world.site, checked_answer(world)))
    other, _ = generate_keypair()
    response = upload(world, client=witness_client(world, header), sign_with=other)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "bad_signature" and body["ledger_witness"]["status"] == 201
    assert CheckpointWitness.objects.count() == 1
