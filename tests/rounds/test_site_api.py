"""The site workers' REST API, with real signed updates: what is accepted, what
is refused and recorded (forged signature, truncated upload, NaN, wrong shape,
oversize), what is only refused (closed round, already received), and who may
call it at all (site tokens only)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from django.conf import settings as django_settings
from django.utils import timezone
from rest_framework.test import APIClient

from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from tests.support.fl_harness import use_artifact_folder
from tests.support.training_fixtures import make_scene
from training import outbox
from training.fl.serialization import pack_tensors, sha256_hex
from training.fl.signing import generate_keypair, sign_update, update_message
from training.jobs.proposals import job_cancel
from training.jobs.transitions import job_transition
from training.models import (
    GlobalModel,
    JobParticipant,
    JobState,
    Round,
    SiteCredential,
    SiteUpdate,
)
from training.rounds import credentials, intake, verification
from training.rounds.artifacts import artifact_store
from training.site.protocol import SITE_PROTOCOL

pytestmark = pytest.mark.django_db

SHAPES = {
    "net.0.weight": (16, 30),
    "net.0.bias": (16,),
    "net.2.weight": (2, 16),
    "net.2.bias": (2,),
}


@pytest.fixture(autouse=True)
def _artifact_root(settings, tmp_path):
    use_artifact_folder(settings, tmp_path / "artifacts")


def global_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    state["norm.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    return state


def start_job(scene, *, seed: int = 0, **spec_overrides):
    """An approved, running job with round 1 open and an update dispatched to each site."""
    cast = scene.cast
    job = scene.propose(**spec_overrides)
    scene.decide(job, cast.hospital_a)
    scene.decide(job, cast.hospital_b)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED
    job_transition(acting_user=None, job=job, to_state=JobState.RUNNING)
    data = pack_tensors(global_state(seed))
    digest = artifact_store().put(data)
    model = GlobalModel.objects.create(
        job=job, round_index=0, digest=digest, lineage_hash="0" * 64, size_bytes=len(data)
    )
    rnd = Round.objects.create(
        job=job,
        index=1,
        global_model_in=model,
        deadline=timezone.now() + dt.timedelta(hours=1),
    )
    for institution in (cast.hospital_a, cast.hospital_b):
        SiteUpdate.objects.create(
            round=rnd, institution=institution, start_digest=digest, sent_at=timezone.now()
        )
    return job, model, rnd


@dataclass
class Site:
    credential: SiteCredential
    token: str
    private_pem: bytes

    def client(self) -> APIClient:
        client = APIClient()
        client.credentials(
            HTTP_AUTHORIZATION=f"Site {self.token}", HTTP_X_SITE_PROTOCOL=str(SITE_PROTOCOL)
        )
        return client


def make_site(cast, institution=None, label="gpu-node-1") -> Site:
    private_pem, public_pem = generate_keypair()
    credential, token = credentials.site_credential_create(
        acting_user=cast.steward,
        institution=institution or cast.hospital_a,
        label=label,
        public_key=public_pem,
    )
    return Site(credential=credential, token=token, private_pem=private_pem)


@dataclass
class World:
    cast: object
    scene: object
    job: object
    model: GlobalModel
    round: Round
    site: Site


@pytest.fixture
def world(cast):
    scene = make_scene(cast)
    job, model, rnd = start_job(scene)
    return World(cast=cast, scene=scene, job=job, model=model, round=rnd, site=make_site(cast))


def update_tensors(*, scale: float = 0.01, seed: int = 1, mask: bool = True) -> dict:
    """An update as the job's pipeline (partial sharing 0.4) makes it: each tensor shares a
    random 40% of its coordinates (rounded down), zero elsewhere; ``mask=False`` shares all
    (more than the agreement's 0.4 allows: the centre refuses it, test_privacy_floor)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"delta/{n}": torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}
    if mask:
        for name, shape in SHAPES.items():
            numel = math.prod(shape)
            chosen = torch.randperm(numel, generator=g)[: int(0.4 * numel)]
            shared = torch.zeros(numel, dtype=torch.bool)
            shared[chosen] = True
            shared = shared.reshape(shape)
            tensors[f"mask/{name}"] = shared
            tensors[f"delta/{name}"] = torch.where(shared, tensors[f"delta/{name}"], 0.0)
    return tensors


EVENTS = [
    {
        "mechanism": "gaussian",
        "params": {"noise_multiplier": 5.0},
        "count": 1,
        "source": "gaussian_noise",
    }
]
PIPELINE = [
    {"filter": "partial_sharing", "fraction": 0.4},
    {"filter": "gaussian_noise", "noise_multiplier": 5.0, "clip_norm": 1.0},
]


def upload(
    world,
    *,
    tensors=None,
    data: bytes | None = None,
    samples: int = 500,
    site: Site | None = None,
    sign_with: bytes | None = None,
    digest: str | None = None,
    body: bytes | None = None,
    round_index: int = 1,
    job_id: int | None = None,
    metrics=None,
    events=None,
    client=None,
    signed_site: str | None = None,
):
    """Pack, sign and POST an update as a real worker would; the keyword arguments
    break one thing at a time."""
    site = site or world.site
    job_id = job_id or world.job.pk
    data = data if data is not None else pack_tensors(tensors or update_tensors())
    digest = digest or sha256_hex(data)
    message = update_message(
        job_id=job_id,
        round_index=round_index,
        site=signed_site or site.credential.institution.slug,
        update_digest=digest,
        samples=samples,
    )
    signature = sign_update(sign_with or site.private_pem, message)
    client = client or site.client()
    return client.generic(
        "POST",
        f"/api/site/v1/jobs/{job_id}/rounds/{round_index}/update/",
        data=body if body is not None else data,
        content_type="application/octet-stream",
        HTTP_X_UPDATE_DIGEST=digest,
        HTTP_X_UPDATE_SIGNATURE=signature,
        HTTP_X_UPDATE_SAMPLES=str(samples),
        HTTP_X_UPDATE_METRICS=json.dumps(
            metrics if metrics is not None else {"loss": 0.41, "accuracy": 0.8}
        ),
        HTTP_X_UPDATE_PRIVACY_EVENTS=json.dumps(events if events is not None else EVENTS),
        HTTP_X_UPDATE_PIPELINE=json.dumps(PIPELINE),
    )


def site_update(world, institution=None) -> SiteUpdate:
    return SiteUpdate.objects.get(
        round=world.round, institution=institution or world.cast.hospital_a
    )


def entries(event: str):
    return list(LedgerEntry.objects.filter(event=event).order_by("seq"))


def assert_rejected(world, response, *, code: str, status: int = 400, contains: str = ""):
    assert response.status_code == status, response.content
    body = response.json()
    assert body["code"] == code
    assert body["recorded"] is True
    assert contains in body["detail"]
    update = site_update(world)
    assert update.status == SiteUpdate.Status.REJECTED
    assert update.reject_reason == body["detail"]
    assert update.credential_id == world.site.credential.pk
    (entry,) = entries("round.update_rejected")
    payload = json.loads(entry.payload_text)
    assert payload["code"] == code
    assert payload["reason"] == body["detail"]
    assert payload["site"] == world.cast.hospital_a.slug
    assert payload["round"] == 1
    assert payload["job_id"] == world.job.pk
    assert entry.subject_id == str(update.pk)
    assert entries("round.update_accepted") == []
    assert verify_chain().ok
    return update


# --- Accepted ----------------------------------------------------------------------------------


def test_a_signed_update_is_accepted_and_recorded(world, django_capture_on_commit_callbacks):
    tensors = update_tensors()
    data = pack_tensors(tensors)
    with (
        mock.patch.object(outbox.current_app, "send_task") as send_task,
        django_capture_on_commit_callbacks(execute=True),
    ):
        response = upload(world, tensors=tensors, samples=640)
    assert response.status_code == 201, response.content
    body = response.json()
    digest = sha256_hex(data)
    assert body["status"] == "accepted"
    assert body["duplicate"] is False
    assert body["update_digest"] == digest
    assert body["samples"] == 640
    assert body["site"] == "hospital-a"

    update = site_update(world)
    assert update.status == SiteUpdate.Status.ACCEPTED
    assert update.samples == 640
    assert update.update_digest == digest
    assert update.size_bytes == len(data)
    assert update.credential_id == world.site.credential.pk
    assert update.received_at is not None
    assert update.pipeline == PIPELINE
    assert update.privacy_events == EVENTS
    assert update.metrics == {"loss": 0.41, "accuracy": 0.8}
    assert artifact_store().get(digest) == data

    (entry,) = entries("round.update_accepted")
    payload = json.loads(entry.payload_text)
    assert payload["site"] == "hospital-a"
    assert payload["round"] == 1
    assert payload["job_id"] == world.job.pk
    assert payload["samples"] == 640
    assert payload["update_digest"] == digest
    assert payload["signature"] == update.signature
    assert payload["pipeline"] == PIPELINE
    assert payload["privacy_events"] == EVENTS
    assert payload["metrics"] == {"loss": 0.41, "accuracy": 0.8}
    assert payload["global_model"] == world.model.digest
    assert payload["start_model"] == world.model.digest
    assert entry.institution_slug == "hospital-a"
    assert entry.consortium_slug == world.cast.consortium.slug
    assert (
        "hospital-a" in entry.actor_repr and world.site.credential.token_prefix in entry.actor_repr
    )
    assert verify_chain().ok
    # Hospital B is still expected: the coordinator is not asked to close the round yet.
    send_task.assert_not_called()


def test_the_last_report_of_a_round_asks_the_coordinator_to_close_it(
    world, cast, django_capture_on_commit_callbacks
):
    """The round closes on its last upload, accepted or rejected, not on the next tick."""
    site_b = make_site(cast, institution=cast.hospital_b, label="b-node")
    with (
        mock.patch.object(outbox.current_app, "send_task") as send_task,
        django_capture_on_commit_callbacks(execute=True),
    ):
        assert upload(world).status_code == 201
        send_task.assert_not_called()
        # Hospital B's update is the last one expected; it is rejected, and still counts.
        rejected = upload(
            world, site=site_b, tensors=update_tensors(seed=9), sign_with=world.site.private_pem
        )
        assert rejected.json()["code"] == "bad_signature"
    send_task.assert_called_once_with(
        "training.round_maybe_close", args=[world.round.pk], kwargs={}, queue="central", retry=False
    )


def test_a_duplicated_upload_does_no_harm(world, django_capture_on_commit_callbacks):
    tensors = update_tensors()
    with mock.patch.object(outbox.current_app, "send_task"):
        first = upload(world, tensors=tensors)
        second = upload(world, tensors=tensors)
    assert first.status_code == 201
    assert second.status_code == 200, second.content
    assert second.json()["duplicate"] is True
    assert second.json()["id"] == first.json()["id"]
    assert len(entries("round.update_accepted")) == 1
    assert entries("round.update_rejected") == []
    assert SiteUpdate.objects.filter(status=SiteUpdate.Status.ACCEPTED).count() == 1


def test_another_update_after_acceptance_is_refused_not_recorded(world):
    with mock.patch.object(outbox.current_app, "send_task"):
        assert upload(world, tensors=update_tensors(seed=1)).status_code == 201
        again = upload(world, tensors=update_tensors(seed=2))
    assert again.status_code == 409
    assert again.json()["code"] == "already_received"
    assert again.json()["recorded"] is False
    assert site_update(world).status == SiteUpdate.Status.ACCEPTED
    assert len(entries("round.update_accepted")) == 1
    assert entries("round.update_rejected") == []


def test_the_service_reports_duplicates(world):
    data = pack_tensors(update_tensors())
    digest = sha256_hex(data)
    kwargs = dict(
        credential=world.site.credential,
        job_id=world.job.pk,
        round_index=1,
        data=data,
        samples=10,
        update_digest=digest,
        signature=sign_update(
            world.site.private_pem,
            update_message(
                job_id=world.job.pk,
                round_index=1,
                site="hospital-a",
                update_digest=digest,
                samples=10,
            ),
        ),
        metrics={},
        privacy_events=[],
        pipeline=[],
    )
    with mock.patch.object(outbox.current_app, "send_task"):
        first = intake.update_receive(**kwargs)
        second = intake.update_receive(**kwargs)
    assert first.duplicate is False and second.duplicate is True
    assert first.pk == second.pk


# --- Rejected and recorded ----------------------------------------------------------------------


def test_a_forged_signature_is_rejected(world):
    other_private, _other_public = generate_keypair()
    response = upload(world, sign_with=other_private)
    update = assert_rejected(world, response, code="bad_signature", contains="signature")
    assert update.samples == 0  # nothing of the claimed update counts


def test_a_signature_for_another_site_is_rejected(world):
    response = upload(world, signed_site="hospital-b")
    assert_rejected(world, response, code="bad_signature")


def test_a_signature_over_other_samples_is_rejected(world):
    data = pack_tensors(update_tensors())
    digest = sha256_hex(data)
    signature = sign_update(
        world.site.private_pem,
        update_message(
            job_id=world.job.pk, round_index=1, site="hospital-a", update_digest=digest, samples=10
        ),
    )
    response = world.site.client().generic(
        "POST",
        f"/api/site/v1/jobs/{world.job.pk}/rounds/1/update/",
        data=data,
        content_type="application/octet-stream",
        HTTP_X_UPDATE_DIGEST=digest,
        HTTP_X_UPDATE_SIGNATURE=signature,
        HTTP_X_UPDATE_SAMPLES="1000",  # more weight than was signed for
    )
    assert_rejected(world, response, code="bad_signature")


def test_a_truncated_upload_is_rejected(world):
    data = pack_tensors(update_tensors())
    response = upload(world, data=data, body=data[: len(data) // 2])
    assert_rejected(
        world,
        response,
        code="digest_mismatch",
        contains="digest mismatch: the upload was truncated or altered",
    )


def test_a_nan_update_is_rejected_naming_the_tensor(world):
    tensors = update_tensors()
    tensors["delta/net.2.weight"][1, 3] = float("nan")
    response = upload(world, tensors=tensors)
    assert_rejected(
        world, response, code="not_finite", contains="NaN or infinity in delta/net.2.weight"
    )


def test_an_infinite_value_is_rejected(world):
    tensors = update_tensors()
    tensors["delta/net.0.bias"][0] = float("inf")
    assert_rejected(world, upload(world, tensors=tensors), code="not_finite", contains="net.0.bias")


def test_a_wrong_shape_is_rejected_naming_the_tensor(world):
    tensors = update_tensors()
    tensors["delta/net.0.weight"] = torch.zeros(16, 29)
    response = upload(world, tensors=tensors)
    update = assert_rejected(world, response, code="tensor_mismatch")
    assert "delta/net.0.weight has shape [16, 29], expected [16, 30]" in update.reject_reason


def test_a_wrong_dtype_is_rejected(world):
    tensors = update_tensors()
    tensors["delta/net.2.bias"] = torch.zeros(2, dtype=torch.float64)
    response = upload(world, tensors=tensors)
    assert_rejected(
        world, response, code="tensor_mismatch", contains="delta/net.2.bias has dtype float64"
    )


def test_a_missing_tensor_is_rejected(world):
    tensors = update_tensors()
    del tensors["delta/net.2.bias"]
    assert_rejected(
        world, upload(world, tensors=tensors), code="tensor_mismatch", contains="delta/net.2.bias"
    )


def test_an_unknown_tensor_is_rejected(world):
    tensors = update_tensors()
    tensors["delta/backdoor"] = torch.zeros(3)
    assert_rejected(
        world, upload(world, tensors=tensors), code="tensor_mismatch", contains="delta/backdoor"
    )


def test_a_delta_for_a_buffer_is_rejected(world):
    tensors = update_tensors()
    tensors["delta/norm.num_batches_tracked"] = torch.zeros(())
    assert_rejected(
        world,
        upload(world, tensors=tensors),
        code="tensor_mismatch",
        contains="norm.num_batches_tracked",
    )


def test_a_mask_must_be_bool(world):
    tensors = update_tensors()
    tensors["mask/net.0.weight"] = tensors["mask/net.0.weight"].to(torch.float32)
    assert_rejected(
        world, upload(world, tensors=tensors), code="tensor_mismatch", contains="mask/net.0.weight"
    )


def test_a_file_that_is_not_a_tensor_file_is_rejected(world):
    response = upload(world, data=b"PK\x03\x04 a zip, or a pickle")
    assert_rejected(world, response, code="malformed", contains="malformed tensor file")


def test_a_malformed_safetensors_file_is_rejected_saying_what_is_wrong(world):
    # Well-formed safetensors, but a dtype outside the engine's allowlist.
    entry = {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}
    head = json.dumps({"delta/net.0.weight": entry}).encode()
    response = upload(world, data=len(head).to_bytes(8, "little") + head + bytes(4))
    assert_rejected(
        world,
        response,
        code="malformed",
        contains="malformed tensor file: entry 'delta/net.0.weight' has dtype 'F8_E4M3', "
        "which is not allowed",
    )


@pytest.mark.parametrize("samples", [1001, 0])
def test_implausible_samples_are_rejected(world, samples):
    # The site's data set has 1000 records.
    response = upload(world, samples=samples)
    assert_rejected(world, response, code="bad_samples")


def test_invalid_privacy_events_are_rejected(world):
    response = upload(world, events=[{"mechanism": "gaussian", "params": {}}])
    assert_rejected(world, response, code="bad_privacy_events", contains="noise_multiplier")


def test_nan_metrics_are_rejected(world):
    # JSON allows NaN only by accident; the ledger refuses it.
    response = upload(world, metrics={"loss": float("nan")})
    assert_rejected(world, response, code="bad_metadata", contains="metrics")


def test_an_oversize_upload_is_refused_with_413(world, settings):
    data = pack_tensors(update_tensors())
    settings.FL_MAX_UPDATE_BYTES = len(data) - 1
    response = upload(world, data=data)
    assert_rejected(world, response, code="too_large", status=413)


def test_the_body_reader_stops_at_the_limit(world, settings):
    from io import BytesIO

    from training.rounds import site_api_upload

    settings.FL_MAX_UPDATE_BYTES = 1000
    request = mock.Mock()
    request.META = {}
    request.stream = BytesIO(b"x" * 5000)
    with pytest.raises(intake.UpdateRefused) as refused:
        site_api_upload._read_body(
            request, credential=world.site.credential, job_id=world.job.pk, round_index=1
        )
    assert refused.value.status == 413
    assert request.stream.tell() <= 1001 + site_api_upload._READ_CHUNK
    assert site_update(world).status == SiteUpdate.Status.REJECTED
    assert "over the limit of 1000 bytes" in site_update(world).reject_reason


def test_a_removed_participant_is_rejected(world):
    JobParticipant.objects.filter(job=world.job, institution=world.cast.hospital_a).update(
        status=JobParticipant.Status.REMOVED, removed_reason="consent withdrawn"
    )
    response = upload(world)
    assert_rejected(world, response, code="not_participant", status=403, contains="consent")


def test_a_rejected_update_takes_no_second_upload(world):
    upload(world, sign_with=generate_keypair()[0])
    with mock.patch.object(outbox.current_app, "send_task"):
        again = upload(world)
    assert again.status_code == 409
    assert again.json()["code"] == "already_received"
    assert site_update(world).status == SiteUpdate.Status.REJECTED
    assert entries("round.update_accepted") == []


def test_a_credential_revoked_during_verification_is_recorded(world):
    """Revoked after the token was checked, before the update was recorded."""
    original = intake.verify_upload

    def revoke_then_verify(**kwargs):
        result = original(**kwargs)
        credentials.site_credential_revoke(
            acting_user=world.cast.steward, credential=world.site.credential
        )
        return result

    with mock.patch.object(intake, "verify_upload", revoke_then_verify):
        response = upload(world)
    assert_rejected(world, response, code="credential_revoked", status=401)


def test_a_participant_removed_during_verification_is_recorded(world):
    """Removed after the unlocked look, before the update was recorded: the locked read of the
    site's row carries the participation again, and the removal's reason reaches the site."""
    original = intake.verify_upload

    def remove_then_verify(**kwargs):
        result = original(**kwargs)
        JobParticipant.objects.filter(job=world.job, institution=world.cast.hospital_a).update(
            status=JobParticipant.Status.REMOVED, removed_reason="consent withdrawn mid-upload"
        )
        return result

    with mock.patch.object(intake, "verify_upload", remove_then_verify):
        response = upload(world)
    assert_rejected(world, response, code="not_participant", status=403, contains="mid-upload")


# --- Refused, not recorded ---------------------------------------------------------------------


def test_a_closed_round_refuses_uploads(world):
    Round.objects.filter(pk=world.round.pk).update(state=Round.State.CLOSED)
    response = upload(world)
    assert response.status_code == 409
    assert response.json()["code"] == "round_closed"
    assert "round closed" in response.json()["detail"]
    assert response.json()["recorded"] is False
    assert site_update(world).status == SiteUpdate.Status.DISPATCHED
    assert entries("round.update_rejected") == []


def test_an_unknown_round_is_404(world):
    response = upload(world, round_index=7)
    assert response.status_code == 404
    assert response.json()["code"] == "no_such_round"


def test_a_site_not_asked_for_this_round_is_refused(world):
    SiteUpdate.objects.filter(round=world.round, institution=world.cast.hospital_a).delete()
    response = upload(world)
    assert response.status_code == 409
    assert response.json()["code"] == "not_dispatched"
    assert entries("round.update_rejected") == []


def test_missing_headers_are_400(world):
    response = world.site.client().generic(
        "POST",
        f"/api/site/v1/jobs/{world.job.pk}/rounds/1/update/",
        data=b"abc",
        content_type="application/octet-stream",
    )
    assert response.status_code == 400
    assert response.json()["code"] == "bad_request"
    assert site_update(world).status == SiteUpdate.Status.DISPATCHED


def test_a_malformed_json_header_is_400(world):
    response = world.site.client().generic(
        "POST",
        f"/api/site/v1/jobs/{world.job.pk}/rounds/1/update/",
        data=b"abc",
        content_type="application/octet-stream",
        HTTP_X_UPDATE_DIGEST="0" * 64,
        HTTP_X_UPDATE_SIGNATURE="x",
        HTTP_X_UPDATE_SAMPLES="5",
        HTTP_X_UPDATE_METRICS="{not json",
    )
    assert response.status_code == 400
    assert "X-Update-Metrics" in response.json()["detail"]


def test_another_content_type_is_415(world):
    response = world.site.client().post(
        f"/api/site/v1/jobs/{world.job.pk}/rounds/1/update/", {"tensors": "x"}, format="json"
    )
    assert response.status_code == 415
    assert response.json()["code"] == "unsupported_media_type"


# --- Who may call ---------------------------------------------------------------------------------


def test_a_revoked_credential_gets_401_and_nothing_is_accepted(world):
    credentials.site_credential_revoke(
        acting_user=world.cast.steward, credential=world.site.credential
    )
    response = upload(world)
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]
    assert response.json()["code"] == "authentication_failed"
    assert response["WWW-Authenticate"].startswith("Site")
    assert site_update(world).status == SiteUpdate.Status.DISPATCHED
    assert entries("round.update_accepted") == []
    assert world.site.client().get("/api/site/v1/whoami/").status_code == 401


def test_an_unknown_token_gets_401(world):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Site fls_not-a-real-token")
    response = client.get("/api/site/v1/whoami/")
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid site token.", "code": "authentication_failed"}


@pytest.mark.parametrize("who", ["steward", "admin", "researcher"])
def test_a_browser_session_cannot_use_the_site_endpoints(world, who):
    client = APIClient()
    client.force_login(getattr(world.cast, who))
    job = world.job.pk
    for response in [
        client.get("/api/site/v1/whoami/"),
        client.get(f"/api/site/v1/jobs/{job}/"),
        client.get(f"/api/site/v1/jobs/{job}/models/{world.model.digest}/"),
        client.generic(
            "POST",
            f"/api/site/v1/jobs/{job}/rounds/1/update/",
            data=b"x",
            content_type="application/octet-stream",
        ),
    ]:
        assert response.status_code == 401, response.content
        assert response.json()["code"] == "not_authenticated"
    assert site_update(world).status == SiteUpdate.Status.DISPATCHED


def test_basic_auth_is_not_a_site_token(world, password):
    client = APIClient()
    client.credentials(
        HTTP_AUTHORIZATION="Basic " + base64.b64encode(f"steward:{password}".encode()).decode()
    )
    assert client.get("/api/site/v1/whoami/").status_code == 401


def test_whoami(world):
    response = world.site.client().get("/api/site/v1/whoami/")
    assert response.status_code == 200
    body = response.json()
    assert body["institution"] == "hospital-a"
    assert body["credential"] == "gpu-node-1"
    assert body["token_prefix"] == world.site.credential.token_prefix
    world.site.credential.refresh_from_db()
    assert world.site.credential.last_used_at is not None


def test_the_job_as_a_site_sees_it(world):
    response = world.site.client().get(f"/api/site/v1/jobs/{world.job.pk}/")
    assert response.status_code == 200
    body = response.json()
    assert body["spec_digest"] == world.job.spec_digest
    assert sha256_hex(body["spec_text"].encode()) == world.job.spec_digest
    assert body["spec"] == world.job.spec
    assert body["state"] == "running"
    assert body["open_round"]["index"] == 1
    assert body["open_round"]["global_model"] == world.model.digest
    assert body["open_round"]["start_model"] == world.model.digest
    assert body["open_round"]["update_status"] == "dispatched"
    assert body["dataset"]["num_records"] == 1000


def test_the_global_model_is_served_with_its_digest(world):
    response = world.site.client().get(
        f"/api/site/v1/jobs/{world.job.pk}/models/{world.model.digest}/"
    )
    assert response.status_code == 200
    assert response["Content-Type"] == "application/octet-stream"
    assert response["X-Content-SHA256"] == world.model.digest
    assert sha256_hex(response.content) == world.model.digest


def test_a_site_cannot_fetch_another_jobs_model(world):
    other_job, other_model, _ = start_job(world.scene, seed=9)
    client = world.site.client()
    # Another job's model under this job's URL, and a digest of no model at all.
    assert (
        client.get(f"/api/site/v1/jobs/{world.job.pk}/models/{other_model.digest}/").status_code
        == 404
    )
    assert client.get(f"/api/site/v1/jobs/{world.job.pk}/models/{'a' * 64}/").status_code == 404
    assert client.get(f"/api/site/v1/jobs/{world.job.pk}/models/not-a-digest/").status_code == 404
    # A job the site no longer takes part in: the same 404 as a missing one.
    JobParticipant.objects.filter(job=other_job, institution=world.cast.hospital_a).update(
        status=JobParticipant.Status.REMOVED
    )
    missing = client.get("/api/site/v1/jobs/999999/")
    removed = client.get(f"/api/site/v1/jobs/{other_job.pk}/")
    assert missing.status_code == removed.status_code == 404
    assert missing.json() == removed.json()
    assert (
        client.get(f"/api/site/v1/jobs/{other_job.pk}/models/{other_model.digest}/").status_code
        == 404
    )


def _send_start_model(world, institution, *, seed: int) -> str:
    """As a cyclic round does: ``institution`` is sent a model that is no GlobalModel (the
    previous site's result), stored in the artifact store."""
    digest = artifact_store().put(pack_tensors(global_state(seed)))
    SiteUpdate.objects.filter(round=world.round, institution=institution).update(
        start_digest=digest, sent_at=timezone.now()
    )
    return digest


def test_a_site_can_fetch_the_model_it_was_sent_and_no_other(world, cast):
    mine = _send_start_model(world, cast.hospital_a, seed=3)
    theirs = _send_start_model(world, cast.hospital_b, seed=4)
    stray = artifact_store().put(pack_tensors(global_state(5)))  # in the store, sent to no one
    client = world.site.client()

    response = client.get(f"/api/site/v1/jobs/{world.job.pk}/models/{mine}/")
    assert response.status_code == 200
    assert response["X-Content-SHA256"] == mine
    assert sha256_hex(response.content) == mine
    assert client.get(f"/api/site/v1/jobs/{world.job.pk}/").json()["open_round"]["start_model"] == (
        mine
    )
    # The job's global models stay readable.
    assert client.get(
        f"/api/site/v1/jobs/{world.job.pk}/models/{world.model.digest}/"
    ).status_code == (200)
    # Another site's start model, and an artifact that is no model of this site, are 404.
    for digest in (theirs, stray):
        response = client.get(f"/api/site/v1/jobs/{world.job.pk}/models/{digest}/")
        assert response.status_code == 404
        assert response.json() == {"detail": "Not found.", "code": "not_found"}
    # Site B reads its own start model, not site A's.
    site_b = make_site(cast, institution=cast.hospital_b, label="b-node").client()
    assert site_b.get(f"/api/site/v1/jobs/{world.job.pk}/models/{theirs}/").status_code == 200
    assert site_b.get(f"/api/site/v1/jobs/{world.job.pk}/models/{mine}/").status_code == 404
    # The start model of another job's round is not readable under this job's URL.
    other_job, _other_model, other_round = start_job(world.scene, seed=9)
    other_start = artifact_store().put(pack_tensors(global_state(6)))
    SiteUpdate.objects.filter(round=other_round, institution=cast.hospital_a).update(
        start_digest=other_start
    )
    assert client.get(f"/api/site/v1/jobs/{world.job.pk}/models/{other_start}/").status_code == 404
    assert client.get(f"/api/site/v1/jobs/{other_job.pk}/models/{other_start}/").status_code == 200


def test_an_update_is_checked_against_the_model_the_site_was_sent(world, cast):
    """A cyclic site's start model is not the round's global model: the shapes are checked
    against what the site was sent."""
    shapes = {"net.0.weight": (4, 30), "net.0.bias": (4,)}
    g = torch.Generator().manual_seed(7)
    start = artifact_store().put(
        pack_tensors({n: torch.randn(s, generator=g) for n, s in shapes.items()})
    )
    SiteUpdate.objects.filter(round=world.round, institution=cast.hospital_a).update(
        start_digest=start
    )
    fitting = {f"delta/{n}": torch.zeros(s) for n, s in shapes.items()}
    fitting |= {f"mask/{n}": torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}
    with mock.patch.object(outbox.current_app, "send_task"):
        assert upload(world, tensors=update_tensors(mask=False)).status_code == 400
        assert site_update(world).status == SiteUpdate.Status.REJECTED
        reason = site_update(world).reject_reason
        assert "expected [4] (the net.0.bias of the model the site was sent)" in reason
        site_b = make_site(cast, institution=cast.hospital_b, label="b-node")
        SiteUpdate.objects.filter(round=world.round, institution=cast.hospital_b).update(
            start_digest=start
        )
        assert upload(world, site=site_b, tensors=fitting).status_code == 201


def test_a_site_not_sent_the_round_yet_cannot_upload(world, cast):
    SiteUpdate.objects.filter(round=world.round, institution=cast.hospital_a).update(
        start_digest="", sent_at=None
    )
    response = upload(world)
    assert response.status_code == 409
    assert response.json()["code"] == "not_sent"
    assert response.json()["recorded"] is False
    assert site_update(world).status == SiteUpdate.Status.DISPATCHED
    assert entries("round.update_rejected") == entries("round.update_accepted") == []
    body = world.site.client().get(f"/api/site/v1/jobs/{world.job.pk}/").json()
    assert body["open_round"]["start_model"] is None


# --- The round's start model: what a site worker asks before it trains ------------------------


def round_model(world, *, round_index: int = 1, site: Site | None = None, job_id=None):
    return (
        (site or world.site)
        .client()
        .get(f"/api/site/v1/jobs/{job_id or world.job.pk}/rounds/{round_index}/model/")
    )


def test_the_round_model_is_the_start_model_with_the_spec_digest(world):
    response = round_model(world)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/octet-stream"
    assert response["X-Content-SHA256"] == world.model.digest
    assert response["X-Spec-Digest"] == world.job.spec_digest
    assert sha256_hex(response.content) == world.model.digest


def test_the_round_model_is_the_model_the_site_was_sent(world, cast):
    """In a cyclic round, the previous site's result: each site gets its own start model."""
    mine = _send_start_model(world, cast.hospital_a, seed=3)
    theirs = _send_start_model(world, cast.hospital_b, seed=4)
    response = round_model(world)
    assert response["X-Content-SHA256"] == mine != theirs
    assert sha256_hex(response.content) == mine


def _accept(world):
    with mock.patch.object(outbox.current_app, "send_task"):
        assert upload(world).status_code == 201


def _no_update_row(world):
    SiteUpdate.objects.filter(round=world.round, institution=world.cast.hospital_a).delete()


@pytest.mark.parametrize(
    ("arrange", "code"),
    [
        (_accept, "already_received"),
        (
            lambda w: Round.objects.filter(pk=w.round.pk).update(state=Round.State.AGGREGATING),
            "round_closed",
        ),
        (
            lambda w: job_cancel(acting_user=w.cast.admin, job=w.job, reason="stop"),
            "job_not_running",
        ),
        (_no_update_row, "not_dispatched"),
        (
            lambda w: SiteUpdate.objects.filter(
                round=w.round, institution=w.cast.hospital_a
            ).update(start_digest="", sent_at=None),
            "not_sent",
        ),
    ],
)
def test_the_round_model_says_why_the_site_must_not_train(world, arrange, code):
    arrange(world)
    response = round_model(world)
    assert response.status_code == 409, response.content
    assert response.json()["code"] == code
    assert response.json()["detail"]


def test_the_round_model_of_a_job_or_round_the_site_cannot_see_is_404(world, cast):
    assert round_model(world, round_index=7).status_code == 404
    assert round_model(world, job_id=999999).status_code == 404
    other_job, _model, _rnd = start_job(world.scene, seed=9)
    JobParticipant.objects.filter(job=other_job, institution=cast.hospital_a).update(
        status=JobParticipant.Status.REMOVED
    )
    removed = round_model(world, job_id=other_job.pk)
    missing = round_model(world, job_id=999999)
    assert removed.status_code == missing.status_code == 404
    assert removed.json() == missing.json()


def test_a_revoked_site_gets_no_round_model(world, cast):
    credentials.site_credential_revoke(acting_user=cast.steward, credential=world.site.credential)
    response = round_model(world)
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


# --- What a round costs the database (docs/performance.md, "Round overhead") -------------------


def test_the_round_model_costs_two_queries(world, django_assert_num_queries):
    round_model(world)  # the credential's last_used_at is written at most once a minute
    with django_assert_num_queries(2):  # the credential; the site's row with round and job
        assert round_model(world).status_code == 200


def test_the_queries_an_upload_costs(world, django_assert_num_queries):
    """Authentication 1, who may upload 1, the unlocked first look 2 (participant with job;
    the site's row with its round), the data set 1; under the chain lock: the lock 1, the
    round 1, the row 1 (with whether any other site is still expected, and the participation
    again: the participant row and whether the credential is live), the row written 1, the
    ledger entry (2 on SQLite, 1 on PostgreSQL, where the entry and the head are written in
    one statement; the head is the one the lock read); and 2 transaction statements (a
    savepoint here: the ledger's append takes none of its own). Before the two looks were
    trimmed it was 24 on SQLite (23 on PostgreSQL), then 18 (17), then 15 (14)."""
    from django.db import connection

    round_model(world)  # writes the credential's last_used_at, not counted below
    data = pack_tensors(update_tensors())
    expected = 12 if connection.vendor == "postgresql" else 13
    with mock.patch.object(outbox.current_app, "send_task"), django_assert_num_queries(expected):
        assert upload(world, data=data).status_code == 201


def test_a_duplicate_upload_costs_four_queries(world, django_assert_num_queries):
    """A repeated upload stops at the unlocked first look (authentication, who may upload,
    the participant, the site's row): no verification, no lock."""
    data = pack_tensors(update_tensors())
    with mock.patch.object(outbox.current_app, "send_task"):
        assert upload(world, data=data).status_code == 201
        with django_assert_num_queries(4):
            assert upload(world, data=data).status_code == 200


def test_a_site_of_a_job_it_does_not_take_part_in_gets_404_on_upload(world, cast):
    from tests.support.agreements import add_institution

    outsider_institution, _ = add_institution(cast, name="Hospital Z")
    intruder = make_site(cast, institution=outsider_institution, label="intruder")
    response = upload(world, site=intruder)
    assert response.status_code == 404
    assert entries("round.update_rejected") == []


def test_one_site_cannot_upload_for_another(world, cast):
    site_b = make_site(cast, institution=cast.hospital_b, label="b-node")
    # Site B signs as hospital A with its own key: its token speaks for hospital B,
    # so the update lands on hospital B's row and the signature does not verify.
    response = upload(world, site=site_b, signed_site="hospital-a")
    assert response.status_code == 400
    assert response.json()["code"] == "bad_signature"
    assert site_update(world).status == SiteUpdate.Status.DISPATCHED
    assert site_update(world, cast.hospital_b).status == SiteUpdate.Status.REJECTED


def test_both_sites_accepted(world, cast):
    site_b = make_site(cast, institution=cast.hospital_b, label="b-node")
    with mock.patch.object(outbox.current_app, "send_task") as send_task:
        assert upload(world).status_code == 201
        assert upload(world, site=site_b, tensors=update_tensors(seed=5)).status_code == 201
    assert SiteUpdate.objects.filter(status=SiteUpdate.Status.ACCEPTED).count() == 2
    assert send_task.call_count == 0  # on_commit: the test transaction never commits


def test_an_unreadable_global_model_is_503_and_not_recorded(world, tmp_path):
    verification._model_layout.cache_clear()
    digest = world.model.digest
    (tmp_path / "artifacts" / digest[:2] / digest[2:4] / digest).write_bytes(b"damaged")
    response = upload(world)
    assert response.status_code == 503
    assert response.json()["code"] == "global_model_unavailable"
    assert response.json()["recorded"] is False
    assert site_update(world).status == SiteUpdate.Status.DISPATCHED
    assert entries("round.update_rejected") == []


def test_the_schema_documents_the_site_api(tmp_path):
    import yaml
    from django.core.management import call_command

    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    schema = yaml.safe_load(target.read_text())
    upload_op = schema["paths"]["/api/site/v1/jobs/{job_id}/rounds/{round_index}/update/"]["post"]
    assert "application/octet-stream" in upload_op["requestBody"]["content"]
    headers = {p["name"] for p in upload_op["parameters"] if p["in"] == "header"}
    assert {"X-Update-Digest", "X-Update-Signature", "X-Update-Samples"} <= headers
    assert {"200", "201", "400", "401", "404", "409", "413"} <= set(upload_op["responses"])
    assert upload_op["security"] == [{"siteToken": []}]
    assert "siteToken" in schema["components"]["securitySchemes"]
    for path in ["/api/site/v1/whoami/", "/api/site/v1/jobs/{job_id}/models/{digest}/"]:
        assert schema["paths"][path]["get"]["security"] == [{"siteToken": []}]


@pytest.mark.postgres
@pytest.mark.skipif(
    not django_settings.DATABASE_IS_POSTGRES,
    reason="needs DATABASE_URL pointing at PostgreSQL",
)
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("same", [True, False], ids=["same-update", "two-updates"])
def test_simultaneous_uploads_count_once(cast, same):
    """Two connections upload for the same site and round at once (a retried
    request racing the original): one is accepted, the other sees it."""
    import threading

    from django.db import connection

    scene = make_scene(cast)
    job, _model, _rnd = start_job(scene)
    site = make_site(cast)
    calls = []
    for seed in (1, 1 if same else 2):
        data = pack_tensors(update_tensors(seed=seed))
        digest = sha256_hex(data)
        message = update_message(
            job_id=job.pk, round_index=1, site="hospital-a", update_digest=digest, samples=50
        )
        calls.append(
            dict(
                credential=site.credential,
                job_id=job.pk,
                round_index=1,
                data=data,
                samples=50,
                update_digest=digest,
                signature=sign_update(site.private_pem, message),
                metrics={},
                privacy_events=[],
                pipeline=[],
            )
        )
    barrier = threading.Barrier(2)
    results = []

    def go(kwargs):
        try:
            barrier.wait()
            update = intake.update_receive(**kwargs)
            results.append("duplicate" if update.duplicate else "accepted")
        except intake.UpdateRefused as exc:
            results.append(exc.code)
        finally:
            connection.close()

    # Hospital B is no longer expected: hospital A's update is the round's last.
    SiteUpdate.objects.filter(round=_rnd, institution=cast.hospital_b).update(
        status=SiteUpdate.Status.STRAGGLER
    )
    with mock.patch.object(outbox.current_app, "send_task") as send_task:
        threads = [threading.Thread(target=go, args=(kwargs,)) for kwargs in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    expected = ["accepted", "duplicate"] if same else ["accepted", "already_received"]
    assert sorted(results) == expected
    assert LedgerEntry.objects.filter(event="round.update_accepted").count() == 1
    assert LedgerEntry.objects.filter(event="round.update_rejected").count() == 0
    assert SiteUpdate.objects.filter(status=SiteUpdate.Status.ACCEPTED).count() == 1
    assert send_task.call_count == 1
    assert verify_chain().ok
