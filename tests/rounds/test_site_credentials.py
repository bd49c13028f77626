"""Site worker credentials: the services (create, revoke, authenticate), the
pages that manage them, and who may open those pages."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse
from django.utils import timezone

from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from consortium.core.errors import ConflictError
from consortium.governance.services.institutions import institution_update
from tests.support.keys import rsa_pem
from training.fl.signing import generate_keypair
from training.models import SiteCredential
from training.rounds import credentials

pytestmark = pytest.mark.django_db


@pytest.fixture
def public_pem() -> str:
    return generate_keypair()[1]


def create(cast, public_pem, **kwargs):
    return credentials.site_credential_create(
        acting_user=kwargs.pop("user", cast.steward),
        institution=kwargs.pop("institution", cast.hospital_a),
        label=kwargs.pop("label", "gpu-node-1"),
        public_key=kwargs.pop("public_key", public_pem),
    )


# --- Services ---------------------------------------------------------------------------------


def test_create_stores_only_the_hash(cast, public_pem):
    credential, token = create(cast, public_pem)
    assert token.startswith("fls_") and len(token) > 40
    assert credential.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert credential.token_prefix == token[:12]
    assert credential.public_key.startswith("-----BEGIN PUBLIC KEY-----")
    assert credential.created_by == cast.steward
    stored = SiteCredential.objects.filter(pk=credential.pk).values()[0]
    assert token not in json.dumps(stored, default=str)

    entry = LedgerEntry.objects.get(event="site.credential_created")
    payload = json.loads(entry.payload_text)
    assert payload["label"] == "gpu-node-1"
    assert payload["token_prefix"] == credential.token_prefix
    assert len(payload["key_fingerprint"]) == 16
    assert token not in entry.payload_text
    assert entry.institution_slug == "hospital-a"
    assert verify_chain().ok


def test_tokens_differ(cast, public_pem):
    _, first = create(cast, public_pem)
    _, second = create(cast, public_pem, label="gpu-node-2")
    assert first != second


def test_create_falls_back_to_the_institution_key(cast, public_pem):
    institution_update(
        acting_user=cast.inst_admin, institution=cast.hospital_a, worker_public_key=public_pem
    )
    cast.hospital_a.refresh_from_db()
    credential, _ = create(cast, public_pem, public_key="")
    assert credential.public_key == cast.hospital_a.worker_public_key


def test_create_needs_a_key(cast):
    with pytest.raises(ValidationError) as excinfo:
        create(cast, "", public_key="")
    assert "public_key" in excinfo.value.message_dict
    assert not SiteCredential.objects.exists()


@pytest.mark.parametrize(
    "key,message",
    [("not a key", "Not a PEM-encoded public key"), ("rsa", "must be an Ed25519 public key")],
)
def test_create_refuses_a_bad_key(cast, key, message):
    key = rsa_pem() if key == "rsa" else key
    with pytest.raises(ValidationError) as excinfo:
        create(cast, "", public_key=key)
    assert message in " ".join(excinfo.value.message_dict["public_key"])


def test_create_needs_a_label(cast, public_pem):
    with pytest.raises(ValidationError) as excinfo:
        create(cast, public_pem, label="  ")
    assert "label" in excinfo.value.message_dict


def test_authenticate(cast, public_pem):
    credential, token = create(cast, public_pem)
    assert credentials.site_credential_authenticate(token) == credential
    assert credentials.site_credential_authenticate(token + "x") is None
    assert credentials.site_credential_authenticate("") is None
    assert credentials.site_credential_authenticate(None) is None
    assert credentials.site_credential_authenticate(credential.token_hash) is None


def test_last_used_is_written_at_most_once_a_minute(cast, public_pem):
    credential, token = create(cast, public_pem)
    credentials.site_credential_authenticate(token)
    credential.refresh_from_db()
    first = credential.last_used_at
    assert first is not None
    credentials.site_credential_authenticate(token)
    credential.refresh_from_db()
    assert credential.last_used_at == first
    earlier = timezone.now() - dt.timedelta(minutes=2)
    SiteCredential.objects.filter(pk=credential.pk).update(last_used_at=earlier)
    credentials.site_credential_authenticate(token)
    credential.refresh_from_db()
    assert credential.last_used_at > earlier


def test_revoke(cast, public_pem):
    credential, token = create(cast, public_pem)
    credentials.site_credential_revoke(acting_user=cast.inst_admin, credential=credential)
    credential.refresh_from_db()
    assert credential.revoked_at is not None
    assert credential.revoked_by == cast.inst_admin
    assert not credential.is_active
    assert credentials.site_credential_authenticate(token) is None
    assert credentials.site_token_revoked(token)
    entry = LedgerEntry.objects.get(event="site.credential_revoked")
    assert json.loads(entry.payload_text)["token_prefix"] == credential.token_prefix
    with pytest.raises(ConflictError):
        credentials.site_credential_revoke(acting_user=cast.inst_admin, credential=credential)
    assert LedgerEntry.objects.filter(event="site.credential_revoked").count() == 1
    assert verify_chain().ok


# --- Pages ------------------------------------------------------------------------------------


def list_url(cast, institution=None):
    return reverse(
        "training:credential-list",
        args=[cast.consortium.slug, (institution or cast.hospital_a).slug],
    )


def revoke_url(cast, credential, institution=None):
    return reverse(
        "training:credential-revoke",
        args=[cast.consortium.slug, (institution or cast.hospital_a).slug, credential.pk],
    )


def test_the_token_is_shown_once(cast, public_pem, settings):
    settings.SITE_URL = "https://central.example.org"
    client = cast.client_for("steward")
    response = client.post(list_url(cast), {"label": "gpu-node-1", "public_key": public_pem})
    assert response.status_code == 200
    credential = SiteCredential.objects.get()
    html = response.content.decode()
    token = next(
        line.split("=", 1)[1] for line in html.splitlines() if line.startswith("SITE_TOKEN=")
    )
    assert token.startswith(credential.token_prefix)
    assert hashlib.sha256(token.encode()).hexdigest() == credential.token_hash
    assert "SITE_SLUG=hospital-a" in html
    assert "CENTRAL_URL=https://central.example.org" in html
    assert "SITE_SIGNING_KEY=" in html and "DATA_ROOT=" in html
    assert "will not be shown again" in html
    assert response["Cache-Control"] == "no-store"

    later = client.get(list_url(cast)).content.decode()
    assert token not in later
    assert credential.token_prefix in later
    assert "gpu-node-1" in later


def test_a_refused_key_keeps_what_was_typed(cast):
    client = cast.client_for("steward")
    response = client.post(list_url(cast), {"label": "gpu-node-1", "public_key": "nonsense"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "Not a PEM-encoded public key" in html
    assert "nonsense" in html and "gpu-node-1" in html
    assert not SiteCredential.objects.exists()


def test_revoke_page(cast, public_pem):
    credential, token = create(cast, public_pem)
    client = cast.client_for("inst_admin")
    confirm = client.get(revoke_url(cast, credential))
    assert confirm.status_code == 200
    assert credential.token_prefix in confirm.content.decode()
    response = client.post(revoke_url(cast, credential))
    assert response.status_code == 302
    assert response["Location"] == list_url(cast)
    credential.refresh_from_db()
    assert credential.revoked_by == cast.inst_admin
    assert credentials.site_credential_authenticate(token) is None
    again = client.post(revoke_url(cast, credential), follow=True)
    assert "already revoked" in again.content.decode()


def test_a_credential_of_another_institution_is_404(cast, public_pem):
    other, _ = create(cast, public_pem, institution=cast.hospital_b, user=cast.admin)
    client = cast.client_for("steward")
    # Hospital B's credential under hospital A's URL (where the steward may act).
    assert client.get(revoke_url(cast, other)).status_code == 404
    assert client.post(revoke_url(cast, other)).status_code == 404
    other.refresh_from_db()
    assert other.revoked_at is None


@pytest.mark.parametrize(
    "who,linked", [("steward", True), ("inst_admin", True), ("approver", False)]
)
def test_the_institution_page_links_the_credentials(cast, who, linked):
    url = reverse("consortium:institution-detail", args=[cast.consortium.slug, "hospital-a"])
    html = cast.client_for(who).get(url).content.decode()
    assert (list_url(cast) in html) is linked


# The permission matrix: a persona without training.manage_site_credentials at
# hospital A gets the same 404 as for a missing page; anonymous goes to log in.
MATRIX = {
    "anonymous": 302,
    "outsider": 404,
    "other_member": 404,
    "approver": 404,
    "auditor": 404,
    "researcher": 404,
    "admin": 404,
    "steward": 200,
    "inst_admin": 200,
}
ALLOWED = {"steward", "inst_admin"}


@pytest.mark.parametrize("who", sorted(MATRIX))
def test_list_page_matrix(cast, who):
    response = cast.client_for(who).get(list_url(cast))
    assert response.status_code == MATRIX[who]
    if who == "anonymous":
        assert reverse("login") in response["Location"]


@pytest.mark.parametrize("who", sorted(MATRIX))
def test_create_matrix(cast, public_pem, who):
    response = cast.client_for(who).post(list_url(cast), {"label": "w", "public_key": public_pem})
    assert response.status_code == MATRIX[who]
    assert SiteCredential.objects.exists() is (who in ALLOWED)


@pytest.mark.parametrize("who", sorted(MATRIX))
def test_revoke_matrix(cast, public_pem, who):
    credential, _ = create(cast, public_pem)
    client = cast.client_for(who)
    assert client.get(revoke_url(cast, credential)).status_code == MATRIX[who]
    response = client.post(revoke_url(cast, credential))
    assert response.status_code == (302 if who in ALLOWED else MATRIX[who])
    credential.refresh_from_db()
    assert (credential.revoked_at is not None) is (who in ALLOWED)


@pytest.mark.parametrize("who", sorted(MATRIX))
def test_missing_is_the_same_404(cast, who):
    client = cast.client_for(who)
    url = reverse("training:credential-revoke", args=[cast.consortium.slug, "hospital-a", 999999])
    expected = 302 if who == "anonymous" else 404
    assert client.get(url).status_code == expected
    nowhere = reverse("training:credential-list", args=[cast.consortium.slug, "no-such-site"])
    assert client.get(nowhere).status_code == expected


def test_the_steward_of_a_cannot_manage_b(cast, public_pem):
    client = cast.client_for("steward")
    assert client.get(list_url(cast, cast.hospital_b)).status_code == 404
    assert (
        client.post(
            list_url(cast, cast.hospital_b), {"label": "w", "public_key": public_pem}
        ).status_code
        == 404
    )
