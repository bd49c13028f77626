"""Local training on one site's data, with optional DP-SGD (plain PyTorch, no Django).

:func:`train_local` trains the global model on the site's :class:`~training.fl.data.SiteData`
and returns a :class:`LocalResult`: the update (trained minus initial state), the record count
that weights it, training metrics, the optimizer state to keep on site, and the privacy events
to record.

Momentum restart
----------------
With ``momentum_restart=True`` the optimizer is built fresh on every call: no momentum (SGD) or
moment estimates (Adam) survive from one round to the next, and ``LocalResult.optimizer_state``
is ``None``. With ``False`` the caller passes the state the previous round returned; it is
loaded (a copy: the caller's tensors are never changed) before the first step, and the state
after the last step comes back. Optimizer state never leaves the site.

DP-SGD
------
With ``dp_sgd={"noise_multiplier": z, "max_grad_norm": C}`` every step

1. draws a batch by **Poisson sampling**: each record independently with probability
   ``q = min(1, batch_size / N)`` (the sampled Gaussian mechanism the accountant assumes; an
   empty draw still takes a noise-only step);
2. computes per-sample gradients with ``torch.func`` (``vmap`` over ``grad``) and clips each
   sample's whole gradient to L2 norm ``C`` (:func:`clip_per_sample`);
3. sums them, adds Gaussian noise ``N(0, (z C)^2)`` per coordinate (:func:`add_gaussian_noise`)
   and divides by the *expected* batch size ``q N`` (dividing by the actual size would leak it);
4. takes an optimizer step with that gradient.

An epoch is ``ceil(N / batch_size)`` steps, so a round takes ``local_epochs * ceil(N /
batch_size)`` steps, exactly what ``training.jobs.accounting.events_for_pipeline`` projects. The
round's event is ``{"mechanism": "sampled_gaussian", "params": {"noise_multiplier": z,
"sample_rate": q, "steps": steps_taken}, "count": 1, "source": "dp_sgd"}``.

The sampling and the noise come from a generator seeded by ``dp_seed``, which defaults to a
fresh secret random number: noise that anyone could regenerate from a known seed (such as the
round number) could be subtracted from the update, and the guarantee would be void. Pass
``dp_seed`` only in tests. Models with batch normalisation are refused under DP-SGD (batch
statistics mix samples, so per-sample clipping would not bound one record's influence).

The loss
--------
``loss`` names the loss minimised (:data:`training.fl.evaluate.LOSSES`, defined there so that
evaluation computes the same one): ``cross_entropy`` (the default, per pixel for segmentation)
or ``dice_bce`` (segmentation only: cross-entropy plus one minus the soft Dice of the
foreground, per record; the seed's Dice + BCE for two-class masks). DP-SGD's per-sample
gradients differentiate the same loss of each record.

The training metrics (losses, accuracy or Dice on the site's own data) are plain statistics of
the site's data and are not covered by the DP guarantee; a worker running a DP job should
report them only where the agreement allows it.
"""

from __future__ import annotations

import copy
import functools
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from training.fl.data import SiteData
from training.fl.evaluate import DEFAULT_LOSS, check_loss, evaluate, task_loss
from training.fl.noise import gaussian_noise_

__all__ = [
    "LocalResult",
    "add_gaussian_noise",
    "build_optimizer",
    "clip_per_sample",
    "per_sample_gradients",
    "pick_device",
    "private_gradient",
    "train_local",
]

_DP_CHUNK = 64  # per-sample gradients are computed this many records at a time


@dataclass
class LocalResult:
    """What one site's local training produced (see :func:`train_local`)."""

    delta: dict[str, torch.Tensor]
    samples: int
    metrics: dict[str, float | None]
    optimizer_state: dict[str, Any] | None
    privacy_events: list[dict[str, Any]] = field(default_factory=list)


def pick_device() -> str:
    """``"cuda"`` if a GPU is usable, else ``"cpu"`` (CUDA is only touched when called)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _to_cpu(obj: Any) -> Any:
    """A copy on the CPU of a nested optimizer state (tensors in dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(value) for value in obj)
    return copy.deepcopy(obj)


def build_optimizer(
    model: nn.Module, spec: Mapping[str, Any], *, state: Mapping[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The job's optimizer (``{"name": "sgd"|"adam", "lr", "momentum"}``) over ``model``.

    ``state`` (an optimizer ``state_dict`` from an earlier round on this site) is loaded from a
    copy, so the caller's tensors are never modified by later steps.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"optimizer must be an object like {{'name': 'sgd'}}, got {spec!r}")
    name, lr = spec.get("name"), spec.get("lr")
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"optimizer lr must be a positive number, got {lr!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=float(lr), momentum=float(spec.get("momentum", 0.0))
        )
    elif name == "adam":
        optimizer = torch.optim.Adam(params, lr=float(lr))
    else:
        raise ValueError(f"unknown optimizer {name!r} (sgd or adam)")
    if state is not None:
        try:
            optimizer.load_state_dict(copy.deepcopy(dict(state)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"the kept optimizer state does not fit this model and optimizer: {exc}"
            ) from None
    return optimizer


def _loss(logits: torch.Tensor, target: torch.Tensor, loss: str = DEFAULT_LOSS) -> torch.Tensor:
    # The batch's mean loss (training.fl.evaluate.task_loss); cross-entropy is per pixel for
    # segmentation logits [N, C, H, W] and targets [N, H, W].
    return task_loss(logits, target, loss)


def per_sample_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str = DEFAULT_LOSS
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients of each example's ``loss``, ``{name: [B, *shape]}``, and the losses ``[B]``.

    Only trainable parameters are differentiated. Uses ``torch.func.vmap`` over ``grad``
    (dropout draws differ per example).
    """
    from torch.func import functional_call, grad_and_value, vmap  # only DP-SGD needs it

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(
        p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
    ) -> torch.Tensor:
        logits = functional_call(model, (p, b), (xi.unsqueeze(0),))
        return _loss(logits, yi.unsqueeze(0), loss)

    grads, losses = vmap(grad_and_value(one), in_dims=(None, None, 0, 0), randomness="different")(
        params, buffers, x, y
    )
    return grads, losses


def clip_per_sample(
    grads: Mapping[str, torch.Tensor], max_grad_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each example's gradient (all parameters together) to L2 norm at most ``C``.

    ``grads`` maps names to ``[B, *shape]``; returns the clipped gradients and the norms
    before clipping, ``[B]``.
    """
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm!r}")
    tensors = list(grads.values())
    if not tensors:
        return {}, torch.zeros(0)
    batch = tensors[0].shape[0]
    # The sum of each tensor's squares, added up in order (tensors is not empty).
    squares = functools.reduce(torch.add, (g.reshape(batch, -1).pow(2).sum(dim=1) for g in tensors))
    norms = squares.sqrt()
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    clipped = {name: g * factor.view(-1, *([1] * (g.dim() - 1))) for name, g in grads.items()}
    return clipped, norms


def add_gaussian_noise(
    summed: Mapping[str, torch.Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """``summed`` plus independent ``N(0, (noise_multiplier * max_grad_norm)^2)`` noise.

    The noise comes from the privacy filters' sampler (:func:`training.fl.noise.gaussian_noise_`),
    not ``torch.randn``: torch's CPU sampler is Box-Muller on 24-bit uniforms (no draw beyond
    5.77 σ) and CUDA's on 32-bit ones (6.66 σ), while this one draws to 37.7 σ and the cut that
    is left is in the accountant's δ (see :mod:`training.fl.noise`). One draw per step for all
    the parameters together, in ``summed``'s order, on the CPU (then moved to each tensor's
    device), keyed from ``generator`` (a CUDA generator works: only the 128-bit key comes from
    it), so ``dp_seed`` still fixes the noise; ``None`` means torch's default CPU generator.
    """
    std = float(noise_multiplier) * float(max_grad_norm)
    gen = torch.default_generator if generator is None else generator
    total = sum(tensor.numel() for tensor in summed.values())
    flat = gaussian_noise_(torch.empty(total, dtype=torch.float32), std, gen)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, tensor in summed.items():
        n = tensor.numel()
        noise = flat[offset : offset + n].view(tensor.shape)
        offset += n
        out[name] = tensor + noise.to(device=tensor.device, dtype=tensor.dtype)
    return out


def private_gradient(
    per_sample: Mapping[str, torch.Tensor],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One DP-SGD gradient: clip each example, sum, add noise, divide by the expected size."""
    clipped, _ = clip_per_sample(per_sample, max_grad_norm)
    summed = {name: g.sum(dim=0) for name, g in clipped.items()}
    noisy = add_gaussian_noise(
        summed,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        generator=generator,
    )
    return {name: g / expected_batch_size for name, g in noisy.items()}


def _dp_params(dp_sgd: Mapping[str, Any]) -> tuple[float, float]:
    values = []
    for key in ("noise_multiplier", "max_grad_norm"):
        value = dp_sgd.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"dp_sgd {key} must be a positive number, got {value!r}")
        values.append(float(value))
    return values[0], values[1]


def _seed_forked(seed: int, dev: torch.device) -> None:
    """Seed the generators ``fork_rng`` forked for training on ``dev``: the CPU's, and the
    device's own when it is a GPU. Not ``torch.manual_seed``: that also seeds every GPU (queued
    with a formatted stack trace of the call while CUDA is not initialised, a millisecond of a
    site's CPU per round) and would leave the GPUs not in use reseeded after the fork ends."""
    if dev.type not in ("cpu", "cuda"):  # another accelerator, not forked: seeded as before
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    if dev.type == "cuda":  # the device fork_rng forked (CUDA is initialised: the model is on it)
        with torch.cuda.device(dev.index or 0):
            torch.cuda.manual_seed(seed)


def _floating_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: value.detach().to("cpu", torch.float32, copy=True)
        for name, value in model.state_dict().items()
        if value.is_floating_point()
    }


def _check_data(model: nn.Module, data: SiteData, device: torch.device) -> None:
    if data.num_records < 1 or len(data.x_train) != data.num_records:
        raise ValueError(
            f"site data has {len(data.x_train)} records but num_records={data.num_records}"
        )
    if len(data.y_train) != len(data.x_train):
        raise ValueError(f"{len(data.x_train)} inputs but {len(data.y_train)} targets")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(data.x_train[:1].to(device, torch.float32))
    except RuntimeError as exc:
        raise ValueError(
            f"the model does not accept this site's data of shape {list(data.x_train.shape[1:])}: "
            f"{exc}"
        ) from None
    finally:
        model.train(was_training)
    n_out = logits.shape[1]
    top = int(data.y_train.max())
    if top >= n_out or int(data.y_train.min()) < 0:
        raise ValueError(
            f"the site's labels run from {int(data.y_train.min())} to {top} but the model "
            f"predicts {n_out} classes"
        )


def train_local(
    model: nn.Module,
    data: SiteData,
    *,
    epochs: int,
    batch_size: int,
    optimizer: Mapping[str, Any],
    momentum_restart: bool,
    optimizer_state: Mapping[str, Any] | None = None,
    dp_sgd: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
    dp_seed: int | None = None,
    loss: str = DEFAULT_LOSS,
) -> LocalResult:
    """Train ``model`` (in place, moved to ``device``) on ``data``; see the module docstring.

    ``delta`` holds trained minus initial values of every floating-point entry of the state
    dict (float32, CPU). ``samples`` is ``data.num_records``. ``metrics`` holds
    ``train_loss_first_epoch``, ``train_loss_last_epoch``, ``train_accuracy`` or ``train_dice``
    (after training), ``epochs`` and ``steps``. ``seed`` fixes shuffling, dropout and (without
    DP) everything else; ``dp_seed`` fixes DP-SGD's sampling and noise (secret random if None).
    ``loss`` is the loss minimised (module docstring; ``dice_bce`` only on segmentation data).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_loss(loss, data.modality)
    dev = torch.device(device)
    model.to(dev)
    _check_data(model, data, dev)
    if dp_sgd is not None:
        noise_multiplier, max_grad_norm = _dp_params(dp_sgd)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError(
                "DP-SGD needs per-sample gradients, which batch normalisation does not allow; "
                "use a model without BatchNorm (GroupNorm works)"
            )

    n = data.num_records
    initial = _floating_state(model)
    state = None if momentum_restart else optimizer_state
    opt = build_optimizer(model, optimizer, state=state)
    steps_per_epoch = math.ceil(n / batch_size)
    x_all, y_all = data.x_train, data.y_train
    epoch_losses: list[float | None] = []
    steps = 0

    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        _seed_forked(seed, dev)
        model.train()
        if dp_sgd is None:
            gen = torch.Generator().manual_seed(seed)
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen)
                total, count = 0.0, 0
                for start in range(0, n, batch_size):
                    idx = order[start : start + batch_size]
                    xb = x_all[idx].to(dev, torch.float32)
                    yb = y_all[idx].to(dev, torch.int64)
                    opt.zero_grad(set_to_none=True)
                    batch_loss = _loss(model(xb), yb, loss)
                    batch_loss.backward()
                    opt.step()
                    steps += 1
                    total += batch_loss.item() * len(idx)
                    count += len(idx)
                epoch_losses.append(total / count)
        else:
            sample_rate = min(1.0, batch_size / n)  # as training.jobs.accounting projects it
            expected = sample_rate * n
            secret = secrets.randbits(63) if dp_seed is None else int(dp_seed)
            sampler = torch.Generator().manual_seed(secret)
            noise_gen = torch.Generator(device=dev).manual_seed(secret ^ 0x5DEECE66D)
            trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
            for _ in range(epochs):
                total, count = 0.0, 0
                for _ in range(steps_per_epoch):
                    idx = torch.nonzero(torch.rand(n, generator=sampler) < sample_rate).flatten()
                    summed = {name: torch.zeros_like(p) for name, p in trainable}
                    for start in range(0, len(idx), _DP_CHUNK):
                        chunk = idx[start : start + _DP_CHUNK]
                        xb = x_all[chunk].to(dev, torch.float32)
                        yb = y_all[chunk].to(dev, torch.int64)
                        grads, losses = per_sample_gradients(model, xb, yb, loss=loss)
                        clipped, _ = clip_per_sample(grads, max_grad_norm)
                        for name in summed:
                            summed[name] += clipped[name].sum(dim=0)
                        total += losses.sum().item()
                        count += len(chunk)
                    noisy = add_gaussian_noise(
                        summed,
                        noise_multiplier=noise_multiplier,
                        max_grad_norm=max_grad_norm,
                        generator=noise_gen,
                    )
                    opt.zero_grad(set_to_none=True)
                    for name, p in trainable:
                        p.grad = noisy[name] / expected
                    opt.step()
                    steps += 1
                epoch_losses.append(total / count if count else None)

    final = _floating_state(model)
    delta = {name: final[name] - initial[name] for name in initial}
    quality = evaluate(model, x_all, y_all, modality=data.modality, batch_size=256, loss=loss)
    metrics: dict[str, float | None] = {
        "train_loss_first_epoch": epoch_losses[0],
        "train_loss_last_epoch": epoch_losses[-1],
        "epochs": epochs,
        "steps": steps,
    }
    if data.modality == "segmentation":
        metrics["train_dice"] = quality["dice"]
    else:
        metrics["train_accuracy"] = quality["accuracy"]
    events: list[dict[str, Any]] = []
    if dp_sgd is not None:
        events.append(
            {
                "mechanism": "sampled_gaussian",
                "params": {
                    "noise_multiplier": noise_multiplier,
                    "sample_rate": sample_rate,
                    "steps": steps,
                },
                "count": 1,
                "source": "dp_sgd",
            }
        )
    return LocalResult(
        delta=delta,
        samples=n,
        metrics=metrics,
        optimizer_state=None if momentum_restart else _to_cpu(opt.state_dict()),
        privacy_events=events,
    )
