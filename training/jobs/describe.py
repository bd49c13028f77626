"""Plain-English summaries of a training job spec, for the people who approve it.

An approver signs a spec's digest (:func:`training.jobs.spec.spec_digest`), but reads these
sentences: one per privacy filter (:func:`describe_pipeline`), one on where the models are
evaluated (:func:`describe_evaluation`), one on how each site's contribution is scored
(:func:`describe_contribution`) and one on the privacy audit asked before approval
(:func:`describe_privacy_audit`). They take a *normalised* spec (the output
of :func:`training.jobs.spec.validate_spec`) and spell its numbers as the spec does, so what a
person reads is what was hashed.

Like :mod:`training.jobs.spec`, this module imports neither torch nor Django models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from training.fl.contribution import PAIRED_MIN_PLAYERS, SURROGATE_MAX_PLAYERS
from training.jobs.spec import (
    CONTRIBUTION_EXACT_MAX,
    EVALUATION_SITES,
    contribution_settings,
    contribution_value,
    evaluation_settings,
    loss_of,
    privacy_audit_settings,
)

#: The training losses (``training.jobs.spec.LOSSES``) in words.
LOSS_WORDS = {
    "cross_entropy": "cross-entropy loss",
    "dice_bce": "Dice + cross-entropy loss",
}


def _num(value: Any) -> str:
    """A number as the spec spells it: ``1.0``, ``1.1``, ``3``."""
    return repr(value) if isinstance(value, float) else str(value)


def _percent(fraction: Any) -> str:
    text = repr(round(float(fraction) * 100, 8))
    return text[:-2] if text.endswith(".0") else text


def _ordinal(value: Any) -> str:
    v = float(value)
    if not v.is_integer():
        return f"{_percent(v / 100)}th"
    n = int(v)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _describe_exclude(f: Mapping) -> str:
    layers = list(f["layers"])
    noun = "layer" if len(layers) == 1 else "layers"
    return f"Never share the {noun} {', '.join(layers)}: they stay at the site"


def _describe_partial(f: Mapping) -> str:
    pct = _percent(f["fraction"])
    if f.get("strategy", "topk") == "random":
        return f"Share only a random {pct}% of coordinates, drawn afresh each round"
    return f"Share only the {pct}% of coordinates with the largest change (top-k)"


def _describe_clip(f: Mapping) -> str:
    return f"Clip every update at its {_ordinal(f['percentile'])} percentile of absolute values"


def _describe_laplace(f: Mapping) -> str:
    clamp = (
        f"clamping every shared coordinate to ±{_num(f['clip'])} and then "
        if f.get("clip") is not None
        else ""
    )
    return (
        f"Add Laplace noise for differential privacy with ε = {_num(f['epsilon'])} per round, "
        f"{clamp}calibrated to an update sensitivity of {_num(f['sensitivity'])} "
        "(the update's L1 norm is clipped to it)"
    )


def _describe_gaussian(f: Mapping) -> str:
    return (
        f"Add Gaussian noise with noise multiplier {_num(f['noise_multiplier'])} "
        f"after clipping the update to L2 norm {_num(f['clip_norm'])}"
    )


def _describe_svt(f: Mapping) -> str:
    passes = f.get("max_passes", 1)
    text = (
        f"Share at most {_percent(f['fraction'])}% of coordinates, chosen by the sparse "
        f"vector technique with ε = {_num(f['epsilon'])} per pass and threshold "
        f"{_num(f['threshold'])} (at most {passes} {'pass' if passes == 1 else 'passes'} "
        "over the update, each pass run charged its ε)"
    )
    details = []
    if f.get("bound") is not None:
        details.append(f"values clipped to ±{_num(f['bound'])}")
    if f.get("selection_share") is not None:
        details.append(f"{_percent(f['selection_share'])}% of each pass's ε spent on selecting")
    if f.get("threshold_share") is not None:
        details.append(
            f"{_percent(f['threshold_share'])}% of the selection's ε on the threshold's noise"
        )
    if details:
        text += "; " + ", ".join(details)
    if float(f["fraction"]) >= 1.0:
        text += (
            ". At 100% it still leaves coordinates unshared: each pass selects only about "
            "half of those left, so some stay unshared after the last pass, and each pass "
            "is charged"
        )
    return text


def _describe_dp_sgd(f: Mapping) -> str:
    return (
        "Train locally with DP-SGD: clip each example's gradient to L2 norm "
        f"{_num(f['max_grad_norm'])} and add Gaussian noise with noise multiplier "
        f"{_num(f['noise_multiplier'])}"
    )


_DESCRIBE: dict[str, Callable[[Mapping], str]] = {
    "exclude_layers": _describe_exclude,
    "partial_sharing": _describe_partial,
    "percentile_clipping": _describe_clip,
    "laplace_noise": _describe_laplace,
    "gaussian_noise": _describe_gaussian,
    "svt": _describe_svt,
    "dp_sgd": _describe_dp_sgd,
}


def describe_pipeline(spec: Mapping) -> list[str]:
    """One plain-English sentence per privacy filter, in order, for an approver.

    Takes a normalised spec. An empty pipeline gives an empty list (the update
    is shared as computed); the caller words that case for its page.
    """
    return [_DESCRIBE[f["filter"]](f) for f in spec.get("privacy_pipeline") or []]


def pipeline_warnings(spec: Mapping) -> list[str]:
    """Plain words on what a normalised spec's pipeline does that its numbers hide, for the
    proposer before proposing (:class:`training.jobs.proposal_guidance.BudgetPreview`) and the
    approver. Empty when there is nothing to say."""
    out = []
    for f in spec.get("privacy_pipeline") or []:
        if f["filter"] == "svt" and float(f["fraction"]) >= 1.0:
            passes = f.get("max_passes", 1)
            out.append(
                "The sparse vector technique at a share of 100% does not share every "
                "coordinate: each pass selects only about half of the coordinates left, so "
                f"after {passes} {'pass' if passes == 1 else 'passes'} about "
                f"{_percent(0.5**passes)}% of them stay unshared, and every pass run is charged "
                f"ε = {_num(f['epsilon'])} (up to {_num(f['epsilon'] * passes)} per round). "
                "To share everything, use Laplace or Gaussian noise instead."
            )
    return out


def describe_evaluation(spec: Mapping, *, uploaded: tuple[str, int] | None = None) -> str:
    """Plain words on where the job's models are evaluated, and what that asks of a site.

    ``uploaded`` is ``(institution, records)`` of the central validation set the job is
    measured on when an institution's data steward uploaded it
    (``training.jobs.central_validation.validation_set_in_use``); the page reads it, since this
    module reads no database."""
    settings = evaluation_settings(spec)
    metric = "Dice score" if spec.get("purpose") == "segmentation" else "accuracy"
    if settings["where"] != EVALUATION_SITES and uploaded is not None:
        institution, records = uploaded
        return (
            f"The models are evaluated centrally on a validation set uploaded by {institution} "
            f"({records} records) to the consortium's server for '{spec.get('dataset_key')}', "
            "as the agreement allows: no other site's records are used to measure them."
        )
    if settings["where"] != EVALUATION_SITES:
        return (
            "The models are evaluated centrally, on the consortium's own validation set for "
            f"'{spec.get('dataset_key')}': no site's records are used to measure them."
        )
    approximated = (
        f" and, for sampled contribution scores, an approximation of every coalition's {metric} "
        "worked out on the same records"
        if _contribution_surrogate_possible(spec)
        else ""
    )
    return (
        f"The models are evaluated at the sites: each site keeps "
        f"{_percent(settings['validation_fraction'])}% of its own records aside (never trained "
        "on, never sent) and, after each round, measures on them the round's model and at "
        f"most {settings['max_models']} models that contribution scoring builds from the "
        "sites' shared updates, then sends back only "
        f"the {metric}, the loss and its number of records{approximated}, signed with its key. "
        f"The round's {metric} is the sites' figures weighted by their records. Your site is "
        "sent models built from other sites' shared updates, and the other sites models built "
        "from yours."
    )


def _contribution_surrogate_possible(spec: Mapping) -> bool:
    """Whether contribution estimator 3's surrogate can be made for this job's rounds (by the
    coordinator, or by each site when the sites evaluate): a classification job's averaged
    rounds, at most ``SURROGATE_MAX_PLAYERS`` sites, a method that may sample. Whether each
    round's updates keep the coalitions in their span is known only when they arrive."""
    sites = len(spec.get("participants") or [])
    method = contribution_settings(spec)["method"]
    may_sample = method == "shapley_sampled" or (
        method == "auto"
        and (
            sites > CONTRIBUTION_EXACT_MAX
            or (
                evaluation_settings(spec)["where"] == EVALUATION_SITES
                and 2**sites > evaluation_settings(spec)["max_models"]
            )
        )
    )
    return (
        may_sample
        and spec.get("purpose") != "segmentation"
        and spec.get("topology") != "cyclic"
        and sites <= SURROGATE_MAX_PLAYERS
    )


def describe_contribution(spec: Mapping) -> str:
    """One plain-English sentence on how each site's contribution will be scored."""
    settings = contribution_settings(spec)
    method = settings["method"]
    metric = "Dice score" if spec.get("purpose") == "segmentation" else "accuracy"
    if contribution_value(spec) == "loss":
        # Minus the loss, so that a larger value is still better (training.fl.coalition).
        metric = f"validation {LOSS_WORDS.get(loss_of(spec), loss_of(spec))} (lower is better)"
    where = (
        "measured by the sites on their own validation shares"
        if evaluation_settings(spec)["where"] == EVALUATION_SITES
        else "on the consortium's validation set"
    )
    base = (
        "Each round, each site's contribution is scored from the updates it shared, "
        f"by the {metric} {where} of the models its updates make "
    )
    if method == "leave_one_out":
        return base + "with and without it (leave-one-out)."
    exact = "with every subset of the other sites (exact Shapley values)"
    if method == "shapley_exact":
        return base + exact + "."
    # training.fl.contribution's sampled estimators: the paired one from PAIRED_MIN_PLAYERS sites
    # on (a planned sample, at most a third of the coalitions), the GTG-Shapley walk below (and
    # where the sites' evaluation budget is too small for the paired plan).
    walk = (
        f"in at most {settings['permutations']} sampled orderings of the sites (GTG-Shapley), "
        f"stopping early within an ordering once the remaining sites change the {metric} by "
        f"less than {_num(settings['truncation'])}, and when the estimates move by less "
        f"than {_percent(settings['tolerance'])}%"
    )
    paired = (
        "on a planned sample of coalitions of the sites (each site alone and each site left "
        "out, then complementary pairs; at most a third of all coalitions, and no more than "
        f"{settings['permutations']} sampled orderings of the sites would evaluate), "
        "fitted so that the scores add up to the round's change; a round in which neither the "
        f"round's model nor a site alone nor a site left out moves the {metric} by more than "
        f"{_num(settings['truncation'])} (or one step of the metric) is scored zero for everyone"
    )
    sites = len(spec.get("participants") or [])
    sampled = paired if sites >= PAIRED_MIN_PLAYERS else walk
    # Estimator 3 (training.rounds.contributions): for a classification job's averaged rounds
    # a surrogate, made by the coordinator or by each site on its share, corrects the sample.
    if _contribution_surrogate_possible(spec):
        at_sites = evaluation_settings(spec)["where"] == EVALUATION_SITES
        maker = (
            "by each site on its own validation share from the models it evaluates"
            if at_sites
            else "from the round's model and the sites' updates"
        )

        def corrected(fallback: str) -> str:
            return (
                f"{paired}; a second-order approximation of every coalition's {metric}, worked "
                f"out {maker}, is shared out exactly and the sample corrects only its error "
                "(where a site shares part of its update and the average is mask-aware, the "
                f"approximation does not apply: {fallback})"
            )

        alone = "the sample is used alone"
        walked = f"the sites are then scored {walk}"
        sampled = corrected(alone if sites >= PAIRED_MIN_PLAYERS else walked)
        paired = corrected(alone)  # auto samples only above CONTRIBUTION_EXACT_MAX sites
    if method == "shapley_sampled":
        return base + sampled + "."
    return base + f"{exact} when at most {CONTRIBUTION_EXACT_MAX} sites take part, else {paired}."


def describe_privacy_audit(spec: Mapping) -> str:
    """One plain-English sentence on the privacy audit the job asks of each site before its
    approvers decide (the spec's ``privacy_audit``), or on its absence."""
    settings = privacy_audit_settings(spec)
    if settings is None:
        return (
            "This job asks for no privacy audit: no site attacks its own update before the "
            "approvers decide."
        )
    return (
        "Before you decide, each site's worker attacks its own update under this pipeline on "
        f"{settings['records']} of its records (seed {settings['seed']}) and reports only the "
        "figures: how closely the attacks rebuild a record, and the share of those records they "
        "rebuild. No record and no reconstruction leaves the site."
    )
