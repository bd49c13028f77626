"""The governance API tells the same truth about a site's worker key as the pages (issue 14,
defect 5): the keys uploads are verified against are those of the site's *active worker
credentials*, so ``GET /api/institutions/`` lists them (``signing_keys``,
``worker_key_registered``), while ``worker_key_fingerprint`` stays the fingerprint of the key on
file for new credentials, and the schema says which is which.
"""

from __future__ import annotations

import pytest
import yaml
from django.core.management import call_command

from consortium.dashboard.worker_keys import worker_keys
from consortium.governance.services.institutions import key_fingerprint
from tests.support.api_client import api
from tests.support.keys import ed25519_pem
from training.rounds.credentials import site_credential_create, site_credential_revoke

pytestmark = pytest.mark.django_db


def by_slug(response) -> dict[str, dict]:
    assert response.status_code == 200, response.json()
    return {row["slug"]: row for row in response.json()["results"]}


def test_the_api_lists_the_active_credentials_keys_not_only_the_key_on_file(cast):
    # Hospital A's workers sign with two credentials of their own and no key is on file.
    assert cast.hospital_a.worker_public_key == ""
    old_pem, new_pem, revoked_pem = ed25519_pem(), ed25519_pem(), ed25519_pem()
    site_credential_create(
        acting_user=cast.admin, institution=cast.hospital_a, label="gpu-1", public_key=old_pem
    )
    site_credential_create(
        acting_user=cast.admin, institution=cast.hospital_a, label="gpu-2", public_key=new_pem
    )
    revoked, _token = site_credential_create(
        acting_user=cast.admin, institution=cast.hospital_a, label="old", public_key=revoked_pem
    )
    site_credential_revoke(acting_user=cast.admin, credential=revoked)
    # Hospital B has a key on file and no credential: no worker of it can upload.
    file_pem = ed25519_pem()
    cast.hospital_b.worker_public_key = file_pem.strip()
    cast.hospital_b.save(update_fields=["worker_public_key"])

    rows = by_slug(api(cast.approver).get("/api/institutions/"))
    a, b = rows[cast.hospital_a.slug], rows[cast.hospital_b.slug]
    assert a["worker_key_registered"] is True
    assert [k["label"] for k in a["signing_keys"]] == ["gpu-2", "gpu-1"]  # newest first
    assert [k["fingerprint"] for k in a["signing_keys"]] == [
        key_fingerprint(new_pem.strip()),
        key_fingerprint(old_pem.strip()),
    ]
    assert all(k["token_prefix"] for k in a["signing_keys"])
    assert a["worker_key_fingerprint"] == ""  # nothing on file, yet the workers sign
    assert b["worker_key_registered"] is False and b["signing_keys"] == []
    assert b["worker_key_fingerprint"] == key_fingerprint(file_pem.strip())

    # One institution reads the same, and the same as the pages' worker keys.
    one = api(cast.approver).get(f"/api/institutions/{cast.hospital_a.slug}/").json()
    assert one["signing_keys"] == a["signing_keys"]
    pages = worker_keys([cast.hospital_a, cast.hospital_b])
    for institution in (cast.hospital_a, cast.hospital_b):
        row = rows[institution.slug]
        keys = pages[institution.pk]
        assert row["worker_key_registered"] == keys.registered
        assert [k["fingerprint"] for k in row["signing_keys"]] == [
            k.fingerprint for k in keys.signing_keys
        ]
        assert row["worker_key_fingerprint"] == keys.key_on_file


def test_listing_institutions_reads_the_credentials_in_one_query(
    cast, django_assert_max_num_queries
):
    for label in ("a", "b", "c"):
        site_credential_create(
            acting_user=cast.admin,
            institution=cast.hospital_a,
            label=label,
            public_key=ed25519_pem(),
        )
    client = api(cast.approver)
    client.get("/api/institutions/")  # warm the grants cache and the like
    with django_assert_max_num_queries(12) as captured:
        client.get("/api/institutions/")
    credential_reads = [q for q in captured.captured_queries if "site_credential" in q["sql"]]
    assert len(credential_reads) == 1, [q["sql"] for q in credential_reads]


def test_the_schema_says_which_key_is_which(tmp_path):
    path = tmp_path / "schema.yml"
    call_command("spectacular", "--file", str(path))
    institution = yaml.safe_load(path.read_text())["components"]["schemas"]["Institution"]
    props = institution["properties"]
    assert "active" in props["signing_keys"]["description"]
    assert props["signing_keys"]["items"]["$ref"].endswith("/SigningKey")
    assert (
        "Not the key updates are verified against"
        in (props["worker_key_fingerprint"]["description"])
    )
    assert props["worker_key_registered"]["type"] == "boolean"
