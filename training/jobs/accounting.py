"""Privacy accounting for training jobs: events, replay, and budget projections.

Every privacy-relevant release a site makes is recorded as a :class:`PrivacyEvent` (JSON-safe, so
it can be stored on a ``SiteUpdate`` and in the ledger). An institution's spent budget is never a
running total kept by hand: :func:`epsilon_spent` replays all of its events through an accountant
every time (docs/architecture.md, section 4, step 5), and :func:`project_budget` does the same for
"everything so
far plus this job" before a job is proposed or a round is dispatched.

Why Google's ``dp-accounting`` and not opacus: this module runs in the central web process and the
coordinator, which must not import torch (docs/architecture.md, section 6). dp-accounting is pure
Python on
numpy/scipy, has both RDP and PLD accountants, and a typed, documented event vocabulary
(``GaussianDpEvent``, ``PoissonSampledDpEvent``, ``SelfComposedDpEvent``, ...) that maps one to one
onto our events. Opacus' accountants live inside its torch training engine. The library is
imported lazily (about a second of scipy imports), so a web process that never projects a budget
does not pay for it at start-up.

Composition rule (what :func:`epsilon_spent` computes):

* Pure ε-DP events (``laplace``, ``pure_epsilon``: the Laplace filter and the sparse vector
  technique) compose by basic composition: ``ε_pure = Σ ε · count`` with δ = 0. This is exact and
  readable in a report; it ignores the (small, many-round) gain RDP would give Laplace.
* Gaussian events (``gaussian``: ``GaussianDpEvent(z)`` per round) and sampled-Gaussian events
  (``sampled_gaussian``: DP-SGD, ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` self-composed
  ``steps`` times) are composed together in one Rényi-DP accountant
  (``dp_accounting.rdp.RdpAccountant`` semantics, add-or-remove-one neighbouring relation) over the
  fixed orders :data:`RDP_ORDERS`, and the RDP curve is converted once to ``ε_rdp`` at the target δ
  with ``dp_accounting.rdp.compute_epsilon`` (the conversion of Balle et al. 2020, Prop. 12, which
  is tighter than the classical ``min_α R(α) + log(1/δ)/(α-1)``).
* The total is ``ε_pure + ε_rdp`` at δ: an (ε1, 0)-DP and an (ε2, δ)-DP mechanism compose to
  (ε1 + ε2, δ)-DP. No events at all cost 0.0.
* The samplers' cut tails (issue 15) are charged to δ: see :func:`sampler_delta`. In every
  realistic case the term is below float64's resolution of δ and changes nothing; where it is not,
  the RDP part is converted at ``δ - term`` so that the total still holds at δ, and where no part
  of δ can cover it (a release at ε of several hundred) the replay is refused like an unbounded
  loss.

The accountant is versioned (:data:`ACCOUNTANT_VERSIONS`): version 2 computes a sampled
Gaussian's fractional orders by the exact signed series (:mod:`training.jobs.rdp_fractional`)
instead of dp-accounting's upper bound, which gives up at low noise with a large sampling rate.
Budgets and new reports use the current version; the report verifier replays an older report
with the version it was made by (:func:`accountant_version`), so it still verifies.

RDP composition is additive per order, which is all ``RdpAccountant.compose`` does
(``rdp += count * rdp(event)``). Computing the RDP of one Poisson-sampled Gaussian step costs
20 to 150 ms (a series per fractional order), so the curve of one application of each distinct
mechanism is computed by an ``RdpAccountant`` once and cached; the replay sums ``count`` times the
cached curves. The result is identical to composing everything in a single accountant (a test pins
that), and a 50-event replay with warm caches takes well under a millisecond.

A ``noise_multiplier`` is σ divided by the L2 sensitivity of what the filter releases; calibrating
σ to the right sensitivity is the filter's job, not the accountant's.

No Django and no torch here: the job services, the coordinator and the reports all call it.

Why one module: it is the one definition of what an institution has spent, read by proposals,
budgets, the coordinator and every report; the events, their replay and the projection share
the same composition rule and caches, and a split would invite two places to compose ε. The
series of one mechanism, pure mathematics, is apart (:mod:`training.jobs.rdp_fractional`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACCOUNTANT_VERSION",
    "ACCOUNTANT_VERSIONS",
    "MECHANISMS",
    "RDP_ORDERS",
    "BudgetProjection",
    "PrivacyEvent",
    "accountant_version",
    "as_dp_event",
    "epsilon_or_unbounded",
    "epsilon_spent",
    "events_for_pipeline",
    "project_budget",
    "sampler_delta",
]

# dp_accounting 0.6.0's DEFAULT_RDP_ORDERS, written out so that a library upgrade cannot silently
# change the ε replayed for events already in the ledger. Fractional orders near 1 matter for large
# ε (a few to tens, where caps sit); the large integer orders for small ε.
RDP_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 10.0 for x in range(1, 100)) + tuple(float(a) for a in range(11, 64))
) + (128.0, 256.0, 512.0, 1024.0)

#: How the RDP curves are computed, by version. A report's ε figures are replayed by the
#: accountant when it is verified, so a report made before a change must still verify: the
#: verifier (``audit.reports.verify``) replays with the current version first and, where the
#: figures differ, with each earlier one. Budgets and new reports always use the current one.
ACCOUNTANT_VERSIONS: dict[int, str] = {
    1: "dp-accounting 0.6's RDP curves; at fractional orders its series of the absolute binomial "
    "coefficients (an upper bound, infinite where it does not converge)",
    2: "the sampled Gaussian's fractional orders by the signed series, exact "
    "(training.jobs.rdp_fractional); every other order as in version 1",
}
ACCOUNTANT_VERSION = 2
_VERSION: contextvars.ContextVar[int] = contextvars.ContextVar(
    "accountant_version", default=ACCOUNTANT_VERSION
)


@contextlib.contextmanager
def accountant_version(version: int) -> Iterator[None]:
    """Replay with an earlier accountant inside the block (the report verifier, for reports made
    before a change of :data:`ACCOUNTANT_VERSIONS`); a context variable, so it reaches the
    report's builders without threading a parameter through each of them."""
    if version not in ACCOUNTANT_VERSIONS:
        raise ValueError(f"unknown accountant version {version!r}")
    token = _VERSION.set(version)
    try:
        yield
    finally:
        _VERSION.reset(token)


# mechanism -> (required parameters, parameters that must be whole numbers)
MECHANISMS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "laplace": (("epsilon",), frozenset()),
    "gaussian": (("noise_multiplier",), frozenset()),
    "sampled_gaussian": (("noise_multiplier", "sample_rate", "steps"), frozenset({"steps"})),
    "pure_epsilon": (("epsilon",), frozenset()),
}
_PURE = frozenset({"laplace", "pure_epsilon"})

#: Per noise draw, the ideal Gaussian or Laplace distribution's mass beyond the largest draw the
#: engine's samplers can make: ``training.fl.noise.TAIL_MASS`` (2**-1025), written out as a number
#: because this module must not import torch (a test keeps the two equal).
SAMPLER_TAIL_MASS = 2.0**-1025
#: An upper bound on the noise draws of one application of an event (a round's release, or one
#: DP-SGD step): 2**40 coordinates (a 4 TiB float32 update) times 2**8 draws per coordinate (the
#: sparse vector technique draws two per coordinate per pass). The event does not record the
#: model's size, so the bound is generous; in log terms it costs ln(2**48) = 33 of the ~710 of
#: headroom that ``SAMPLER_TAIL_MASS`` leaves.
MAX_DRAWS_PER_APPLICATION = 2**48

# Filters that change what is shared but give no DP guarantee on their own.
_NON_DP_FILTERS = frozenset({"exclude_layers", "partial_sharing", "percentile_clipping"})


def _number(value: Any, what: str) -> float:
    # bool is an int subclass; True as an epsilon is a bug upstream, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


def _whole(value: Any, what: str, *, minimum: int = 1) -> int:
    number = _number(value, what)
    if not number.is_integer():
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if number < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value!r}")
    return int(number)


@dataclass(frozen=True)
class PrivacyEvent:
    """One privacy-relevant release, in a form that can be stored as JSON and replayed.

    ``mechanism`` is one of :data:`MECHANISMS`; ``params`` are, by mechanism:

    * ``laplace``: ``{"epsilon": e}`` (pure ε-DP per occurrence);
    * ``gaussian``: ``{"noise_multiplier": z}`` (σ / L2 sensitivity);
    * ``sampled_gaussian``: ``{"noise_multiplier": z, "sample_rate": q, "steps": n}`` (DP-SGD:
      ``n`` Poisson-sampled steps at rate ``q``);
    * ``pure_epsilon``: ``{"epsilon": e}`` (any other pure ε-DP release, e.g. the sparse vector
      technique).

    ``count`` is how many times it happened (rounds); ``source`` names the filter that produced
    it. Construction validates everything and normalises numbers (floats, whole ``steps``), so a
    bad event is refused where it is made, not when a budget is replayed.
    """

    mechanism: str
    params: dict
    count: int = 1
    source: str = ""

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            known = ", ".join(sorted(MECHANISMS))
            raise ValueError(f"unknown privacy mechanism {self.mechanism!r} (known: {known})")
        if not isinstance(self.params, Mapping):
            raise ValueError(f"{self.mechanism} params must be an object, got {self.params!r}")
        required, whole = MECHANISMS[self.mechanism]
        missing = [name for name in required if name not in self.params]
        if missing:
            raise ValueError(f"{self.mechanism} event is missing {', '.join(missing)}")
        unknown = sorted(set(self.params) - set(required))
        if unknown:
            raise ValueError(f"{self.mechanism} event has unknown params {', '.join(unknown)}")
        params: dict[str, float | int] = {}
        for name in required:
            what = f"{self.mechanism} {name}"
            if name in whole:
                params[name] = _whole(self.params[name], what)
                continue
            value = _number(self.params[name], what)
            if value < 0:
                raise ValueError(f"{what} must not be negative, got {value!r}")
            if name == "sample_rate" and value > 1:
                raise ValueError(f"{what} must be at most 1, got {value!r}")
            params[name] = value
        if not isinstance(self.source, str):
            raise ValueError(f"event source must be a string, got {self.source!r}")
        # A private copy: the caller's dict cannot change a frozen event afterwards.
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "count", _whole(self.count, f"{self.mechanism} count"))

    def __hash__(self) -> int:
        return hash((self.mechanism, tuple(sorted(self.params.items())), self.count, self.source))

    def to_json(self) -> dict:
        """A plain JSON-safe dict; :meth:`from_json` gives back an equal event."""
        return {
            "mechanism": self.mechanism,
            "params": dict(self.params),
            "count": self.count,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: dict) -> PrivacyEvent:
        """Rebuild an event from :meth:`to_json` output; ``ValueError`` says what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a privacy event must be an object, got {data!r}")
        unknown = sorted(set(data) - {"mechanism", "params", "count", "source"})
        if unknown:
            raise ValueError(f"privacy event has unknown keys {', '.join(unknown)}")
        for key in ("mechanism", "params"):
            if key not in data:
                raise ValueError(f"privacy event is missing {key!r}")
        return cls(
            mechanism=data["mechanism"],
            params=data["params"],
            count=data.get("count", 1),
            source=data.get("source", ""),
        )


def _filter_param(spec: Mapping, name: str, key: str) -> Any:
    if key not in spec:
        raise ValueError(f"privacy filter {name!r} is missing {key!r}")
    return spec[key]


def events_for_pipeline(
    pipeline: list[dict], *, rounds: int, local_epochs: int, batch_size: int, num_records: int
) -> list[PrivacyEvent]:
    """The events one site would spend over a whole job, from the job's privacy pipeline.

    ``pipeline`` is the job spec's list of filters (``{"filter": name, **params}``), in order.
    ``num_records`` is the site's local data set size, which sets DP-SGD's sampling rate and steps.
    Filters that are not DP by themselves give no event; an unknown filter is a ``ValueError``
    naming it (a new filter must be taught to the accountant before a job can use it).
    """
    rounds = _whole(rounds, "rounds")
    local_epochs = _whole(local_epochs, "local_epochs")
    batch_size = _whole(batch_size, "batch_size")
    num_records = _whole(num_records, "num_records")
    events: list[PrivacyEvent] = []
    for position, spec in enumerate(pipeline):
        if not isinstance(spec, Mapping) or "filter" not in spec:
            raise ValueError(f"privacy pipeline entry {position} has no 'filter': {spec!r}")
        name = spec["filter"]
        if name in _NON_DP_FILTERS:
            continue
        if name == "laplace_noise":
            epsilon = _filter_param(spec, name, "epsilon")
            events.append(PrivacyEvent("laplace", {"epsilon": epsilon}, rounds, name))
        elif name == "gaussian_noise":
            z = _filter_param(spec, name, "noise_multiplier")
            events.append(PrivacyEvent("gaussian", {"noise_multiplier": z}, rounds, name))
        elif name == "svt":
            epsilon = _number(_filter_param(spec, name, "epsilon"), "svt epsilon")
            passes = _whole(spec.get("max_passes", 1), "svt max_passes")
            # Each pass of the selection is a fresh run of the sparse vector technique.
            events.append(PrivacyEvent("pure_epsilon", {"epsilon": epsilon * passes}, rounds, name))
        elif name == "dp_sgd":
            z = _filter_param(spec, name, "noise_multiplier")
            steps = rounds * local_epochs * math.ceil(num_records / batch_size)
            params = {
                "noise_multiplier": z,
                "sample_rate": min(1.0, batch_size / num_records),
                "steps": steps,
            }
            events.append(PrivacyEvent("sampled_gaussian", params, 1, name))
        else:
            raise ValueError(f"privacy filter {name!r} is unknown to the accountant")
    return events


@functools.cache
def _dp():
    import dp_accounting  # lazy: about a second of scipy imports

    # For a sampled Gaussian with a large sampling rate, dp-accounting's series for fractional
    # orders near 1 may not converge; it then leaves that order out of the minimum (which only
    # makes ε larger, never smaller) and logs an absl WARNING per order and per call, dozens for
    # every budget page. The exclusion is sound, so only errors are let through.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return dp_accounting


def _unit_dp_event(key: tuple):
    dp = _dp()
    if key[0] == "gaussian":
        return dp.GaussianDpEvent(key[1])
    _, z, q = key
    return dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(z))


@functools.lru_cache(maxsize=4096)
def _unit_rdp(key: tuple, version: int = ACCOUNTANT_VERSION):
    """RDP curve over :data:`RDP_ORDERS` of one application of a Gaussian mechanism.

    ``key`` is ``("gaussian", z)`` or ``("sampled_gaussian", z, q)``. dp_accounting has no
    public getter for an accountant's RDP curve, so this reads ``RdpAccountant._rdp``; the tests
    check it against the closed form α/(2z²) and against a single-accountant composition, so a
    library change that breaks this fails there. From version 2 a sampled Gaussian's fractional
    orders are the exact signed series (:mod:`training.jobs.rdp_fractional`, whose docstring
    says why) instead of dp_accounting's upper bound of them.
    """
    exact_fractional = version >= 2 and key[0] == "sampled_gaussian" and 0 < key[2] < 1
    # From version 2 dp_accounting computes only the whole orders of a sampled Gaussian (a
    # finite sum); its fractional orders, most of its time, come from the signed series.
    orders = [a for a in RDP_ORDERS if float(a).is_integer()] if exact_fractional else RDP_ORDERS
    accountant = _dp().rdp.RdpAccountant(orders=list(orders))
    accountant.compose(_unit_dp_event(key))
    computed = getattr(accountant, "_rdp", None)
    if computed is None or len(computed) != len(orders):
        raise RuntimeError("dp_accounting's RdpAccountant no longer exposes its RDP curve")
    if not exact_fractional:
        # A read-only copy (about 1.2 kB): cached curves are shared by every replay.
        curve = computed.astype("float64", copy=True)
    else:
        from training.jobs.rdp_fractional import rdp_sampled_gaussian

        _, z, q = key
        whole = dict(zip(orders, computed.tolist(), strict=True))
        curve = _float_array(
            [
                whole[order] if order in whole else rdp_sampled_gaussian(q, z, order)
                for order in RDP_ORDERS
            ]
        )
    curve.flags.writeable = False
    return curve


def _float_array(values: list[float]):
    import numpy  # lazy, with dp_accounting's other imports

    return numpy.array(values, dtype="float64")


def _split(events: Iterable[PrivacyEvent]) -> tuple[float, dict[tuple, int]]:
    """Pure ε total, and applications per distinct Gaussian mechanism (RDP is additive)."""
    pure = 0.0
    gaussian: dict[tuple, int] = {}
    for event in events:
        if not isinstance(event, PrivacyEvent):
            raise TypeError(f"expected a PrivacyEvent, got {event!r}")
        params = event.params
        if event.mechanism in _PURE:
            pure += params["epsilon"] * event.count
            continue
        z = params["noise_multiplier"]
        if event.mechanism == "gaussian":
            key, times = ("gaussian", z), event.count
        else:
            key = ("sampled_gaussian", z, params["sample_rate"])
            times = params["steps"] * event.count
            if params["sample_rate"] == 0:
                continue  # nobody's record is ever used: no privacy cost
        if z == 0:
            raise ValueError(
                f"{event.mechanism} event from {event.source or 'an unnamed source'} has noise "
                "multiplier 0: it adds no noise, so its privacy loss is unbounded"
            )
        gaussian[key] = gaussian.get(key, 0) + times
    return pure, gaussian


def as_dp_event(events: Iterable[PrivacyEvent]):
    """The Gaussian part of ``events`` as one ``dp_accounting.ComposedDpEvent``.

    Pure ε events are left out (they are composed by basic composition). Useful to hand the same
    history to another dp_accounting accountant (e.g. PLD) or to log it in the library's terms.
    """
    dp = _dp()
    _, gaussian = _split(events)
    return dp.ComposedDpEvent(
        [dp.SelfComposedDpEvent(_unit_dp_event(key), times) for key, times in gaussian.items()]
    )


def _rdp_epsilon(gaussian: tuple[tuple[tuple, int], ...], delta: float) -> float:
    return _rdp_epsilon_of(gaussian, delta, _VERSION.get())


@functools.lru_cache(maxsize=4096)
def _rdp_epsilon_of(gaussian: tuple[tuple[tuple, int], ...], delta: float, version: int) -> float:
    curve = sum(times * _unit_rdp(key, version) for key, times in gaussian)
    epsilon, _order = _dp().rdp.compute_epsilon(RDP_ORDERS, curve, delta)
    return float(epsilon)


def _log1p_exp(x: float) -> float:
    """``ln(1 + e**x)`` without overflow."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def _cut_term(applications: int, epsilon: float) -> float:
    """``(1 + e**ε) * applications * MAX_DRAWS_PER_APPLICATION * SAMPLER_TAIL_MASS``, at most 1."""
    if applications <= 0:
        return 0.0
    log_term = (
        _log1p_exp(epsilon)
        + math.log(applications)
        + math.log(MAX_DRAWS_PER_APPLICATION)
        + math.log(SAMPLER_TAIL_MASS)
    )
    return math.exp(min(log_term, 0.0))


def _applications(events: Iterable[PrivacyEvent]) -> tuple[list[tuple[float, int]], int]:
    """Pure events as ``(ε per application, applications)``, and Gaussian applications in all."""
    pure: list[tuple[float, int]] = []
    gaussian = 0
    for event in events:
        if event.mechanism in _PURE:
            pure.append((event.params["epsilon"], event.count))
        elif event.mechanism == "gaussian":
            gaussian += event.count
        elif event.params["sample_rate"] > 0:
            gaussian += event.params["steps"] * event.count
    return pure, gaussian


def sampler_delta(events: Iterable[PrivacyEvent], *, rdp_epsilon: float) -> float:
    """The δ that the samplers' cut tails add to a guarantee at ``ε_pure + rdp_epsilon``.

    The engine's Gaussian and Laplace samplers never draw beyond their largest value (37.7 σ,
    743 b: :mod:`training.fl.noise`), where the ideal distribution has mass at most
    :data:`SAMPLER_TAIL_MASS` per draw. The sampler is the ideal one conditioned on missing that
    tail, so a coupling that redraws the rare tail draws gives, for a release of ``d`` draws,
    even chosen adaptively round after round (a union bound over draws), a mechanism ``M'``
    within total variation ``η = d * SAMPLER_TAIL_MASS`` of the ideal ``M``.

    Bound: if ``M`` is (ε, δ)-DP and ``TV(M(x), M'(x)) <= η`` for every input, then for every set
    of outputs ``S`` and neighbours ``x, y``: ``P[M'(x) ∈ S] <= P[M(x) ∈ S] + η <= e**ε P[M(y) ∈
    S] + δ + η <= e**ε (P[M'(y) ∈ S] + η) + δ + η``, so ``M'`` is (ε, δ + (1 + e**ε) η)-DP.

    Applied per pure event (each application is (ε_i, 0)-DP, so its cut version is (ε_i, (1 +
    e**ε_i) η)-DP; basic composition adds the δs) and once to the Gaussian part as a whole (its
    RDP-composed (``rdp_epsilon``, δ) guarantee), with ``d`` bounded by
    :data:`MAX_DRAWS_PER_APPLICATION` per application. Computed in logs, capped at 1. For ε per
    application below about 600 it is under 1e-30; it reaches δ only for a release at ε of
    several hundred, whose guarantee means nothing anyway.
    """
    pure, gaussian = _applications(events)
    total = sum(_cut_term(count, epsilon) for epsilon, count in pure)
    total += _cut_term(gaussian, rdp_epsilon)
    return min(total, 1.0)


def epsilon_spent(events: Iterable[PrivacyEvent], *, delta: float) -> float:
    """Total ε at δ for all the events of one institution.

    Replayed from the events every time, never summed by hand for the RDP part; see the module
    docstring for the composition rule. Raises ``ValueError`` for a δ outside
    (0, 1), for an unbounded privacy loss (a Gaussian event without noise), and where the
    samplers' cut tails (:func:`sampler_delta`) would take half of δ or more.
    """
    delta = _number(delta, "delta")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be strictly between 0 and 1, got {delta!r}")
    events = list(events)
    pure, gaussian = _split(events)
    key = tuple(sorted(gaussian.items()))
    rdp = _rdp_epsilon(key, delta) if gaussian else 0.0
    # The samplers' cut tails (sampler_delta): usually below δ's float resolution.
    cut = sampler_delta(events, rdp_epsilon=rdp) if math.isfinite(rdp) else 0.0
    if delta + cut != delta:
        # Convert the RDP part at δ - cut instead, with cut taken at an ε at least as large as
        # the result (the RDP part's ε at δ/2), so that the total holds at δ.
        upper = _rdp_epsilon(key, delta / 2) if gaussian else 0.0
        cut = sampler_delta(events, rdp_epsilon=upper)
        if not cut < delta / 2:
            raise ValueError(
                f"no guarantee at delta={delta:g}: the noise samplers' cut tails alone cost "
                f"delta {cut:.3g} at these events' epsilon (a release at epsilon of several "
                "hundred); see training.jobs.accounting.sampler_delta"
            )
        rdp = _rdp_epsilon(key, delta - cut) if gaussian else 0.0
    total = pure + rdp
    if not math.isfinite(total):
        raise ValueError(
            f"privacy loss is unbounded at delta={delta:g} (pure part {pure}, RDP part {rdp}): "
            "check the events' noise multipliers and sample rates"
        )
    return total


def _decimals(a: float, b: float) -> int:
    """Decimals to print: 2, or more when two different numbers would print the same."""
    for decimals in range(2, 7):
        if a == b or f"{a:.{decimals}f}" != f"{b:.{decimals}f}":
            return decimals
    return 6


@dataclass(frozen=True)
class BudgetProjection:
    """An institution's ε after a proposed job, against its cap, at one δ.

    ``projected`` replays past and job events together, so it can be less than
    ``already_spent + job_cost`` (RDP composes sub-additively); it is never more.
    """

    institution: str
    already_spent: float
    job_cost: float
    projected: float
    cap: float
    delta: float

    @property
    def fits(self) -> bool:
        # A relative tolerance so float noise in a replay cannot flip a cap that is met exactly.
        return self.projected <= self.cap or math.isclose(self.projected, self.cap, rel_tol=1e-9)

    @property
    def remaining(self) -> float:
        """What is left under the cap after the job (0 when it is met or exceeded)."""
        return max(self.cap - self.projected, 0.0)

    def explain(self) -> str:
        """One sentence for a form error, a page or the ledger."""
        if not math.isfinite(self.projected):
            return (
                f"{self.institution}: the job gives no finite ε at δ={self.delta:g} (a release "
                f"at an ε of several hundred voids the guarantee), so it cannot fit the cap "
                f"{self.cap:g}"
            )
        d = _decimals(self.projected, self.cap)
        verdict = "is within" if self.fits else "exceeds"
        return (
            f"{self.institution}: projected ε {self.projected:.{d}f} {verdict} its cap "
            f"{self.cap:.{d}f} at δ={self.delta:g} (already spent {self.already_spent:.{d}f}, "
            f"this job {self.job_cost:.{d}f})"
        )


def epsilon_or_unbounded(events: list[PrivacyEvent], delta: float) -> float:
    """:func:`epsilon_spent`, or infinity where the events give no guarantee at ``delta``: a
    projection must refuse such a job (it fits no cap), not fail. A δ outside (0, 1) is still a
    ValueError: that is a wrong argument, not a verdict on the job."""
    delta = _number(delta, "delta")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be strictly between 0 and 1, got {delta!r}")
    try:
        return epsilon_spent(events, delta=delta)
    except ValueError:
        return math.inf


def project_budget(
    *,
    institution: str,
    past_events: Iterable[PrivacyEvent],
    job_events: Iterable[PrivacyEvent],
    cap: float,
    delta: float,
) -> BudgetProjection:
    """Replay an institution's past events with a job's events and compare with its ε cap."""
    cap = _number(cap, "cap")
    if cap < 0:
        raise ValueError(f"cap must not be negative, got {cap!r}")
    past, job = list(past_events), list(job_events)
    return BudgetProjection(
        institution=institution,
        already_spent=epsilon_or_unbounded(past, delta),
        job_cost=epsilon_or_unbounded(job, delta),
        projected=epsilon_or_unbounded(past + job, delta),
        cap=cap,
        delta=float(delta),
    )
