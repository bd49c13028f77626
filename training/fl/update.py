"""The wire format of a site's update: the one module that writes and reads it.

An update is a safetensors file of named tensors, written and read by the engine's tensor
container (:mod:`training.fl.serialization`). For every floating-point tensor ``<name>`` of
the model the site was sent (its start model) it holds

* ``delta/<name>``: float32, the same shape: the site's change to that tensor, after its
  privacy filters;
* ``mask/<name>``: bool, the same shape, only when the pipeline shared the update in part
  (a mask, or a layer left out): True where the coordinate is shared. A layer left out is
  sent as a zero delta with an all-False mask, so an update always names every trained
  tensor, and a False coordinate takes no part in the average.

Nothing else: a non-floating tensor of the model (``num_batches_tracked``) is not trained and
has no delta. Who uses what here:

* the site worker packs its update (:func:`pack_update`);
* the intake reads it (:func:`read_update`) and checks it (:func:`check_update`) against the
  layout of the start model (:func:`model_layout`): names, shapes, dtypes, finite deltas. A
  failed check raises :class:`BadUpdate` with a code and a reason naming the tensor;
* the coordinator and the contribution scorer unpack it into its deltas and masks
  (:func:`unpack_update`, :func:`split_update`) and apply a mask (:func:`masked_delta`).

torch is imported inside the functions that need it (lazily, not to dodge a cycle): the
central web process imports this module through the intake and never pays for torch, and a
site worker's parent process does not load it before it forks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import torch

__all__ = [
    "DELTA_PREFIX",
    "MASK_PREFIX",
    "BadUpdate",
    "TensorLayout",
    "check_update",
    "delta_name",
    "mask_name",
    "masked_delta",
    "model_layout",
    "pack_update",
    "read_update",
    "split_update",
    "unpack_update",
    "update_tensors",
]

#: The prefix of a tensor's delta in an update.
DELTA_PREFIX: Final = "delta/"
#: The prefix of a tensor's mask in an update (True: the coordinate is shared).
MASK_PREFIX: Final = "mask/"

#: What :class:`BadUpdate` says went wrong (the intake records it as the rejection's code).
MALFORMED: Final = "malformed"
TENSOR_MISMATCH: Final = "tensor_mismatch"
NOT_FINITE: Final = "not_finite"


def delta_name(name: str) -> str:
    """The name of tensor ``name``'s delta in an update."""
    return DELTA_PREFIX + name


def mask_name(name: str) -> str:
    """The name of tensor ``name``'s mask in an update."""
    return MASK_PREFIX + name


class BadUpdate(ValueError):
    """An update that breaks the wire format. ``code`` is ``malformed`` (not a tensor
    container), ``tensor_mismatch`` (a name, shape or dtype that does not match the start
    model) or ``not_finite``; the message (``reason``) names the tensor and what is wrong."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class TensorLayout:
    """One tensor of a model, as an update is checked against it."""

    dtype: str
    shape: tuple[int, ...]
    floating: bool


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_layout(model_file: bytes) -> dict[str, TensorLayout]:
    """``{name: TensorLayout}`` of a packed model (the start model an update is a delta from)."""
    # Lazy: torch is loaded only by the processes that read tensors (module docstring).
    from training.fl.serialization import unpack_tensors

    return {
        name: TensorLayout(_dtype_name(t.dtype), tuple(t.shape), t.is_floating_point())
        for name, t in unpack_tensors(model_file).items()
    }


# --- Writing (the site worker) -------------------------------------------------------------


def update_tensors(
    full_delta: Mapping[str, torch.Tensor],
    shared: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """``{"delta/<name>", "mask/<name>"}`` for every tensor of ``full_delta`` (the site's whole
    update), from what its privacy pipeline shares: ``shared`` (the tensors it kept) and
    ``mask`` (per tensor, True where shared; None when every coordinate of ``shared`` is).

    A layer the pipeline excluded is sent as zeros with an all-False mask (the central side
    expects every tensor of the model, and a False mask means "not shared": it takes no part
    in the average)."""
    import torch  # lazy torch (module docstring)

    tensors: dict[str, torch.Tensor] = {}
    masked = mask is not None or len(shared) != len(full_delta)
    for name, original in full_delta.items():
        if name in shared:
            tensors[delta_name(name)] = shared[name].to(torch.float32).contiguous()
            if masked:
                part = mask.get(name) if mask is not None else None
                tensors[mask_name(name)] = (
                    part.to(torch.bool).contiguous()
                    if part is not None
                    else torch.ones(original.shape, dtype=torch.bool)
                )
        else:
            tensors[delta_name(name)] = torch.zeros(original.shape, dtype=torch.float32)
            tensors[mask_name(name)] = torch.zeros(original.shape, dtype=torch.bool)
    return tensors


def pack_update(
    full_delta: Mapping[str, torch.Tensor],
    shared: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor] | None,
) -> bytes:
    """The update file a site uploads (see :func:`update_tensors`)."""
    # Lazy: torch is loaded only by the processes that read tensors (module docstring).
    from training.fl.serialization import pack_tensors

    return pack_tensors(update_tensors(full_delta, shared, mask))


# --- Reading and checking (the intake) -----------------------------------------------------


def read_update(data: bytes, *, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of an uploaded file; :class:`BadUpdate` (``malformed``) when it is not a
    valid tensor container of at most ``max_bytes`` bytes."""
    # Lazy: torch is loaded only by the processes that read tensors (module docstring).
    from training.fl.serialization import MalformedTensorFile, unpack_tensors

    try:
        return unpack_tensors(data, max_bytes=max_bytes)
    except MalformedTensorFile as exc:
        raise BadUpdate(MALFORMED, str(exc)) from None


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_update(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, TensorLayout]) -> None:
    """The update's tensors against those of the model the site was sent: names, shapes,
    dtypes, finite values. Raises :class:`BadUpdate` naming the tensor and what is wrong."""
    import torch  # lazy torch (module docstring)

    for name in sorted(tensors):
        if name.startswith(DELTA_PREFIX):
            base, want = name.removeprefix(DELTA_PREFIX), torch.float32
        elif name.startswith(MASK_PREFIX):
            base, want = name.removeprefix(MASK_PREFIX), torch.bool
        else:
            base, want = None, None
        if base is None or want is None or base not in layout:
            raise BadUpdate(
                TENSOR_MISMATCH,
                f"unexpected tensor {name!r}: an update holds delta/<name> and mask/<name> "
                "for the tensors of the model the site was sent",
            )
        tensor = tensors[name]
        expected = layout[base]
        if not expected.floating:
            raise BadUpdate(
                TENSOR_MISMATCH,
                f"unexpected tensor {name!r}: the model's {base} is not floating-point "
                "and is not trained",
            )
        if tensor.dtype != want:
            raise BadUpdate(
                TENSOR_MISMATCH,
                f"{name} has dtype {_dtype_name(tensor.dtype)}, expected {_dtype_name(want)}",
            )
        if tuple(tensor.shape) != expected.shape:
            raise BadUpdate(
                TENSOR_MISMATCH,
                f"{name} has shape {_shape_text(tuple(tensor.shape))}, expected "
                f"{_shape_text(expected.shape)} (the {base} of the model the site was sent)",
            )
    missing = [
        delta_name(base)
        for base, expected in sorted(layout.items())
        if expected.floating and delta_name(base) not in tensors
    ]
    if missing:
        raise BadUpdate(
            TENSOR_MISMATCH, f"missing tensor {missing[0]} (the model the site was sent has it)"
        )
    for name in sorted(tensors):
        if name.startswith(DELTA_PREFIX) and not bool(torch.isfinite(tensors[name]).all()):
            raise BadUpdate(NOT_FINITE, f"NaN or infinity in {name}")


# --- Unpacking (the coordinator, the contribution scorer) ----------------------------------


def split_update(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(delta, mask)`` of an update's tensors, each keyed by the model's tensor names
    (``mask`` empty when the update was shared in full)."""
    delta = {
        n.removeprefix(DELTA_PREFIX): t for n, t in tensors.items() if n.startswith(DELTA_PREFIX)
    }
    mask = {n.removeprefix(MASK_PREFIX): t for n, t in tensors.items() if n.startswith(MASK_PREFIX)}
    return delta, mask


def unpack_update(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(delta, mask)`` of a stored (already checked) update file: :func:`split_update`."""
    # Lazy: torch is loaded only by the processes that read tensors (module docstring).
    from training.fl.serialization import unpack_tensors

    return split_update(unpack_tensors(data))


def masked_delta(
    delta: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The delta with the coordinates its mask does not share set to zero."""
    import torch  # lazy torch (module docstring)

    return {
        n: torch.where(mask[n], d, torch.zeros_like(d)) if n in mask else d
        for n, d in delta.items()
    }
