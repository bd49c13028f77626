"""Forms of the training pages. They check types and shapes only (JSON is JSON,
a shape is a list of whole numbers); the rules — spec bounds, the agreement,
the budgets — live in the services of ``training.jobs``, whose errors the views put back on
these forms next to the field they concern."""

from __future__ import annotations

import json

from django import forms

from training.fl.params import FILTER_NAMES, FILTER_PARAMS, MISSING, Choice, LayerList, Number
from training.jobs.spec import AGGREGATIONS, LOSSES, PRIVACY_AUDIT_FIELDS, PURPOSES
from training.models import Approval, Modality
from training.web.presenters import model_choices

#: A pipeline that satisfies a typical agreement (40% shared, clipped, Gaussian noise), kept for
#: the tests that type it. The proposal page does not offer it: it starts from the agreement in
#: force (``training.jobs.proposal_guidance``), since an agreement may require another mechanism.
DEFAULT_PIPELINE = [
    {"filter": "partial_sharing", "fraction": 0.4, "strategy": "topk"},
    {"filter": "percentile_clipping", "percentile": 95},
    {"filter": "gaussian_noise", "noise_multiplier": 4.0, "clip_norm": 1.0},
]


def pretty_json(value) -> str:
    return json.dumps(value, indent=2)


#: The training losses and averaging rules in words (training.jobs.spec.LOSSES, AGGREGATIONS).
LOSS_WORDS = {
    "cross_entropy": "Cross-entropy",
    "dice_bce": "Dice + cross-entropy (segmentation)",
}
AGGREGATION_WORDS = {
    "masked_mean": "Mask-aware mean: each coordinate averaged over the sites that shared it",
    "zero_filled_mean": "Zero-filled mean: a coordinate a site did not share counts as 0",
}


def _pipeline_text(pipeline) -> str:
    """One filter per line: readable, and easy to reorder by moving lines."""
    if not pipeline:
        return "[]"
    return "[\n" + ",\n".join("  " + json.dumps(f) for f in pipeline) + "\n]"


def _audit_asked(spec: dict) -> dict | None:
    """The ``privacy_audit`` a spec asks for, normalised or not (``true`` and ``{}`` ask for
    one at the defaults, as :func:`training.jobs.spec.validate_spec` reads them), else None."""
    value = spec.get("privacy_audit")
    if value is True:
        return {}
    return dict(value) if isinstance(value, dict) else None


def _json_object(text: str, what: str) -> dict | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise forms.ValidationError(
            f"This is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
        ) from None
    if not isinstance(value, dict):
        raise forms.ValidationError(f'The {what} must be a JSON object, like {{"key": ...}}.')
    return value


# --- Site data sets -------------------------------------------------------------------


class DatasetForm(forms.Form):
    key = forms.CharField(
        max_length=64,
        help_text="How jobs name this data set, e.g. 'tumours-2024'. Lower-case letters, "
        "digits, '.', '_' and '-'. It cannot change later.",
    )
    description = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text="What it holds and how it was collected. Only this description leaves the "
        "site: the records never do.",
    )
    modality = forms.ChoiceField(choices=Modality.choices)
    num_records = forms.IntegerField(label="Number of records", min_value=1)
    input_shape = forms.CharField(
        label="Input shape",
        max_length=100,
        help_text="The shape of one input as comma-separated whole numbers: '30' for 30 "
        "tabular features, '1, 28, 28' for single-channel 28×28 images.",
    )
    n_classes = forms.IntegerField(label="Number of classes", min_value=2)
    schema = forms.CharField(
        label="Schema (JSON, optional)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 5, "class": "mono"}),
        help_text="Optional JSON object: column names, units, label meaning, e.g. "
        '{"columns": ["age", "size_mm"], "label": "malignant"}.',
    )

    def __init__(self, *args, editing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if editing:
            self.fields["key"].disabled = True
            self.fields["key"].required = False
            self.fields["key"].help_text = "The key cannot change: jobs name it."

    def clean_input_shape(self):
        text = self.cleaned_data["input_shape"].strip().strip("[]()")
        parts = [p.strip() for p in text.split(",")]
        if not text or any(not p for p in parts):
            raise forms.ValidationError(
                "Give the shape as comma-separated whole numbers, e.g. '30' or '1, 28, 28'."
            )
        try:
            shape = [int(p) for p in parts]
        except ValueError:
            raise forms.ValidationError(
                "Every dimension must be a whole number, e.g. '1, 28, 28'."
            ) from None
        if any(d < 1 for d in shape):
            raise forms.ValidationError("Every dimension must be at least 1.")
        return shape

    def clean_schema(self):
        return _json_object(self.cleaned_data["schema"], "schema") or {}

    @staticmethod
    def initial_from(dataset) -> dict:
        return {
            "key": dataset.key,
            "description": dataset.description,
            "modality": dataset.modality,
            "num_records": dataset.num_records,
            "input_shape": ", ".join(str(d) for d in dataset.input_shape),
            "n_classes": dataset.n_classes,
            "schema": pretty_json(dataset.schema) if dataset.schema else "",
        }

    def service_fields(self) -> dict:
        data = dict(self.cleaned_data)
        if self.fields["key"].disabled:
            data.pop("key", None)
        return data


# --- Training jobs ---------------------------------------------------------------------


#: Each privacy filter in words, for the step-by-step pipeline editor.
FILTER_LABELS = {
    "exclude_layers": "Keep named layers at the site",
    "partial_sharing": "Share only part of the update",
    "percentile_clipping": "Clip the update's outliers",
    "laplace_noise": "Add Laplace noise (pure ε per round)",
    "gaussian_noise": "Add Gaussian noise to the update",
    "svt": "Select what is shared by the sparse vector technique",
    "dp_sgd": "Train with DP-SGD at the site",
}


def _param_schema(key: str, spec) -> dict:
    out: dict = {"key": key}
    if isinstance(spec, LayerList):
        out["kind"] = "layers"
    elif isinstance(spec, Choice):
        out.update(kind="choice", choices=list(spec.choices))
    elif isinstance(spec, Number):
        out.update(kind=spec.kind, min=spec.lo, max=spec.hi, help=spec.message())
    default = getattr(spec, "default", MISSING)
    if default is not MISSING:
        out["default"] = default
    return out


def pipeline_step_schema() -> dict:
    """Every privacy filter with its parameters' kinds, bounds and defaults, for
    ``static/js/proposal_pipeline.js``: it edits the pipeline as ordered steps and writes the
    JSON box the server reads, so the browser never becomes a second source of the rules
    (the server still checks every value, from ``training.fl.params``)."""
    return {
        name: {
            "label": FILTER_LABELS.get(name, name),
            "params": [_param_schema(key, spec) for key, spec in FILTER_PARAMS[name].items()],
        }
        for name in FILTER_NAMES
    }


def _choices(values) -> list[tuple[str, str]]:
    return [(v, v) for v in values]


class JobForm(forms.Form):
    """A training job spec as form fields. ``to_spec()`` builds the JSON the
    services validate; fields left empty are left out so the spec's defaults apply."""

    title = forms.CharField(max_length=200)
    participants = forms.MultipleChoiceField(
        label="Participating institutions", widget=forms.CheckboxSelectMultiple
    )
    dataset_key = forms.CharField(
        label="Data set key",
        max_length=64,
        help_text="The key of the data set every participant offers (suggestions below are "
        "the keys the institutions registered).",
    )
    purpose = forms.ChoiceField(choices=_choices(PURPOSES))
    model = forms.ChoiceField(label="Model")
    model_params = forms.CharField(
        label="Model parameters (JSON, optional)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "class": "mono"}),
        help_text='E.g. {"hidden_sizes": [64, 32], "dropout": 0.1}. Empty: the model\'s defaults.',
    )
    topology = forms.ChoiceField(
        choices=[
            ("fedavg", "fedavg — every site trains each round; the server averages"),
            ("cyclic", "cyclic — the model visits one site after another"),
        ]
    )
    rounds = forms.IntegerField(min_value=1)
    local_epochs = forms.IntegerField(label="Local epochs per round", min_value=1, initial=1)
    batch_size = forms.IntegerField(min_value=1, initial=32)
    optimizer = forms.ChoiceField(
        choices=[("sgd", "SGD with momentum"), ("adam", "Adam")], initial="sgd"
    )
    lr = forms.FloatField(label="Learning rate", initial=0.01)
    momentum = forms.FloatField(
        required=False, initial=0.9, help_text="SGD only; leave empty for Adam."
    )
    momentum_restart = forms.BooleanField(
        label="Restart the optimizer's momentum each round",
        required=False,
        initial=True,
    )
    loss = forms.ChoiceField(
        label="Training loss",
        choices=[(key, LOSS_WORDS[key]) for key in LOSSES],
        initial=LOSSES[0],
        required=False,  # a post without it (an older form, a script) means the default
        help_text="Dice + cross-entropy is for segmentation masks; classifiers train with "
        "cross-entropy.",
    )
    aggregation = forms.ChoiceField(
        label="Averaging of the sites' updates",
        choices=[(key, AGGREGATION_WORDS[key]) for key in AGGREGATIONS],
        initial=AGGREGATIONS[0],
        required=False,
    )
    privacy_pipeline = forms.CharField(
        label="Privacy pipeline (JSON)",
        widget=forms.Textarea(attrs={"rows": 7, "class": "mono"}),
        help_text="An ordered list of filters applied on site to each update before it leaves, "
        'e.g. [{"filter": "gaussian_noise", "noise_multiplier": 4.0, "clip_norm": 1.0}]. '
        "The table below lists every filter and its parameters.",
    )
    min_participants = forms.IntegerField(
        label="Minimum participants per round",
        required=False,
        min_value=1,
        help_text="Empty: every participant must report each round.",
    )
    round_timeout_seconds = forms.IntegerField(
        label="Round timeout (seconds)", min_value=1, initial=600
    )
    approval_ttl_hours = forms.IntegerField(
        label="Approval deadline (hours)",
        min_value=1,
        initial=168,
        help_text="Every approval must be in within this time, or the job expires.",
    )

    evaluation = forms.CharField(
        label="Where models are evaluated (JSON, optional)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 2, "class": "mono"}),
        help_text='E.g. {"where": "sites"} or {"where": "central"}. Empty: centrally for a '
        "bundled data set (on the consortium's validation set), at the sites otherwise.",
    )
    privacy_audit = forms.BooleanField(
        label="Ask each site for a privacy audit before approval",
        required=False,
        help_text="Before its approvers decide, each site's worker attacks its own update under "
        "this pipeline on a few of its records and reports only the figures (how closely a "
        "record is rebuilt, and the share of records rebuilt). No record leaves the site. "
        "The agreement may require it.",
    )
    privacy_audit_records = forms.IntegerField(
        label="Records each site audits",
        required=False,
        min_value=PRIVACY_AUDIT_FIELDS["records"][1],
        max_value=PRIVACY_AUDIT_FIELDS["records"][2],
        initial=PRIVACY_AUDIT_FIELDS["records"][3],
        help_text="Each costs the site a few seconds of CPU. Empty: "
        f"{PRIVACY_AUDIT_FIELDS['records'][3]}.",
    )
    privacy_audit_seed = forms.IntegerField(
        label="Audit seed",
        required=False,
        min_value=PRIVACY_AUDIT_FIELDS["seed"][1],
        max_value=PRIVACY_AUDIT_FIELDS["seed"][2],
        initial=PRIVACY_AUDIT_FIELDS["seed"][3],
        help_text="Fixes which records are attacked, the noise and the attacks, so the audit "
        f"can be repeated. Empty: {PRIVACY_AUDIT_FIELDS['seed'][3]}.",
    )
    contribution = forms.CharField(
        label="Contribution scoring (JSON, optional)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 2, "class": "mono"}),
        help_text='E.g. {"method": "leave_one_out"} or {"method": "shapley_sampled", '
        '"permutations": 50}. Empty: "auto", exact Shapley values up to 8 sites, sampled above.',
    )

    def __init__(self, *args, institutions, dataset_keys=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["participants"].choices = [(i.slug, i.name) for i in institutions]
        self.fields["model"].choices = model_choices()
        # The page renders <datalist id="dataset-keys"> with the keys offered.
        self.fields["dataset_key"].widget.attrs["list"] = "dataset-keys"
        self.dataset_keys = list(dataset_keys)

    def clean_model_params(self):
        return _json_object(self.cleaned_data["model_params"], "model parameters")

    def clean_contribution(self):
        return _json_object(self.cleaned_data["contribution"], "contribution scoring")

    def clean_evaluation(self):
        return _json_object(self.cleaned_data["evaluation"], "evaluation")

    def clean_privacy_pipeline(self):
        text = (self.cleaned_data["privacy_pipeline"] or "").strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(
                f"This is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
            ) from None
        if not isinstance(value, list):
            raise forms.ValidationError(
                'The pipeline must be a JSON list of filters: [{"filter": ...}, ...] '
                "(an empty list [] shares updates unfiltered)."
            )
        return value

    def to_spec(self) -> dict:
        d = self.cleaned_data
        optimizer = {"name": d["optimizer"], "lr": d["lr"]}
        if d["optimizer"] == "sgd" and d.get("momentum") is not None:
            optimizer["momentum"] = d["momentum"]
        model = {"name": d["model"]}
        if d.get("model_params"):
            model["params"] = d["model_params"]
        spec = {
            "purpose": d["purpose"],
            "participants": list(d["participants"]),
            "dataset_key": d["dataset_key"].strip(),
            "model": model,
            "topology": d["topology"],
            "rounds": d["rounds"],
            "local_epochs": d["local_epochs"],
            "batch_size": d["batch_size"],
            "optimizer": optimizer,
            "momentum_restart": bool(d["momentum_restart"]),
            # At their defaults these are left out of the normalised spec (validate_spec).
            "loss": d.get("loss") or LOSSES[0],
            "aggregation": d.get("aggregation") or AGGREGATIONS[0],
            "privacy_pipeline": d["privacy_pipeline"],
            "round_timeout_seconds": d["round_timeout_seconds"],
            "approval_ttl_hours": d["approval_ttl_hours"],
        }
        if d.get("min_participants") is not None:
            spec["min_participants"] = d["min_participants"]
        if d.get("contribution"):
            spec["contribution"] = d["contribution"]
        if d.get("evaluation"):
            spec["evaluation"] = d["evaluation"]
        if d.get("privacy_audit"):
            # The knobs are read only with the box ticked; empty ones take their defaults.
            spec["privacy_audit"] = {
                key: default if d.get(f"privacy_audit_{key}") is None else d[f"privacy_audit_{key}"]
                for key, (*_, default) in PRIVACY_AUDIT_FIELDS.items()
            }
        return spec

    @classmethod
    def initial_proposal(cls, defaults) -> dict:
        """The fields of a new proposal, filled from
        :func:`training.jobs.proposal_guidance.proposal_defaults`: derived from the agreement
        in force, so that proposing the form as it comes is accepted."""
        return cls.initial_from_spec(title=defaults.title, spec=defaults.spec)

    @classmethod
    def initial_from(cls, job) -> dict:
        return cls.initial_from_spec(title=job.title, spec=job.spec)

    @staticmethod
    def initial_from_spec(*, title: str, spec: dict) -> dict:
        """The field values that ``to_spec()`` turns back into ``spec``."""
        optimizer = spec.get("optimizer") or {}
        model = spec.get("model") or {}
        everyone = len(spec.get("participants") or [])
        audit = _audit_asked(spec)
        return {
            "title": title,
            "participants": list(spec.get("participants") or []),
            "dataset_key": spec.get("dataset_key", ""),
            "purpose": spec.get("purpose"),
            "model": model.get("name"),
            "model_params": pretty_json(model["params"]) if model.get("params") else "",
            "topology": spec.get("topology"),
            "rounds": spec.get("rounds"),
            "local_epochs": spec.get("local_epochs"),
            "batch_size": spec.get("batch_size"),
            "optimizer": optimizer.get("name"),
            "lr": optimizer.get("lr"),
            "momentum": optimizer.get("momentum"),
            "momentum_restart": bool(spec.get("momentum_restart", True)),
            "loss": spec.get("loss") or LOSSES[0],
            "aggregation": spec.get("aggregation") or AGGREGATIONS[0],
            "privacy_pipeline": _pipeline_text(spec.get("privacy_pipeline")),
            "min_participants": (
                None if spec.get("min_participants") == everyone else spec.get("min_participants")
            ),
            "round_timeout_seconds": spec.get("round_timeout_seconds"),
            "approval_ttl_hours": spec.get("approval_ttl_hours"),
            "contribution": pretty_json(spec["contribution"]) if spec.get("contribution") else "",
            "evaluation": pretty_json(spec["evaluation"]) if spec.get("evaluation") else "",
            "privacy_audit": audit is not None,
            **{
                f"privacy_audit_{key}": (audit or {}).get(key, default)
                for key, (*_, default) in PRIVACY_AUDIT_FIELDS.items()
            },
        }


class CancelForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text="Recorded in the ledger and sent to the approvers and the proposer.",
    )


class DecisionForm(forms.Form):
    institution = forms.ModelChoiceField(
        queryset=None, label="Decide on behalf of", empty_label=None
    )
    decision = forms.ChoiceField(
        choices=[
            (Approval.Decision.APPROVED, "Approve: my institution takes part in this job"),
            (Approval.Decision.REJECTED, "Reject: my institution does not take part"),
        ],
        widget=forms.RadioSelect,
    )
    reason = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text="Required to reject (the proposer and the other approvers see it); "
        "optional to approve.",
    )
    spec_digest = forms.CharField(widget=forms.HiddenInput)
    agreement_version_id = forms.IntegerField(widget=forms.HiddenInput, required=False)

    def __init__(self, *args, institutions, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["institution"].queryset = institutions

    def clean(self):
        data = super().clean()
        if (
            data.get("decision") == Approval.Decision.REJECTED
            and not (data.get("reason") or "").strip()
        ):
            self.add_error("reason", "Give the reason for rejecting; the proposer sees it.")
        return data


class SiteCredentialForm(forms.Form):
    """A new worker credential: a label, and the worker's public key (PEM)."""

    label = forms.CharField(
        max_length=100,
        help_text="A name to tell this worker apart, e.g. 'gpu-node-1'.",
    )
    public_key = forms.CharField(
        label="Worker public key (PEM)",
        required=False,
        widget=forms.Textarea(
            attrs={
                "rows": 5,
                "class": "mono",
                "placeholder": "-----BEGIN PUBLIC KEY-----\n…\n-----END PUBLIC KEY-----",
            }
        ),
        help_text="The Ed25519 public key of the worker's signing key. Generate the pair on "
        "the site machine with generate_keypair() (training.fl.signing): the private key "
        "stays there (SITE_SIGNING_KEY), the public key goes here. Leave empty to use the "
        "worker key registered on the institution.",
    )


# --- Central validation sets ---------------------------------------------------------------


class ValidationSetForm(forms.Form):
    """A central validation set: the data set key it validates, the file, and the steward's
    confirmation that these records go to the consortium's server."""

    key = forms.ChoiceField(
        label="Data set key",
        help_text="The key the sites registered the data set under; the records must have its "
        "shape.",
    )
    file = forms.FileField(
        label="File (.csv or .npz)",
        help_text="A CSV like a site's own: a header row, a 'label' column of class indices "
        "(0, 1, 2, ...) and numeric feature columns. Or an .npz archive (numpy.savez) of "
        "'images' with 'labels' (classification) or 'masks' (segmentation).",
    )
    confirmed = forms.BooleanField(
        label="I confirm that these records may be sent to the consortium's server, where "
        "models are evaluated on them, as the agreement in force allows.",
    )

    def __init__(self, *args, keys, max_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["key"].choices = [("", "— choose a key —"), *_choices(keys)]
        self.max_bytes = max_bytes

    def clean_file(self):
        uploaded = self.cleaned_data["file"]
        if uploaded.size > self.max_bytes:
            raise forms.ValidationError(
                f"The file has {uploaded.size} bytes; a central validation set may have at "
                f"most {self.max_bytes}."
            )
        return uploaded
