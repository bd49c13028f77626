"""Noise for the privacy filters: Gaussian, Laplace and uniform draws from AES-128-CTR keystream.

Why not torch's samplers: AES-CTR (OpenSSL through ``cryptography``, with AES-NI) makes random
words several times faster than torch's single-threaded Mersenne Twister, releases the GIL so the
chunks run on the kernels' thread pool, and its output does not reveal the generator state. The
decisions (24-bit uniforms, Box-Muller, inverse CDF, the key and counter layout, and what this
does not protect against) are listed under "Noise" in :mod:`training.fl.filters`, and tested in
``tests/fl/test_fl_filters.py``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from training.fl import kernels

__all__ = ["NOISE_CHUNK", "gaussian_noise_", "laplace_noise_", "laplace_scalar", "uniform_keys_"]

#: Values per noise task (its keystream and Box-Muller scratch stay in the core's L2 cache).
NOISE_CHUNK = 1 << 18
# Largest float32 strictly inside (-1, 1): keeps log1p(-|u|) finite.
_U_MAX = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


def _keystream_chunks(
    out: torch.Tensor,
    generator: torch.Generator,
    fill: Callable[[np.ndarray, np.ndarray], object],
    *,
    extra_words: int = 0,
) -> None:
    """Run ``fill(chunk, words)`` over NOISE_CHUNK-sized chunks of flat float32 ``out``, where
    ``words`` are ``chunk.size + extra_words`` uint32 words of AES-128-CTR keystream (Box-Muller
    needs an even number of fresh words for an odd-sized chunk).

    The key is 128 bits drawn from ``generator``; chunk ``i`` uses counter block ``i * 2**64``, so
    the words depend only on the generator and the position, not on the thread count. AES-CTR
    (OpenSSL through ``cryptography``, with AES-NI) makes random words several times faster than
    torch's Mersenne Twister, releases the GIL, and is unpredictable without the key.
    """
    n = out.numel()
    if n == 0:
        return
    key = b"".join(
        int(w).to_bytes(8, "little")
        for w in torch.randint(0, 2**63 - 1, (2,), generator=generator, dtype=torch.int64)
    )
    flat = out.numpy()

    def work(start: int) -> None:
        end = min(start + NOISE_CHUNK, n)
        words = _thread_scratch("words", end - start + extra_words, np.uint32)
        counter = (start // NOISE_CHUNK).to_bytes(8, "big") + bytes(8)
        encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        encryptor.update_into(_zero_bytes(words.nbytes), words.data.cast("B"))
        fill(flat[start:end], words)

    list(kernels.executor().map(work, range(0, n, NOISE_CHUNK)))


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
        _zeros = bytes(max(size, 4 * NOISE_CHUNK + 16))
    return memoryview(_zeros)[:size]


def _unit_interval(words: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``(j + 1) / 2**24`` for the low 24 bits ``j`` of each word: uniform on (0, 1], exactly
    representable in float32 (so ``log`` is finite and at most 0)."""
    np.bitwise_and(words, 0xFFFFFF, out=words)
    np.add(words, 1, out=words)
    out[...] = words  # at most 2**24: exact in float32
    out *= np.float32(2.0**-24)
    return out


def gaussian_noise_(out: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fill flat float32 ``out`` with N(0, std²) draws (Box-Muller on AES-CTR words).

    Box and Muller (1958): for U1 on (0, 1] and U2 uniform, ``sqrt(-2 ln U1) cos(2 pi U2)`` and
    ``... sin(...)`` are independent standard normals. Uniforms have 24 bits, as in torch's own
    float sampler, so the tails end at 5.77 std. numpy's float32 log/sin/cos are vectorised
    (AVX-512 here), and the compiled steps around them (kernels.box_muller_*) make the rest
    one pass each; each chunk's work stays in cache.
    """

    def fill(chunk: np.ndarray, words: np.ndarray) -> None:
        m = chunk.size
        h = (m + 1) // 2
        radius = _thread_scratch("radius", h, np.float32)
        angle = _thread_scratch("angle", h, np.float32)
        # Fresh words for every angle: with an odd m the chunk has one word more (extra_words),
        # never a reuse of a radius word, which would tie that draw's angle to a radius.
        kernels.box_muller_uniforms(words[: 2 * h], radius, angle)
        np.log(radius, out=radius)
        kernels.box_muller_radius(radius, std)
        np.cos(angle, out=chunk[:h])
        chunk[:h] *= radius
        rest = m - h
        np.sin(angle[:rest], out=chunk[h:])
        chunk[h:] *= radius[:rest]

    if out.numel():
        _keystream_chunks(out, generator, fill, extra_words=1)
    return out


def uniform_keys_(out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill flat float32 ``out`` with uniform draws on (0, 1] (24 bits, from AES-CTR words)."""
    if out.numel():
        _keystream_chunks(out, generator, lambda chunk, words: _unit_interval(words, chunk))
    return out


def laplace_noise_(out: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Fill flat float32 ``out`` with Laplace(0, scale) draws (inverse CDF on AES-CTR words).

    ``|X| = -scale * ln U`` with U uniform on (0, 1] (24 bits: tails end at about 16.6 scale),
    and the sign from the word's top bit, set exactly by flipping the float's sign bit.
    """

    def fill(chunk: np.ndarray, words: np.ndarray) -> None:
        signs = np.bitwise_and(words, np.uint32(0x80000000))
        _unit_interval(words, chunk)
        np.log(chunk, out=chunk)
        chunk *= np.float32(-scale)
        bits = chunk.view(np.uint32)
        np.bitwise_xor(bits, signs, out=bits)

    if out.numel():
        _keystream_chunks(out, generator, fill)
    return out


def laplace_scalar(scale: float, generator: torch.Generator) -> float:
    u = float(torch.empty(1).uniform_(-1.0, 1.0, generator=generator).clamp_(-_U_MAX, _U_MAX))
    return -scale * math.copysign(1.0, u) * math.log1p(-abs(u)) if u else 0.0
