"""Central validation sets (training/rounds/validation_sets.py and
training/jobs/central_validation.py): a data steward uploads one only when the agreement in
force allows it, only for a key the sites registered and with its shape, and a malformed file
is refused saying where; the upload is held in the artifact store and recorded in the ledger.
A job evaluated centrally on a key that is not bundled passes the spec and is checked by the
compliance check instead: refused, naming the term, without an allowed and uploaded set;
proposed with one, and its approvers read who uploaded it.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from rest_framework.test import APIClient

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from consortium.core.errors import ConflictError, ServiceError
from consortium.governance.services.withdrawals import consent_withdraw
from tests.support.agreements import agreement_in_force
from tests.support.fl_harness import use_artifact_folder
from tests.support.training_fixtures import DATASET_KEY, make_scene, offer_dataset
from tests.web.test_accessibility import unlabelled
from training.fl.serialization import unpack_tensors
from training.jobs.central_validation import validation_set_current, validation_set_in_use
from training.jobs.compliance import ComplianceError
from training.jobs.spec import evaluation_settings, validate_spec
from training.models import CentralValidationSet, JobState
from training.rounds.artifacts import artifact_store, sha256_hex
from training.rounds.validation_sets import validation_set_upload

pytestmark = pytest.mark.django_db

CENTRAL = {"where": "central"}


@pytest.fixture
def artifacts(settings, tmp_path):
    return use_artifact_folder(settings, tmp_path / "artifacts")


@pytest.fixture
def allowed(cast, artifacts):
    """Hospitals A and B offer 'tumours' (30 features, 2 classes) under an agreement in force
    that allows a central validation set."""
    return make_scene(cast, allows_central_validation_set=True)


def csv_bytes(rows: int = 12, features: int = 30, *, classes: int = 2, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    lines = [",".join([*(f"f{i}" for i in range(features)), "label"])]
    for r in range(rows):
        values = [repr(float(v)) for v in rng.normal(size=features)]
        lines.append(",".join([*values, str(r % classes)]))
    return ("\n".join(lines) + "\n").encode()


def upload(cast, data: bytes, *, name: str = "validation.csv", key: str = DATASET_KEY, who=None):
    return validation_set_upload(
        acting_user=who or cast.steward,
        institution=cast.hospital_a,
        key=key,
        file_name=name,
        data=data,
    )


def page_url(cast, institution=None) -> str:
    return reverse(
        "training:validation-sets",
        kwargs={"slug": cast.consortium.slug, "inst_slug": (institution or cast.hospital_a).slug},
    )


def post_page(client, url, data: bytes, *, name="validation.csv", key=DATASET_KEY):
    return client.post(
        url,
        {"key": key, "file": SimpleUploadedFile(name, data), "confirmed": "on"},
    )


# --- the upload ---------------------------------------------------------------------------------


def test_an_upload_is_refused_unless_the_agreement_allows_it(cast, artifacts):
    make_scene(cast)  # the term is off
    with pytest.raises(ConflictError) as caught:
        upload(cast, csv_bytes())
    assert "does not allow a central validation set" in str(caught.value)
    assert "allows a central validation set" in str(caught.value)
    client = cast.client_for("steward")
    page = client.get(page_url(cast)).content.decode()
    assert 'id="central-set-refused"' in page and "Send to the consortium" not in page
    response = post_page(client, page_url(cast), csv_bytes())
    assert response.status_code == 200
    assert "does not allow a central validation set" in response.content.decode()
    assert not CentralValidationSet.objects.exists()
    assert not LedgerEntry.objects.filter(event=ledger_events.VALIDATION_SET_UPLOADED).exists()


NOT_STEWARDS = ["admin", "approver", "inst_admin", "researcher", "auditor", "other_member"]


@pytest.mark.parametrize("persona", NOT_STEWARDS + ["outsider"])
def test_anyone_but_a_data_steward_of_the_institution_gets_a_404(allowed, cast, persona):
    client = cast.client_for(persona)
    assert client.get(page_url(cast)).status_code == 404
    assert post_page(client, page_url(cast), csv_bytes()).status_code == 404
    api = APIClient()
    api.force_authenticate(getattr(cast, persona))
    response = api.post(
        "/api/validation-sets/",
        {
            "institution": cast.hospital_a.slug,
            "key": DATASET_KEY,
            "file": SimpleUploadedFile("v.csv", csv_bytes()),
        },
        format="multipart",
    )
    # An outsider cannot see the institution the body names: the same 404, as everywhere.
    assert response.status_code == 404, response.json()
    assert not CentralValidationSet.objects.exists()


def test_a_steward_of_another_institution_gets_a_404_and_the_service_refuses(allowed, cast):
    client = cast.client_for("steward")  # hospital A's
    assert client.get(page_url(cast, cast.hospital_b)).status_code == 404
    assert client.get(page_url(cast)).status_code == 200
    with pytest.raises(ServiceError, match="Only a data steward of Hospital A"):
        upload(cast, csv_bytes(), who=cast.approver)
    anonymous = cast.client_for(None).get(page_url(cast))
    assert anonymous.status_code == 302 and reverse("login") in anonymous.url


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        (
            "v.csv",
            b"f0,f1,label\n0.5,1.5,0\n0.25,x,1\n",
            "v.csv, line 3: non-numeric value 'x' in column 'f1'",
        ),
        ("v.csv", b"f0,f1,label\n0.5,1.5,0\n0.25,2.5\n", "v.csv, line 3: expected 3 values, got 2"),
        ("v.csv", b"f0,f1,label\n0.5,1.5,0.5\n", "line 2: label '0.5' is not a class index"),
        ("v.csv", b"f0,f1\n0.5,1.5\n", "v.csv: no 'label' column in the header"),
        ("v.csv", b"f0,label\n\xff\xfe,0\n", "v.csv: not UTF-8 text"),
        ("v.csv", b"", "v.csv: the file is empty"),
        ("v.txt", b"f0,label\n1,0\n", "upload a .csv file"),
        ("v.npz", b"not a zip", "v.npz: not a readable .npz archive"),
    ],
)
def test_a_malformed_file_is_refused_saying_where(allowed, cast, name, data, message):
    with pytest.raises(ValidationError) as caught:
        upload(cast, data, name=name)
    assert message in " ".join(caught.value.message_dict["file"])
    assert not CentralValidationSet.objects.exists()


def test_the_page_shows_the_line_and_column_at_fault(allowed, cast):
    response = post_page(
        cast.client_for("steward"), page_url(cast), b"f0,f1,label\n0.5,1.5,0\n0.25,x,1\n"
    )
    assert response.status_code == 200
    assert "line 3: non-numeric value &#x27;x&#x27; in column &#x27;f1&#x27;" in (
        response.content.decode()
    )
    assert not CentralValidationSet.objects.exists()


def test_an_npz_with_object_arrays_is_refused_without_unpickling(allowed, cast):
    buffer = io.BytesIO()
    np.savez(buffer, images=np.array([{"a": 1}, None], dtype=object), labels=np.zeros(2))
    with pytest.raises(ValidationError) as caught:
        upload(cast, buffer.getvalue(), name="v.npz")
    assert (
        "v.npz[images]: cannot read it without unpickling" in caught.value.message_dict["file"][0]
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (csv_bytes(features=2), "Hospital A's 'tumours' has records of shape [30], the "),
        (csv_bytes(classes=5), "has 2 classes (labels 0 to 1), the validation set has labels up"),
    ],
)
def test_records_that_do_not_fit_the_registered_data_sets_are_refused(allowed, cast, data, message):
    with pytest.raises(ValidationError) as caught:
        upload(cast, data)
    assert message in caught.value.message_dict["file"][0]


def test_images_for_a_tabular_key_and_unregistered_keys_are_refused(allowed, cast):
    buffer = io.BytesIO()
    np.savez(buffer, images=np.zeros((3, 1, 4, 4)), labels=np.array([0, 1, 0]))
    with pytest.raises(ValidationError) as caught:
        upload(cast, buffer.getvalue(), name="scans.npz")
    assert (
        "holds tabular records, the validation set holds image records"
        in (caught.value.message_dict["file"][0])
    )
    with pytest.raises(ValidationError) as caught:
        upload(cast, csv_bytes(), key="nobody-offers-this")
    assert "has registered a data set 'nobody-offers-this'" in caught.value.message_dict["key"][0]


def test_an_upload_is_held_in_the_artifact_store_and_recorded(allowed, cast):
    data = csv_bytes(rows=12)
    held = upload(cast, data)
    assert (held.num_records, held.input_shape, held.n_classes) == (12, [30], 2)
    assert held.modality == "tabular" and held.file_format == "csv"
    assert held.upload_sha256 == sha256_hex(data)
    tensors = unpack_tensors(artifact_store().get(held.digest))
    assert tensors["x"].shape == (12, 30) and tensors["y"].tolist() == [0, 1] * 6
    (entry,) = LedgerEntry.objects.filter(event=ledger_events.VALIDATION_SET_UPLOADED)
    payload = json.loads(entry.payload_text)
    assert payload == {
        "key": DATASET_KEY,
        "institution": cast.hospital_a.slug,
        "digest": held.digest,
        "upload_sha256": held.upload_sha256,
        "file_format": "csv",
        "records": 12,
        "modality": "tabular",
        "input_shape": [30],
        "n_classes": 2,
        "agreement_id": allowed.version.agreement_id,
        "version": allowed.version.number,
        "replaces": None,
    }
    assert entry.actor_id_at_write == cast.steward.pk
    assert entry.institution_slug == cast.hospital_a.slug

    newer = upload(cast, csv_bytes(rows=20, seed=1))
    held.refresh_from_db()
    assert held.replaced_at is not None and newer.replaced_at is None
    assert validation_set_current(cast.consortium.pk, DATASET_KEY) == newer
    last = LedgerEntry.objects.filter(event=ledger_events.VALIDATION_SET_UPLOADED).last()
    assert json.loads(last.payload_text)["replaces"] == held.digest
    assert verify_chain().ok


def test_the_steward_uploads_through_the_page_and_the_api(allowed, cast):
    client = cast.client_for("steward")
    datasets = reverse(
        "training:dataset-list",
        kwargs={"slug": cast.consortium.slug, "inst_slug": cast.hospital_a.slug},
    )
    assert 'id="validation-sets-link"' in client.get(datasets).content.decode()
    approver_view = cast.client_for("approver").get(datasets).content.decode()
    assert 'id="validation-sets-link"' not in approver_view
    form_page = client.get(page_url(cast)).content.decode()
    assert 'enctype="multipart/form-data"' in form_page
    assert unlabelled(form_page) == []  # every field has its label
    response = post_page(client, page_url(cast), csv_bytes(rows=8))
    assert response.status_code == 302
    page = client.get(page_url(cast)).content.decode()
    assert "validation.csv" in page and 'id="central-set-allowed"' in page

    api = APIClient()
    api.force_authenticate(cast.steward)
    response = api.post(
        "/api/validation-sets/",
        {
            "institution": cast.hospital_a.slug,
            "key": DATASET_KEY,
            "file": SimpleUploadedFile("again.csv", csv_bytes(rows=9)),
        },
        format="multipart",
    )
    assert response.status_code == 201, response.json()
    assert response.json()["num_records"] == 9 and response.json()["institution"] == "hospital-a"
    listed = api.get("/api/validation-sets/", {"current": "true"}).json()
    assert [s["file_name"] for s in listed["results"]] == ["again.csv"]
    malformed = api.post(
        "/api/validation-sets/",
        {
            "institution": cast.hospital_a.slug,
            "key": DATASET_KEY,
            "file": SimpleUploadedFile("bad.csv", b"f0,label\nx,0\n"),
        },
        format="multipart",
    )
    assert malformed.status_code == 400
    assert "line 2: non-numeric value 'x' in column 'f0'" in json.dumps(malformed.json())


def test_an_image_archive_is_accepted_for_an_image_key(allowed, cast):
    for institution in (cast.hospital_a, cast.hospital_b):
        offer_dataset(
            cast, institution, key="scans", modality="image", input_shape=(1, 8, 8), n_classes=3
        )
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, images=np.random.default_rng(0).random((6, 8, 8)), labels=[0, 1, 2, 0, 1, 2]
    )
    held = upload(cast, buffer.getvalue(), name="scans.npz", key="scans")
    assert (held.modality, held.input_shape, held.n_classes) == ("image", [1, 8, 8], 3)
    assert held.file_format == "npz"


# --- proposals ----------------------------------------------------------------------------------


def test_the_spec_leaves_central_evaluation_of_any_key_to_the_compliance_check():
    from tests.support.training_fixtures import make_spec

    spec = validate_spec(make_spec(evaluation=CENTRAL))
    assert spec["evaluation"] == CENTRAL
    assert evaluation_settings(spec) == CENTRAL
    # The default for a key that is not bundled is still the sites.
    assert evaluation_settings(validate_spec(make_spec()))["where"] == "sites"


def _problems(caught) -> dict:
    return {p.term: p.message for p in caught.value.problems}


def test_a_central_job_is_refused_naming_the_term_when_the_agreement_does_not_allow_it(cast):
    scene = make_scene(cast)
    with pytest.raises(ComplianceError) as caught:
        scene.propose(evaluation=CENTRAL)
    message = _problems(caught)["central_validation_set"]
    assert "does not allow a central validation set" in message
    assert "“allows a central validation set”" in message
    # Evaluated at the sites, the same job is proposed.
    assert scene.propose().state == JobState.AWAITING_APPROVAL


def test_a_central_job_is_refused_without_a_set_and_proposed_with_one(allowed, cast):
    with pytest.raises(ComplianceError) as caught:
        allowed.propose(evaluation=CENTRAL)
    assert (
        "no central validation set for 'tumours' has been uploaded"
        in (_problems(caught)["central_validation_set"])
    )
    held = upload(cast, csv_bytes(rows=15))
    job = allowed.propose(evaluation=CENTRAL)
    assert job.state == JobState.AWAITING_APPROVAL
    assert validation_set_in_use(job) == held
    review = reverse("training:job-review", kwargs={"slug": cast.consortium.slug, "pk": job.pk})
    page = cast.client_for("approver").get(review).content.decode()
    assert (
        "models are evaluated centrally on a validation set uploaded by Hospital A (15 records)"
        in (page)
    )


def test_the_set_of_an_institution_that_withdrew_is_no_longer_used(allowed, cast):
    upload(cast, csv_bytes())
    consent_withdraw(
        acting_user=cast.approver,
        agreement=allowed.version.agreement,
        institution=cast.hospital_a,
        reason="Our board withdrew its consent.",
    )
    assert validation_set_current(cast.consortium.pk, DATASET_KEY) is None
    with pytest.raises(ConflictError, match="withdrawn its consent"):
        upload(cast, csv_bytes())


# --- a withdrawal reaches only the agreement it was made under (issue 14) -----------------------


def withdraw_a(cast, agreement, reason: str):
    """Hospital A's approver withdraws its consent under ``agreement`` only."""
    return consent_withdraw(
        acting_user=cast.approver, agreement=agreement, institution=cast.hospital_a, reason=reason
    )


@pytest.fixture
def two_agreements(cast, artifacts):
    """An imaging agreement first, then the tumour agreement (the newest, so the one in force),
    both signed by both hospitals and both allowing a central validation set."""
    imaging = agreement_in_force(cast, title="Imaging DUA", allows_central_validation_set=True)
    scene = make_scene(cast, title="Tumour DUA", allows_central_validation_set=True)
    assert scene.version.agreement != imaging.agreement
    scene.imaging = imaging
    return scene


def test_a_withdrawal_from_another_agreement_leaves_the_set_in_use_and_uploads_open(
    two_agreements, cast
):
    held = upload(cast, csv_bytes(rows=10))
    assert held.agreement_version == two_agreements.version  # given under the tumour DUA
    withdraw_a(cast, two_agreements.imaging.agreement, "We leave the imaging study only.")

    assert validation_set_current(cast.consortium.pk, DATASET_KEY) == held
    job = two_agreements.propose(evaluation=CENTRAL)
    assert job.state == JobState.AWAITING_APPROVAL
    assert validation_set_in_use(job) == held
    # The steward still sends records under the agreement in force.
    newer = upload(cast, csv_bytes(rows=11, seed=2))
    assert validation_set_in_use(job) == newer
    page = cast.client_for("steward").get(page_url(cast)).content.decode()
    assert "Send to the consortium" in page


def test_a_withdrawal_under_the_jobs_agreement_takes_the_set_out_of_its_jobs_only(cast, artifacts):
    imaging = make_scene(cast, title="Imaging DUA", allows_central_validation_set=True)
    held = upload(cast, csv_bytes(rows=10))  # given under the imaging DUA
    imaging_job = imaging.propose(evaluation=CENTRAL)
    tumour = agreement_in_force(cast, title="Tumour DUA", allows_central_validation_set=True)
    withdraw_a(cast, tumour.agreement, "We leave the tumour study only.")

    # The imaging job still measures on the records Hospital A gave under the imaging DUA.
    assert validation_set_in_use(imaging_job) == held
    # A job under the tumour DUA may not use Hospital A's records, and A sends none under it.
    assert validation_set_current(cast.consortium.pk, DATASET_KEY) is None
    assert (
        validation_set_current(
            cast.consortium.pk, DATASET_KEY, agreement_id=imaging.version.agreement_id
        )
        == held
    )
    with pytest.raises(ConflictError, match="withdrawn its consent under “Tumour DUA”"):
        upload(cast, csv_bytes())


def test_records_given_under_an_agreement_the_uploader_left_are_used_by_no_job(cast, artifacts):
    imaging = make_scene(cast, title="Imaging DUA", allows_central_validation_set=True)
    upload(cast, csv_bytes(rows=10))  # given under the imaging DUA
    imaging_job = imaging.propose(evaluation=CENTRAL)
    tumour = agreement_in_force(cast, title="Tumour DUA", allows_central_validation_set=True)
    withdraw_a(cast, imaging.version.agreement, "We withdraw the imaging records.")

    assert validation_set_in_use(imaging_job) is None
    # Nor does a job under the tumour DUA, still in force for Hospital A, read them.
    assert validation_set_current(cast.consortium.pk, DATASET_KEY) is None
    # Hospital A may send records anew under the tumour DUA; those are used there.
    again = upload(cast, csv_bytes(rows=12))
    assert again.agreement_version == tumour
    assert validation_set_current(cast.consortium.pk, DATASET_KEY) == again
