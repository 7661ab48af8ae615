"""Philox4x32-10 as CUDA device functions: the noise contract of ``ddpm_ref.rng``, in registers.

What it is: device functions that compute, inside any kernel, the same uint32 words as
``ddpm_ref.rng.philox4x32`` (Salmon et al. 2011, Random123) for the same ``(counter, key)``, and map
them to floats exactly as ``ddpm_ref.rng`` does:

* uniform ``u = ((w >> 8) | 1) * 2**-24`` (float32, exact);
* normal: Box-Muller on word pairs ``(w0, w1) -> (z0, z1)``, ``r = sqrt(-2 ln u0)``,
  ``z0 = r cos(2 pi u1)``, ``z1 = r sin(2 pi u1)`` in float64, rounded once to float32.

Counter layout (see ``ddpm_ref/rng.py``): ``c0 = element // 4``, ``c1 = index``, ``c2 = step``,
``c3 = sub``; key ``(seed, stream)``. Element ``e`` takes word ``e % 4`` of block ``e // 4``.

What it is not: a host API. The kernels that use these (``noise.py``) are the host API.

Integer maths: the simulator runs these lines on NumPy scalars, the compiler on LLVM integers. Every
product is formed as ``uint64 * uint64`` of values below 2**32 (exact in both), every word is masked
back to 32 bits explicitly, and every constant is a typed NumPy uint64, so neither integer promotion
rule (Numba's uint64/int64 -> float64 mixing, NumPy's value-based casting) can change a bit.
"""
from __future__ import annotations

import math

import numpy as np

from .runtime import cuda_module

cuda = cuda_module()
from numba import float32, float64, uint64  # noqa: E402  (after the clear-message import)

__all__ = ["philox4x32_10", "word_to_uniform", "words_to_normal_pair", "philox_normal4", "philox_uniform4"]

M0 = np.uint64(0xD2511F53)
M1 = np.uint64(0xCD9E8D57)
W0 = np.uint64(0x9E3779B9)
W1 = np.uint64(0xBB67AE85)
MASK32 = np.uint64(0xFFFFFFFF)
SHIFT32 = np.uint64(32)
SHIFT8 = np.uint64(8)
ONE64 = np.uint64(1)
TWO_M24 = 2.0 ** -24              # float64: the uniform's scale
TWO_M24_F32 = np.float32(2.0 ** -24)
TWO_PI = 2.0 * math.pi            # the same float64 as (2.0 * np.pi) in ddpm_ref.rng


@cuda.jit(device=True, inline=True)
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on 32-bit words held in uint64; returns the four output words (uint64)."""
    c0 = uint64(c0)
    c1 = uint64(c1)
    c2 = uint64(c2)
    c3 = uint64(c3)
    k0 = uint64(k0)
    k1 = uint64(k1)
    for _ in range(10):
        p0 = c0 * M0                       # exact: both factors < 2**32
        p1 = c2 * M1
        n0 = (p1 >> SHIFT32) ^ c1 ^ k0     # hi1 ^ c1 ^ k0
        n1 = p1 & MASK32                   # lo1
        n2 = (p0 >> SHIFT32) ^ c3 ^ k1     # hi0 ^ c3 ^ k1
        n3 = p0 & MASK32                   # lo0
        c0 = n0
        c1 = n1
        c2 = n2
        c3 = n3
        k0 = (k0 + W0) & MASK32            # the key bump after the last round is never used
        k1 = (k1 + W1) & MASK32
    return c0, c1, c2, c3


@cuda.jit(device=True, inline=True)
def word_to_uniform(w):
    """float32 uniform in (0, 1): ``((w >> 8) | 1) * 2**-24`` (exact in float32)."""
    return float32(((uint64(w) >> SHIFT8) | ONE64)) * TWO_M24_F32


@cuda.jit(device=True, inline=True)
def words_to_normal_pair(w0, w1):
    """Box-Muller on one word pair, float64 maths, one rounding to float32 (as ddpm_ref.rng)."""
    u0 = float64((uint64(w0) >> SHIFT8) | ONE64) * TWO_M24
    u1 = float64((uint64(w1) >> SHIFT8) | ONE64) * TWO_M24
    r = math.sqrt(-2.0 * math.log(u0))
    theta = TWO_PI * u1
    return float32(r * math.cos(theta)), float32(r * math.sin(theta))


@cuda.jit(device=True, inline=True)
def philox_normal4(block, index, step, sub, seed, stream):
    """The four float32 normals of counter block ``block`` of sample ``index``."""
    w0, w1, w2, w3 = philox4x32_10(block, index, step, sub, seed, stream)
    z0, z1 = words_to_normal_pair(w0, w1)
    z2, z3 = words_to_normal_pair(w2, w3)
    return z0, z1, z2, z3


@cuda.jit(device=True, inline=True)
def philox_uniform4(block, index, step, sub, seed, stream):
    """The four float32 uniforms of counter block ``block`` of sample ``index``."""
    w0, w1, w2, w3 = philox4x32_10(block, index, step, sub, seed, stream)
    return word_to_uniform(w0), word_to_uniform(w1), word_to_uniform(w2), word_to_uniform(w3)
