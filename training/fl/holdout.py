"""Which of a site's own records it keeps aside to evaluate models on (no torch, no Django).

When a job evaluates at the sites (the spec's ``evaluation.where`` is ``"sites"``, see
:func:`training.jobs.spec.evaluation_settings`), each site keeps a *validation share* of its
own records: never trained on, used only to measure the models it is sent. The share is
chosen per job and site, deterministically, so that every round's training task and every
evaluation task of the job at that site split the records the same way, and a record that
was evaluated on is never trained on.

This module only counts and seeds: the central side needs the counts (a site that keeps
records aside trains on fewer, which raises DP-SGD's sampling rate, so the privacy accountant
must project with the training count), and it must not import torch. The split itself is
:func:`training.fl.data.split_holdout`.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "BUNDLED_DATASETS",
    "holdout_seed",
    "training_count",
    "validation_count",
]

#: The demo data sets shipped with the engine (:mod:`training.fl.data`); each comes with a
#: consortium validation set, so their jobs can evaluate centrally.
BUNDLED_DATASETS: tuple[str, ...] = ("breast-cancer", "digits", "lesions")


def validation_count(num_records: int, fraction: float) -> int:
    """How many of ``num_records`` records a site keeps aside: ``round(n * fraction)``, at
    least one, and never all of them (at least one record is left to train on).

    ``ValueError`` when the site has fewer than two records (nothing could be split)."""
    n = int(num_records)
    if n < 2:
        raise ValueError(
            f"a site with {n} record(s) cannot keep a validation share and still train: "
            "at least 2 records are needed"
        )
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be between 0 and 1, got {fraction!r}")
    return min(n - 1, max(1, round(n * fraction)))


def training_count(num_records: int, fraction: float) -> int:
    """How many records a site trains on once its validation share is kept aside."""
    return int(num_records) - validation_count(num_records, fraction)


def holdout_seed(spec_digest: str, site: str) -> int:
    """The seed of a site's split for a job: fixed by the approved spec's digest and the site,
    so the same job splits the same way in every round and every task."""
    text = f"{spec_digest}:holdout:{site}".encode()
    return int(hashlib.sha256(text).hexdigest()[:15], 16)
