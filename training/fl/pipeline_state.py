"""The state the privacy filters share while :func:`training.fl.filters.apply_pipeline` runs:
the flat update, its shared set, and the scratch buffers (:class:`Workspace`).

Why a state object instead of tensors passed from filter to filter: a filter records what it can
(a top-k's threshold, a percentile clip's bound) instead of writing the whole update, and the
next pass that writes the values anyway applies everything pending (:meth:`PipelineState.finish`);
see "Performance" in :mod:`training.fl.filters`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.fl import kernels

__all__ = ["Band", "PipelineState", "Workspace"]


class Workspace:
    """Named flat scratch buffers, grown on demand and reused between calls (not thread-safe)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self._buffers[name] = buf
        return buf[:n]


@dataclass
class Band:
    """The scores in a bracket ``[lo, hi]``: the ``size`` values of ``values`` that come after
    its ``offset`` smallest (``values`` may hold a second band's scores too, all above or all
    below this one's). ``below`` scores are smaller than ``lo``; per
    :func:`kernels.chunk_size` chunk, ``chunk_ge`` are at least ``lo``. For the last bracket
    of a scan, ``above`` scores exceed ``hi`` and ``sumsq_below``/``l1_below`` sum the shared
    scores below ``lo`` (for a second bracket: only those above the first one). ``segments`` are
    ``(start, count)`` of each chunk's gathered scores and positions in the workspace: valid
    until the next scan. Made by the scans of :mod:`training.fl.selection`; kept here because
    the state holds the bands found ahead for a coming percentile (``prepared``)."""

    lo: float
    hi: float
    below: int
    chunk_ge: np.ndarray
    values: np.ndarray
    offset: int
    size: int
    segments: list[tuple[int, int]]
    above: int = 0
    sumsq_below: float = 0.0
    l1_below: float = 0.0


_EMPTY = np.empty(0, dtype=np.float32)
#: The mask argument of a kernel called without a mask (``has_mask`` False).
_NO_MASK = np.zeros(1, dtype=np.uint8)


class PipelineState:
    """The flat update and its shared set while the pipeline runs.

    The shared set is the coordinates where ``maskb`` (bool, None = all) is True *and*
    ``|values| >= floor``: a top-k selection records its threshold as ``floor`` instead of
    writing a mask, and the values the filters mean are ``clip(values, ±clip)`` on shared
    coordinates: a percentile clip is only recorded too. Both are applied by the next pass that
    writes the values anyway (noise, or the end of the pipeline): :meth:`finish`. Invariant:
    ``values`` is 0 wherever ``maskb`` is False (and below ``floor`` it is not shared, whatever
    it holds). ``chunk_counts``, when known, is the number of shared coordinates in each
    :func:`kernels.chunk_size` chunk. ``norms`` caches ``(L2², L1)`` of the meant values while
    known. ``ranked``, while the meant values are unchanged, is ``(offset, sample)``: the
    scores' ascending order statistics from rank ``offset`` on are exactly the shared
    ``|values|``, and ``sample`` is a sorted sample of scores with the same order statistics
    from that rank on (drawn before a top-k, still valid after it).
    """

    def __init__(self, values: torch.Tensor, ws: Workspace, generator: torch.Generator):
        self.values = values
        self.array = values.numpy()
        self.n = values.numel()
        self.ws = ws
        self.generator = generator
        self.maskb: torch.Tensor | None = None
        self.shared = self.n
        self.floor = 0.0
        self.clip = math.inf
        self.chunk_counts: np.ndarray | None = None
        self.norms: tuple[float, float] | None = None
        self.ranked: tuple[int, np.ndarray | None] | None = None
        #: Bands found ahead for the ranks a coming percentile will ask
        #: (see :func:`training.fl.selection.keep_top_lazily`).
        self.prepared: dict[tuple[int, ...], Band] = {}
        #: The filters after the one running (for the look-ahead).
        self.upcoming: list[dict[str, Any]] = []
        self._bool_slot = 0

    @property
    def mask(self) -> np.ndarray:
        """``maskb`` as uint8 for the kernels (a dummy when it is None)."""
        return _NO_MASK if self.maskb is None else self.maskb.view(torch.uint8).numpy()

    def new_bool_buffer(self) -> torch.Tensor:
        # Two buffers alternate, so the current mask can be read while the next is built.
        self._bool_slot ^= 1
        return self.ws.get(f"maskb{self._bool_slot}", self.n, torch.bool)

    def set_mask(
        self, maskb: torch.Tensor, count: int, chunk_counts: list[int] | None = None
    ) -> None:
        """The shared set is now ``maskb`` (``values`` already 0 outside it)."""
        self.maskb, self.shared, self.floor = maskb, count, 0.0
        self.chunk_counts = None if chunk_counts is None else np.asarray(chunk_counts)
        self.touched()

    def touched(self) -> None:
        self.norms = None
        self.ranked = None
        self.prepared = {}

    def finish(self, factor: float = 1.0, noise: np.ndarray | None = None) -> None:
        """Write ``factor * clip(values) + noise`` on shared coordinates, 0 elsewhere, and the
        shared set as a mask if a top-k left only its threshold: one pass.

        ``noise`` holds one draw per shared coordinate, in order, plus a spare slot (None: no
        noise).
        """
        pending = self.floor > 0 or self.clip != math.inf
        if noise is None and factor == 1.0 and not pending:
            return
        has_mask, mask = self.maskb is not None, self.mask
        mask_out = self.new_bool_buffer() if self.floor > 0 else self.maskb
        out = _NO_MASK if mask_out is None else mask_out.view(torch.uint8).numpy()
        draws = _EMPTY if noise is None else noise
        starts = kernels.chunk_starts(self.n)
        firsts = [0] * len(starts)
        if noise is not None:  # where each chunk's draws begin
            if has_mask or self.floor > 0:
                counts = self.shared_per_chunk()
                firsts = np.concatenate(([0], np.cumsum(counts)[:-1])).tolist()
            else:
                firsts = list(starts)
        first_of = dict(zip(starts, firsts, strict=True))
        floor, clip, array = self.floor, self.clip, self.array
        kernels.run_chunks(
            lambda s, e: kernels.finish_values(
                array, mask, has_mask, floor, clip, factor, draws, first_of[s], out, s, e
            ),
            self.n,
        )
        norms = self.norms
        self.maskb, self.floor, self.clip = mask_out, 0.0, math.inf
        self.touched()
        if noise is None and factor == 1.0:
            self.norms = norms  # the clipped values are what the norms were of

    def shared_per_chunk(self) -> np.ndarray:
        if self.chunk_counts is None:
            if self.floor > 0:
                raise AssertionError("a pending top-k threshold always knows its chunk counts")
            mask = self.mask
            self.chunk_counts = np.asarray(
                kernels.run_chunks(lambda s, e: int(np.count_nonzero(mask[s:e])), self.n)
            )
        return self.chunk_counts

    def current_norms(self) -> tuple[float, float]:
        """``(L2, L1)`` of the meant values (clipped, shared only)."""
        if self.norms is None:
            floor, clip, array = self.floor, self.clip, self.array
            parts = kernels.run_chunks(
                lambda s, e: kernels.shared_norms(array, floor, clip, s, e), self.n
            )
            self.norms = (sum(p[0] for p in parts), sum(p[1] for p in parts))
        sumsq, l1 = self.norms
        return math.sqrt(sumsq), l1
