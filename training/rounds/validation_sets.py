"""Central validation sets on the consortium's server: a data steward's upload, and the one way
the coordinator and the contribution scorer load the validation set a job is measured on.

The upload (:func:`validation_set_upload`) is the one path by which records reach the central
side, so it is guarded like a governance act: only a data steward of an institution of the
consortium, only while the agreement in force allows a central validation set
(``AgreementVersion.allows_central_validation_set``), only records that fit the data sets the
sites registered under the key, and always recorded in the ledger
(``validation_set.uploaded``) in the same transaction as the row. The file is read by the
engine's own adapters (``training.fl.data.load_csv_bytes`` and ``load_npz_bytes``: the format
of a site's ``<key>.csv`` or image folder, never unpickled), and the records are stored as the
engine's tensor container (``x``, ``y``) in the content-addressed artifact store, so what the
models are measured on has one digest, named in the ledger and in each round's metrics.

Which set a job uses is decided in ``training.jobs.central_validation``
(:func:`~training.jobs.central_validation.validation_set_in_use`); :func:`validation_set_of`
loads it, or the bundled set of a bundled key when nobody uploaded one.

torch is imported inside the functions that need it (as in ``training.rounds.states``).
"""

from __future__ import annotations

import re
import zipfile
from io import BytesIO
from pathlib import PurePath
from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry, describe_actor, lock_chain
from consortium.core.errors import ConflictError, ServiceError
from consortium.governance.models import Institution, Role, Withdrawal
from consortium.governance.permissions import has_institution_role
from training.jobs.central_validation import (
    allowing_version,
    fit_problems,
    validation_set_in_use,
)
from training.models import CentralValidationSet, SiteDataset, TrainingJob
from training.rounds.artifacts import ArtifactError, artifact_store, sha256_hex

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_UPLOAD_BYTES", "validation_set_of", "validation_set_upload"]

#: The largest file a steward may upload (and the most an .npz archive may unpack to).
MAX_UPLOAD_BYTES = 256 * 2**20

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_FORMATS = {".csv": CentralValidationSet.Format.CSV, ".npz": CentralValidationSet.Format.NPZ}


def _file_error(message: str) -> ValidationError:
    return ValidationError({"file": message})


def _read_records(file_name: str, data: bytes):
    """The file's records as the engine reads a site's own files (``SiteData``), and its format;
    ``ValidationError`` on the ``file`` field saying what is wrong and where."""
    from training.fl.data import load_csv_bytes, load_npz_bytes  # lazy torch (module docstring)

    suffix = PurePath(file_name).suffix.lower()
    if suffix not in _FORMATS:
        raise _file_error(
            f"{file_name}: upload a .csv file (a header row, a 'label' column of class indices "
            "and numeric features) or an .npz archive (numpy.savez of 'images' with 'labels' or "
            "'masks')."
        )
    if not data:
        raise _file_error(f"{file_name}: the file is empty.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise _file_error(
            f"{file_name}: {len(data)} bytes, more than the {MAX_UPLOAD_BYTES} bytes a central "
            "validation set may have."
        )
    file_format = _FORMATS[suffix]
    if file_format == CentralValidationSet.Format.NPZ:
        try:
            unpacked = sum(i.file_size for i in zipfile.ZipFile(BytesIO(data)).infolist())
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise _file_error(f"{file_name}: not a readable .npz archive: {exc}") from None
        if unpacked > MAX_UPLOAD_BYTES:
            raise _file_error(
                f"{file_name}: its arrays unpack to {unpacked} bytes, more than the "
                f"{MAX_UPLOAD_BYTES} bytes a central validation set may have."
            )
    reader = load_csv_bytes if file_format == CentralValidationSet.Format.CSV else load_npz_bytes
    try:
        records = reader(data, source=file_name)
    except ValueError as exc:
        raise _file_error(str(exc)) from None
    return records, file_format


def validation_set_upload(
    *, acting_user, institution: Institution, key: str, file_name: str, data: bytes
) -> CentralValidationSet:
    """Hold ``data`` (a CSV or .npz file) as the consortium's central validation set for ``key``,
    uploaded by ``institution``'s data steward; it replaces the set held for ``key`` so far.

    Refused (``ConflictError``) unless the agreement in force allows a central validation set
    and the institution has not withdrawn its consent under that agreement (a withdrawal from
    another agreement of the consortium does not stop it); refused (``ValidationError``) when no
    site registered a data set under ``key``, or the file is malformed (the message names the
    line and column, or the array) or does not fit the registered data sets."""
    consortium = institution.consortium
    if not has_institution_role(acting_user, institution, Role.DATA_STEWARD):
        raise ServiceError(
            f"Only a data steward of {institution} can upload a validation set for it.",
            code="not_data_steward",
        )
    key = (key or "").strip()
    if not _KEY_RE.fullmatch(key):
        raise ValidationError(
            {
                "key": "Use the data set's key: 1 to 64 lower-case letters, digits, '.', '_' "
                "or '-', starting with a letter or digit."
            }
        )
    version, why_not = allowing_version(consortium)
    if version is None:
        raise ConflictError(
            f"No validation set can be uploaded: {why_not}.", code="central_set_not_allowed"
        )
    # Records are given under the agreement in force (``version``), so only a withdrawal
    # under that agreement refuses them; one from another agreement of the consortium does
    # not (the jobs under it never read the set: ``central_validation.usable_validation_sets``).
    if Withdrawal.objects.filter(
        agreement_id=version.agreement_id, institution=institution
    ).exists():
        raise ConflictError(
            f"{institution} has withdrawn its consent under “{version.agreement}”, the "
            "agreement in force: it sends no record to the consortium under it.",
            code="withdrawn",
        )
    datasets = list(
        SiteDataset.objects.filter(institution__consortium=consortium, key=key)
        .select_related("institution")
        .order_by("institution__slug")
    )
    if not datasets:
        raise ValidationError(
            {
                "key": f"No institution of {consortium} has registered a data set '{key}': "
                "a validation set must fit a data set the sites offer."
            }
        )
    records, file_format = _read_records(file_name, data)
    problems = fit_problems(
        modality=records.modality,
        input_shape=records.input_shape,
        n_classes=records.n_classes,
        datasets=datasets,
    )
    if problems:
        raise _file_error(
            f"{file_name} does not fit the registered data sets: {'; '.join(problems)}."
        )

    from training.fl.serialization import pack_tensors  # lazy torch (module docstring)

    packed = pack_tensors({"x": records.x_train, "y": records.y_train})
    digest = artifact_store().put(packed)
    with transaction.atomic():
        lock_chain()  # the chain first, then the rows (audit.ledger.chain.lock_chain)
        current = (
            CentralValidationSet.objects.select_for_update()
            .filter(consortium=consortium, key=key, replaced_at__isnull=True)
            .first()
        )
        if current is not None:
            current.replaced_at = timezone.now()
            current.save(update_fields=["replaced_at"])
        held = CentralValidationSet.objects.create(
            consortium=consortium,
            key=key,
            institution=institution,
            agreement_version=version,
            uploaded_by=acting_user,
            uploaded_by_repr=describe_actor(acting_user),
            file_name=PurePath(file_name).name[:255],
            file_format=file_format,
            upload_sha256=sha256_hex(data),
            digest=digest,
            size_bytes=len(packed),
            num_records=records.num_records,
            modality=records.modality,
            input_shape=list(records.input_shape),
            n_classes=records.n_classes,
        )
        append_entry(
            event=ledger_events.VALIDATION_SET_UPLOADED,
            actor=acting_user,
            subject=held,
            consortium_slug=consortium.slug,
            institution_slug=institution.slug,
            payload={
                "key": key,
                "institution": institution.slug,
                "digest": digest,
                "upload_sha256": held.upload_sha256,
                "file_format": str(file_format),
                "records": held.num_records,
                "modality": held.modality,
                "input_shape": held.input_shape,
                "n_classes": held.n_classes,
                "agreement_id": version.agreement_id,
                "version": version.number,
                "replaces": current.digest if current is not None else None,
            },
        )
    return held


def validation_set_of(
    job: TrainingJob,
) -> tuple[torch.Tensor, torch.Tensor, CentralValidationSet | None]:
    """``(x, y, held)``: the validation set the job's models are measured on centrally, with
    the uploaded set it came from (``None`` for a bundled set). ``ValueError`` saying why when
    there is none (a key that is not bundled and no set uploaded) or it cannot be read."""
    # Lazy torch (module docstring).
    from training.fl.data import BUNDLED_DATASETS, load_validation_set
    from training.fl.serialization import unpack_tensors

    key = job.spec["dataset_key"]
    held = validation_set_in_use(job)
    if held is None:
        if key not in BUNDLED_DATASETS:
            raise ValueError(f"the consortium holds no central validation set for '{key}'")
        x, y = load_validation_set(key)
        return x, y, None
    try:
        tensors = unpack_tensors(artifact_store().get(held.digest))
    except ArtifactError as exc:
        raise ValueError(f"the central validation set for '{key}' cannot be read: {exc}") from exc
    if set(tensors) != {"x", "y"}:
        raise ValueError(f"the central validation set {held.digest} is not a set of x and y")
    return tensors["x"], tensors["y"], held
