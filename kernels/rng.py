"""Philox4x32-10 as CUDA device functions: the noise contract of ``ddpm_ref.rng``, in registers.

What it is: device functions that compute, inside any kernel, the same uint32 words as
``ddpm_ref.rng.philox4x32`` (Salmon et al. 2011, Random123) for the same ``(counter, key)``, and map
them to floats exactly as ``ddpm_ref.rng`` does:

* uniform ``u = ((w >> 8) | 1) * 2**-24`` (float32, exact);
* normal: Box-Muller on word pairs ``(w0, w1) -> (z0, z1)``, ``r = sqrt(-2 ln u0)``,
  ``z0 = r cos(2 pi u1)``, ``z1 = r sin(2 pi u1)`` in float64, rounded once to float32.

Counter layout (see ``ddpm_ref/rng.py``): ``c0 = element // 4``, ``c1 = index``, ``c2 = step``,
``c3 = sub``; key ``(seed, stream)``. Element ``e`` takes word ``e % 4`` of block ``e // 4``.

Version 2 (``*_v2``, what the kernels use): the same words and the same normals within the same
1e-6, cheaper. Philox keeps its state in uint32 registers and forms each product as one
32 x 32 -> 64-bit multiply (``mul.wide.u32``) instead of 64-bit multiplies. Box-Muller runs in
float32 with accurate (not fast-math) libdevice functions, ``q = -2 logf(u0)``, ``r = sqrt_rn(q)``,
``(s, c) = sincospif(2 u1)`` (the argument ``2 u1`` is exact, so no ``2 pi`` rounding), ``z = r c``,
and falls back to v1's float64 maths when ``q >= 15`` (probability exp(-7.5) = 5.5e-4 per pair).
Error bound of the float32 path against v1 (the reference rounded once), from libdevice's
documented maximum errors (logf 1 ulp, sincospif 1 ulp, fsqrt_rn correctly rounded): r has relative
error <= 2**-23 (half of logf's plus the sqrt rounding), c and s absolute error <= 2**-24, so before
the final rounding ``|r c - z| <= r (2**-23 + 2**-24) <= 7e-7`` for ``r < sqrt(15 (1 + 2**-23)) <
3.873``; then ``|z| < 4``, one float32 ulp is <= 2.4e-7 and two roundings differ by at most one
ulp: total <= 9.4e-7 < 1e-6. The tail ``q >= 15`` (|z| up to 5.77, ulp 4.8e-7) would not hold that
bound in float32, which is why it keeps float64. In the simulator libdevice does not exist: logf,
sincospif and the sqrt are emulated by float64 libm rounded once to float32 (correctly rounded,
an instance of the same error bounds).

What it is not: a host API. The kernels that use these (``noise.py``) are the host API.

Integer maths: the simulator runs these lines on NumPy scalars, the compiler on LLVM integers. Every
product is formed as ``uint64 * uint64`` of values below 2**32 (exact in both), every word is masked
back to 32 bits explicitly, and every constant is a typed NumPy uint64, so neither integer promotion
rule (Numba's uint64/int64 -> float64 mixing, NumPy's value-based casting) can change a bit.
"""
from __future__ import annotations

import math

import numpy as np

from .runtime import cuda_module, is_simulator

cuda = cuda_module()
from numba import float32, float64, uint32, uint64  # noqa: E402  (after the clear-message import)

__all__ = ["philox4x32_10", "word_to_uniform", "words_to_normal_pair", "philox_normal4", "philox_uniform4",
           "philox4x32_10_v2", "words_to_normal_pair_v2", "philox_normal4_v2"]

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


# ---------------------------------------------------------------------------------------------
# Version 2: uint32 Philox state, float32 Box-Muller with a float64 tail (see the module docstring)
# ---------------------------------------------------------------------------------------------

M0_32 = np.uint32(0xD2511F53)
M1_32 = np.uint32(0xCD9E8D57)
W0_32 = np.uint32(0x9E3779B9)
W1_32 = np.uint32(0xBB67AE85)
Q_TAIL = np.float32(15.0)         # q = -2 ln u0 at or above this: the float64 path
MINUS_TWO_F32 = np.float32(-2.0)
TWO_F32 = np.float32(2.0)

if is_simulator():
    # No libdevice in the simulator: float64 libm rounded once (correctly rounded float32 results).
    def _logf(x):
        return float32(math.log(float(x)))

    def _sqrtf(x):
        return float32(math.sqrt(float(x)))

    def _sincospif(x):
        a = math.pi * float(x)
        return float32(math.sin(a)), float32(math.cos(a))

    def _umulhi(a, b):
        return uint32((uint64(a) * uint64(b)) >> SHIFT32)
else:  # pragma: no cover - compiled for the GPU
    from numba.cuda import libdevice as _ld
    _umulhi = _ld.umulhi
    _logf = _ld.logf
    _sqrtf = _ld.fsqrt_rn
    _sincospif = _ld.sincospif


@cuda.jit(device=True, inline=True)
def philox4x32_10_v2(c0, c1, c2, c3, k0, k1):
    """The same ten Philox rounds as :func:`philox4x32_10` with uint32 state: each product's high
    word from ``umulhi`` (``mul.hi.u32``), its low word a 32-bit multiply; words stay uint32 (so no
    64-bit multiply is emitted). Returns the four output words as uint32."""
    c0 = uint32(c0)
    c1 = uint32(c1)
    c2 = uint32(c2)
    c3 = uint32(c3)
    k0 = uint32(k0)
    k1 = uint32(k1)
    for _ in range(10):
        hi0 = uint32(_umulhi(c0, M0_32))
        hi1 = uint32(_umulhi(c2, M1_32))
        lo0 = uint32((uint64(c0) * uint64(M0_32)) & MASK32)      # exact product, low word
        lo1 = uint32((uint64(c2) * uint64(M1_32)) & MASK32)
        n0 = uint32(hi1 ^ c1 ^ k0)
        n1 = lo1
        n2 = uint32(hi0 ^ c3 ^ k1)
        n3 = lo0
        c0 = n0
        c1 = n1
        c2 = n2
        c3 = n3
        k0 = uint32((uint64(k0) + uint64(W0_32)) & MASK32)
        k1 = uint32((uint64(k1) + uint64(W1_32)) & MASK32)
    return c0, c1, c2, c3


@cuda.jit(device=True, inline=True)
def words_to_normal_pair_v2(w0, w1):
    """Box-Muller on one word pair in float32 (accurate libdevice logf, fsqrt_rn, sincospif), within
    1e-6 of :func:`words_to_normal_pair`; the float64 path of v1 for the tail ``-2 ln u0 >= 15``."""
    u0 = float32(uint32((uint32(w0) >> uint32(8)) | uint32(1))) * TWO_M24_F32    # exact
    q = MINUS_TWO_F32 * _logf(u0)
    if q < Q_TAIL:
        r = _sqrtf(q)
        u1 = float32(uint32((uint32(w1) >> uint32(8)) | uint32(1))) * TWO_M24_F32
        s, c = _sincospif(TWO_F32 * u1)                                            # 2 u1: exact
        return float32(r * c), float32(r * s)
    return words_to_normal_pair(w0, w1)


@cuda.jit(device=True, inline=True)
def philox_normal4_v2(block, index, step, sub, seed, stream):
    """The four float32 normals of counter block ``block`` of sample ``index`` (version 2)."""
    w0, w1, w2, w3 = philox4x32_10_v2(block, index, step, sub, seed, stream)
    z0, z1 = words_to_normal_pair_v2(w0, w1)
    z2, z3 = words_to_normal_pair_v2(w2, w3)
    return z0, z1, z2, z3
