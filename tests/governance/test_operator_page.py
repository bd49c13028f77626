"""The operator's page that starts a consortium (``/consortia/new/``) and the overview's link
to it: only a superuser reaches either; everyone else gets the same 404 as for a missing page.
"""

from __future__ import annotations

import json
import re

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from audit.ledger import events as ledger_events
from audit.models import LedgerEntry
from consortium.core.errors import ServiceError
from consortium.governance.models import Consortium, Invitation, Membership, Role
from consortium.governance.permissions import is_operator
from consortium.governance.services.bootstrap import consortium_start
from tests.support.ledger_checks import ledger_records
from tests.web.test_accessibility import unlabelled

pytestmark = pytest.mark.django_db

User = get_user_model()
START = "/consortia/new/"


@pytest.fixture
def operator(db):
    return User.objects.create_superuser("operator", "ops@example.org", "x")


def test_the_page_is_at_consortia_new():
    assert reverse("consortium:consortium-start") == START


@pytest.mark.parametrize(
    "who", ["outsider", "other_member", "approver", "steward", "inst_admin", "auditor", "admin"]
)
def test_only_a_superuser_reaches_the_page(cast, who):
    client = cast.client_for(who)
    with ledger_records():
        assert client.get(START).status_code == 404
        assert client.post(START, {"name": "X", "admin_email": "x@example.org"}).status_code == 404
    assert not Consortium.objects.filter(name="X").exists()


def test_anonymous_is_sent_to_sign_in(cast):
    response = cast.client_for("anonymous").get(START)
    assert response.status_code == 302 and response.url.startswith(reverse("login"))


def test_a_deactivated_superuser_is_no_operator(operator):
    operator.is_active = False
    operator.save()
    assert not is_operator(operator)
    with ledger_records(), pytest.raises(ServiceError, match="Only a superuser"):
        consortium_start(acting_user=operator, name="X", admin_email="x@example.org")
    assert not Consortium.objects.exists()


def test_the_operator_starts_a_consortium_and_sees_the_link_once(
    client, operator, mailoutbox, django_capture_on_commit_callbacks, settings
):
    settings.SITE_URL = "https://central.example.org"
    client.force_login(operator)
    form = client.get(START)
    assert form.status_code == 200
    assert 'name="admin_email"' in form.content.decode()
    assert unlabelled(form.content.decode()) == []
    invited = (ledger_events.CONSORTIUM_CREATED, ledger_events.MEMBER_INVITED)
    with ledger_records(*invited), django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            START, {"name": "North Sea Imaging", "slug": "", "admin_email": "Lead@Example.org"}
        )
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    consortium = Consortium.objects.get(slug="north-sea-imaging")
    for entry in LedgerEntry.objects.filter(consortium_slug=consortium.slug):
        assert entry.actor_id == operator.pk
    invitation = Invitation.objects.get(consortium=consortium)
    assert (invitation.email, invitation.role) == ("lead@example.org", Role.CONSORTIUM_ADMIN)
    html = response.content.decode()
    link = re.search(r'<code id="invitation-link">([^<]+)</code>', html).group(1)
    assert link.startswith("https://central.example.org/invitations/")
    assert mailoutbox[0].to == ["lead@example.org"] and link in mailoutbox[0].body
    assert "will not be shown again" in html
    # The operator is no member of it: the consortium's own pages stay closed to them.
    assert not Membership.objects.filter(user=operator).exists()
    assert (
        client.get(reverse("consortium:consortium-detail", args=[consortium.slug])).status_code
        == 404
    )


def test_the_form_shows_service_errors_and_writes_nothing(cast, client, operator):
    client.force_login(operator)
    with ledger_records():
        taken = client.post(
            START, {"name": "Y", "slug": cast.consortium.slug, "admin_email": "y@example.org"}
        )
        reserved = client.post(START, {"name": "Y", "slug": "new", "admin_email": "y@example.org"})
        bad_email = client.post(START, {"name": "Y", "slug": "y", "admin_email": "nope"})
    assert "already exists" in str(taken.context["form"].non_field_errors())
    assert 'value="Y"' in taken.content.decode()
    assert "reserved" in str(reserved.context["form"].errors["slug"])
    assert bad_email.context["form"].errors["admin_email"]
    assert not Consortium.objects.filter(slug__in=["y", "new"]).exists()


def test_the_overview_offers_the_page_to_a_superuser_only(cast, client, operator):
    client.force_login(operator)
    page = client.get(reverse("consortium:overview")).content.decode()
    assert f'href="{START}"' in page and "Start a consortium" in page
    assert "wait" not in page and "Membership comes by invitation" not in page

    outsider = cast.client_for("outsider").get(reverse("consortium:overview")).content.decode()
    assert START not in outsider
    assert "Membership comes by invitation" in outsider


def test_the_page_and_an_existing_consortium_called_new_do_not_meet(cast, client, operator):
    # "new" is refused as a slug by the service every path goes through, so the page's URL can
    # never hide a consortium's.
    from django.core.exceptions import ValidationError

    from consortium.governance.services.institutions import consortium_create

    with pytest.raises(ValidationError, match="reserved"):
        consortium_create(acting_user=operator, name="New", slug="new")
    payloads = [json.loads(e.payload_text) for e in LedgerEntry.objects.all()]
    assert all(p.get("slug") != "new" for p in payloads)
