"""The centre checks the privacy floor of every update it receives (issue 16, item 7): a
modified worker that shares more coordinates than the job's pipeline and the agreement allow,
hides values outside its mask, or shares a layer the pipeline excludes is refused, and the
refusal is recorded like any other (training/rounds/verification.py, _check_privacy_floor).
Updates are posted as a real worker posts them (tests/rounds/test_site_api.py's helpers)."""

from __future__ import annotations

import pytest
import torch

from tests.rounds import test_site_api as site_api
from tests.rounds.test_site_api import assert_rejected, update_tensors, upload
from tests.support.fl_harness import use_artifact_folder
from tests.support.training_fixtures import make_scene, pipeline

# SHAPES of test_site_api: 530 coordinates; the agreement and the pipeline share 40%: 212.
TOTAL = 530


def world_of(cast, settings, tmp_path, **spec):
    use_artifact_folder(settings, tmp_path / "artifacts")
    scene = make_scene(cast)
    job, model, rnd = site_api.start_job(scene, **spec)
    return site_api.World(
        cast=cast, scene=scene, job=job, model=model, round=rnd, site=site_api.make_site(cast)
    )


@pytest.fixture
def world(cast, settings, tmp_path):
    return world_of(cast, settings, tmp_path)


def shared_exactly(count: int, *, outside: float = 0.0) -> dict:
    """An update sharing the first ``count`` coordinates (flattened in SHAPES order), with
    ``outside`` as the value of every coordinate it does not share."""
    tensors, left = {}, count
    for name, shape in site_api.SHAPES.items():
        numel = int(torch.tensor(shape).prod())
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[: max(0, min(left, numel))] = True
        left -= numel
        values = torch.where(mask, torch.full((numel,), 0.01), torch.full((numel,), outside))
        tensors[f"delta/{name}"] = values.reshape(shape)
        tensors[f"mask/{name}"] = mask.reshape(shape)
    return tensors


def test_an_update_within_the_floor_is_accepted(world):
    assert upload(world, tensors=shared_exactly(212)).status_code == 201


def test_sharing_more_than_the_agreement_allows_is_refused_and_recorded(world):
    response = upload(world, tensors=shared_exactly(213))
    assert_rejected(
        world,
        response,
        code="privacy_floor",
        contains="the update shares 213 of the model's 530 coordinates (40.2%); the job's "
        "pipeline shares at most 40% and the agreement in force at most 40%, so at most 212",
    )


def test_an_update_without_masks_shares_everything_and_is_refused(world):
    response = upload(world, tensors=update_tensors(mask=False))
    assert_rejected(world, response, code="privacy_floor", contains="shares 530 of the model's 530")


def test_values_outside_the_mask_count_as_shared(world):
    """The mask says 40%, but every other coordinate carries a value: it left the site."""
    response = upload(world, tensors=shared_exactly(200, outside=0.5))
    assert_rejected(world, response, code="privacy_floor", contains="shares 530 of")


def test_the_job_pipeline_binds_below_the_agreement(cast, settings, tmp_path):
    world = world_of(
        cast, settings, tmp_path, privacy_pipeline=pipeline(noise_multiplier=5.0, fraction=0.2)
    )
    response = upload(world, tensors=shared_exactly(107))
    assert_rejected(
        world,
        response,
        code="privacy_floor",
        contains="shares 107 of the model's 530 coordinates (20.2%); the job's pipeline shares "
        "at most 20% and the agreement in force at most 40%, so at most 106 may leave the site",
    )
    site_b = site_api.make_site(cast, institution=cast.hospital_b, label="b-node")
    assert upload(world, site=site_b, tensors=shared_exactly(106)).status_code == 201


def test_a_layer_the_pipeline_excludes_may_not_be_shared(cast, settings, tmp_path):
    excluded = [{"filter": "exclude_layers", "layers": ["net.2"]}, *pipeline(noise_multiplier=5.0)]
    world = world_of(cast, settings, tmp_path, privacy_pipeline=excluded)
    tensors = shared_exactly(100)  # the first 100 coordinates: all in net.0.weight
    tensors["mask/net.2.bias"] = torch.tensor([True, False])
    tensors["delta/net.2.bias"] = torch.tensor([0.3, 0.0])
    response = upload(world, tensors=tensors)
    assert_rejected(
        world,
        response,
        code="privacy_floor",
        contains="net.2.bias is shared (1 coordinates), but the job's pipeline excludes the "
        "layers starting with 'net.2'",
    )
