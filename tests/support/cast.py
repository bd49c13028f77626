"""The people every permission test runs as (``tests/conftest.py``'s ``cast`` fixture), and
the same consortium for tests that build it outside a fixture (the fault suite's cluster,
which outlives one test)."""

from dataclasses import dataclass
from functools import cached_property

from django.test import Client

from consortium.governance.models import Role
from consortium.governance.services.institutions import consortium_create, institution_create
from tests.support.factories import MembershipFactory, UserFactory


@dataclass
class Cast:
    consortium: object
    hospital_a: object
    hospital_b: object
    admin: object
    auditor: object
    approver: object
    approver_b: object
    steward: object
    inst_admin: object
    researcher: object
    other_member: object
    outsider: object

    # The superusers, made on first use only (the other tests' scenes stay as they were).
    @cached_property
    def superuser(self):
        """The installation's operator: a superuser (and staff), member of nothing. Answered
        everywhere inside a consortium as the outsider is (consortium.core.access)."""
        return UserFactory(username="superuser", is_superuser=True, is_staff=True)

    @cached_property
    def superuser_admin(self):
        """The consortium's administrator (a membership) who is also a superuser, as the demo's
        ``admin`` once was. Answered everywhere as the administrator is: the flag adds nothing."""
        user = UserFactory(username="superuser_admin", is_superuser=True, is_staff=True)
        MembershipFactory(user=user, consortium=self.consortium, role=Role.CONSORTIUM_ADMIN)
        return user

    def client_for(self, who: str | None) -> Client:
        """A Django test client signed in as ``who`` (a field name), or anonymous."""
        client = Client()
        if who and who != "anonymous":
            client.force_login(getattr(self, who))
        return client


def make_cast(consortium_name: str = "Test Consortium") -> Cast:
    """A consortium with hospitals A and B and one user per role, through the services."""
    admin = UserFactory(username="admin", first_name="Ada", last_name="Admin")
    consortium = consortium_create(acting_user=admin, name=consortium_name)
    hospital_a = institution_create(acting_user=admin, consortium=consortium, name="Hospital A")
    hospital_b = institution_create(acting_user=admin, consortium=consortium, name="Hospital B")

    def member(username, role, institution=None):
        user = UserFactory(username=username)
        MembershipFactory(user=user, consortium=consortium, institution=institution, role=role)
        return user

    return Cast(
        consortium=consortium,
        hospital_a=hospital_a,
        hospital_b=hospital_b,
        admin=admin,
        auditor=member("auditor", Role.AUDITOR),
        approver=member("approver", Role.APPROVER, hospital_a),
        approver_b=member("approver_b", Role.APPROVER, hospital_b),
        steward=member("steward", Role.DATA_STEWARD, hospital_a),
        inst_admin=member("inst_admin", Role.INSTITUTION_ADMIN, hospital_a),
        researcher=member("researcher", Role.RESEARCHER, hospital_a),
        other_member=member("other_member", Role.RESEARCHER, hospital_b),
        outsider=UserFactory(username="outsider"),
    )
