"""The proposal form carries every setting of a job's spec both ways: opening a job in the form
and saving it unchanged gives the same spec (and digest). A setting the form did not know was
dropped by an edit, silently changing the job an approver had seen (the loss, the averaging and
where models are evaluated, once)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from training.jobs.spec import spec_digest, validate_spec
from training.web.forms import JobForm


def spec_of(**overrides):
    spec = {
        "purpose": "classification",
        "participants": ["hospital-a", "hospital-b", "hospital-c"],
        "dataset_key": "breast-cancer",
        "model": {"name": "mlp"},
        "rounds": 3,
        "optimizer": {"name": "sgd", "lr": 0.01},
    }
    return validate_spec({**spec, **overrides})


SPECS = {
    "defaults": spec_of(),
    "segmentation with Dice + cross-entropy, zero-filled, valued by the loss": spec_of(
        purpose="segmentation",
        dataset_key="lesions",
        model={"name": "small_unet"},
        loss="dice_bce",
        aggregation="zero_filled_mean",
        contribution={"method": "leave_one_out", "value": "loss"},
    ),
    "evaluated at the sites on a bundled data set": spec_of(
        evaluation={"where": "sites", "max_models": 8}
    ),
    "evaluated centrally on a hospital's own key": spec_of(
        dataset_key="ct-scans", evaluation={"where": "central"}
    ),
}


@pytest.mark.parametrize("name", SPECS)
def test_saving_a_job_unchanged_through_the_form_keeps_its_spec(name):
    spec = SPECS[name]
    initial = JobForm.initial_from(SimpleNamespace(spec=spec, title="Kept"))
    institutions = [SimpleNamespace(slug=s, name=s.title()) for s in spec["participants"]]
    data = {k: v for k, v in initial.items() if v is not None}
    form = JobForm(data=data, institutions=institutions)
    assert form.is_valid(), form.errors
    again = validate_spec(form.to_spec())
    assert again == spec
    assert spec_digest(again) == spec_digest(spec)


def test_the_form_offers_the_loss_and_averaging_and_refuses_bad_evaluation_json():
    spec = SPECS["defaults"]
    initial = JobForm.initial_from(SimpleNamespace(spec=spec, title="Kept"))
    institutions = [SimpleNamespace(slug=s, name=s.title()) for s in spec["participants"]]
    data = {k: v for k, v in initial.items() if v is not None}
    form = JobForm(data={**data, "evaluation": json.dumps(["sites"])}, institutions=institutions)
    assert not form.is_valid() and "must be a JSON object" in str(form.errors["evaluation"])
    form = JobForm(data={**data, "loss": "dice_bce"}, institutions=institutions)
    assert form.is_valid()  # the spec, not the form, knows a classifier cannot use it
    with pytest.raises(Exception, match="loss"):
        validate_spec(form.to_spec())
