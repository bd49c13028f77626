"""Honest guarantees (issue 15): the formal ε at δ, mechanism by mechanism, and what it is worth.

The breakdown's figures are the accountant's own (``epsilon_spent`` on each step's events, and on
all of them for the composed total); a mechanism whose ε alone is above 10 over the job is called
weak with the sentence that points at the privacy audit; a pipeline without a DP mechanism says it
has no formal guarantee. The review page, the job page and the proposal's budget preview show it.
"""

from __future__ import annotations

import html
import json
import math
import re

import pytest
from django.urls import reverse

from tests.support.training_fixtures import make_scene, offer_dataset
from training.jobs.accounting import epsilon_spent, events_for_pipeline
from training.jobs.guarantees import (
    WEAK_EPSILON,
    guarantee_for_events,
    guarantee_for_spec,
    weak_guarantee_advice,
)
from training.jobs.spec import training_records
from training.models import PrivacyReservation

DELTA = 1e-5
WEAK = "the formal guarantee is weak at this ε: it does not by itself stop an attacker from rebuilding a record; see the privacy audit"  # noqa: E501
NONE = "No DP mechanism: no formal guarantee"

#: The sparse vector technique at per-parameter settings: ε 1.0 per pass, 5 passes, 100 rounds.
SVT = {"filter": "svt", "epsilon": 1.0, "threshold": 0.01, "fraction": 0.1, "max_passes": 5}
DP_SGD = {"filter": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 1.0}
GAUSSIAN = {"filter": "gaussian_noise", "noise_multiplier": 4.0, "clip_norm": 1.0}
CLIP = {"filter": "percentile_clipping", "percentile": 95.0}
#: Agreements these pipelines comply with (the default terms require Gaussian noise, cap 8).
SVT_TERMS = {"required_dp_mechanism": "svt", "epsilon_cap": "600", "max_shared_fraction": "1"}
DP_SGD_TERMS = {"required_dp_mechanism": "dp_sgd", "max_shared_fraction": "1", "epsilon_cap": "20"}


def spec(pipeline, *, rounds=10, local_epochs=1, batch_size=32) -> dict:
    return {
        "rounds": rounds,
        "local_epochs": local_epochs,
        "batch_size": batch_size,
        "privacy_pipeline": pipeline,
    }


def step_events(step, s, num_records):
    return events_for_pipeline(
        [step],
        rounds=s["rounds"],
        local_epochs=s["local_epochs"],
        batch_size=s["batch_size"],
        num_records=num_records,
    )


def text_of(response) -> str:
    assert response.status_code == 200
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", response.content.decode(), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


# --- the breakdown ------------------------------------------------------------------------


def test_each_mechanisms_figure_is_the_accountants_on_its_own_events_and_the_total_composed():
    s = spec([DP_SGD, CLIP, {**SVT, "max_passes": 2}, GAUSSIAN], rounds=20)
    g = guarantee_for_spec(s, num_records=700, delta=DELTA, cap=50.0)

    assert [m.name for m in g.mechanisms] == [
        "DP-SGD (per-example clipping, Gaussian noise, sampled)",
        "Sparse vector technique selection and release",
        "Gaussian noise on the update",
    ]
    for m, step in zip(g.mechanisms, [DP_SGD, {**SVT, "max_passes": 2}, GAUSSIAN], strict=True):
        assert m.epsilon == epsilon_spent(step_events(step, s, 700), delta=DELTA)
    every = events_for_pipeline(
        s["privacy_pipeline"], rounds=20, local_epochs=1, batch_size=32, num_records=700
    )
    assert g.epsilon == epsilon_spent(every, delta=DELTA)
    # Gaussian mechanisms compose in RDP: the total is less than the parts added up.
    assert g.epsilon < sum(m.epsilon for m in g.mechanisms)
    assert g.mechanisms[1].epsilon == 1.0 * 2 * 20  # SVT: ε per pass × passes × rounds
    assert (g.delta, g.cap) == (DELTA, 50.0)
    assert "composed by the accountant" in g.explain() and " sum" in g.explain()


def test_svt_at_per_parameter_settings_is_weak_and_points_at_the_audit():
    g = guarantee_for_spec(spec([CLIP, SVT], rounds=100), num_records=500, delta=DELTA)

    (svt,) = g.mechanisms
    assert svt.epsilon == 500.0  # 1.0 × 5 passes × 100 rounds
    assert svt.weak and svt.verdict == "weak"
    assert g.weak and g.verdict == "weak"
    assert WEAK[0].upper() + WEAK[1:] in g.note
    assert "manage.py privacy_audit" in g.note and "“Privacy audit”" in g.note
    assert "22,026" in g.note  # e^10: what the bound is worth at the threshold
    # It points at the audit; it does not claim that one ran.
    assert "audit ran" not in g.note and "audited" not in g.note


def test_dp_sgd_at_noise_1_1_is_not_flagged():
    g = guarantee_for_spec(spec([DP_SGD, CLIP]), num_records=1000, delta=DELTA)

    (dp,) = g.mechanisms
    assert 0 < dp.epsilon <= WEAK_EPSILON
    assert not dp.weak and not g.weak and g.verdict == "meaningful"
    assert g.note == ""
    assert "weak" not in g.explain()
    assert weak_guarantee_advice({"Hospital A": g}) == []


def test_dp_sgd_depends_on_the_sites_records_and_nothing_else_does():
    s = spec([DP_SGD, GAUSSIAN])
    small = guarantee_for_spec(s, num_records=100, delta=DELTA)
    large = guarantee_for_spec(s, num_records=5000, delta=DELTA)
    assert small.mechanisms[0].epsilon > large.mechanisms[0].epsilon
    assert small.mechanisms[1].epsilon == large.mechanisms[1].epsilon


@pytest.mark.parametrize(
    "pipeline",
    [
        [],
        [{"filter": "partial_sharing", "fraction": 0.1}],
        [CLIP],
        [{"filter": "exclude_layers", "layers": ["fc1"]}, CLIP],
    ],
)
def test_a_pipeline_without_a_dp_mechanism_has_no_formal_guarantee(pipeline):
    g = guarantee_for_spec(spec(pipeline), num_records=500, delta=DELTA)

    assert g.mechanisms == () and g.epsilon == 0.0
    assert g.verdict == "none" and not g.weak
    assert g.note.startswith(NONE)
    assert g.explain() == g.note
    assert weak_guarantee_advice({"Hospital A": g}) == [g.note]


def test_the_composed_total_can_be_weak_when_no_mechanism_alone_is():
    # Two Gaussian steps each just under the threshold; composed, over it.
    s = spec([{**GAUSSIAN, "noise_multiplier": 1.7}, {**GAUSSIAN, "noise_multiplier": 1.7}])
    g = guarantee_for_spec(s, num_records=500, delta=DELTA)
    assert all(not m.weak for m in g.mechanisms), [m.epsilon for m in g.mechanisms]
    assert g.weak
    (advice,) = weak_guarantee_advice({"Hospital A": g})
    assert "composed cost more than ε 10" in advice and WEAK in advice


def test_an_unbounded_loss_is_weak_not_an_error():
    # An event without noise: the accountant refuses it; the guarantee says "unbounded".
    from training.jobs.accounting import PrivacyEvent

    event = PrivacyEvent("gaussian", {"noise_multiplier": 0.0}, 1, "gaussian_noise")
    g = guarantee_for_events([event], delta=DELTA)
    assert math.isinf(g.epsilon) and g.weak and g.epsilon_text == "unbounded"


# --- the pages ----------------------------------------------------------------------------


def review_url(job):
    return reverse("training:job-review", args=[job.consortium.slug, job.pk])


def job_url(job):
    return reverse("training:job-detail", args=[job.consortium.slug, job.pk])


def guarantee_block(response, slug) -> str:
    page = response.content.decode()
    start = page.index(">", page.index(f'id="guarantee-{slug}"')) + 1
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page[start:])))


@pytest.mark.django_db
def test_the_review_page_flags_svt_at_per_parameter_settings_as_weak(cast):
    scene = make_scene(
        cast, required_dp_mechanism="svt", epsilon_cap="600", max_shared_fraction="1"
    )
    job = scene.propose(rounds=100, privacy_pipeline=[CLIP, SVT])
    reservation = PrivacyReservation.objects.get(job=job, institution=cast.hospital_a)

    response = cast.client_for("approver").get(review_url(job))
    text = text_of(response)
    block = guarantee_block(response, cast.hospital_a.slug)

    assert f"this job would spend ε {reservation.epsilon:.2f}" in text
    assert "Sparse vector technique selection and release ε 500.00 weak" in block
    assert "composed by the accountant ε 500.00; your institution's cap is ε 600.00" in block
    assert WEAK[0].upper() + WEAK[1:] in block
    assert "manage.py privacy_audit" in block


@pytest.mark.django_db
def test_the_review_page_does_not_flag_dp_sgd_at_noise_1_1(cast):
    scene = make_scene(cast, **DP_SGD_TERMS)
    job = scene.propose(rounds=10, privacy_pipeline=[DP_SGD, CLIP])
    reservation = PrivacyReservation.objects.get(job=job, institution=cast.hospital_a)

    response = cast.client_for("approver").get(review_url(job))
    block = guarantee_block(response, cast.hospital_a.slug)

    records = training_records(1000, job.spec)  # what the site trains on
    expected = epsilon_spent(
        step_events(DP_SGD, spec([DP_SGD]), records), delta=float(scene.version.delta)
    )
    assert records < 1000  # evaluation at the sites keeps some records aside
    assert f"ε {reservation.epsilon:.2f}" in block
    dp_sgd = "DP-SGD (per-example clipping, Gaussian noise, sampled)"
    assert f"{dp_sgd} ε {expected:.2f} meaningful" in block, block
    assert "weak" not in block.split("Your decision")[0]


@pytest.mark.django_db
def test_the_review_page_says_when_there_is_no_formal_guarantee(cast):
    scene = make_scene(cast, required_dp_mechanism="none")
    job = scene.propose(privacy_pipeline=[{"filter": "partial_sharing", "fraction": 0.4}, CLIP])

    response = cast.client_for("approver").get(review_url(job))
    assert guarantee_block(response, cast.hospital_a.slug).strip().startswith(NONE)


@pytest.mark.django_db
def test_the_job_page_shows_the_breakdown_per_institution_where_records_differ(cast):
    scene = make_scene(cast, **DP_SGD_TERMS)
    # Hospital B's data set is smaller: DP-SGD samples a larger share of it, at a higher ε.
    from training.models import SiteDataset

    SiteDataset.objects.filter(institution=cast.hospital_b).delete()
    offer_dataset(cast, cast.hospital_b, num_records=200)
    job = scene.propose(rounds=10, privacy_pipeline=[DP_SGD, CLIP])

    text = text_of(cast.client_for("researcher").get(job_url(job)))
    about = text[text.index("What leaves each site") :]
    a, b = (
        epsilon_spent(
            step_events(DP_SGD, spec([DP_SGD]), training_records(n, job.spec)), delta=DELTA
        )
        for n in (1000, 200)
    )
    assert f"rests on ({cast.hospital_a.name})" in about
    assert f"rests on ({cast.hospital_b.name})" in about
    assert f"sampled) ε {a:.2f}" in about and f"sampled) ε {b:.2f}" in about


@pytest.mark.django_db
def test_the_job_page_gives_one_statement_when_every_participant_has_the_same_figures(cast):
    scene = make_scene(
        cast, required_dp_mechanism="svt", epsilon_cap="600", max_shared_fraction="1"
    )
    job = scene.propose(rounds=100, privacy_pipeline=[CLIP, SVT])

    text = text_of(cast.client_for("researcher").get(job_url(job)))
    about = text[text.index("What leaves each site") :]
    names = f"{cast.hospital_a.name}, {cast.hospital_b.name}"
    assert about.count("What the formal guarantee rests on") == 1
    assert f"rests on ({names})" in about
    assert "Sparse vector technique selection and release ε 500.00 weak" in about
    assert WEAK[0].upper() + WEAK[1:] in about


@pytest.mark.django_db
def test_the_job_page_says_when_there_is_no_formal_guarantee(cast):
    scene = make_scene(cast, required_dp_mechanism="none")
    job = scene.propose(privacy_pipeline=[{"filter": "partial_sharing", "fraction": 0.4}, CLIP])

    text = text_of(cast.client_for("researcher").get(job_url(job)))
    assert NONE in text[text.index("What leaves each site") :]


@pytest.mark.django_db
def test_the_proposal_preview_adds_the_weak_guarantee_sentence(cast):
    from tests.support.training_fixtures import make_spec
    from training.jobs.proposal_guidance import proposal_budget_preview

    make_scene(cast, **SVT_TERMS)
    weak = proposal_budget_preview(
        consortium=cast.consortium, spec=make_spec(rounds=100, privacy_pipeline=[CLIP, SVT])
    )
    (sentence,) = [a for a in weak.advice if WEAK in a]
    assert sentence.startswith("Sparse vector technique selection and release (")
    assert "ε 500.00" in sentence

    fine = proposal_budget_preview(
        consortium=cast.consortium,
        spec=make_spec(
            rounds=10, privacy_pipeline=[CLIP, {**SVT, "max_passes": 1, "epsilon": 0.2}]
        ),
    )
    assert not any("weak" in a for a in fine.advice)


@pytest.mark.django_db
def test_the_review_page_says_an_unbounded_projection_rather_than_nothing(cast):
    """Another reservation of the institution holds an event without noise: the projection has
    no guarantee at δ, and the page says so (it used to print an empty figure)."""
    scene = make_scene(cast, **DP_SGD_TERMS)
    job = scene.propose(rounds=10, privacy_pipeline=[DP_SGD, CLIP])
    reservation = PrivacyReservation.objects.get(job=job, institution=cast.hospital_a)
    events = json.loads(reservation.events_text)
    events.append(
        {"mechanism": "gaussian", "params": {"noise_multiplier": 0.0}, "count": 1, "source": "x"}
    )
    PrivacyReservation.objects.filter(pk=reservation.pk).update(events_text=json.dumps(events))

    text = text_of(cast.client_for("approver").get(review_url(job)))
    assert "your institution would be at an unbounded ε (no guarantee at this δ) of its cap" in text
