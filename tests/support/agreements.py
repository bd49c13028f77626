"""Data-use agreements for tests: the terms every training test starts from, publishing,
signing, amending, and a third institution that signs too.

Everything goes through the governance services, so the ledger stays a true record and
``audit.ledger.chain.verify_chain()`` holds afterwards. The functions take the ``cast``
(tests/conftest.py).
"""

from __future__ import annotations

import datetime as dt

from consortium.governance.models import Role
from consortium.governance.services.agreements import (
    agreement_amend,
    agreement_create,
    agreement_sign,
    agreement_version_publish,
    agreement_version_update,
)
from consortium.governance.services.institutions import institution_create
from tests.support.factories import MembershipFactory, UserFactory

#: Agreement terms every training test starts from (tabular classification, at
#: most 40% shared, Gaussian noise required, ε cap 8 at δ 1e-5).
TERMS = dict(
    purpose="Train a tumour classifier on tabular features.",
    permitted_purposes=["classification"],
    permitted_model_families=["linear", "mlp"],
    max_shared_fraction="0.4",
    required_dp_mechanism="gaussian",
    epsilon_cap="8",
    delta="0.00001",
    valid_from=dt.date.today() - dt.timedelta(days=1),
    valid_until=dt.date.today() + dt.timedelta(days=365),
    text="The parties share model updates only, never patient data.",
)


def publish_agreement(cast, *, title: str = "Data-use agreement", **overrides):
    """Draft and publish version 1 of an agreement (nobody has signed it yet).

    ``overrides`` replace terms of TERMS; a term set to None is left to the service's
    default (``permitted_purposes=None``: every purpose, as older clients send it)."""
    version = agreement_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        title=title,
        **{**TERMS, **overrides},
    )
    return agreement_version_publish(acting_user=cast.admin, version=version)


def sign(version, user, institution):
    """``user`` (an approver of ``institution``) signs ``version``."""
    return agreement_sign(
        acting_user=user,
        version=version,
        institution=institution,
        typed_name=user.get_full_name() or user.get_username(),
        confirmed=True,
        expected_digest=version.content_digest,
    )


def signers(cast) -> list[tuple]:
    """(approver, institution) for every institution of the consortium that has an
    approver (hospital C too, once :func:`add_institution` made it)."""
    pairs = [(cast.approver, cast.hospital_a), (cast.approver_b, cast.hospital_b)]
    pairs.extend(getattr(cast, "extra_signers", []))
    return pairs


def sign_all(cast, version):
    for user, institution in signers(cast):
        sign(version, user, institution)
    return version


def agreement_in_force(cast, **overrides):
    """An agreement published and signed by every institution: in force today.

    ``overrides`` go to :func:`publish_agreement` (``title`` and terms)."""
    return sign_all(cast, publish_agreement(cast, **overrides))


def amend(cast, version, *, sign_by_all: bool = True, **changes):
    """Publish an amendment of ``version``'s agreement (with ``changes`` to its terms);
    sign it by everyone unless ``sign_by_all`` is False."""
    draft = agreement_amend(acting_user=cast.admin, agreement=version.agreement)
    if changes:
        agreement_version_update(acting_user=cast.admin, version=draft, **changes)
    new = agreement_version_publish(acting_user=cast.admin, version=draft)
    if sign_by_all:
        sign_all(cast, new)
    return new


def add_institution(cast, name: str = "Hospital C"):
    """A third institution with its own approver, remembered on the cast so
    :func:`sign_all` signs for it. Call before publishing the agreement."""
    institution = institution_create(acting_user=cast.admin, consortium=cast.consortium, name=name)
    approver = UserFactory(username=f"approver_{institution.slug}")
    MembershipFactory(
        user=approver, consortium=cast.consortium, institution=institution, role=Role.APPROVER
    )
    extra = getattr(cast, "extra_signers", [])
    cast.extra_signers = [*extra, (approver, institution)]
    return institution, approver


def terms_as_first_written(version) -> dict:
    """The digested terms of a version made from :data:`TERMS`, exactly as they were written
    before any later term (``LATER_TERMS``) existed: what its digest must still be taken over."""
    return {
        "agreement_id": version.agreement_id,
        "number": version.number,
        "purpose": TERMS["purpose"],
        "permitted_purposes": ["classification"],
        "permitted_model_families": ["linear", "mlp"],
        "max_shared_fraction": "0.4",
        "required_dp_mechanism": "gaussian",
        "epsilon_cap": "8",
        "delta": "0.00001",
        "valid_from": TERMS["valid_from"].isoformat(),
        "valid_until": TERMS["valid_until"].isoformat(),
        "text": TERMS["text"],
    }
