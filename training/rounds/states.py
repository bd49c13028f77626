"""Model states on the central side: the model of a job, its initial weights, and states and
updates as stored in the artifact store.

One definition, for the coordinator (``training.rounds.coordinator``, which builds, aggregates
and evaluates round models) and the contribution scorer (``training.rounds.contributions``,
which rebuilds coalitions of a round's updates): how a job's model is built from its spec and
data set, how a model state is read and written (the engine's pickle-free tensor container,
content-addressed in ``training.rounds.artifacts``), and how an update is read (its wire
format: ``training.fl.update``).

torch is imported inside the functions that need it, not to dodge an import loop: a process
that imports this module (the web process, through the Celery tasks it may queue) and never
builds a model never pays for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consortium.core.prepared import PreparedQuery
from training.fl.update import unpack_update
from training.jobs.registry import model_registry
from training.models import JobParticipant, SiteDataset, TrainingJob
from training.rounds.artifacts import artifact_store

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "build_model",
    "class_path",
    "dataset_of",
    "initial_seed",
    "initial_state",
    "load_state",
    "load_update",
    "store_state",
]


# Read in every close; compiled once per connection (consortium.core.prepared).
_FIRST_PARTICIPANT_DATASET = PreparedQuery(
    lambda job_id, key: SiteDataset.objects.filter(
        institution_id__in=JobParticipant.objects.filter(job_id=job_id).values("institution_id"),
        key=key,
    ).order_by("institution__slug", "pk")[:1],
    job_id=int,
    key=str,
)


def dataset_of(job: TrainingJob, spec: dict) -> SiteDataset:
    """One participant's description of the job's data set: every participant's has the same
    shape and classes (checked when the job was proposed)."""
    found = _FIRST_PARTICIPANT_DATASET.all(job_id=job.pk, key=str(spec["dataset_key"]))
    dataset = found[0] if found else None
    if dataset is None:
        raise ValueError(f"no participant offers the data set '{spec['dataset_key']}' any more")
    return dataset


def class_path(spec: dict) -> str:
    """The dotted path of the class of the job's model (from the model registry)."""
    return model_registry()[spec["model"]["name"]].class_path


def build_model(spec: dict, dataset: SiteDataset) -> nn.Module:
    """A fresh module of the job's model for its data set's shape and classes."""
    from training.fl.models import build_model as build  # lazy torch: see the module docstring

    return build(
        class_path(spec),
        input_shape=list(dataset.input_shape),
        n_classes=dataset.n_classes,
        params=spec["model"].get("params") or {},
    )


def initial_seed(job: TrainingJob) -> int:
    """The seed of the job's initial weights: fixed per job and reproducible from its spec
    digest (which the ledger holds)."""
    return int(job.spec_digest[:15], 16)


def initial_state(spec: dict, dataset: SiteDataset, seed: int) -> dict[str, torch.Tensor]:
    """The job's initial model state (round 0), built with ``seed`` without touching the
    process's global random state."""
    # Lazy torch: see the module docstring.
    import torch

    from training.fl.serialization import state_to_cpu_float

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec, dataset)
    return state_to_cpu_float(model.state_dict())


def load_state(digest: str) -> dict[str, torch.Tensor]:
    """The model state stored under ``digest``."""
    from training.fl.serialization import unpack_tensors  # lazy torch: see the module docstring

    return unpack_tensors(artifact_store().get(digest))


def store_state(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """Store a model state; returns its digest and size in bytes."""
    from training.fl.serialization import pack_tensors  # lazy torch: see the module docstring

    data = pack_tensors(state)
    return artifact_store().put(data), len(data)


def load_update(digest: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(delta, mask)`` of the update stored under ``digest`` (``mask`` empty when the site
    shared its whole update)."""
    return unpack_update(artifact_store().get(digest))
