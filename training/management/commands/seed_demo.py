"""Create the demo consortium: four hospitals, one user per role, a published
data-use agreement signed by every hospital's approver, and the data sets each
hospital offers (descriptions only; the records stay on site).

It lives in the training app, the top layer, because it seeds across apps.

Everything goes through the services, so the ledger records the seeding like any
other governance work. Running it again changes nothing and prints the logins.
"""

from __future__ import annotations

import datetime as dt
import os

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from consortium.governance import services
from consortium.governance.models import Consortium, Role
from consortium.governance.selectors import agreement_status, current_version
from training.jobs import services as training_services
from training.models import SiteDataset

DEMO_SLUG = "demo"
HOSPITALS = [
    ("St Thomas' Teaching Hospital", "st-thomas", "GB"),
    ("King's Regional Medical Centre", "kings-regional", "GB"),
    ("Maudsley Neuroscience Institute", "maudsley", "GB"),
    ("Barts Cancer Centre", "barts", "GB"),
]
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


class Command(BaseCommand):
    help = "Create the demo consortium (idempotent) and print the demo logins."

    def add_arguments(self, parser):
        parser.add_argument(
            "--password",
            default=os.environ.get("DEMO_PASSWORD", "demo-consortium-2026"),
            help="Password for every demo user (default: demo-consortium-2026).",
        )

    def handle(self, *args, password: str, **options):
        with transaction.atomic():
            logins = self._seed(password)
        status = agreement_status(Consortium.objects.get(slug=DEMO_SLUG).agreements.first())
        self.stdout.write(self.style.SUCCESS("Demo consortium ready."))
        in_force = "yes" if status.in_force else "no: " + "; ".join(status.reasons)
        self.stdout.write(f"Agreement in force: {in_force}")
        self.stdout.write(f"Logins (password for all: {password}):")
        for username, what in logins:
            self.stdout.write(f"  {username:<26} {what}")

    def _user(self, username: str, full_name: str, password: str):
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

    def _member(self, user, consortium, role, institution=None):
        # Seeding stands in for accepted invitations.
        services.membership_grant(
            acting_user=self.admin,
            user=user,
            consortium=consortium,
            role=role,
            institution=institution,
            via="seed_demo",
        )

    def _seed(self, password: str) -> list[tuple[str, str]]:
        admin = self._user("admin", "Alex Morgan", password)
        admin.is_staff = admin.is_superuser = True
        admin.save(update_fields=["is_staff", "is_superuser"])
        self.admin = admin
        logins = [("admin", "consortium administrator (and Django admin)")]

        consortium = Consortium.objects.filter(slug=DEMO_SLUG).first()
        if consortium is None:
            consortium = services.consortium_create(
                acting_user=admin,
                name="London Federated Oncology Consortium",
                slug=DEMO_SLUG,
                description="Four hospitals training tumour models together without pooling data.",
            )
        # Signed in but a member of nothing: shows that a stranger to the consortium sees none
        # of it (every page and socket answers "not found").
        self._user("visitor", "Casey Visitor", password)
        auditor = self._user("auditor", "Sam Patel", password)
        self._member(auditor, consortium, Role.AUDITOR)
        logins.append(("auditor", "auditor"))
        logins.append(("visitor", "signed in, member of nothing (sees nothing)"))

        institutions = []
        for index, (name, slug, country) in enumerate(HOSPITALS):
            institution = consortium.institutions.filter(slug=slug).first()
            if institution is None:
                institution = services.institution_create(
                    acting_user=admin, consortium=consortium, name=name, slug=slug, country=country
                )
            institutions.append(institution)
            approver = self._user(f"approver-{slug}", f"Approver {name.split()[0]}", password)
            self._member(approver, consortium, Role.APPROVER, institution)
            logins.append((approver.username, f"approver, {name}"))
            steward = self._user(f"steward-{slug}", f"Steward {name.split()[0]}", password)
            self._member(steward, consortium, Role.DATA_STEWARD, institution)
            logins.append((steward.username, f"data steward, {name}"))
            if index == 0:
                inst_admin = self._user(f"itadmin-{slug}", "Jordan Lee", password)
                self._member(inst_admin, consortium, Role.INSTITUTION_ADMIN, institution)
                logins.append((inst_admin.username, f"institution administrator, {name}"))
                researcher = self._user("researcher", "Riley Chen", password)
                self._member(researcher, consortium, Role.RESEARCHER, institution)
                logins.append(("researcher", f"researcher, {name}"))
            for dataset in DATASETS:
                if SiteDataset.objects.filter(institution=institution, key=dataset["key"]).exists():
                    continue
                training_services.dataset_register(
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
            version = services.agreement_create(
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
            services.agreement_version_publish(acting_user=admin, version=version)
        version = current_version(agreement)
        signed = set(version.signatures.values_list("institution_id", flat=True))
        for institution in institutions:
            if institution.pk in signed:
                continue
            approver = get_user_model().objects.get(username=f"approver-{institution.slug}")
            services.agreement_sign(
                acting_user=approver,
                version=version,
                institution=institution,
                typed_name=approver.get_full_name(),
                confirmed=True,
                expected_digest=version.content_digest,
            )
        return logins
