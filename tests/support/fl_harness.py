"""Shared arrangements for the coordinator and worker tests: a consortium of three
hospitals that hold real data (the bundled breast-cancer set split across them), each
with site credentials, an Ed25519 key and a data folder, and a job over them; and an
artifact store in a folder of the test's own.

Everything goes through the services, so ``audit.ledger.chain.verify_chain()`` holds.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.agreements import add_institution, agreement_in_force
from tests.support.training_fixtures import TrainingScene, make_spec, offer_dataset
from training.fl.data import demo_split
from training.fl.signing import generate_keypair
from training.rounds.credentials import site_credential_create
from training.site.client import WorkerConfig

DATASET_KEY = "breast-cancer"


def use_artifact_folder(settings, folder: Path) -> Path:
    """Point the artifact store (``STORAGES["artifacts"]``) at ``folder`` on the file system
    for this test (``settings``: pytest-django's fixture); returns ``folder``."""
    settings.STORAGES = {
        **settings.STORAGES,
        "artifacts": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(folder)},
        },
    }
    return folder


#: Agreement terms for the engine tests: logistic regression may share the whole update
#: without noise, so the model visibly learns in a few rounds.
OPEN_TERMS = dict(
    permitted_model_families=["linear", "mlp"],
    max_shared_fraction="1",
    required_dp_mechanism="none",
)


@dataclass
class Site:
    institution: object
    token: str
    key_path: Path
    data_root: Path
    num_records: int

    @property
    def slug(self) -> str:
        return self.institution.slug

    def config(self, central_url: str = "http://testserver") -> WorkerConfig:
        return WorkerConfig(
            site_slug=self.slug,
            central_url=central_url,
            token=self.token,
            signing_key_path=self.key_path,
            data_root=self.data_root,
        )

    def env(self, central_url: str) -> dict:
        return {
            "SITE_SLUG": self.slug,
            "CENTRAL_URL": central_url,
            "SITE_TOKEN": self.token,
            "SITE_SIGNING_KEY": str(self.key_path),
            "DATA_ROOT": str(self.data_root),
        }


@dataclass
class Consortium3:
    scene: TrainingScene
    sites: list[Site] = field(default_factory=list)
    dataset_key: str = DATASET_KEY

    def site(self, slug: str) -> Site:
        return next(s for s in self.sites if s.slug == slug)

    def propose_and_approve(self, **overrides):
        """A job over the three sites, approved by all three (job_start not yet run)."""
        spec = job_spec([s.slug for s in self.sites], dataset_key=self.dataset_key, **overrides)
        from training.jobs.proposals import job_propose

        job = job_propose(
            acting_user=self.scene.cast.researcher,
            consortium=self.scene.cast.consortium,
            title="Breast cancer classifier",
            spec=spec,
        )
        for site in self.sites:
            self.scene.decide(job, site.institution)
        job.refresh_from_db()
        return job


def job_spec(participants, **overrides) -> dict:
    spec = make_spec(
        participants=participants,
        dataset_key=DATASET_KEY,
        model={"name": "logistic_regression", "params": {}},
        rounds=2,
        local_epochs=1,
        batch_size=32,
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0},
        privacy_pipeline=[],
        round_timeout_seconds=600,
    )
    spec.update(overrides)
    return spec


def write_site_csv(folder: Path, data, *, key: str = DATASET_KEY) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{key}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        features = data.x_train.shape[1]
        writer.writerow([f"f{i}" for i in range(features)] + ["label"])
        for x, y in zip(data.x_train.tolist(), data.y_train.tolist(), strict=True):
            writer.writerow([repr(v) for v in x] + [int(y)])


def make_consortium3(
    cast, tmp_path: Path, *, dataset_key: str = DATASET_KEY, **terms
) -> Consortium3:
    """Hospitals A, B and C under an agreement in force, each offering its share of the
    breast-cancer set (written as its own CSV under its data folder, as ``dataset_key``: any
    other key than the bundled one makes it a data set the consortium has no copy of) with
    credentials."""
    add_institution(cast, "Hospital C")
    version = agreement_in_force(cast, **{**OPEN_TERMS, **terms})
    institutions = [cast.hospital_a, cast.hospital_b, *[i for _u, i in cast.extra_signers]]
    split = demo_split(DATASET_KEY, [i.slug for i in institutions])
    scene = TrainingScene(cast=cast, version=version)
    out = Consortium3(scene=scene, dataset_key=dataset_key)
    for institution in institutions:
        data = split[institution.slug]
        root = tmp_path / "sites" / institution.slug
        write_site_csv(root, data, key=dataset_key)
        scene.datasets.append(
            offer_dataset(
                cast,
                institution,
                key=dataset_key,
                num_records=data.num_records,
                input_shape=(30,),
                n_classes=2,
            )
        )
        out.sites.append(
            site_with_credentials(
                cast,
                institution,
                keys=tmp_path / "keys",
                data_root=root,
                num_records=data.num_records,
            )
        )
    return out


def site_with_credentials(
    cast, institution, *, keys: Path, data_root: Path, num_records: int
) -> Site:
    """A site of ``institution`` whose data is under ``data_root``: its own Ed25519 key (0600,
    under ``keys``) and worker credentials created by the administrator."""
    private_pem, public_pem = generate_keypair()
    key_path = keys / f"{institution.slug}.pem"
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(private_pem)
    key_path.chmod(0o600)
    _credential, token = site_credential_create(
        acting_user=cast.admin, institution=institution, label="worker", public_key=public_pem
    )
    return Site(
        institution=institution,
        token=token,
        key_path=key_path,
        data_root=data_root,
        num_records=num_records,
    )
