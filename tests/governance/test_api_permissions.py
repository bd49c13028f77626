"""Who may call what: every endpoint and action of the API against each persona,
with the exact status code. Anonymous requests are refused before anything is
looked up (401, with the API token's ``Bearer`` challenge: no password is accepted).
A missing object, a hidden one and a visible one the user may not act on all
give the same 404."""

import datetime as dt
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.urls import reverse
from rest_framework.test import APIRequestFactory, force_authenticate

from audit import api_urls as audit_api_urls
from audit.models import LedgerEntry
from consortium.governance.api import urls as governance_api_urls
from consortium.governance.api.views import InstitutionViewSet
from consortium.governance.models import Membership, Role
from consortium.governance.services.agreements import agreement_create, agreement_version_publish
from consortium.governance.services.institutions import consortium_create, institution_create
from consortium.governance.services.members import invitation_create
from tests.support.api_client import client_for
from tests.support.factories import UserFactory
from tests.support.permission_matrix import BASE_PERSONAS, api_codes, assert_api_answer
from training import api_urls as training_api_urls

PERSONAS = [*BASE_PERSONAS, "inst_admin", "steward"]
TODAY = dt.date.today()
TERMS = {
    "purpose": "Train a tumour classifier on tabular features.",
    "permitted_model_families": ["linear"],
    "max_shared_fraction": "0.5",
    "required_dp_mechanism": "gaussian",
    "epsilon_cap": "8",
    "delta": "0.00001",
    "valid_from": (TODAY - dt.timedelta(days=1)).isoformat(),
    "valid_until": (TODAY + dt.timedelta(days=30)).isoformat(),
    "text": "Model updates only.",
}


@dataclass
class Scene:
    cast: Any
    published: Any  # version 1 of agreement A, published
    draft: Any  # version 1 of agreement B, a draft
    invitation: Any  # to hospital A as researcher
    token: str

    def user(self, who):
        return None if who == "anonymous" else getattr(self.cast, who)


@pytest.fixture
def scene(cast):
    def create(title):
        return agreement_create(
            acting_user=cast.admin,
            consortium=cast.consortium,
            title=title,
            **{
                **TERMS,
                "valid_from": TODAY - dt.timedelta(days=1),
                "valid_until": TODAY + dt.timedelta(days=30),
            },
        )

    published = agreement_version_publish(acting_user=cast.admin, version=create("A"))
    draft = create("B")
    invitation, token = invitation_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        institution=cast.hospital_a,
        email="invitee@example.org",
        role=Role.RESEARCHER,
    )
    return Scene(cast, published, draft, invitation, token)


#: ``expect(default, *, anonymous=401, outsider=None, **overrides)``: codes for PERSONAS.
expect = partial(api_codes, PERSONAS)


def researcher_membership(s):
    return Membership.objects.get(user=s.cast.researcher).pk


# (name, method, url(scene), body(scene, user) or None, expected codes)
CASES = [
    ("consortia-list", "get", lambda s: "/api/consortia/", None, expect(200)),
    (
        "consortia-retrieve",
        "get",
        lambda s: f"/api/consortia/{s.cast.consortium.slug}/",
        None,
        expect(200, outsider=404),
    ),
    ("institutions-list", "get", lambda s: "/api/institutions/", None, expect(200)),
    (
        "institutions-retrieve",
        "get",
        lambda s: f"/api/institutions/{s.cast.hospital_a.slug}/",
        None,
        expect(200, outsider=404),
    ),
    (
        "institutions-create",
        "post",
        lambda s: "/api/institutions/",
        lambda s, u: {"consortium": s.cast.consortium.slug, "name": "Hospital Z"},
        # The outsider cannot see the consortium the body names: a field error.
        expect(404, admin=201),
    ),
    (
        "institutions-partial_update",
        "patch",
        lambda s: f"/api/institutions/{s.cast.hospital_a.slug}/",
        lambda s, u: {"country": "FR"},
        expect(404, admin=200, inst_admin=200, steward=200),
    ),
    (
        "institutions-put-not-routed",
        "put",
        lambda s: f"/api/institutions/{s.cast.hospital_a.slug}/",
        lambda s, u: {"country": "FR"},
        expect(405),
    ),
    ("memberships-list", "get", lambda s: "/api/memberships/", None, expect(200)),
    (
        "memberships-retrieve",
        "get",
        lambda s: f"/api/memberships/{researcher_membership(s)}/",
        None,
        expect(200, outsider=404),
    ),
    (
        "memberships-partial_update",
        "patch",
        lambda s: f"/api/memberships/{researcher_membership(s)}/",
        lambda s, u: {"role": Role.DATA_STEWARD},
        expect(404, admin=200, inst_admin=200),
    ),
    (
        "memberships-destroy",
        "delete",
        lambda s: f"/api/memberships/{researcher_membership(s)}/",
        None,
        expect(404, admin=204, inst_admin=204),
    ),
    ("invitations-list", "get", lambda s: "/api/invitations/", None, expect(200)),
    (
        "invitations-retrieve",
        "get",
        lambda s: f"/api/invitations/{s.invitation.pk}/",
        None,
        expect(200, outsider=404),
    ),
    (
        "invitations-create-consortium-role",
        "post",
        lambda s: "/api/invitations/",
        lambda s, u: {
            "consortium": s.cast.consortium.slug,
            "email": "new@example.org",
            "role": Role.AUDITOR,
        },
        expect(404, admin=201),
    ),
    (
        "invitations-create-institution-role",
        "post",
        lambda s: "/api/invitations/",
        lambda s, u: {
            "consortium": s.cast.consortium.slug,
            "institution": s.cast.hospital_a.slug,
            "email": "new@example.org",
            "role": Role.APPROVER,
        },
        expect(404, admin=201, inst_admin=201),
    ),
    (
        "invitations-revoke",
        "post",
        lambda s: f"/api/invitations/{s.invitation.pk}/revoke/",
        None,
        expect(404, admin=200, inst_admin=200),
    ),
    (
        # Every signed-in user may try; the invitation is for another address.
        "invitations-accept",
        "post",
        lambda s: "/api/invitations/accept/",
        lambda s, u: {"token": s.token},
        expect(400),
    ),
    ("agreements-list", "get", lambda s: "/api/agreements/", None, expect(200)),
    (
        "agreements-retrieve",
        "get",
        lambda s: f"/api/agreements/{s.published.agreement_id}/",
        None,
        expect(200, outsider=404),
    ),
    (
        "agreements-create",
        "post",
        lambda s: "/api/agreements/",
        lambda s, u: {"consortium": s.cast.consortium.slug, "title": "C", **TERMS},
        expect(404, admin=201),
    ),
    (
        "agreements-amend",
        "post",
        lambda s: f"/api/agreements/{s.published.agreement_id}/amend/",
        None,
        expect(404, admin=201),
    ),
    (
        "agreements-withdraw",
        "post",
        lambda s: f"/api/agreements/{s.published.agreement_id}/withdraw/",
        lambda s, u: {"institution": s.cast.hospital_a.slug, "reason": "Ethics board said no."},
        # The consortium's administrator cannot withdraw a hospital's consent.
        expect(404, approver=201, inst_admin=201),
    ),
    ("versions-list", "get", lambda s: "/api/agreement-versions/", None, expect(200)),
    (
        "versions-retrieve",
        "get",
        lambda s: f"/api/agreement-versions/{s.published.pk}/",
        None,
        expect(200, outsider=404),
    ),
    (
        "versions-partial_update",
        "patch",
        lambda s: f"/api/agreement-versions/{s.draft.pk}/",
        lambda s, u: {"text": "New text."},
        expect(404, admin=200),
    ),
    (
        "versions-publish",
        "post",
        lambda s: f"/api/agreement-versions/{s.draft.pk}/publish/",
        None,
        expect(404, admin=200),
    ),
    (
        "versions-sign",
        "post",
        lambda s: f"/api/agreement-versions/{s.published.pk}/sign/",
        lambda s, u: {
            "institution": s.cast.hospital_a.slug,
            "typed_name": u.get_full_name() if u else "x",
            "confirmed": True,
            "content_digest": s.published.content_digest,
        },
        expect(404, approver=201),
    ),
    ("ledger-list", "get", lambda s: "/api/ledger/", None, expect(200)),
    (
        "ledger-verify",
        "post",
        lambda s: "/api/ledger/verify/",
        lambda s, u: {"consortium": s.cast.consortium.slug},
        expect(404, auditor=200, admin=200),
    ),
]


def request(scene, who, method, url_fn, body_fn):
    client = client_for(scene, who)
    body = body_fn(scene, scene.user(who)) if body_fn else None
    return getattr(client, method)(url_fn(scene), body, format="json")


@pytest.mark.parametrize("who", PERSONAS)
@pytest.mark.parametrize("name, method, url_fn, body_fn, codes", CASES, ids=[c[0] for c in CASES])
def test_matrix(scene, who, name, method, url_fn, body_fn, codes):
    assert_api_answer(request(scene, who, method, url_fn, body_fn), codes[who])


def test_every_routed_action_is_in_its_permission_map():
    routers = [governance_api_urls.router, audit_api_urls.router, training_api_urls.router]
    for router, (_prefix, viewset, _basename) in (
        (router, entry) for router in routers for entry in router.registry
    ):
        routed = set()
        for route in router.get_routes(viewset):
            routed |= {a for a in route.mapping.values() if hasattr(viewset, a)}
        assert routed <= set(viewset.permission_map), viewset
        assert routed, viewset


def test_an_unregistered_permission_is_refused_when_routed():
    class Typo(InstitutionViewSet):
        permission_map = {**InstitutionViewSet.permission_map, "retrieve": "consortium.veiw"}

    with pytest.raises(ImproperlyConfigured, match="consortium.veiw"):
        Typo.as_view({"get": "retrieve"})


def test_an_action_missing_from_the_map_is_refused(cast):
    class Leaky(InstitutionViewSet):
        permission_map = {
            k: v for k, v in InstitutionViewSet.permission_map.items() if k != "partial_update"
        }

    view = Leaky.as_view({"patch": "partial_update"})
    request = APIRequestFactory().patch("/", {"country": "FR"}, format="json")
    force_authenticate(request, user=cast.admin)
    response = view(request, slug=cast.hospital_a.slug)
    assert response.status_code == 403
    cast.hospital_a.refresh_from_db()
    assert cast.hospital_a.country == ""


@pytest.mark.parametrize(
    "method, template, body",
    [
        ("get", "/api/consortia/{}/", None),
        ("get", "/api/institutions/{}/", None),
        ("patch", "/api/institutions/{}/", {"country": "FR"}),
        ("get", "/api/memberships/{}/", None),
        ("patch", "/api/memberships/{}/", {"role": "researcher"}),
        ("delete", "/api/memberships/{}/", None),
        ("get", "/api/invitations/{}/", None),
        ("post", "/api/invitations/{}/revoke/", None),
        ("get", "/api/agreements/{}/", None),
        ("post", "/api/agreements/{}/amend/", None),
        ("post", "/api/agreements/{}/withdraw/", {"institution": "hospital-a", "reason": "x" * 12}),
        ("get", "/api/agreement-versions/{}/", None),
        ("patch", "/api/agreement-versions/{}/", {"text": "x"}),
        ("post", "/api/agreement-versions/{}/publish/", None),
        ("post", "/api/agreement-versions/{}/sign/", {"institution": "hospital-a"}),
    ],
)
@pytest.mark.parametrize("missing", ["999999", "not-a-number"])
def test_a_missing_object_looks_like_a_forbidden_one(scene, method, template, body, missing):
    """The admin asking for an id that does not exist gets the same answer as the
    outsider asking for one that does."""
    existing = {
        "/api/consortia/{}/": scene.cast.consortium.slug,
        "/api/institutions/{}/": scene.cast.hospital_a.slug,
        "/api/memberships/{}/": researcher_membership(scene),
        "/api/invitations/{}/revoke/": scene.invitation.pk,
        "/api/invitations/{}/": scene.invitation.pk,
        "/api/agreements/{}/": scene.published.agreement_id,
        "/api/agreements/{}/amend/": scene.published.agreement_id,
        "/api/agreements/{}/withdraw/": scene.published.agreement_id,
        "/api/agreement-versions/{}/": scene.draft.pk,
        "/api/agreement-versions/{}/publish/": scene.draft.pk,
        "/api/agreement-versions/{}/sign/": scene.published.pk,
    }[template]
    forbidden = getattr(client_for(scene, "outsider"), method)(
        template.format(existing), body, format="json"
    )
    missing_response = getattr(client_for(scene, "admin"), method)(
        template.format(missing), body, format="json"
    )
    assert forbidden.status_code == missing_response.status_code == 404
    assert forbidden.json() == missing_response.json() == {"detail": "Not found."}


def test_a_visible_object_without_the_right_is_404_too(scene):
    """The approver sees hospital A but may not edit it: same 404 as a missing one."""
    client = client_for(scene, "approver")
    denied = client.patch(f"/api/institutions/{scene.cast.hospital_a.slug}/", {"country": "FR"})
    missing = client.patch("/api/institutions/nowhere/", {"country": "FR"})
    assert client.get(f"/api/institutions/{scene.cast.hospital_a.slug}/").status_code == 200
    assert denied.status_code == missing.status_code == 404
    assert denied.json() == missing.json()


LISTS = [
    "/api/consortia/",
    "/api/institutions/",
    "/api/memberships/",
    "/api/invitations/",
    "/api/agreements/",
    "/api/agreement-versions/",
    "/api/ledger/",
]


@pytest.fixture
def elsewhere(db):
    """A second consortium, with its own people and paperwork."""
    boss = UserFactory(username="boss")
    other = consortium_create(acting_user=boss, name="Elsewhere")
    hospital = institution_create(acting_user=boss, consortium=other, name="Hospital X")
    invitation_create(acting_user=boss, consortium=other, email="x@example.org", role=Role.AUDITOR)
    agreement_create(
        acting_user=boss,
        consortium=other,
        title="Elsewhere DUA",
        **{
            **TERMS,
            "valid_from": TODAY,
            "valid_until": TODAY + dt.timedelta(days=1),
        },
    )
    return other, hospital


@pytest.mark.parametrize("url", LISTS)
@pytest.mark.parametrize("who", ["outsider", "superuser"])
def test_an_outsider_lists_nothing(scene, elsewhere, url, who):
    """Nor does the operator: a superuser sees no consortium it is not a member of."""
    body = client_for(scene, who).get(url).json()
    assert body["count"] == 0 and body["results"] == []


@pytest.mark.parametrize("url", LISTS)
def test_lists_stop_at_the_consortium(scene, elsewhere, url):
    body = client_for(scene, "admin").get(url).json()
    assert body["count"] > 0
    text = str(body["results"])
    assert "elsewhere" not in text and "hospital-x" not in text
    assert "Elsewhere" not in text


@pytest.mark.parametrize("who", ["other_member", "approver", "inst_admin", "steward"])
def test_ledger_is_for_auditors_and_administrators(scene, who):
    assert client_for(scene, who).get("/api/ledger/").json()["count"] == 0
    auditor_view = client_for(scene, "auditor").get("/api/ledger/").json()
    assert auditor_view["count"] == LedgerEntry.objects.count()


def test_filters_cannot_widen_the_scope(scene, elsewhere):
    other, hospital = elsewhere
    client = client_for(scene, "admin")
    assert client.get("/api/institutions/", {"consortium": other.slug}).json()["count"] == 0
    assert client.get("/api/ledger/", {"consortium": other.slug}).json()["count"] == 0
    assert client.get("/api/memberships/", {"institution": hospital.slug}).json()["count"] == 0


def test_a_hidden_slug_in_a_body_reads_as_unknown(scene, elsewhere):
    other, _ = elsewhere
    client = client_for(scene, "admin")
    hidden = client.post("/api/institutions/", {"consortium": other.slug, "name": "Q"})
    unknown = client.post("/api/institutions/", {"consortium": "no-such", "name": "Q"})
    # The 404 of an object named in the URL, the same body for both: a slug cannot be probed.
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json() == unknown.json() == {"detail": "Not found."}


def test_api_root_routes_are_namespaced():
    assert reverse("api:institution-list") == "/api/institutions/"
    assert reverse("api:ledger-entry-verify") == "/api/ledger/verify/"
