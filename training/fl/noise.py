"""Noise for the privacy filters: Gaussian, Laplace and uniform draws from AES-128-CTR keystream.

Why not torch's samplers: AES-CTR (OpenSSL through ``cryptography``, with AES-NI) makes random
words several times faster than torch's single-threaded Mersenne Twister, releases the GIL so the
chunks run on the kernels' thread pool, and its output does not reveal the generator state. The
key and counter layout, and what this does not protect against, are listed under "Noise" in
:mod:`training.fl.filters`, and tested in ``tests/fl/test_fl_filters.py`` and
``tests/fl/test_noise_tails.py``.

**Tails (issue 15).** A sampler built on 24-bit uniforms, as torch's own float samplers are, never
draws beyond 5.77 σ (Box-Muller: ``sqrt(-2 ln 2**-24)``) or 16.6 b (Laplace: ``-ln 2**-24``): the
mechanism that runs is not the Gaussian or Laplace mechanism the accountant charges. Decision:
draw the uniform that decides the tail "wide", and account what is still cut.

* *Wide uniforms.* Box-Muller's radius uniform is ``u = (w + 0.5) / 2**64`` for 64 keystream bits
  ``w``; when ``w`` is 0 (probability 2**-64, so practically never, but correct when it
  happens) fresh keystream extends it: ``u = 2**-64 (w' + 0.5) / 2**64``, and so on, geometrically,
  up to 16 blocks, so the smallest ``u`` is 2**-1025 (:data:`GAUSSIAN_SMALLEST_U`) and the
  largest radius ``sqrt(2 * 1025 ln 2)`` = 37.7 σ. Laplace's ``|X| = -b ln u`` uses 63 bits per
  block (the 64th is the sign), up to 17 blocks: ``u`` down to 2**-1072, ``|X|`` up to 743 b.
  :func:`laplace_scalar` (the sparse vector technique's threshold noise) uses the same, in
  Python, from the same keystream, in float64.
* *Where float64 is needed, and only there.* The first block's ``u`` is at least 1.5 * 2**-64,
  far above float32's smallest normal number (2**-126), so it is rounded to float32 (24
  significant bits at every magnitude: the 24-bit sampler had 1 significant bit at 2**-24) and
  its log is numpy's vectorised float32 log, as before: numpy's float64 log is not vectorised
  here and took 0.48 ms per 131,072 values against 0.05 ms in float32, about a third of the
  sampler's time if taken for every draw. Only a draw that needs more blocks (probability
  2**-64) gets its ``ln u`` in float64 (:func:`wide_uniform`, ``math.log``; at least -743,
  exact enough in float32). The angle stays a 24-bit float32 uniform and ``cos``/``sin``
  float32: it decides no tail.
* *What is still cut, accounted.* The true distribution puts mass beyond the largest draw:
  ``P(|Z| > r_max) <= P(R > r_max) = exp(-r_max**2 / 2) = 2**-1025`` per Gaussian draw (R is the
  Box-Muller radius, ``|Z| <= R``), and ``P(|X| > t_max) = 2**-1072`` per Laplace draw;
  :func:`tail_mass` is the larger, :data:`TAIL_MASS`. The sampler is the ideal one conditioned on
  not landing there (up to the rounding of the last paragraph), so a release of ``d`` draws is
  within total variation ``d * TAIL_MASS`` of the ideal mechanism, and
  :mod:`training.jobs.accounting` adds ``(1 + e**ε) * d * TAIL_MASS`` to δ (the bound is derived
  there, with ``d`` bounded by 2**48 per release). Below ε of about 600 per release this is under
  float64's resolution of any δ in use (tested); above it the replay says so.
* *Speed.* The radius costs 64 bits instead of 24 (3 words per Box-Muller pair instead of 2),
  Laplace 2 words per draw instead of 1; the rest is unchanged. 4M draws on 2 threads: Gaussian
  8.3-9.4 ms against 8.0-9.5 before, Laplace 8.3-10.5 against 7.7-7.9 (docs/performance.md,
  "Privacy filters", with the command).

**Not built: protection against floating-point attacks.** The transforms are still floating point
(``ln``, ``sqrt``, ``cos``, a float32 result): the output distribution is a discrete one on floats
whose gaps depend on the value, and Mironov's attack on the textbook Laplace sampler (CCS 2012),
and the attacks of Jin et al. (S&P 2022) on Gaussian samplers, exploit exactly that, and the δ term
above does not cover it. No snapping mechanism or discrete sampler is implemented; widening the
uniforms removes the cut tails, not that weakness.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from training.fl import kernels

__all__ = [
    "GAUSSIAN_SMALLEST_U",
    "LAPLACE_SMALLEST_U",
    "NOISE_CHUNK",
    "TAIL_MASS",
    "gaussian_max_draw",
    "gaussian_noise_",
    "laplace_max_draw",
    "laplace_noise_",
    "laplace_scalar",
    "tail_mass",
    "uniform_keys_",
    "wide_uniform",
]

#: Values per noise task (its keystream and Box-Muller scratch stay in the core's L2 cache).
NOISE_CHUNK = 1 << 18

# Bits per block of a wide uniform, and blocks at most (the first from the chunk's own words).
_GAUSS_BITS, _GAUSS_BLOCKS = 64, 16
_LAPLACE_BITS, _LAPLACE_BLOCKS = 63, 17
_LOW63 = (1 << 63) - 1
#: Smallest radius uniform the Gaussian sampler can draw: ``0.5 * 2**-(64 * 16)``.
GAUSSIAN_SMALLEST_U = math.ldexp(0.5, -_GAUSS_BITS * _GAUSS_BLOCKS)
#: Smallest uniform behind ``|X| = -b ln u`` in the Laplace samplers: ``0.5 * 2**-(63 * 17)``.
LAPLACE_SMALLEST_U = math.ldexp(0.5, -_LAPLACE_BITS * _LAPLACE_BLOCKS)


def gaussian_max_draw() -> float:
    """The largest ``|draw| / std`` the Gaussian sampler can give: ``sqrt(-2 ln u_min)`` (37.7)."""
    return math.sqrt(-2.0 * math.log(GAUSSIAN_SMALLEST_U))


def laplace_max_draw() -> float:
    """The largest ``|draw| / scale`` the Laplace samplers can give: ``-ln u_min`` (743)."""
    return -math.log(LAPLACE_SMALLEST_U)


def tail_mass() -> float:
    """Per draw, the ideal distribution's mass beyond the samplers' largest draw (an upper bound).

    Gaussian: ``P(|Z| > r) <= P(R > r) = exp(-r**2 / 2)`` at ``r = gaussian_max_draw()``, which is
    ``GAUSSIAN_SMALLEST_U``; Laplace: ``P(|X| > t) = exp(-t)`` at ``t = laplace_max_draw()``, which
    is ``LAPLACE_SMALLEST_U``. The larger of the two: 2**-1025, about 2.8e-309.
    """
    return max(GAUSSIAN_SMALLEST_U, LAPLACE_SMALLEST_U)


#: :func:`tail_mass`, which ``training.jobs.accounting`` (no torch there) copies as a number.
TAIL_MASS = tail_mass()


def wide_uniform(blocks: Iterable[int], bits: int, levels: int) -> float:
    """``u`` from ``bits``-bit blocks: ``(w_k + 0.5) 2**-(bits (k + 1))`` at the first nonzero
    block ``w_k`` (or the last of ``levels``): uniform on (0, 1) down to ``2**-(bits levels + 1)``,
    each 0 block (probability ``2**-bits``) extending the exponent geometrically."""
    k = 0
    for k, w in enumerate(blocks):  # noqa: B007 - k is read after the loop
        if w or k == levels - 1:
            return math.ldexp(float(w) + 0.5, -bits * (k + 1))
    raise ValueError(f"wide_uniform: {k + 1} zero blocks given, {levels} needed")


def _key(generator: torch.Generator) -> bytes:
    """128 bits from ``generator`` (on its own device, so a CUDA generator works too)."""
    words = torch.randint(
        0, 2**63 - 1, (2,), generator=generator, dtype=torch.int64, device=generator.device
    ).tolist()
    return b"".join(int(w).to_bytes(8, "little") for w in words)


def _aes_blocks(key: bytes, counter: int, count: int) -> list[int]:
    """``count`` 64-bit keystream words from CTR block ``counter`` (little-endian)."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
    data = encryptor.update(bytes(8 * count))
    return [int.from_bytes(data[8 * i : 8 * i + 8], "little") for i in range(count)]


#: ``extra(j, count)``: ``count`` fresh 64-bit words for element ``j`` of a chunk.
Extra = Callable[[int, int], list[int]]


def _keystream_chunks(
    out: torch.Tensor,
    generator: torch.Generator,
    fill: Callable[[np.ndarray, np.ndarray, Extra], object],
    words_for: Callable[[int], int] = lambda m: m,
) -> None:
    """Run ``fill(chunk, words, extra)`` over NOISE_CHUNK-sized chunks of flat float32 ``out``,
    where ``words`` are ``words_for(chunk.size)`` uint32 words of AES-128-CTR keystream and
    ``extra`` gives fresh words for the rare wide uniform that needs more blocks.

    The key is 128 bits drawn from ``generator``; chunk ``i`` uses counter block ``i * 2**64``,
    and element ``j``'s extra words counter block ``i * 2**64 + 2**63 + j * 2**8`` (the chunk's
    own words use fewer than 2**20 blocks, so the two never meet), so the words depend only on
    the generator and the position, not on the thread count.
    """
    n = out.numel()
    if n == 0:
        return
    key = _key(generator)
    flat = out.numpy()

    def work(start: int) -> None:
        end = min(start + NOISE_CHUNK, n)
        chunk = start // NOISE_CHUNK
        words = _thread_scratch("words", words_for(end - start), np.uint32)
        counter = chunk.to_bytes(8, "big") + bytes(8)
        encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        encryptor.update_into(_zero_bytes(words.nbytes), words.data.cast("B"))

        def extra(j: int, count: int) -> list[int]:
            return _aes_blocks(key, (chunk << 64) | (1 << 63) | (j << 8), count)

        fill(flat[start:end], words, extra)

    starts = range(0, n, NOISE_CHUNK)
    if len(starts) == 1:
        work(0)  # one chunk (a scalar, a small tensor): no hand-off to the pool
    else:
        list(kernels.executor().map(work, starts))


_zeros = b""
_local = threading.local()


def _thread_scratch(name: str, size: int, dtype: type) -> np.ndarray:
    """A per-thread reused buffer: fresh memory is slow to touch here (3 GB/s against ~17)."""
    buf = getattr(_local, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(max(size, NOISE_CHUNK), dtype=dtype)
        setattr(_local, name, buf)
    return buf[:size]


def _zero_bytes(size: int) -> memoryview:
    global _zeros
    if len(_zeros) < size:
        _zeros = bytes(max(size, 12 * NOISE_CHUNK + 16))
    return memoryview(_zeros)[:size]


def _unit_interval(words: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``(j + 1) / 2**24`` for the low 24 bits ``j`` of each word: uniform on (0, 1], exactly
    representable in float32 (so ``log`` is finite and at most 0)."""
    np.bitwise_and(words, 0xFFFFFF, out=words)
    np.add(words, 1, out=words)
    out[...] = words  # at most 2**24: exact in float32
    out *= np.float32(2.0**-24)
    return out


def _wide_logs(u: np.ndarray, zeros: int, extra: Extra, bits: int, levels: int) -> None:
    """In place, float32 wide uniforms ``u`` to ``ln u``. A kernel left 0 where the first block
    was 0 (``zeros`` of them): those are finished from fresh words and their log taken in
    float64 (at least ln 2**-1072 = -743, well inside float32's range)."""
    idx = np.flatnonzero(u == 0.0) if zeros else np.empty(0, dtype=np.intp)
    u[idx] = 1.0
    np.log(u, out=u)
    mask = (1 << bits) - 1
    for j in idx:
        more = [w & mask for w in extra(int(j), levels - 1)]
        u[j] = math.log(wide_uniform([0, *more], bits, levels))


def gaussian_noise_(out: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fill flat float32 ``out`` with N(0, std²) draws (Box-Muller on AES-CTR words).

    Box and Muller (1958): for U1 on (0, 1] and U2 uniform, ``sqrt(-2 ln U1) cos(2 pi U2)`` and
    ``... sin(...)`` are independent standard normals. U1 is a wide uniform (64 bits, extended
    down to 2**-1025: tails to 37.7 std, see the module docstring); U2 has 24 bits. numpy's
    float32 log/cos/sin are vectorised (AVX-512 here), and the compiled steps around them
    (kernels.box_muller_wide_uniforms, kernels.box_muller_radius) make the rest one pass each;
    each chunk's work stays in cache.
    """

    def fill(chunk: np.ndarray, words: np.ndarray, extra: Extra) -> None:
        m = chunk.size
        h = (m + 1) // 2
        radius = _thread_scratch("radius", h, np.float32)
        angle = _thread_scratch("angle", h, np.float32)
        # Two words per radius and one per angle, all fresh: with an odd m the last angle's
        # sine is unused, never a word shared between a radius and an angle.
        zeros = kernels.box_muller_wide_uniforms(words, radius, angle)
        _wide_logs(radius, zeros, extra, _GAUSS_BITS, _GAUSS_BLOCKS)
        kernels.box_muller_radius(radius, std)
        np.cos(angle, out=chunk[:h])
        chunk[:h] *= radius
        rest = m - h
        np.sin(angle[:rest], out=chunk[h:])
        chunk[h:] *= radius[:rest]

    if out.numel():
        _keystream_chunks(out, generator, fill, lambda m: 3 * ((m + 1) // 2))
    return out


def uniform_keys_(out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill flat float32 ``out`` with uniform draws on (0, 1] (24 bits, from AES-CTR words).

    Keys for a uniformly random choice (random partial sharing, SVT's subset), not noise: no
    tail to decide, so 24 bits stay."""
    if out.numel():
        _keystream_chunks(out, generator, lambda chunk, words, _extra: _unit_interval(words, chunk))
    return out


def laplace_noise_(out: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Fill flat float32 ``out`` with Laplace(0, scale) draws (inverse CDF on AES-CTR words).

    ``|X| = -scale * ln U`` with U a wide uniform (63 bits, extended down to 2**-1072: tails to
    743 scale, see the module docstring), and the sign from the 64th bit, applied to the float32
    result.
    """

    def fill(chunk: np.ndarray, words: np.ndarray, extra: Extra) -> None:
        zeros = kernels.laplace_wide_uniforms(words, chunk)
        _wide_logs(chunk, zeros, extra, _LAPLACE_BITS, _LAPLACE_BLOCKS)
        kernels.laplace_magnitudes(words, chunk, scale, chunk)

    if out.numel():
        _keystream_chunks(out, generator, fill, lambda m: 2 * m)
    return out


def laplace_scalar(scale: float, generator: torch.Generator) -> float:
    """One Laplace(0, scale) draw in float64, as :func:`laplace_noise_` draws (the same wide
    uniform and tails), from AES-CTR keystream under a key drawn from ``generator``."""
    blocks = _aes_blocks(_key(generator), 0, _LAPLACE_BLOCKS)
    u = wide_uniform([w & _LOW63 for w in blocks], _LAPLACE_BITS, _LAPLACE_BLOCKS)
    x = -scale * math.log(u)
    return -x if blocks[0] >> 63 else x
