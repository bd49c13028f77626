"""A superuser is the installation's operator, not a member: it acts for a consortium or an
institution only through a membership with the role the act needs (consortium.core.access).

The four acts a review found open to the demo's ``admin`` (then the consortium's administrator
*and* a superuser, so passing every ``user.has_perm``): withdrawing a hospital's consent through
the API, creating a hospital's site worker credentials (its token: posing as its worker),
changing its data sets, revoking its credentials. Each is refused to that administrator and to
the operator (a superuser member of nothing), and each still works for the hospital's own
people. The operator keeps what is the platform's: the Django admin (read-only for governance,
jobs and the ledger), starting a consortium, /metrics.
"""

from __future__ import annotations

import pytest
from django.contrib import admin as django_admin
from django.core.exceptions import ImproperlyConfigured
from django.urls import reverse

from audit.models import LedgerEntry
from consortium.core.access import may
from consortium.governance.models import Institution, Withdrawal
from tests.support.agreements import agreement_in_force
from tests.support.api_client import api
from tests.support.job_api import DATASET
from tests.support.keys import ed25519_pem
from tests.support.training_fixtures import make_scene
from training.jobs.datasets import dataset_register
from training.models import SiteCredential, SiteDataset
from training.rounds.credentials import site_credential_create
from training.web.consumers import ConsortiumLiveConsumer, JobLiveConsumer

pytestmark = pytest.mark.django_db

#: The two superusers of the cast: the consortium's administrator who is also a superuser (the
#: demo's ``admin`` before) and the operator, a superuser member of nothing.
SUPERUSERS = ["superuser_admin", "superuser"]


def url(name, cast, **kwargs):
    return reverse(
        name, kwargs={"slug": cast.consortium.slug, "inst_slug": cast.hospital_a.slug, **kwargs}
    )


class Unchanged:
    """Nothing is written: no ledger entry, and ``rows()`` returns what it did."""

    def __init__(self, rows):
        self.rows = rows

    def __enter__(self):
        self.seq = LedgerEntry.objects.order_by("-seq").values_list("seq", flat=True).first()
        self.before = self.rows()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            assert self.rows() == self.before
            last = LedgerEntry.objects.order_by("-seq").values_list("seq", flat=True).first()
            assert last == self.seq


# --- 1. withdrawing a hospital's consent through the API ------------------------------------


@pytest.mark.parametrize("who", SUPERUSERS)
def test_a_superuser_cannot_withdraw_a_hospitals_consent(cast, who):
    """Before: 201, and hospital A was out of every future job on the superuser's word."""
    version = agreement_in_force(cast)
    body = {"institution": cast.hospital_a.slug, "reason": "Nobody at the hospital said so."}
    path = f"/api/agreements/{version.agreement_id}/withdraw/"
    with Unchanged(lambda: list(Withdrawal.objects.values_list("pk", flat=True))):
        response = api(getattr(cast, who)).post(path, body, format="json")
    assert response.status_code == 404, response.content
    assert response.json() == {"detail": "Not found."}
    # The hospital's own approver still may.
    assert api(cast.approver).post(path, body, format="json").status_code == 201


# --- 2. creating a hospital's site worker credentials (its token) ----------------------------


@pytest.mark.parametrize("who", SUPERUSERS)
def test_a_superuser_cannot_create_a_hospitals_worker_credentials(cast, who):
    """Before: 200 with the token, which authenticates as hospital A's worker."""
    page = url("training:credential-list", cast)
    client = cast.client_for(who)
    with Unchanged(lambda: list(SiteCredential.objects.values_list("pk", flat=True))):
        assert client.get(page).status_code == 404
        response = client.post(page, {"label": "mine-now", "public_key": ed25519_pem()})
    assert response.status_code == 404
    assert b"fls_" not in response.content
    # Neither is it offered on the institution's page the administrator can open.
    if who == "superuser_admin":
        detail = reverse(
            "consortium:institution-detail",
            kwargs={"slug": cast.consortium.slug, "inst_slug": cast.hospital_a.slug},
        )
        assert page not in client.get(detail).content.decode()
    # The hospital's data steward still may.
    made = cast.client_for("steward").post(page, {"label": "node", "public_key": ed25519_pem()})
    assert made.status_code == 200 and SiteCredential.objects.filter(label="node").exists()


# --- 3. changing a hospital's data sets -----------------------------------------------------


@pytest.fixture
def dataset(cast):
    return dataset_register(acting_user=cast.steward, institution=cast.hospital_a, **DATASET)


def dataset_rows():
    return list(SiteDataset.objects.order_by("pk").values_list("pk", "key", "description"))


@pytest.mark.parametrize("who", SUPERUSERS)
def test_a_superuser_cannot_change_a_hospitals_data_sets(cast, dataset, who):
    """Before: 201, 200 and 204 through the API, 302 on the pages."""
    client = api(getattr(cast, who))
    pages = cast.client_for(who)
    new = {**DATASET, "key": "planted", "institution": cast.hospital_a.slug}
    with Unchanged(dataset_rows):
        answers = [
            client.post("/api/datasets/", new, format="json"),
            client.patch(f"/api/datasets/{dataset.pk}/", {"description": "x"}, format="json"),
            client.delete(f"/api/datasets/{dataset.pk}/"),
            pages.post(url("training:dataset-create", cast), {**DATASET, "key": "planted"}),
            pages.post(url("training:dataset-edit", cast, key=dataset.key), {"description": "x"}),
            pages.post(url("training:dataset-remove", cast, key=dataset.key)),
        ]
    # The operator cannot even name hospital A in a body (the 404 of any outsider).
    assert [a.status_code for a in answers] == [404] * 6
    # The hospital's data steward still may.
    steward = api(cast.steward)
    answer = steward.patch(f"/api/datasets/{dataset.pk}/", {"description": "New."}, format="json")
    assert answer.status_code == 200


# --- 4. revoking a hospital's credentials ---------------------------------------------------


@pytest.mark.parametrize("who", SUPERUSERS)
def test_a_superuser_cannot_revoke_a_hospitals_credentials(cast, who):
    """Before: 302, and hospital A's worker was locked out."""
    credential, _token = site_credential_create(
        acting_user=cast.steward,
        institution=cast.hospital_a,
        label="node",
        public_key=ed25519_pem(),
    )
    revoke = url("training:credential-revoke", cast, pk=credential.pk)
    client = cast.client_for(who)
    with Unchanged(lambda: list(SiteCredential.objects.values_list("pk", "revoked_at"))):
        assert client.get(revoke).status_code == 404
        assert client.post(revoke).status_code == 404
    # The hospital's institution administrator still may.
    assert cast.client_for("inst_admin").post(revoke).status_code == 302
    credential.refresh_from_db()
    assert credential.revoked_at is not None


# --- what the operator keeps, and what it sees ----------------------------------------------


def test_the_operator_keeps_the_platforms_acts(cast, settings):
    settings.METRICS_TOKEN = ""
    client = cast.client_for("superuser")
    assert client.get(reverse("admin:index")).status_code == 200
    assert client.get(reverse("consortium:consortium-start")).status_code == 200
    assert client.get("/metrics").status_code == 200
    assert may(cast.superuser, "consortium.start_consortium", None)
    # ...but reads nothing of a consortium it is not a member of.
    detail = reverse("consortium:consortium-detail", kwargs={"slug": cast.consortium.slug})
    assert client.get(detail).status_code == 404
    assert api(cast.superuser).get("/api/institutions/").json()["count"] == 0


def test_the_live_sockets_refuse_the_operator(cast):
    """The sockets load their object by the URL alone, so the rule is all that stands between
    a superuser and a consortium's live entries. Before: allowed."""
    job = make_scene(cast).propose(user=cast.researcher)
    consortium_socket, job_socket = ConsortiumLiveConsumer(), JobLiveConsumer()
    assert not consortium_socket.allowed(cast.superuser, cast.consortium)
    assert not consortium_socket.shows_entries(cast.superuser, cast.consortium)
    assert not job_socket.allowed(cast.superuser, job)
    # The consortium's administrator, a superuser or not, by membership.
    assert consortium_socket.shows_entries(cast.superuser_admin, cast.consortium)
    assert job_socket.allowed(cast.admin, job)


GOVERNED = [
    m
    for m in django_admin.site._registry
    if m._meta.app_label in {"consortium", "training", "audit"}
]


@pytest.mark.parametrize("model", GOVERNED, ids=[m.__name__ for m in GOVERNED])
def test_the_admin_edits_no_governance_record(cast, model):
    """The Django admin stays the operator's, but the records that carry governance weight
    (and the ledger) change only through the services: no add, change or delete there."""
    model_admin = django_admin.site._registry[model]
    request = type("Request", (), {"user": cast.superuser})()
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request)
    assert not model_admin.has_delete_permission(request)


def test_the_admin_refuses_a_superusers_edit_of_an_institution(cast):
    client = cast.client_for("superuser")
    change = reverse("admin:consortium_institution_change", args=[cast.hospital_a.pk])
    page = client.get(change)
    assert page.status_code == 200 and 'name="_save"' not in page.content.decode()
    client.post(change, {"name": "Renamed", "slug": "renamed", "consortium": cast.consortium.pk})
    assert Institution.objects.get(pk=cast.hospital_a.pk).name == "Hospital A"
    delete = reverse("admin:consortium_institution_delete", args=[cast.hospital_a.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403
    assert Institution.objects.filter(pk=cast.hospital_a.pk).exists()


def test_may_refuses_an_unregistered_permission(cast):
    """A typo would read as a quiet no (or, through Django's shortcut, a quiet yes)."""
    with pytest.raises(ImproperlyConfigured, match="consortium.veiw_consortium"):
        may(cast.admin, "consortium.veiw_consortium", cast.consortium)
    cast.admin.is_active = False
    assert not may(cast.admin, "consortium.view_consortium", cast.consortium)
