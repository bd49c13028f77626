"""Who may open which governance page: the full matrix.

Every page (GET, and POST for the actions) runs as every persona. Anonymous
users are sent to the login page (except on an invitation link); a persona
without the permission gets 404, exactly like a missing object; an allowed one
gets the page (200) or the redirect after acting (302).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.urls import reverse
from django.utils import timezone
from django.views.generic import TemplateView

from consortium.core.pages import PermissionRequiredMixin
from consortium.governance.models import Membership, Role
from consortium.governance.pages import GovernancePage
from consortium.governance.services.agreements import (
    agreement_amend,
    agreement_create,
    agreement_version_publish,
)
from consortium.governance.services.institutions import consortium_create, institution_create
from consortium.governance.services.members import invitation_create
from tests.support.factories import UserFactory
from tests.support.permission_matrix import (
    BASE_PERSONAS,
    LOGIN,
    answered_as,
    ask_page,
    assert_page_answer,
    permission_cases,
    same_404_page,
)

pytestmark = pytest.mark.django_db

PERSONAS = [*BASE_PERSONAS, "inst_admin", "steward"]
MEMBERS = {"other_member", "approver", "auditor", "admin", "inst_admin", "steward"}
ADMIN = {"admin"}
INSTITUTION_KEEPERS = {"admin", "inst_admin", "steward"}  # consortium.change_institution
MEMBER_MANAGERS = {"admin", "inst_admin"}  # hospital A's memberships and invitations
APPROVERS = {"approver"}
WITHDRAWERS = {"approver", "inst_admin"}


@dataclass
class Scene:
    """Objects the URLs point at: agreement 1 with version 1 published and
    version 2 drafted, the researcher's membership at hospital A, and a
    pending invitation to hospital A."""

    cast: object
    agreement: object
    v1: object
    v2: object
    membership: object
    invitation: object
    token: str


@pytest.fixture
def scene(cast):
    today = timezone.localdate()
    v1 = agreement_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        title="DUA",
        purpose="Classify tumours.",
        permitted_model_families=["linear"],
        max_shared_fraction="0.5",
        required_dp_mechanism="gaussian",
        epsilon_cap="8",
        delta="0.00001",
        valid_from=today - dt.timedelta(days=1),
        valid_until=today + dt.timedelta(days=30),
        text="Share model updates only.",
    )
    agreement_version_publish(acting_user=cast.admin, version=v1)
    v2 = agreement_amend(acting_user=cast.admin, agreement=v1.agreement)
    invitation, token = invitation_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        email="invitee@example.org",
        role=Role.APPROVER,
        institution=cast.hospital_a,
    )
    return Scene(
        cast=cast,
        agreement=v1.agreement,
        v1=v1,
        v2=v2,
        membership=Membership.objects.get(user=cast.researcher),
        invitation=invitation,
        token=token,
    )


# kwargs builders: scene -> URL kwargs.
def consortium(s):
    return {"slug": s.cast.consortium.slug}


def hospital_a(s):
    return {**consortium(s), "inst_slug": s.cast.hospital_a.slug}


def membership(s):
    return {**consortium(s), "pk": s.membership.pk}


def invitation(s):
    return {**consortium(s), "pk": s.invitation.pk}


def token(s):
    return {"token": s.token}


def agreement(s):
    return {**consortium(s), "pk": s.agreement.pk}


def v1(s):
    return {**agreement(s), "number": 1}


def v2(s):
    return {**agreement(s), "number": 2}


# POST data builders: (scene, persona) -> form data that succeeds for an allowed persona.
def institution_data(s, who):
    return {"name": "Hospital A", "country": "FR", "worker_public_key": ""}


def new_institution_data(s, who):
    return {"name": "Clinic C"}


def invite_data(s, who):
    return {"email": "new@example.org", "role": "approver", "institution": s.cast.hospital_a.pk}


def role_data(s, who):
    return {"role": "data_steward"}


def terms_data(s, who):
    today = timezone.localdate()
    return {
        "title": "DUA 2",
        "purpose": "Segment.",
        "permitted_model_families": ["unet"],
        "max_shared_fraction": "0.3",
        "required_dp_mechanism": "dp_sgd",
        "epsilon_cap": "4",
        "delta": "0.00001",
        "valid_from": today.isoformat(),
        "valid_until": (today + dt.timedelta(days=9)).isoformat(),
        "text": "Text.",
    }


def sign_data(s, who):
    user = getattr(s.cast, who, None) or s.cast.approver
    return {
        "institution": s.cast.hospital_a.pk,
        "typed_name": user.get_full_name(),
        "confirmed": "on",
        "expected_digest": s.v1.content_digest,
    }


def withdraw_data(s, who):
    return {"institution": s.cast.hospital_a.pk, "reason": "The ethics board said no."}


# (url name, kwargs builder, method, personas allowed, status when allowed, POST data)
ROUTES = [
    ("consortium-detail", consortium, "get", MEMBERS, 200, None),
    ("institution-create", consortium, "get", ADMIN, 200, None),
    ("institution-create", consortium, "post", ADMIN, 302, new_institution_data),
    ("institution-detail", hospital_a, "get", MEMBERS, 200, None),
    ("institution-edit", hospital_a, "get", INSTITUTION_KEEPERS, 200, None),
    ("institution-edit", hospital_a, "post", INSTITUTION_KEEPERS, 302, institution_data),
    ("member-list", consortium, "get", MEMBERS, 200, None),
    ("member-invite", consortium, "get", MEMBER_MANAGERS, 200, None),
    ("member-invite", consortium, "post", MEMBER_MANAGERS, 302, invite_data),
    ("membership-role", membership, "post", MEMBER_MANAGERS, 302, role_data),
    ("membership-role", membership, "get", MEMBER_MANAGERS, 405, None),
    ("membership-remove", membership, "get", MEMBER_MANAGERS, 200, None),
    ("membership-remove", membership, "post", MEMBER_MANAGERS, 302, None),
    ("invitation-revoke", invitation, "post", MEMBER_MANAGERS, 302, None),
    ("agreement-list", consortium, "get", MEMBERS, 200, None),
    ("agreement-create", consortium, "get", ADMIN, 200, None),
    ("agreement-create", consortium, "post", ADMIN, 302, terms_data),
    ("agreement-detail", agreement, "get", MEMBERS, 200, None),
    ("agreement-amend", agreement, "post", ADMIN, 302, None),
    ("agreement-amend", agreement, "get", ADMIN, 405, None),
    ("agreement-withdraw", agreement, "get", WITHDRAWERS, 200, None),
    ("agreement-withdraw", agreement, "post", WITHDRAWERS, 302, withdraw_data),
    ("version-detail", v1, "get", MEMBERS, 200, None),
    ("version-detail", v2, "get", MEMBERS, 200, None),
    ("version-edit", v2, "get", ADMIN, 200, None),
    ("version-edit", v2, "post", ADMIN, 302, terms_data),
    ("version-publish", v2, "get", ADMIN, 200, None),
    ("version-publish", v2, "post", ADMIN, 302, None),
    ("version-sign", v1, "get", APPROVERS, 200, None),
    ("version-sign", v1, "post", APPROVERS, 302, sign_data),
]


def _matrix():
    yield from permission_cases(ROUTES, PERSONAS)
    # The overview: members are sent on to their one consortium; an outsider (and the
    # operator, a superuser member of nothing) sees an empty list.
    for persona in PERSONAS:
        expected = {"anonymous": LOGIN, "outsider": 200}.get(answered_as(persona), 302)
        yield pytest.param(
            "overview", lambda s: {}, "get", persona, expected, None, id=f"get-overview-{persona}"
        )
    # An invitation link opens for anyone holding it.
    for persona in PERSONAS:
        yield pytest.param(
            "invitation-accept", token, "get", persona, 200, None, id=f"get-invitation-{persona}"
        )


@pytest.mark.parametrize(
    ("url_name", "kwargs", "method", "persona", "expected", "data"),
    list(_matrix()),
)
def test_permission_matrix(scene, url_name, kwargs, method, persona, expected, data):
    url, response = ask_page(scene, "consortium", url_name, kwargs, method, persona, data)
    assert_page_answer(response, url, method, expected)


MISSING = [
    ("consortium-detail", {"slug": "no-such-consortium"}),
    ("agreement-list", {"slug": "no-such-consortium"}),
    ("institution-detail", lambda s: {**consortium(s), "inst_slug": "no-such-site"}),
    ("institution-edit", lambda s: {**consortium(s), "inst_slug": "no-such-site"}),
    ("membership-remove", lambda s: {**consortium(s), "pk": 999_999}),
    ("agreement-detail", lambda s: {**consortium(s), "pk": 999_999}),
    ("agreement-withdraw", lambda s: {**consortium(s), "pk": 999_999}),
    ("version-detail", lambda s: {**agreement(s), "number": 99}),
    ("version-edit", lambda s: {**agreement(s), "number": 99}),
    ("version-sign", lambda s: {**agreement(s), "number": 99}),
    ("invitation-accept", {"token": "no-such-token"}),
]


@pytest.mark.parametrize(("url_name", "kwargs"), MISSING, ids=[m[0] for m in MISSING])
@pytest.mark.parametrize("persona", ["admin", "approver"])
def test_a_missing_object_is_the_same_404(scene, url_name, kwargs, persona):
    kwargs = kwargs(scene) if callable(kwargs) else kwargs
    response = scene.cast.client_for(persona).get(reverse(f"consortium:{url_name}", kwargs=kwargs))
    assert response.status_code == 404


@pytest.mark.parametrize(
    "action", ["membership-role", "membership-remove", "invitation-revoke", "agreement-amend"]
)
def test_posting_to_a_missing_object_is_404(scene, action):
    kwargs = {**consortium(scene), "pk": 999_999}
    response = scene.cast.client_for("admin").post(reverse(f"consortium:{action}", kwargs=kwargs))
    assert response.status_code == 404


def test_forbidden_and_missing_pages_are_indistinguishable(scene):
    """Same status and same body: nothing tells a probe that the id exists."""
    client = scene.cast.client_for("other_member")
    forbidden = client.get(reverse("consortium:institution-edit", kwargs=hospital_a(scene)))
    missing = client.get(
        reverse("consortium:institution-edit", kwargs={**consortium(scene), "inst_slug": "nothing"})
    )
    assert same_404_page(forbidden, missing)
    assert b"does not exist, or is not yours to see" in forbidden.content


def test_objects_of_another_consortium_are_404_even_for_its_admin(scene):
    """Ids are looked up inside the consortium in the URL: another consortium's
    agreement under this slug is missing, and that consortium is invisible."""
    other_admin = UserFactory(username="other_admin")
    other = consortium_create(acting_user=other_admin, name="Other Consortium")
    institution = institution_create(acting_user=other_admin, consortium=other, name="Far Hospital")
    client = scene.cast.client_for("admin")
    for name, kwargs in [
        ("consortium-detail", {"slug": other.slug}),
        ("institution-detail", {**consortium(scene), "inst_slug": institution.slug}),
        ("institution-detail", {"slug": other.slug, "inst_slug": institution.slug}),
        ("agreement-detail", {"slug": other.slug, "pk": scene.agreement.pk}),
        (
            "membership-remove",
            {**consortium(scene), "pk": Membership.objects.get(user=other_admin).pk},
        ),
    ]:
        assert client.get(reverse(f"consortium:{name}", kwargs=kwargs)).status_code == 404, name
    # Their admin cannot reach ours either.
    mine = scene.cast.client_for(None)
    mine.force_login(other_admin)
    assert (
        mine.get(reverse("consortium:agreement-detail", kwargs=agreement(scene))).status_code == 404
    )


def test_overview_lists_only_the_users_consortia(scene):
    cast = scene.cast
    outsider = cast.client_for("outsider").get(reverse("consortium:overview"))
    assert outsider.status_code == 200
    assert list(outsider.context["consortia"]) == []
    assert cast.consortium.name not in outsider.content.decode()

    second = consortium_create(acting_user=cast.approver, name="Second Consortium")
    consortium_create(acting_user=UserFactory(), name="Hidden Consortium")
    response = cast.client_for("approver").get(reverse("consortium:overview"))
    assert response.status_code == 200
    assert {c.slug for c in response.context["consortia"]} == {cast.consortium.slug, second.slug}
    assert "Hidden Consortium" not in response.content.decode()


def test_pages_list_only_what_the_user_may_act_on(scene):
    url = reverse("consortium:member-list", kwargs=consortium(scene))
    inst_admin = scene.cast.client_for("inst_admin").get(url)
    manageable = {
        r["membership"].user.username for r in inst_admin.context["rows"] if r["can_manage"]
    }
    assert manageable == {"approver", "steward", "inst_admin", "researcher"}
    approver = scene.cast.client_for("approver").get(url)
    assert not any(r["can_manage"] for r in approver.context["rows"])
    assert approver.context["invitations"] == []


def test_a_view_without_a_declared_permission_fails_loudly():
    class Forgetful(GovernancePage):
        template_name = "base.html"

    class Typo(PermissionRequiredMixin, TemplateView):
        permission_required = "consortium.view_consortum"

    class NoObject(GovernancePage):
        permission_required = "consortium.view_consortium"

    for view in (Forgetful, Typo):
        with pytest.raises(ImproperlyConfigured):
            view.as_view()
    # Declaring a permission without saying which object it applies to fails on use.
    with pytest.raises(ImproperlyConfigured):
        NoObject().get_permission_object()
