"""Shared arrangements for training tests: data sets at each institution, a valid job
spec, and the scene that puts them under an agreement in force (the agreement itself and its
TERMS: tests/support/agreements.py).

Everything here goes through the services, so the ledger stays a true record
and ``audit.ledger.chain.verify_chain()`` holds afterwards. Plain functions take the
``cast`` (tests/conftest.py); the ``scene`` fixture combines them::

    from tests.support.training_fixtures import make_scene

    @pytest.fixture
    def scene(cast):
        return make_scene(cast)

    def test_something(scene):
        job = scene.propose(rounds=5)
        scene.decide(job, scene.cast.hospital_a)

Budget arithmetic worth knowing (δ = 1e-5, Gaussian noise, the TERMS cap ε 8):
noise multiplier 5 for 10 rounds costs ε ≈ 2.81 (two such jobs together ≈ 4.16,
so they fit); noise 3 for 20 rounds costs ε ≈ 7.53 (two together ≈ 11.44, so
only one fits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.support.agreements import agreement_in_force, signers

DATASET_KEY = "tumours"

#: Noise and rounds with known costs (see the module docstring).
CHEAP = {"noise_multiplier": 5.0, "rounds": 10}  # ε ≈ 2.81
COSTLY = {"noise_multiplier": 3.0, "rounds": 20}  # ε ≈ 7.53: one fits the cap, two do not


def pipeline(*, noise_multiplier: float = 5.0, fraction: float | None = 0.4, clip_norm=1.0):
    """A privacy pipeline that meets TERMS' floor: partial sharing, then Gaussian noise."""
    filters = []
    if fraction is not None:
        filters.append({"filter": "partial_sharing", "fraction": fraction})
    if noise_multiplier is not None:
        filters.append(
            {
                "filter": "gaussian_noise",
                "noise_multiplier": noise_multiplier,
                "clip_norm": clip_norm,
            }
        )
    return filters


def make_spec(
    *,
    participants=("hospital-a", "hospital-b"),
    noise_multiplier: float = 5.0,
    rounds: int = 10,
    **overrides,
) -> dict:
    """A spec that complies with TERMS when both hospitals offer DATASET_KEY.

    ``overrides`` replace top-level fields (``privacy_pipeline``, ``model``, ...).
    """
    spec = {
        "purpose": "classification",
        "participants": list(participants),
        "dataset_key": DATASET_KEY,
        "model": {"name": "mlp", "params": {"hidden_sizes": [16]}},
        "rounds": rounds,
        "local_epochs": 1,
        "batch_size": 32,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "privacy_pipeline": pipeline(noise_multiplier=noise_multiplier),
        "approval_ttl_hours": 48,
    }
    spec.update(overrides)
    return spec


def offer_dataset(
    cast,
    institution,
    *,
    key: str = DATASET_KEY,
    modality: str = "tabular",
    num_records: int = 1000,
    input_shape=(30,),
    n_classes: int = 2,
):
    """``institution`` offers a data set (registered through the service, as a steward would)."""
    from training.jobs.datasets import dataset_register

    return dataset_register(
        acting_user=cast.admin,
        institution=institution,
        key=key,
        description=f"{key} at {institution.name}",
        modality=modality,
        num_records=num_records,
        input_shape=list(input_shape),
        n_classes=n_classes,
    )


def offer_datasets(cast, institutions=None, **kwargs) -> list:
    institutions = institutions or [inst for _user, inst in signers(cast)]
    return [offer_dataset(cast, institution, **kwargs) for institution in institutions]


@dataclass
class TrainingScene:
    """A consortium ready for training: agreement in force, data sets at each hospital."""

    cast: object
    version: object
    datasets: list = field(default_factory=list)

    def propose(self, *, user=None, title: str = "Tumour classifier", **spec_overrides):
        from training.jobs.proposals import job_propose

        return job_propose(
            acting_user=user or self.cast.researcher,
            consortium=self.cast.consortium,
            title=title,
            spec=make_spec(**spec_overrides),
        )

    def approver_of(self, institution):
        return dict((inst.pk, user) for user, inst in signers(self.cast))[institution.pk]

    def decide(self, job, institution, decision: str = "approved", reason: str = "", **kw):
        """The institution's approver decides on what the job is now (digest, version)."""
        from training.jobs.approvals import approval_decide

        job.refresh_from_db()
        return approval_decide(
            acting_user=kw.pop("user", None) or self.approver_of(institution),
            job=job,
            institution=institution,
            decision=decision,
            reason=reason,
            spec_digest=kw.pop("spec_digest", job.spec_digest),
            agreement_version_id=kw.pop("agreement_version_id", job.agreement_version_id),
        )


def make_scene(cast, **terms) -> TrainingScene:
    """Every institution of the cast has signed TERMS (with ``terms`` changed) and
    offers a tabular ``tumours`` data set."""
    version = agreement_in_force(cast, **terms)
    return TrainingScene(cast=cast, version=version, datasets=offer_datasets(cast))


@pytest.fixture
def scene(cast) -> TrainingScene:
    """:func:`make_scene` for hospitals A and B. Import it into a test module, or
    declare ``scene`` there as ``return make_scene(cast)`` to keep linters quiet."""
    return make_scene(cast)
