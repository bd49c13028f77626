"""``manage.py privacy_audit``: its text and JSON output and its errors (no database)."""

import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError


def _spec(tmp_path, **overrides):
    spec = {
        "purpose": "classification",
        "participants": ["hospital-a", "hospital-b"],
        "dataset_key": "digits",
        "model": {"name": "logistic_regression"},
        "rounds": 3,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
    }
    spec.update(overrides)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _run(*args):
    from io import StringIO

    out = StringIO()
    call_command("privacy_audit", *args, stdout=out)
    return out.getvalue()


def test_text_output_is_a_table_and_a_summary_in_words(tmp_path):
    text = _run("--spec", _spec(tmp_path), "--dataset", "digits", "--records", "2")
    lines = text.splitlines()
    assert lines[0].split() == ["record", "attack", "rebuilt", "label", "SSIM", "PSNR", "dB"]
    assert len([line for line in lines if line.strip()[:1].isdigit()]) == 2
    assert "With this pipeline (100% of the update shared) an attacker rebuilt a record" in text
    assert "out of 1 (median SSIM" in text
    assert "The label was inferred right for 100% of them." in text


def test_json_output_and_tabular_data(tmp_path):
    spec = _spec(
        tmp_path,
        model={"name": "mlp"},
        privacy_pipeline=[{"filter": "partial_sharing", "fraction": 0.5}],
    )
    out = _run("--spec", spec, "--dataset", "breast-cancer", "--records", "1", "--json")
    result = json.loads(out)
    assert result["modality"] == "tabular"
    assert result["seed"] == 0
    assert result["shared_fraction"] == pytest.approx(0.5, abs=0.001)
    assert set(result["summary"]) >= {"median_relative_error", "success_rate"}
    assert len(result["records"]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spec", "/nonexistent/spec.json", "--dataset", "digits"], "no such file"),
        (["--dataset", "my-hospital"], "'my-hospital' is not a bundled data set"),
        (["--dataset", "lesions"], "needs a segmentation model"),
        (["--dataset", "digits", "--records", "0"], "--records must be at least 1"),
    ],
)
def test_bad_input_says_what_is_wrong(tmp_path, args, message):
    if "--spec" not in args:
        args = ["--spec", _spec(tmp_path), *args]
    with pytest.raises(CommandError, match=message):
        _run(*args)


def test_an_invalid_spec_lists_its_errors(tmp_path):
    spec = _spec(tmp_path, rounds=0, optimizer={"name": "rmsprop", "lr": 0.1})
    with pytest.raises(CommandError) as caught:
        _run("--spec", spec, "--dataset", "digits")
    text = str(caught.value)
    assert "is not a valid job spec" in text
    assert "rounds:" in text and "optimizer.name:" in text
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CommandError, match="not a JSON file"):
        _run("--spec", str(bad), "--dataset", "digits")


def test_a_model_out_of_reach_is_refused_with_the_reason(tmp_path):
    spec = _spec(tmp_path, model={"name": "mlp", "params": {"hidden_sizes": [1024, 512]}})
    with pytest.raises(CommandError, match="out of the audit's reach: the model has"):
        _run("--spec", spec, "--dataset", "digits", "--records", "1")
