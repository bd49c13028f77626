#!/usr/bin/env python
"""The seed's findings, re-run through the engine's public functions (issue 15).

    .venv/bin/python benchmarks/science/experiments.py [--quick] [--datasets digits ...]
        [--seeds N] [--seed S] [--rounds R] [--momentum-restart on|off] [--arms TEXT ...]
        [--out DIR]

A science harness, not a product path: no Django, no database, no site worker. Every arm calls
the engine as a site and the coordinator would (:func:`training.fl.data.demo_split` for the
sites, :func:`training.fl.models.build_model`, :func:`training.fl.local.train_local`,
:func:`training.fl.filters.apply_pipeline`, :class:`training.fl.aggregate.StreamingFedAvg`,
:func:`training.fl.aggregate.cyclic_order`, :func:`training.fl.baseline.train_centralised`,
:func:`training.fl.evaluate.evaluate`) and the accountant prices each pipeline
(:func:`training.jobs.accounting.events_for_pipeline`, :func:`~training.jobs.accounting.
epsilon_spent` at δ = 1e-5). What the engine has no single function for (a FedAvg or cyclic
*loop*, local-only training) is written here, from those parts.

Data: the bundled sets split by :func:`~training.fl.data.demo_split` over the four demo sites:
unequal sizes (35/27/21/17%) and, for digits and breast cancer, Dirichlet(0.8) label skew; for
the generated lesions, a gain and noise level per site's "scanner". The split's seed is the
run's seed, so every seed has other sites. The consortium's validation part
(:func:`~training.fl.data.load_validation_set`) scores every arm: accuracy, or Dice for lesions.

The arms (``ARMS``; docs/science.md defines them in words):

* ``local``: each site trains alone for ``R`` epochs; the table shows the mean over the sites of
  their validation scores. ``centralised``: one model on the pooled records for ``R`` epochs
  (:func:`~training.fl.baseline.train_centralised`).
* ``fedavg`` (momentum restart: a fresh optimizer every round), ``fedavg-keep`` (the optimizer's
  state kept on each site from round to round), ``cyclic`` (the model visits the sites in turn,
  :func:`~training.fl.aggregate.cyclic_order`).
* ``topk-10``, ``topk-40``, ``random-10``, ``random-40``: ``partial_sharing`` at that share,
  mask-aware averaging. Sharing 100% is ``fedavg`` itself (the filter at 1.0 is a no-op).
* Noise. ``gamma`` is the 99th percentile of ``|update|`` over the four sites' first local
  update (measured per data set and seed, before any arm runs). Three noise levels set the
  Laplace scale ``b = nu * gamma`` (``NOISE_LEVELS``). With ``m`` the model's coordinates:

  - ``laplace-<level>``: ``laplace_noise`` on every coordinate, each clamped to
    ``[-gamma, gamma]`` (``clip``), ``sensitivity = m * gamma`` (the L1 bound of the clamped
    update, so the L1 clip never binds) and ``epsilon = m * gamma / b``: ``Lap(b)`` per
    coordinate.
  - ``svt-noise-<level>-<share>``, **equal per-coordinate noise**: ``svt`` with ``threshold =
    gamma / 2`` (so ``bound = gamma``), one pass, and ``epsilon`` set so that the released
    values get the same ``Lap(b)``: the release's scale is ``c * gamma / eps3`` with ``c =
    round(share * m)`` and ``eps3 = epsilon / 2``, so ``epsilon = 2 c gamma / b``.
  - ``svt-eps-<level>-<share>``, **equal total ε**: the same ``svt`` at the Laplace arm's
    ``epsilon = m * gamma / b`` per round; its released values then get ``Lap(2 * share * b)``.

* ``topk-10-zero-filled``: top-k 10% with the seed's zero-filled mean, for comparison.

Every arm but ``fedavg-keep`` restarts momentum unless ``--momentum-restart off``.
``--quick`` (CI): one seed, two rounds, a subset of the arms, a quarter of the lesion images.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.fl.aggregate import StreamingFedAvg, apply_update, cyclic_order  # noqa: E402
from training.fl.baseline import train_centralised  # noqa: E402
from training.fl.data import DEMO_SITES, SiteData, demo_split, load_validation_set  # noqa: E402
from training.fl.evaluate import evaluate  # noqa: E402
from training.fl.filters import apply_pipeline  # noqa: E402
from training.fl.local import train_local  # noqa: E402
from training.fl.models import build_model  # noqa: E402
from training.jobs.accounting import epsilon_spent, events_for_pipeline  # noqa: E402

DELTA = 1e-5
DEFAULT_OUT = ROOT / "docs" / "science"
#: Laplace scale b as a multiple of gamma, per noise level.
NOISE_LEVELS: dict[str, float] = {"low": 0.1, "mid": 0.3, "high": 1.0}
SVT_SHARES: tuple[float, ...] = (0.1, 0.4, 1.0)


@dataclass(frozen=True)
class DataConfig:
    """How one bundled set is trained: model, optimizer, loss, metric."""

    key: str
    model: str
    params: dict[str, Any]
    n_classes: int
    optimizer: dict[str, Any]
    loss: str
    metric: str
    batch_size: int = 32
    #: Share of each site's records kept (the lesion U-Net is the slow part on a CPU).
    keep: float = 1.0


CONFIGS: dict[str, DataConfig] = {
    "digits": DataConfig(
        "digits",
        "training.fl.models.MLP",
        {"hidden_sizes": [32]},
        10,
        {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "cross_entropy",
        "accuracy",
    ),
    "breast-cancer": DataConfig(
        "breast-cancer",
        "training.fl.models.MLP",
        {"hidden_sizes": [16]},
        2,
        {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "cross_entropy",
        "accuracy",
    ),
    "lesions": DataConfig(
        "lesions",
        "training.fl.models.SmallUNet",
        # 8 channels, not 4: with 4, the four ReLU channels that feed the head could all die in
        # Adam's first steps at lr 0.01 (seed 2 did, centralised included), after which the head
        # sees zeros and predicts the background prior everywhere (Dice 0 for good).
        {"base_channels": 8, "depth": 2},
        2,
        {"name": "adam", "lr": 0.01},
        "dice_bce",
        "dice",
        batch_size=16,
        keep=0.5,
    ),
}


@dataclass(frozen=True)
class Arm:
    """One arm: how it trains (``kind``) and the privacy pipeline it applies.

    ``pipeline(calibration)`` builds the pipeline from the data set's measured ``gamma`` and
    model size ``m`` (the noise arms need both)."""

    name: str
    group: str
    kind: str  # local | centralised | fedavg | cyclic
    pipeline: Callable[[dict[str, float]], list[dict[str, Any]]] = field(
        default=lambda _c: [], compare=False
    )
    restart: bool | None = None  # None: the run's default
    zero_filled: bool = False
    note: str = ""
    configured_share: float | None = 1.0


def _share(fraction: float, strategy: str) -> Callable[[dict[str, float]], list[dict[str, Any]]]:
    return lambda _c: [{"filter": "partial_sharing", "fraction": fraction, "strategy": strategy}]


def _laplace(level: float) -> Callable[[dict[str, float]], list[dict[str, Any]]]:
    def build(c: dict[str, float]) -> list[dict[str, Any]]:
        gamma, m = c["gamma"], c["m"]
        b = level * gamma
        return [
            {
                "filter": "laplace_noise",
                "epsilon": m * gamma / b,
                "sensitivity": m * gamma,
                "clip": gamma,
            }
        ]

    return build


def _svt(level: float, share: float, *, equal: str) -> Callable[[dict[str, float]], list]:
    def build(c: dict[str, float]) -> list[dict[str, Any]]:
        gamma, m = c["gamma"], c["m"]
        b = level * gamma
        # Equal noise: the release's Lap(c gamma / (eps / 2)) is Lap(b); equal ε: Laplace's ε.
        epsilon = 2.0 * round(share * m) * gamma / b if equal == "noise" else m * gamma / b
        return [
            {
                "filter": "svt",
                "epsilon": epsilon,
                "threshold": gamma / 2.0,
                "fraction": share,
                "max_passes": 1,
            }
        ]

    return build


def _arms() -> list[Arm]:
    arms = [
        Arm("local", "baselines", "local", note="mean over sites, each alone"),
        Arm("centralised", "baselines", "centralised", note="records pooled"),
        Arm("fedavg", "topology", "fedavg", restart=True, note="momentum restart"),
        Arm("fedavg-keep", "topology", "fedavg", restart=False, note="optimizer state kept"),
        Arm("cyclic", "topology", "cyclic"),
    ]
    for pct in (10, 40):
        for strategy in ("topk", "random"):
            arms.append(
                Arm(
                    f"{strategy}-{pct}",
                    "sharing",
                    "fedavg",
                    _share(pct / 100, strategy),
                    configured_share=pct / 100,
                )
            )
    arms.append(
        Arm(
            "topk-10-zero-filled",
            "sharing",
            "fedavg",
            _share(0.1, "topk"),
            zero_filled=True,
            configured_share=0.1,
            note="zero-filled mean",
        )
    )
    for level, nu in NOISE_LEVELS.items():
        arms.append(
            Arm(
                f"laplace-{level}",
                "noise",
                "fedavg",
                _laplace(nu),
                note=f"Lap(b), b = {nu} gamma, every coordinate",
            )
        )
        for share in SVT_SHARES:
            pct = round(share * 100)
            arms.append(
                Arm(
                    f"svt-noise-{level}-{pct}",
                    "noise",
                    "fedavg",
                    _svt(nu, share, equal="noise"),
                    configured_share=share,
                    note=f"release Lap(b), b = {nu} gamma",
                )
            )
            arms.append(
                Arm(
                    f"svt-eps-{level}-{pct}",
                    "noise",
                    "fedavg",
                    _svt(nu, share, equal="eps"),
                    configured_share=share,
                    note=f"epsilon of laplace-{level}",
                )
            )
    return arms


ARMS = _arms()
QUICK_ARMS = (
    "local",
    "centralised",
    "fedavg",
    "fedavg-keep",
    "cyclic",
    "topk-10",
    "random-40",
    "laplace-mid",
    "svt-noise-mid-40",
    "svt-eps-mid-10",
)


# --- one data set, one seed ----------------------------------------------------------------


def _subsample(sites: dict[str, SiteData], keep: float, seed: int) -> dict[str, SiteData]:
    if keep >= 1.0:
        return sites
    out = {}
    for index, (slug, data) in enumerate(sites.items()):
        n = max(8, round(data.num_records * keep))
        order = (
            torch.randperm(
                data.num_records, generator=torch.Generator().manual_seed(seed * 100 + index)
            )[:n]
            .sort()
            .values
        )
        out[slug] = SiteData(
            x_train=data.x_train[order],
            y_train=data.y_train[order],
            num_records=n,
            modality=data.modality,
            input_shape=list(data.input_shape),
            n_classes=data.n_classes,
            source=data.source,
        )
    return out


@dataclass
class Context:
    cfg: DataConfig
    sites: dict[str, SiteData]
    validation: tuple[torch.Tensor, torch.Tensor]
    seed: int
    rounds: int
    restart: bool

    def model(self) -> torch.nn.Module:
        """The initial model: the same weights for every arm of this seed."""
        torch.manual_seed(self.seed)
        first = next(iter(self.sites.values()))
        return build_model(
            self.cfg.model,
            input_shape=first.input_shape,
            n_classes=self.cfg.n_classes,
            params=self.cfg.params,
        )

    def score(self, model: torch.nn.Module) -> float:
        x, y = self.validation
        modality = next(iter(self.sites.values())).modality
        return float(evaluate(model, x, y, modality=modality, loss=self.cfg.loss)[self.cfg.metric])

    def train(
        self,
        model: torch.nn.Module,
        data: SiteData,
        *,
        restart: bool,
        state: dict[str, Any] | None,
        seed: int,
    ) -> Any:
        return train_local(
            model,
            data,
            epochs=1,
            batch_size=self.cfg.batch_size,
            optimizer=self.cfg.optimizer,
            momentum_restart=restart,
            optimizer_state=state,
            seed=seed,
            loss=self.cfg.loss,
        )


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def calibrate(ctx: Context) -> dict[str, float]:
    """``gamma`` (99th percentile of ``|update|`` of the sites' first local update) and ``m``."""
    values = []
    for index, data in enumerate(ctx.sites.values()):
        model = ctx.model()
        result = ctx.train(model, data, restart=True, state=None, seed=ctx.seed * 1000 + index)
        values.append(torch.cat([t.reshape(-1) for t in result.delta.values()]).abs())
    flat = torch.cat(values)
    m = sum(t.numel() for t in _float_state(ctx.model()).values())
    gamma = float(torch.quantile(flat.double(), 0.99))
    return {"gamma": gamma, "m": float(m)}


def run_local(ctx: Context) -> dict[str, Any]:
    curves = []
    for index, data in enumerate(ctx.sites.values()):
        model, state, curve = ctx.model(), None, []
        for r in range(ctx.rounds):
            result = ctx.train(
                model, data, restart=False, state=state, seed=ctx.seed * 1000 + r * 10 + index
            )
            state = result.optimizer_state
            curve.append(ctx.score(model))
        curves.append(curve)
    mean_curve = [statistics.fmean(c[r] for c in curves) for r in range(ctx.rounds)]
    return {"curve": mean_curve, "per_site": [c[-1] for c in curves], "shared_fraction": None}


def run_centralised(ctx: Context) -> dict[str, Any]:
    model = ctx.model()
    result = train_centralised(
        model,
        ctx.sites,
        epochs=ctx.rounds,
        batch_size=ctx.cfg.batch_size,
        optimizer=ctx.cfg.optimizer,
        loss=ctx.cfg.loss,
        seed=ctx.seed,
        validation=ctx.validation,
    )
    assert result.validation is not None
    return {
        "curve": None,
        "final": float(result.validation[ctx.cfg.metric]),
        "shared_fraction": None,
    }


def run_fedavg(ctx: Context, arm: Arm, calibration: dict[str, float]) -> dict[str, Any]:
    pipeline = arm.pipeline(calibration)
    restart = ctx.restart if arm.restart is None else arm.restart
    model = ctx.model()
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    template = _float_state(model)
    states: dict[str, dict[str, Any] | None] = dict.fromkeys(ctx.sites)
    generator = torch.Generator().manual_seed(ctx.seed * 7919 + 1)
    curve, shares, passes = [], [], []
    for r in range(ctx.rounds):
        agg = StreamingFedAvg(template, zero_filled=arm.zero_filled)
        for index, (slug, data) in enumerate(ctx.sites.items()):
            model.load_state_dict(global_state)
            result = ctx.train(
                model,
                data,
                restart=restart,
                state=states[slug],
                seed=ctx.seed * 1000 + r * 10 + index,
            )
            states[slug] = result.optimizer_state
            if pipeline:
                filtered = apply_pipeline(result.delta, pipeline, generator=generator)
                agg.add(filtered.delta, filtered.mask, result.samples)
                shares.append(filtered.shared_fraction)
                for step in filtered.notes["steps"]:
                    if step["filter"] == "svt":
                        passes.append(step["passes"])
            else:
                agg.add(result.delta, None, result.samples)
                shares.append(1.0)
        global_state = apply_update(global_state, agg.result())
        model.load_state_dict(global_state)
        curve.append(ctx.score(model))
    return {
        "curve": curve,
        "shared_fraction": statistics.fmean(shares),
        "pipeline": pipeline,
        "svt_passes": statistics.fmean(passes) if passes else None,
    }


def run_cyclic(ctx: Context, arm: Arm) -> dict[str, Any]:
    restart = ctx.restart if arm.restart is None else arm.restart
    model = ctx.model()
    states: dict[str, dict[str, Any] | None] = dict.fromkeys(ctx.sites)
    index_of = {slug: i for i, slug in enumerate(ctx.sites)}
    curve = []
    for r in range(ctx.rounds):
        for slug in cyclic_order(list(ctx.sites), r):
            # A copy: train_local trains the model in place, and state_dict() shares its tensors.
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result = ctx.train(
                model,
                ctx.sites[slug],
                restart=restart,
                state=states[slug],
                seed=ctx.seed * 1000 + r * 10 + index_of[slug],
            )
            states[slug] = result.optimizer_state
            # What the coordinator does with the site's update: apply it to the model it sent.
            model.load_state_dict(apply_update(state, result.delta))
        curve.append(ctx.score(model))
    return {"curve": curve, "shared_fraction": 1.0}


def epsilon_of(pipeline: list[dict[str, Any]], ctx: Context) -> dict[str, Any] | None:
    """The accountant's ε at δ over the run's rounds, for a pipeline with a DP mechanism."""
    largest = max(d.num_records for d in ctx.sites.values())
    events = events_for_pipeline(
        pipeline,
        rounds=ctx.rounds,
        local_epochs=1,
        batch_size=ctx.cfg.batch_size,
        num_records=largest,
    )
    if not events:
        return None
    per_round = sum(e.params.get("epsilon", 0.0) for e in events)
    try:
        total: float | None = epsilon_spent(events, delta=DELTA)
        refused = None
    except ValueError as exc:
        total, refused = None, str(exc)
    return {
        "per_round": per_round,
        "total": total,
        "basic_composition": per_round * ctx.rounds,
        "refused": refused,
    }


def run_arm(ctx: Context, arm: Arm, calibration: dict[str, float]) -> dict[str, Any]:
    if arm.kind == "local":
        out = run_local(ctx)
    elif arm.kind == "centralised":
        out = run_centralised(ctx)
    elif arm.kind == "cyclic":
        out = run_cyclic(ctx, arm)
    else:
        out = run_fedavg(ctx, arm, calibration)
    if "final" not in out:
        out["final"] = out["curve"][-1]
    pipeline = out.get("pipeline") or []
    out["epsilon"] = epsilon_of(pipeline, ctx) if pipeline else None
    return out


# --- the run ----------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def run_dataset(
    key: str,
    arms: list[Arm],
    seeds: list[int],
    rounds: int,
    restart: bool,
    keep: float | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    cfg = CONFIGS[key]
    keep = cfg.keep if keep is None else keep
    per_seed: dict[str, list[dict[str, Any]]] = {arm.name: [] for arm in arms}
    calibrations = []
    for seed in seeds:
        sites = _subsample(demo_split(key, DEMO_SITES, seed=seed), keep, seed)
        ctx = Context(cfg, sites, load_validation_set(key), seed, rounds, restart)
        calibration = calibrate(ctx)
        calibrations.append(calibration)
        for arm in arms:
            started = time.perf_counter()
            out = run_arm(ctx, arm, calibration)
            per_seed[arm.name].append(out)
            log(
                f"  {key} seed {seed} {arm.name:<22} {cfg.metric} {out['final']:.3f} "
                f"({time.perf_counter() - started:.1f} s)"
            )
    summary: dict[str, Any] = {}
    for arm in arms:
        runs = per_seed[arm.name]
        mean, std = _mean_std([r["final"] for r in runs])
        curves = [r["curve"] for r in runs if r["curve"] is not None]
        curve_mean = (
            [statistics.fmean(c[i] for c in curves) for i in range(rounds)] if curves else None
        )
        shares = [r["shared_fraction"] for r in runs if r["shared_fraction"] is not None]
        eps = runs[0]["epsilon"]
        summary[arm.name] = {
            "group": arm.group,
            "kind": arm.kind,
            "note": arm.note,
            "metric_mean": mean,
            "metric_std": std,
            "per_seed": [r["final"] for r in runs],
            "curve_mean": curve_mean,
            "shared_fraction": statistics.fmean(shares) if shares else None,
            "configured_share": arm.configured_share if arm.kind == "fedavg" else None,
            "momentum_restart": (restart if arm.restart is None else arm.restart)
            if arm.kind in ("fedavg", "cyclic")
            else None,
            "epsilon": eps,
            "pipeline": runs[0].get("pipeline") or [],
            "svt_passes": runs[0].get("svt_passes"),
        }
        if arm.kind == "local":
            summary[arm.name]["per_site_last_seed"] = runs[-1]["per_site"]
    first = next(iter(demo_split(key, DEMO_SITES, seed=seeds[0]).values()))
    return {
        "metric": cfg.metric,
        "model": {"class": cfg.model, "params": cfg.params},
        "optimizer": cfg.optimizer,
        "loss": cfg.loss,
        "batch_size": cfg.batch_size,
        "keep": keep,
        "modality": first.modality,
        "site_records": {
            slug: d.num_records
            for slug, d in _subsample(
                demo_split(key, DEMO_SITES, seed=seeds[0]), keep, seeds[0]
            ).items()
        },
        "calibration": calibrations,
        "arms": summary,
    }


def _fmt_eps(eps: dict[str, Any] | None) -> str:
    if eps is None:
        return "-"
    if eps["total"] is not None:
        return f"{eps['total']:.3g}"
    return f">{eps['basic_composition']:.3g}*"


def table(key: str, result: dict[str, Any]) -> str:
    """A Markdown table of one data set's arms."""
    metric = result["metric"]
    lines = [
        f"| arm | {metric} (mean ± std) | shared | ε per round | ε at δ=1e-5, whole run |",
        "|---|---|---|---|---|",
    ]
    for name, arm in result["arms"].items():
        share = "-" if arm["shared_fraction"] is None else f"{arm['shared_fraction']:.1%}"
        eps = arm["epsilon"]
        per_round = "-" if eps is None else f"{eps['per_round']:.3g}"
        lines.append(
            f"| {name} | {arm['metric_mean']:.3f} ± {arm['metric_std']:.3f} | {share} | "
            f"{per_round} | {_fmt_eps(eps)} |"
        )
    return "\n".join(lines)


# --- figures: plain SVG ------------------------------------------------------------------------

_COLOURS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#17becf",
    "#bcbd22",
)


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_lines(
    title: str, ylabel: str, series: dict[str, list[float]], references: dict[str, float]
) -> str:
    """A line chart: one line per arm (metric per round), dashed lines for references."""
    width, height, left, right, top, bottom = 640, 360, 56, 190, 32, 40
    pw, ph = width - left - right, height - top - bottom
    values = [v for s in series.values() for v in s] + list(references.values())
    lo = max(0.0, math.floor(min(values) * 10) / 10) if values else 0.0
    hi = min(1.0, math.ceil(max(values) * 10) / 10) if values else 1.0
    if hi - lo < 0.1:
        lo = max(0.0, hi - 0.1)
    rounds = max((len(s) for s in series.values()), default=1)

    def x(i: int) -> float:
        return left + (pw * i / (rounds - 1) if rounds > 1 else pw / 2)

    def y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="18" font-size="13">{_esc(title)}</text>',
    ]
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
        )
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for i in range(rounds):
        out.append(f'<text x="{x(i):.1f}" y="{top + ph + 14}" text-anchor="middle">{i + 1}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">round</text>')
    out.append(
        f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
        f'text-anchor="middle">{_esc(ylabel)}</text>'
    )
    legend_y = top
    for n, (label, value) in enumerate(references.items()):
        colour = "#000" if n == 0 else "#888"
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            f'stroke="{colour}" stroke-dasharray="5 4"/>'
        )
        out.append(
            f'<line x1="{left + pw + 10}" x2="{left + pw + 30}" y1="{legend_y}" '
            f'y2="{legend_y}" stroke="{colour}" stroke-dasharray="5 4"/>'
        )
        out.append(f'<text x="{left + pw + 36}" y="{legend_y + 4}">{_esc(label)}</text>')
        legend_y += 16
    for n, (label, curve) in enumerate(series.items()):
        colour = _COLOURS[n % len(_COLOURS)]
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(curve))
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{points}"/>'
        )
        out.append(
            f'<line x1="{left + pw + 10}" x2="{left + pw + 30}" y1="{legend_y}" '
            f'y2="{legend_y}" stroke="{colour}" stroke-width="2"/>'
        )
        out.append(f'<text x="{left + pw + 36}" y="{legend_y + 4}">{_esc(label)}</text>')
        legend_y += 16
    out.append("</svg>")
    return "\n".join(out) + "\n"


#: The figures per data set: (file suffix, title, arms drawn as lines).
FIGURES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("topology", "FedAvg, momentum restart, cyclic", ("fedavg", "fedavg-keep", "cyclic")),
    (
        "sharing",
        "Partial sharing (mask-aware mean)",
        ("fedavg", "topk-40", "random-40", "topk-10", "random-10", "topk-10-zero-filled"),
    ),
    (
        "noise-equal-noise",
        "Laplace vs SVT at equal per-coordinate noise (mid)",
        ("fedavg", "laplace-mid", "svt-noise-mid-10", "svt-noise-mid-40", "svt-noise-mid-100"),
    ),
    (
        "noise-equal-eps",
        "Laplace vs SVT at equal total epsilon (mid)",
        ("fedavg", "laplace-mid", "svt-eps-mid-10", "svt-eps-mid-40", "svt-eps-mid-100"),
    ),
)


def write_figures(key: str, result: dict[str, Any], out: Path) -> list[Path]:
    arms = result["arms"]
    references = {
        name: arms[name]["metric_mean"] for name in ("centralised", "local") if name in arms
    }
    written = []
    for suffix, title, names in FIGURES:
        series = {
            n: arms[n]["curve_mean"]
            for n in names
            if n in arms and arms[n]["curve_mean"] is not None
        }
        if not series:
            continue
        path = out / f"{key}-{suffix}.svg"
        path.write_text(svg_lines(f"{key}: {title}", result["metric"], series, references))
        written.append(path)
    return written


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI: one seed, two rounds, a subset of the arms, small data",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=sorted(CONFIGS),
        default=["digits", "breast-cancer", "lesions"],
    )
    parser.add_argument("--seeds", type=int, default=None, help="how many seeds (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 10)")
    parser.add_argument(
        "--momentum-restart",
        choices=("on", "off"),
        default="on",
        help="the default for every arm but fedavg / fedavg-keep",
    )
    parser.add_argument(
        "--arms", nargs="+", default=None, help="only the arms whose name contains one of these"
    )
    parser.add_argument(
        "--keep",
        type=float,
        default=None,
        help="share of each site's records kept (default: per data set)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results and figures (default {DEFAULT_OUT.relative_to(ROOT)}; "
        "with --quick, nothing is written unless given)",
    )
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.rounds is None:
        args.rounds = 2 if args.quick else 10
    if args.out is None and not args.quick:
        args.out = DEFAULT_OUT
    if args.seeds < 1 or args.rounds < 1:
        parser.error("--seeds and --rounds must be at least 1")
    return args


def main(
    argv: Sequence[str] | None = None, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the arms and return (and, with ``--out``, write) the results."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    arms = [a for a in ARMS if not args.quick or a.name in QUICK_ARMS]
    if args.arms:
        arms = [a for a in arms if any(text in a.name for text in args.arms)]
    seeds = list(range(args.seed, args.seed + args.seeds))
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": " ".join(["benchmarks/science/experiments.py", *(argv or sys.argv[1:])]),
        "seeds": seeds,
        "rounds": args.rounds,
        "momentum_restart_default": args.momentum_restart == "on",
        "noise_levels": NOISE_LEVELS,
        "delta": DELTA,
        "datasets": {},
    }
    for key in args.datasets:
        keep = (
            args.keep
            if args.keep is not None
            else (0.25 if args.quick and key == "lesions" else None)
        )
        results["datasets"][key] = run_dataset(
            key, arms, seeds, args.rounds, args.momentum_restart == "on", keep, log
        )
        log(f"\n{key} ({args.rounds} rounds, seeds {seeds})\n")
        log(table(key, results["datasets"][key]))
        log("")
    results["seconds"] = time.perf_counter() - started
    log(
        "* the accountant refuses a guarantee at this ε (the samplers' cut tails); the figure "
        "is the basic composition of the pure ε per round"
    )
    log(f"run time {results['seconds']:.0f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        for key, result in results["datasets"].items():
            write_figures(key, result, args.out)
    return results


if __name__ == "__main__":
    main()
