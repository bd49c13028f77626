"""``manage.py privacy_audit --spec FILE --dataset KEY [--records N] [--seed S] [--json]``: run
the privacy audit (:mod:`training.fl.inversion`) of a job spec on a bundled data set.

For a proposer who wants to try a pipeline before proposing: the spec file is validated as a
proposal would be (:func:`training.jobs.spec.validate_spec`); the job's model is built from the
registry with a fixed seed (the first round's start model), trained one step per audited record
of the bundled set's first demo site, filtered by the spec's pipeline and attacked. The data set
is ``--dataset``, whatever the spec's ``dataset_key`` says: the bundled set stands in for the
sites' own data. It prints a table and a summary in words, or the result's JSON. Bad input is a
``CommandError`` that says what is wrong. Nothing is written to the ledger (this is a trial on
public data, not a site's audit).
"""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from training.fl.holdout import BUNDLED_DATASETS
from training.jobs.registry import model_registry
from training.jobs.spec import SpecError, validate_spec

_DATA_MODALITY = {"digits": ("tabular", "image"), "breast-cancer": ("tabular",)}


def _read_spec(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise CommandError(f"--spec {path}: no such file")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"--spec {path}: not a JSON file ({exc})") from None
    try:
        return validate_spec(raw)
    except SpecError as exc:
        lines = "\n".join(f"  {where or 'spec'}: {msg}" for where, msg in exc.errors.items())
        raise CommandError(f"--spec {path} is not a valid job spec:\n{lines}") from None


def summary_words(result) -> str:
    """The audit's result in plain words (:meth:`~training.fl.inversion.AuditResult.in_words`)."""
    return result.in_words()


class Command(BaseCommand):
    help = (
        "Attack a job spec's privacy pipeline on a bundled data set: what could an attacker "
        "rebuild from one local update?"
    )

    def add_arguments(self, parser):
        parser.add_argument("--spec", required=True, metavar="FILE", help="The job spec (JSON).")
        parser.add_argument(
            "--dataset",
            required=True,
            metavar="KEY",
            help=f"A bundled data set: {', '.join(BUNDLED_DATASETS)}.",
        )
        parser.add_argument("--records", type=int, default=8, help="Records to audit (8).")
        parser.add_argument("--seed", type=int, default=0, help="Fixes everything (0).")
        parser.add_argument("--json", action="store_true", help="Print the result as JSON.")

    def handle(self, *args, **options):
        import torch  # lazy: the command is listed without loading torch

        from training.fl.inversion import (
            AuditOutOfReach,
            AuditSettings,
            bundled_records,
            run_audit,
        )
        from training.fl.models import build_model

        spec = _read_spec(options["spec"])
        key = options["dataset"]
        if key not in BUNDLED_DATASETS:
            raise CommandError(
                f"--dataset {key!r} is not a bundled data set (bundled: "
                f"{', '.join(BUNDLED_DATASETS)})"
            )
        if options["records"] < 1:
            raise CommandError("--records must be at least 1")
        model_spec = model_registry()[spec["model"]["name"]]
        allowed = _DATA_MODALITY.get(key, ("segmentation",))
        if model_spec.modality not in allowed:
            raise CommandError(
                f"the spec's model '{model_spec.name}' is a {model_spec.modality} model; the "
                f"bundled set '{key}' needs a {' or '.join(allowed)} model"
            )
        data = bundled_records(key, image_model=model_spec.modality == "image")
        torch.manual_seed(options["seed"])
        try:
            model = build_model(
                model_spec.class_path,
                input_shape=list(data.x.shape[1:]),
                n_classes=data.n_classes,
                params=spec["model"].get("params") or {},
            )
            settings = AuditSettings(records=options["records"], seed=options["seed"], batch_size=1)
            result = run_audit(
                model,
                data.x,
                data.y,
                modality=data.modality,
                optimizer=spec["optimizer"],
                pipeline=spec["privacy_pipeline"],
                settings=settings,
                image_shape=data.image_shape,
                value_range=data.value_range,
                # The job's loss, where the spec chooses one, trains the audited step; the
                # attacks differentiate the cross-entropy (a lower bound for another loss).
                step_options={"loss": spec["loss"]} if "loss" in spec else None,
            )
        except AuditOutOfReach as exc:
            raise CommandError(f"this model is out of the audit's reach: {exc}") from None
        except ValueError as exc:
            raise CommandError(str(exc)) from None

        if options["json"]:
            self.stdout.write(json.dumps(result.to_json(), indent=2, sort_keys=True))
            return
        self.stdout.write(self._table(result))
        self.stdout.write("")
        self.stdout.write(summary_words(result))

    def _table(self, result) -> str:
        image = result.modality != "tabular"
        head = ["record", "attack", "rebuilt", "label"]
        head += ["SSIM", "PSNR dB"] if image else ["rel. error", "features"]
        if result.modality == "segmentation":
            head.append("mask Dice")
        rows = [head]
        for r in result.records:
            label = "-" if r.label_inferred is None else ("right" if r.label_inferred else "wrong")
            row = [str(r.record), r.attack, "yes" if r.success else "no", label]
            if image:
                row += [f"{r.ssim:.3f}", f"{r.psnr:.1f}"]
            else:
                row += [f"{r.relative_error:.3f}", f"{r.features_within:.0%}"]
            if result.modality == "segmentation":
                row.append(f"{r.dice:.3f}")
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        return "\n".join(
            "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
        )
