"""What the training-API tests arrange (tests/jobs/test_api_training*.py): an agreement in
force with a data set at each hospital, a compliant logistic-regression spec, a proposal, and
an approver's decision as the API takes it.

They differ on purpose from tests/support/training_fixtures.py: the spec here trains logistic
regression under noise 3 for 10 rounds (each site spends ε ≈ 5.02 of its cap of 8: two such
jobs fit, three do not; ``make_spec``: an MLP, noise 5, ε ≈ 2.81), and the agreement is titled
"DUA" and permits every purpose.
"""

from __future__ import annotations

from tests.support.agreements import agreement_in_force
from tests.support.training_fixtures import DATASET_KEY
from training.jobs.datasets import dataset_register
from training.jobs.proposals import job_propose
from training.models import TrainingJob

#: The data set each hospital offers (``dataset_register`` keywords).
DATASET = dict(
    key=DATASET_KEY,
    description="Tumour features from biopsies, 2015-2023.",
    modality="tabular",
    num_records=1000,
    input_shape=[30],
    n_classes=2,
)
GAUSSIAN = {"filter": "gaussian_noise", "noise_multiplier": 3.0, "clip_norm": 1.0}


def logistic_spec(**overrides) -> dict:
    """A compliant spec: each site spends ε ≈ 5.02 of its cap of 8 (two fit, three do not)."""
    spec = {
        "purpose": "classification",
        "participants": ["hospital-a", "hospital-b"],
        "dataset_key": DATASET_KEY,
        "model": {"name": "logistic_regression"},
        "rounds": 10,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "privacy_pipeline": [{"filter": "partial_sharing", "fraction": 0.4}, GAUSSIAN],
    }
    spec.update(overrides)
    return spec


def agreement_and_datasets_in_force(cast):
    """A published agreement ("DUA", every purpose permitted) signed by both hospitals, and
    the data set each offers (registered by hospital A's steward and by the admin)."""
    version = agreement_in_force(cast, title="DUA", permitted_purposes=None)
    dataset_register(acting_user=cast.steward, institution=cast.hospital_a, **DATASET)
    dataset_register(acting_user=cast.admin, institution=cast.hospital_b, **DATASET)
    return version


def propose_logistic(cast, user=None, **spec_overrides) -> TrainingJob:
    """The researcher (or ``user``) proposes :func:`logistic_spec` through the service."""
    return job_propose(
        acting_user=user or cast.researcher,
        consortium=cast.consortium,
        title="Tumour classifier",
        spec=logistic_spec(**spec_overrides),
    )


def decide_body(job, institution, decision="approved", reason=""):
    """The body of ``POST /api/jobs/<id>/decide/`` on what the job is now."""
    return {
        "institution": institution.slug,
        "decision": decision,
        "reason": reason,
        "spec_digest": job.spec_digest,
        "agreement_version": job.agreement_version_id,
    }
