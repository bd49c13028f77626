"""What the training pages' tests arrange, and type into the forms: the data sets a steward
registers, the data-set and job forms' data, and the spec those pages propose (the report
tests report on a job proposed with it too).

They differ on purpose from tests/support/training_fixtures.py: the data sets here are
registered by hospital A's steward with 500 records (``offer_datasets``: the admin, 1000
records), and the spec uses the job form's ``DEFAULT_PIPELINE`` for 5 rounds
(``make_spec``: partial sharing and noise 5 for 10 rounds).
"""

from __future__ import annotations

import json

from tests.support.training_fixtures import DATASET_KEY
from training.jobs.datasets import dataset_register
from training.web.forms import DEFAULT_PIPELINE

#: The agreement's title on these pages (the job page names it).
AGREEMENT_TITLE = "Tumour DUA"


def steward_registers_datasets(cast, key=DATASET_KEY):
    """Hospital A's steward registers a 500-record tabular data set ``key``
    ("Tumours at <hospital>") at hospitals A and B."""
    for institution in (cast.hospital_a, cast.hospital_b):
        dataset_register(
            acting_user=cast.steward,
            institution=institution,
            key=key,
            description=f"Tumours at {institution}",
            modality="tabular",
            num_records=500,
            input_shape=[30],
            n_classes=2,
        )


def default_pipeline_spec(cast, **overrides):
    """An MLP for 5 rounds over hospitals A and B under the job form's DEFAULT_PIPELINE;
    ``overrides`` replace top-level fields."""
    spec = {
        "purpose": "classification",
        "participants": [cast.hospital_a.slug, cast.hospital_b.slug],
        "dataset_key": DATASET_KEY,
        "model": {"name": "mlp", "params": {"hidden_sizes": [16]}},
        "rounds": 5,
        "optimizer": {"name": "sgd", "lr": 0.01},
        "privacy_pipeline": DEFAULT_PIPELINE,
    }
    spec.update(overrides)
    return spec


def dataset_data(**overrides):
    """What a steward types in the data-set form."""
    return {
        "key": DATASET_KEY,
        "description": "Tumour measurements from biopsies, 2015-2023",
        "modality": "tabular",
        "num_records": "500",
        "input_shape": "30",
        "n_classes": "2",
        "schema": '{"label": "malignant"}',
        **overrides,
    }


def job_data(cast, **overrides):
    """What a person types in the job form: a job that complies with the agreement's TERMS."""
    return {
        "title": "Tumour classifier",
        "participants": [cast.hospital_a.slug, cast.hospital_b.slug],
        "dataset_key": DATASET_KEY,
        "purpose": "classification",
        "model": "mlp",
        "model_params": '{"hidden_sizes": [16]}',
        "topology": "fedavg",
        "rounds": "5",
        "local_epochs": "1",
        "batch_size": "32",
        "optimizer": "sgd",
        "lr": "0.01",
        "momentum": "0.9",
        "momentum_restart": "on",
        "privacy_pipeline": json.dumps(DEFAULT_PIPELINE),
        "min_participants": "",
        "round_timeout_seconds": "600",
        "approval_ttl_hours": "168",
        "action": "propose",
        **overrides,
    }
