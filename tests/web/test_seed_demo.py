"""The demo seed: what `make demo` shows a new user, and safe to run twice."""

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from consortium.governance.models import Consortium, Role
from consortium.governance.selectors import agreement_status
from training.fl.data import DEMO_SITES, demo_split
from training.models import SiteDataset


@pytest.mark.django_db
def test_seed_demo_builds_a_consortium_in_force_and_is_idempotent():
    out = StringIO()
    call_command("seed_demo", stdout=out)
    consortium = Consortium.objects.get(slug="demo")
    assert consortium.institutions.count() == 4
    status = agreement_status(consortium.agreements.get())
    assert status.in_force, status.reasons
    assert len(status.signed) == 4
    assert SiteDataset.objects.filter(key="breast-cancer").count() == 4
    sizes = {
        d.institution.slug: d.num_records for d in SiteDataset.objects.filter(key="breast-cancer")
    }
    split = demo_split("breast-cancer", DEMO_SITES)
    assert sizes == {slug: part.num_records for slug, part in split.items()}
    # one user per role, with the logins printed
    roles = set(consortium.memberships.values_list("role", flat=True))
    assert roles == set(Role.values)
    text = out.getvalue()
    assert "admin" in text and "auditor" in text and "approver-barts" in text
    assert "demo-consortium-2026" in text
    assert get_user_model().objects.get(username="admin").check_password("demo-consortium-2026")

    entries = LedgerEntry.objects.count()
    call_command("seed_demo", stdout=StringIO())
    assert LedgerEntry.objects.count() == entries  # nothing new the second time
    assert Consortium.objects.count() == 1 and SiteDataset.objects.count() == 12
    assert verify_chain().ok


@pytest.mark.django_db
def test_the_demo_admin_is_a_member_and_the_operator_a_superuser_of_nothing():
    """``admin`` holds its rights through its membership, not as a superuser (a superuser acts
    for no consortium: consortium.core.access); ``operator`` runs the installation and belongs
    to nothing. A database seeded when ``admin`` was a superuser is put right on reseeding."""
    out = StringIO()
    call_command("seed_demo", stdout=out)
    User = get_user_model()
    admin, operator = User.objects.get(username="admin"), User.objects.get(username="operator")
    assert not (admin.is_superuser or admin.is_staff)
    assert list(admin.memberships.values_list("role", "institution")) == [
        (Role.CONSORTIUM_ADMIN, None)
    ]
    assert operator.is_superuser and operator.is_staff and not operator.memberships.exists()
    assert operator.check_password("demo-consortium-2026")
    assert "operator" in out.getvalue()

    User.objects.filter(username="admin").update(is_superuser=True, is_staff=True)
    call_command("seed_demo", stdout=StringIO())
    admin.refresh_from_db()
    assert not (admin.is_superuser or admin.is_staff)
