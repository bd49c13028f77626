"""factory-boy factories for governance objects. Objects that carry ledger
entries in real life are made through services in tests that check the ledger;
these factories are for arranging scenes quickly."""

import datetime as dt
from decimal import Decimal

import factory
from django.contrib.auth import get_user_model

from consortium.governance.models import (
    Agreement,
    AgreementVersion,
    Consortium,
    Institution,
    Membership,
    Role,
)

PASSWORD = "correct-horse-battery-staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.org")
    first_name = factory.Faker("first_name")
    last_name = factory.Faker("last_name")

    @factory.post_generation
    def password(obj, create, extracted, **kwargs):
        obj.set_password(extracted or PASSWORD)
        if create:
            obj.save()


class ConsortiumFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Consortium

    name = factory.Sequence(lambda n: f"Consortium {n}")
    slug = factory.Sequence(lambda n: f"consortium-{n}")


class InstitutionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Institution

    consortium = factory.SubFactory(ConsortiumFactory)
    name = factory.Sequence(lambda n: f"Hospital {n}")
    slug = factory.Sequence(lambda n: f"hospital-{n}")


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    consortium = factory.SubFactory(ConsortiumFactory)
    institution = None
    role = Role.CONSORTIUM_ADMIN


class AgreementFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Agreement

    consortium = factory.SubFactory(ConsortiumFactory)
    title = factory.Sequence(lambda n: f"Data-use agreement {n}")


class AgreementVersionFactory(factory.django.DjangoModelFactory):
    """A draft version; publish it with ``services.agreement_version_publish``."""

    class Meta:
        model = AgreementVersion

    agreement = factory.SubFactory(AgreementFactory)
    number = 1
    purpose = "Train a tumour classifier on tabular features."
    permitted_model_families = ["linear", "mlp"]
    max_shared_fraction = Decimal("0.4")
    required_dp_mechanism = "gaussian"
    epsilon_cap = Decimal("8")
    delta = Decimal("0.00001")
    valid_from = factory.LazyFunction(lambda: dt.date.today() - dt.timedelta(days=30))
    valid_until = factory.LazyFunction(lambda: dt.date.today() + dt.timedelta(days=365))
    text = "The parties agree to share model updates only, never patient data."
