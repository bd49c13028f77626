"""Replayed and repeated uploads (issue 13, items 6 and 8), with real signed updates.

A replay -- an update signed for another round of the site, or a byte-identical copy of an
update already received -- is refused with 409 ``replayed_update`` and recorded nowhere, so
the site's genuine upload that follows is still taken and counts; a genuinely bad update from
the site (a signature that verifies for nothing of the site's) is still recorded against it.
The same update as the site's accepted one is a 200 duplicate even after the round closed; a
different one is 409 ``round_closed``."""

from __future__ import annotations

import datetime as dt
import logging
from unittest import mock

import pytest
from django.utils import timezone

from audit.ledger.chain import verify_chain
from tests.rounds.test_site_api import (  # noqa: F401 - _artifact_root is a fixture
    World,
    _artifact_root,
    entries,
    make_site,
    start_job,
    update_tensors,
    upload,
)
from tests.support.training_fixtures import make_scene
from training import outbox
from training.fl.serialization import pack_tensors, sha256_hex
from training.fl.signing import generate_keypair, sign_update, update_message
from training.models import Round, SiteUpdate
from training.rounds import credentials, intake

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(cast):
    """Round 1 of a running job open, both hospitals asked; hospital A's worker credential."""
    scene = make_scene(cast)
    job, model, rnd = start_job(scene)
    return World(cast=cast, scene=scene, job=job, model=model, round=rnd, site=make_site(cast))


def signed(site, *, job_id: int, round_index: int, data: bytes, samples: int = 500) -> dict:
    """What a worker sends for ``data`` signed for ``(job_id, round_index)``."""
    digest = sha256_hex(data)
    message = update_message(
        job_id=job_id,
        round_index=round_index,
        site=site.credential.institution.slug,
        update_digest=digest,
        samples=samples,
    )
    return {"data": data, "digest": digest, "signature": sign_update(site.private_pem, message)}


def post(site, *, job_id: int, round_index: int, data: bytes, digest: str, signature: str):
    """POST an update as captured on the wire (headers as they were), to any round."""
    return site.client().generic(
        "POST",
        f"/api/site/v1/jobs/{job_id}/rounds/{round_index}/update/",
        data=data,
        content_type="application/octet-stream",
        HTTP_X_UPDATE_DIGEST=digest,
        HTTP_X_UPDATE_SIGNATURE=signature,
        HTTP_X_UPDATE_SAMPLES="500",
    )


def open_round_two(world) -> Round:
    """Round 1 closes; round 2 opens and asks both sites, sent the same global model."""
    Round.objects.filter(pk=world.round.pk).update(state=Round.State.CLOSED)
    rnd = Round.objects.create(
        job=world.job,
        index=2,
        global_model_in=world.model,
        deadline=timezone.now() + dt.timedelta(hours=1),
    )
    for institution in (world.cast.hospital_a, world.cast.hospital_b):
        SiteUpdate.objects.create(
            round=rnd,
            institution=institution,
            start_digest=world.model.digest,
            sent_at=timezone.now(),
        )
    return rnd


def row(rnd: Round, institution) -> SiteUpdate:
    return SiteUpdate.objects.get(round=rnd, institution=institution)


def assert_replay_refused(response, *, contains: str) -> None:
    assert response.status_code == 409, response.content
    body = response.json()
    assert body["code"] == "replayed_update"
    assert body["recorded"] is False
    assert contains in body["detail"], body["detail"]


@pytest.fixture
def send_task():
    with mock.patch.object(outbox.current_app, "send_task") as send_task:
        yield send_task


def test_round_ones_update_replayed_into_round_two_costs_the_site_nothing(world, send_task, caplog):
    job = world.job
    captured = signed(world.site, job_id=job.pk, round_index=1, data=pack_tensors(update_tensors()))
    assert post(world.site, job_id=job.pk, round_index=1, **captured).status_code == 201
    rnd2 = open_round_two(world)

    with caplog.at_level(logging.WARNING, logger="training.rounds.intake"):
        replay = post(world.site, job_id=job.pk, round_index=2, **captured)
    assert_replay_refused(replay, contains=f"this site's update for job #{job.pk} round 1")
    update = row(rnd2, world.cast.hospital_a)
    assert update.status == SiteUpdate.Status.DISPATCHED
    assert (update.update_digest, update.reject_reason, update.received_at) == ("", "", None)
    assert entries("round.update_rejected") == []
    assert any("Replayed update refused" in r.getMessage() for r in caplog.records)

    genuine = upload(world, tensors=update_tensors(seed=7), round_index=2)
    assert genuine.status_code == 201, genuine.content
    update.refresh_from_db()
    assert update.status == SiteUpdate.Status.ACCEPTED
    assert update.update_digest == genuine.json()["update_digest"]
    assert [e.subject_id for e in entries("round.update_accepted")][-1] == str(update.pk)
    assert len(entries("round.update_accepted")) == 2
    assert entries("round.update_rejected") == []
    assert verify_chain().ok


def test_an_update_signed_for_another_round_is_a_replay_even_with_new_bytes(world, send_task):
    """Round 1 never saw these bytes (the site's round-1 update was another): the
    signature alone, which verifies for round 1 and not round 2, makes it a replay."""
    job = world.job
    assert upload(world, tensors=update_tensors(seed=1)).status_code == 201
    rnd2 = open_round_two(world)
    stale = signed(
        world.site, job_id=job.pk, round_index=1, data=pack_tensors(update_tensors(seed=2))
    )
    replay = post(world.site, job_id=job.pk, round_index=2, **stale)
    assert_replay_refused(replay, contains=f"this update was signed for job #{job.pk} round 1")
    assert row(rnd2, world.cast.hospital_a).status == SiteUpdate.Status.DISPATCHED
    assert entries("round.update_rejected") == []
    assert upload(world, tensors=update_tensors(seed=3), round_index=2).status_code == 201


def test_a_replay_signed_with_a_rotated_key_is_still_a_replay(world, cast, send_task):
    """Round 1 was signed with a credential revoked since; the site's new credential posts
    it again: the old key is one of the site's, so it is a replay, not a bad signature."""
    job = world.job
    old = world.site
    assert upload(world, tensors=update_tensors(seed=1)).status_code == 201
    stale = signed(old, job_id=job.pk, round_index=1, data=pack_tensors(update_tensors(seed=2)))
    credentials.site_credential_revoke(acting_user=cast.steward, credential=old.credential)
    new = make_site(cast, label="gpu-node-2")
    rnd2 = open_round_two(world)
    replay = post(new, job_id=job.pk, round_index=2, **stale)
    assert_replay_refused(replay, contains="signed for job")
    assert row(rnd2, world.cast.hospital_a).status == SiteUpdate.Status.DISPATCHED


def test_a_copy_of_another_sites_accepted_update_is_a_replay(world, cast, send_task):
    site_b = make_site(cast, institution=cast.hospital_b, label="b-node")
    data = pack_tensors(update_tensors(seed=4))
    assert upload(world, site=site_b, data=data).status_code == 201
    # Hospital A's token, B's bytes, signed by A for this very round: still a copy.
    copy = upload(world, data=data)
    assert_replay_refused(copy, contains="another site's update")
    assert row(world.round, cast.hospital_a).status == SiteUpdate.Status.DISPATCHED
    assert entries("round.update_rejected") == []
    assert upload(world, tensors=update_tensors(seed=5)).status_code == 201


def test_a_signature_that_verifies_for_nothing_of_the_sites_is_still_recorded(world, send_task):
    """With earlier rounds to try, a forged signature is still the site's bad update."""
    assert upload(world, tensors=update_tensors(seed=1)).status_code == 201
    rnd2 = open_round_two(world)
    forger, _ = generate_keypair()
    response = upload(world, tensors=update_tensors(seed=2), round_index=2, sign_with=forger)
    assert response.status_code == 400
    assert response.json()["code"] == "bad_signature"
    assert response.json()["recorded"] is True
    assert row(rnd2, world.cast.hospital_a).status == SiteUpdate.Status.REJECTED
    (entry,) = entries("round.update_rejected")
    assert entry.subject_id == str(row(rnd2, world.cast.hospital_a).pk)


def test_a_nan_update_signed_for_this_round_is_still_recorded(world, send_task):
    tensors = update_tensors()
    tensors["delta/net.0.bias"][3] = float("nan")
    response = upload(world, tensors=tensors)
    assert response.status_code == 400
    assert response.json()["recorded"] is True
    assert row(world.round, world.cast.hospital_a).status == SiteUpdate.Status.REJECTED


def test_an_identical_reupload_after_the_round_closed_is_a_duplicate(world, send_task):
    data = pack_tensors(update_tensors())
    first = upload(world, data=data)
    assert first.status_code == 201
    Round.objects.filter(pk=world.round.pk).update(state=Round.State.CLOSED)
    again = upload(world, data=data)
    assert again.status_code == 200, again.content
    assert again.json()["duplicate"] is True
    assert again.json()["id"] == first.json()["id"]
    assert len(entries("round.update_accepted")) == 1


def test_a_different_upload_after_the_round_closed_is_refused(world, send_task):
    assert upload(world, tensors=update_tensors(seed=1)).status_code == 201
    Round.objects.filter(pk=world.round.pk).update(state=Round.State.CLOSED)
    other = upload(world, tensors=update_tensors(seed=2))
    assert other.status_code == 409
    assert other.json()["code"] == "round_closed"
    assert other.json()["recorded"] is False


def test_a_duplicate_is_answered_when_the_round_closes_during_verification(world, send_task):
    """The first look saw the round open; by the locked look it has closed and the same
    update was accepted by a racing request: the answer is the duplicate, not round_closed."""
    data = pack_tensors(update_tensors())
    original = intake._first_look

    def first_look_then_race(credential, job_id, round_index, digest=""):
        looked = original(credential, job_id, round_index, digest)
        SiteUpdate.objects.filter(pk=looked[2].pk).update(
            status=SiteUpdate.Status.ACCEPTED, update_digest=sha256_hex(data)
        )
        Round.objects.filter(pk=world.round.pk).update(state=Round.State.CLOSED)
        return looked

    with mock.patch.object(intake, "_first_look", first_look_then_race):
        response = upload(world, data=data)
    assert response.status_code == 200, response.content
    assert response.json()["duplicate"] is True
    assert entries("round.update_accepted") == []
