"""Writes for the data sets a site offers: register, update and remove the description of
a data set (never the records, which stay on site). Each write is a ledger entry in the same
transaction.
"""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry
from consortium.core.errors import ConflictError
from consortium.governance.models import Institution
from training.models import TERMINAL_STATES, JobParticipant, Modality, SiteDataset


def _clean_dataset(
    *, key, description, modality, num_records, input_shape, n_classes, schema
) -> dict:
    errors: dict[str, str] = {}
    key = (key or "").strip()
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", key):
        errors["key"] = (
            "Use 1 to 64 lower-case letters, digits, '.', '_' or '-', starting with a letter "
            "or digit."
        )
    if not (description or "").strip():
        errors["description"] = "Describe the data set (what it holds, how it was collected)."
    if modality not in Modality.values:
        errors["modality"] = f"Choose one of {', '.join(Modality.values)}."
    if not isinstance(num_records, int) or isinstance(num_records, bool) or num_records < 1:
        errors["num_records"] = "The number of records must be a whole number of at least 1."
    shape_ok = (
        isinstance(input_shape, list)
        and input_shape
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)
    )
    if not shape_ok:
        errors["input_shape"] = "Give the shape of one input as positive whole numbers, e.g. [30]."
    elif modality == Modality.TABULAR and len(input_shape) != 1:
        errors["input_shape"] = "Tabular records have a shape of one number: [features]."
    elif modality in (Modality.IMAGE, Modality.SEGMENTATION) and len(input_shape) != 3:
        errors["input_shape"] = "Images have a shape of three numbers: [channels, height, width]."
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 2:
        errors["n_classes"] = "There must be at least two classes."
    if schema is not None and not isinstance(schema, dict):
        errors["schema"] = "The schema must be a JSON object."
    if errors:
        raise ValidationError(errors)
    return {
        "key": key,
        "description": description.strip(),
        "modality": modality,
        "num_records": num_records,
        "input_shape": input_shape,
        "n_classes": n_classes,
        "schema": schema or {},
    }


def dataset_register(*, acting_user, institution: Institution, **fields) -> SiteDataset:
    """Register the description of a data set the site offers (never the data)."""
    data = _clean_dataset(**{**{"schema": None}, **fields})
    if SiteDataset.objects.filter(institution=institution, key=data["key"]).exists():
        raise ConflictError(
            f"{institution} already offers a data set with the key '{data['key']}'."
        )
    with transaction.atomic():
        dataset = SiteDataset.objects.create(
            institution=institution, created_by=acting_user, **data
        )
        append_entry(
            event=ledger_events.DATASET_REGISTERED,
            actor=acting_user,
            subject=dataset,
            consortium_slug=institution.consortium.slug,
            institution_slug=institution.slug,
            payload={k: v for k, v in data.items() if k != "description"},
        )
    return dataset


def dataset_update(*, acting_user, dataset: SiteDataset, **fields) -> SiteDataset:
    """Change a data set's description. The key is fixed: jobs name it."""
    current = {
        "key": dataset.key,
        "description": dataset.description,
        "modality": dataset.modality,
        "num_records": dataset.num_records,
        "input_shape": dataset.input_shape,
        "n_classes": dataset.n_classes,
        "schema": dataset.schema,
    }
    fields.pop("key", None)
    data = _clean_dataset(**{**current, **{k: v for k, v in fields.items() if v is not None}})
    changed = [k for k in data if data[k] != current[k]]
    if not changed:
        return dataset
    with transaction.atomic():
        for name in changed:
            setattr(dataset, name, data[name])
        dataset.updated_at = timezone.now()
        dataset.save(update_fields=[*changed, "updated_at"])
        append_entry(
            event=ledger_events.DATASET_UPDATED,
            actor=acting_user,
            subject=dataset,
            consortium_slug=dataset.institution.consortium.slug,
            institution_slug=dataset.institution.slug,
            payload={"key": dataset.key, "changed": {k: data[k] for k in changed}},
        )
    return dataset


def dataset_remove(*, acting_user, dataset: SiteDataset) -> None:
    """Withdraw an offer. Refused while an unfinished job relies on it."""
    busy = JobParticipant.objects.filter(
        institution=dataset.institution, status=JobParticipant.Status.ACTIVE
    ).exclude(job__state__in=TERMINAL_STATES)
    for participant in busy.select_related("job"):
        if participant.job.spec.get("dataset_key") == dataset.key:
            raise ConflictError(
                f"Job #{participant.job.pk} ({participant.job.title}) uses '{dataset.key}': "
                "cancel it or wait until it ends."
            )
    with transaction.atomic():
        append_entry(
            event=ledger_events.DATASET_REMOVED,
            actor=acting_user,
            subject=dataset,
            consortium_slug=dataset.institution.consortium.slug,
            institution_slug=dataset.institution.slug,
            payload={"key": dataset.key},
        )
        dataset.delete()
