"""The demo consortium: four hospitals, one user per role, a published data-use agreement
signed by every hospital's approver, and the data sets each hospital offers (descriptions
only; the records stay on site).

Everything goes through the services, so the ledger records the seeding like any other
governance work. Seeding again changes nothing.
"""

from __future__ import annotations

import datetime as dt

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from consortium.governance.models import Consortium, Role
from consortium.governance.selectors import current_version
from consortium.governance.services.agreements import (
    agreement_create,
    agreement_sign,
    agreement_version_publish,
)
from consortium.governance.services.institutions import consortium_create, institution_create
from consortium.governance.services.members import membership_grant
from training.jobs.datasets import dataset_register
from training.models import SiteDataset

DEMO_SLUG = "demo"
HOSPITALS = [
    ("St Thomas' Teaching Hospital", "st-thomas", "GB"),
    ("King's Regional Medical Centre", "kings-regional", "GB"),
    ("Maudsley Neuroscience Institute", "maudsley", "GB"),
    ("Barts Cancer Centre", "barts", "GB"),
]
SITE_SLUGS = [slug for _name, slug, _country in HOSPITALS]
# The bundled demo data sets, split unequally across the four sites (non-IID);
# the record counts are those training.fl.data gives each site (20% of every set
# is the consortium's validation set, evaluated centrally).
DATASETS = [
    {
        "key": "breast-cancer",
        "description": "Breast mass fine-needle aspirates: 30 nuclear features per case, "
        "benign or malignant (the Wisconsin diagnostic set, this site's share).",
        "modality": "tabular",
        "input_shape": [30],
        "n_classes": 2,
        "records": [159, 123, 96, 77],
    },
    {
        "key": "digits",
        "description": "8x8 grey-level scans of handwritten digits, flattened to 64 "
        "features (a stand-in for small image-derived feature sets).",
        "modality": "tabular",
        "input_shape": [64],
        "n_classes": 10,
        "records": [503, 388, 302, 244],
    },
    {
        "key": "lesions",
        "description": "Generated 32x32 scans with one to three bright lesions and their "
        "masks, for lesion segmentation scored by Dice.",
        "modality": "segmentation",
        "input_shape": [1, 32, 32],
        "n_classes": 2,
        "records": [140, 108, 84, 68],
    },
]
AGREEMENT_TEXT = """\
1. Purpose. The parties train shared models for tumour classification and lesion
segmentation. Patient data stays at each site; only model updates leave it, after
the site's privacy pipeline.
2. Privacy. No site shares more than the agreed fraction of a model per round, and
every update carries the required differential-privacy mechanism. Each site's
privacy budget is accounted at the agreed delta and may not exceed its cap.
3. Accountability. Every contribution is recorded in the consortium's ledger, and
auditors may export contribution reports at any time.
4. Withdrawal. A site may withdraw its consent at any time, with a reason; it then
takes part in no future job.
"""


def _user(username: str, full_name: str, password: str):
    User = get_user_model()
    first, _, last = full_name.partition(" ")
    user, created = User.objects.get_or_create(
        username=username,
        defaults={"email": f"{username}@demo.example", "first_name": first, "last_name": last},
    )
    if created:
        user.set_password(password)
        user.save(update_fields=["password"])
    return user


def _member(admin, user, consortium, role, institution=None) -> None:
    # Seeding stands in for accepted invitations.
    membership_grant(
        acting_user=admin,
        user=user,
        consortium=consortium,
        role=role,
        institution=institution,
        via="seed_demo",
    )


@transaction.atomic
def seed_demo_consortium(*, password: str) -> list[tuple[str, str]]:
    """Create what is missing of the demo consortium, in one transaction; returns the logins
    as ``(username, what the user is)``."""
    # The consortium's administrator holds its right through a membership (consortium_create
    # makes it), not as a superuser: a superuser acts for no consortium or institution
    # (consortium.core.access). A database seeded before this rule had it a superuser: undone.
    admin = _user("admin", "Alex Morgan", password)
    if admin.is_staff or admin.is_superuser:
        admin.is_staff = admin.is_superuser = False
        admin.save(update_fields=["is_staff", "is_superuser"])
    logins = [("admin", "consortium administrator (a membership, not a superuser)")]
    # The installation's operator: a superuser, member of nothing (the Django admin, /metrics,
    # starting a consortium); it sees none of the demo consortium.
    operator = _user("operator", "Olive Operator", password)
    if not (operator.is_staff and operator.is_superuser):
        operator.is_staff = operator.is_superuser = True
        operator.save(update_fields=["is_staff", "is_superuser"])
    logins.append(("operator", "the operator: superuser (Django admin), member of nothing"))

    consortium = Consortium.objects.filter(slug=DEMO_SLUG).first()
    if consortium is None:
        consortium = consortium_create(
            acting_user=admin,
            name="London Federated Oncology Consortium",
            slug=DEMO_SLUG,
            description="Four hospitals training tumour models together without pooling data.",
        )
    # Signed in but a member of nothing: shows that a stranger to the consortium sees none
    # of it (every page and socket answers "not found").
    _user("visitor", "Casey Visitor", password)
    auditor = _user("auditor", "Sam Patel", password)
    _member(admin, auditor, consortium, Role.AUDITOR)
    logins.append(("auditor", "auditor"))
    logins.append(("visitor", "signed in, member of nothing (sees nothing)"))

    institutions = []
    for index, (name, slug, country) in enumerate(HOSPITALS):
        institution = consortium.institutions.filter(slug=slug).first()
        if institution is None:
            institution = institution_create(
                acting_user=admin, consortium=consortium, name=name, slug=slug, country=country
            )
        institutions.append(institution)
        approver = _user(f"approver-{slug}", f"Approver {name.split()[0]}", password)
        _member(admin, approver, consortium, Role.APPROVER, institution)
        logins.append((approver.username, f"approver, {name}"))
        steward = _user(f"steward-{slug}", f"Steward {name.split()[0]}", password)
        _member(admin, steward, consortium, Role.DATA_STEWARD, institution)
        logins.append((steward.username, f"data steward, {name}"))
        if index == 0:
            inst_admin = _user(f"itadmin-{slug}", "Jordan Lee", password)
            _member(admin, inst_admin, consortium, Role.INSTITUTION_ADMIN, institution)
            logins.append((inst_admin.username, f"institution administrator, {name}"))
            researcher = _user("researcher", "Riley Chen", password)
            _member(admin, researcher, consortium, Role.RESEARCHER, institution)
            logins.append(("researcher", f"researcher, {name}"))
        for dataset in DATASETS:
            if SiteDataset.objects.filter(institution=institution, key=dataset["key"]).exists():
                continue
            dataset_register(
                acting_user=steward,
                institution=institution,
                key=dataset["key"],
                description=dataset["description"],
                modality=dataset["modality"],
                num_records=dataset["records"][index],
                input_shape=dataset["input_shape"],
                n_classes=dataset["n_classes"],
            )

    agreement = consortium.agreements.first()
    if agreement is None:
        today = timezone.localdate()
        version = agreement_create(
            acting_user=admin,
            consortium=consortium,
            title="Oncology data-use agreement",
            purpose="Tumour classification and lesion segmentation research.",
            permitted_model_families=["linear", "mlp", "cnn", "unet"],
            max_shared_fraction="0.4",
            required_dp_mechanism="dp_sgd",
            epsilon_cap="8",
            delta="0.00001",
            valid_from=today - dt.timedelta(days=1),
            valid_until=today + dt.timedelta(days=730),
            text=AGREEMENT_TEXT,
        )
        agreement = version.agreement
        agreement_version_publish(acting_user=admin, version=version)
    version = current_version(agreement)
    signed = set(version.signatures.values_list("institution_id", flat=True))
    for institution in institutions:
        if institution.pk in signed:
            continue
        approver = get_user_model().objects.get(username=f"approver-{institution.slug}")
        agreement_sign(
            acting_user=approver,
            version=version,
            institution=institution,
            typed_name=approver.get_full_name(),
            confirmed=True,
            expected_digest=version.content_digest,
        )
    return logins
