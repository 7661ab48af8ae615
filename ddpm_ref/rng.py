"""The noise contract: a counter-based random number generator (Philox4x32-10).

Every random number in ddpm-ref (initial weights, data order, timesteps, forward-process noise,
dropout masks, sampling noise) comes from this module, never from a global generator. Philox4x32-10
(Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3"; the Random123
generator) is a pure function ``(counter, key) -> 4 uint32 words``: there is no state to carry, so the
number that an element receives is fixed by *what it is for* and *where it sits*, not by how many
numbers were drawn before it. Consequences (all tested):

* the noise that sample ``i`` receives at step ``t`` is the same whatever the batch size or the order
  of the batch;
* the GPU kernels (``ddpm_ref.kernels``) compute the same words bit for bit;
* a resumed training run draws exactly what the uninterrupted run would have drawn.

Addressing (the layout the GPU kernels reproduce)
-------------------------------------------------
A draw is addressed by ``(seed, stream, index, step, sub, element)``:

====================  =======================================================================
key word ``k0``       ``seed``: the user's seed, an integer in [0, 2**32)
key word ``k1``       ``stream``: what the numbers are for (:class:`Stream`)
counter word ``c0``   ``element // 4``: the block of four consecutive elements of one sample
counter word ``c1``   ``index``: the sample's index (in the data set, or in the sampled batch)
counter word ``c2``   ``step``: the training step, or the reverse-process timestep
counter word ``c3``   ``sub``: a further coordinate (the dropout layer, say); 0 unless stated
====================  =======================================================================

Element ``e`` of a sample (in C order of its shape) takes word ``e % 4`` of the block ``e // 4``.

uint32 to float
---------------
* uniform:  ``u = ((w >> 8) | 1) * 2**-24``. The result is an odd multiple of ``2**-24``, exactly
  representable in float32 and strictly inside (0, 1): 0 and 1 never occur, so ``log(u)`` is finite.
* normal: Box-Muller on consecutive pairs of uniforms. Words ``(w0, w1)`` of a block give elements
  ``4b`` and ``4b+1``, words ``(w2, w3)`` give ``4b+2`` and ``4b+3``:
  ``r = sqrt(-2 ln u0)``, ``z0 = r cos(2 pi u1)``, ``z1 = r sin(2 pi u1)``, computed in float64 and
  rounded once to float32. (Here ``cos`` and ``sin`` of ``2 pi u1 = 2 pi k 2**-24`` come from two
  4096-entry tables and the angle-addition formulas, ``k = 2**12 kh + kl``: the same float64 values
  to within 1e-15, so the float32 results are those of a direct float64 evaluation; a GPU kernel
  computing in float64 matches bit for bit but for rare rounding ties, and any kernel must match
  within 1e-6.)
* integers in [0, n): ``(w * n) >> 32`` (multiply-shift; the bias is below ``n / 2**32``).

The module is plain NumPy, vectorised over all counters of a slice at once (the Philox round is
three array operations; see ``_philox_lanes``), working in per-thread scratch arrays; normals for a
(64, 3, 32, 32) batch take a few milliseconds (``python benchmarks/rng_speed.py`` times them against
``numpy.random.Generator.standard_normal``).
"""
from __future__ import annotations

import math
import sys
import threading

import numpy as np

__all__ = [
    "Stream", "philox4x32", "random_bits", "uniform", "normal", "randint", "permutation",
    "bits_to_uniform", "bits_to_normal", "check_seed",
]

# Philox4x32 constants (Random123): round multipliers and the Weyl key increments.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


class Stream:
    """Stream ids (key word ``k1``): what a draw is for. Distinct streams never share numbers."""

    INIT = 1            # parameter initialisation (index = parameter tensor number)
    DATA_ORDER = 2      # shuffling the data set (index = position, step = epoch)
    TIMESTEP = 3        # training timesteps t (index = sample index in the data set)
    TRAIN_NOISE = 4     # forward-process noise eps during training
    DROPOUT = 5         # dropout masks (sub = dropout layer number)
    FLIP = 6            # random horizontal flips
    LABEL_DROP = 7      # dropping class labels for classifier-free guidance
    SAMPLE_INIT = 8     # x_T, the pure noise a sampling run starts from
    SAMPLE_STEP = 9     # the fresh noise z added by each reverse step (step = timestep t)
    EVAL = 10           # evaluation (bits/dim timestep subsets and noise)
    DATA = 11           # synthetic data sets (toy distributions, dequantisation)

    @classmethod
    def names(cls) -> dict:
        return {k: v for k, v in vars(cls).items() if k.isupper()}


def check_seed(seed) -> int:
    """Return ``seed`` as a Python int after checking that it fits the key word (0 <= seed < 2**32)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed}")
    return seed


def _as_u32_array(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype == np.uint32:
        return arr
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError(f"{name} must hold values in [0, 2**32), got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint32)


_W = np.array([[PHILOX_W0], [PHILOX_W1]], dtype=np.uint64)     # (2, 1) key increments
_M = np.array([[PHILOX_M0], [PHILOX_M1]], dtype=np.uint64)     # (2, 1) round multipliers
_LITTLE = sys.byteorder == "little"


def _round_keys(key: np.ndarray, rounds: int):
    """The key of each round, uint32 (rounds, 2, K): ``(k0 + r W0, k1 + r W1) mod 2**32``."""
    if key.shape[1] == 1:          # one key for all counters (the common case): plain integers
        k0, k1 = int(key[0, 0]), int(key[1, 0])
        return np.array([[[(k0 + r * PHILOX_W0) & 0xFFFFFFFF], [(k1 + r * PHILOX_W1) & 0xFFFFFFFF]]
                         for r in range(rounds)], dtype=np.uint32)
    key = key.astype(np.uint64)
    return np.stack([((key + np.uint64(r) * _W) & _MASK32).astype(np.uint32) for r in range(rounds)])


def _philox_lanes(c02: np.ndarray, c13: np.ndarray, key: np.ndarray, rounds: int = PHILOX_ROUNDS,
                  prods=None):
    """The Philox rounds on counters stored as two "lanes" of rows.

    c02: uint32 (2, M) C-contiguous, rows (c0, c2); overwritten with the result's (c0, c2).
    c13: uint32 (2, M), rows (c1, c3). key: uint32 (2, 1) or (2, M), rows (k0, k1).
    prods: optional two uint64 (2, M) C-contiguous scratch arrays.
    Returns ``(c02, c13)``; the second is a view into a scratch array.

    Implementation (the maths is in :func:`philox4x32`): the two 32x32 -> 64-bit products of a round
    are one uint64 multiply of the (2, M) lanes by ``(M0, M1)``; viewing that product as uint32 gives
    the ``lo`` and ``hi`` halves without a shift or mask, and reversing the lane axis pairs
    ``hi1`` with ``c1`` and ``hi0`` with ``c3``: ``(c0, c2) <- (hi1, hi0) ^ (c1, c3) ^ (k0, k1)`` and
    ``(c1, c3) <- (lo1, lo0)``. Three array operations per round, all with long inner loops.
    """
    keys = _round_keys(key, rounds)
    if not _LITTLE:   # big-endian hosts: the portable (slower) spelling of the same round
        c02 = c02.astype(np.uint64)
        c13 = c13.astype(np.uint64)
        for r in range(rounds):
            prod = c02 * _M                                         # (2, M) exact 64-bit products
            c02 = ((prod[::-1] >> _SHIFT32) ^ c13 ^ keys[r]) & _MASK32
            c13 = prod[::-1] & _MASK32
        return c02.astype(np.uint32), c13.astype(np.uint32)
    if prods is None:
        prods = (np.empty(c02.shape, np.uint64), np.empty(c02.shape, np.uint64))
    for r in range(rounds):
        prod = prods[r % 2]                   # alternate: c13 is a view into the previous product
        np.multiply(c02, _M, out=prod)        # (2, M) rows M0 * c0, M1 * c2, exact in uint64
        halves = prod.view(np.uint32)         # (2, 2M): lo, hi, lo, hi, ... (little-endian)
        np.bitwise_xor(halves[::-1, 1::2], c13, out=c02)    # (hi1 ^ c1, hi0 ^ c3)
        np.bitwise_xor(c02, keys[r], out=c02)               # ^ (k0, k1)
        c13 = halves[::-1, 0::2]                            # (lo1, lo0)
    return c02, c13


def philox4x32(counter, key, rounds: int = PHILOX_ROUNDS) -> np.ndarray:
    """Philox4x32-R: the bijection at the heart of the generator.

    counter: uint32 array (..., 4). key: uint32 array (2,) or (..., 2), broadcast against the counter.
    Returns uint32 (..., 4). One round computes the full 64-bit products
    ``(hi0, lo0) = M0 * c0`` and ``(hi1, lo1) = M1 * c2`` and sets
    ``c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; the key is bumped by the Weyl constants
    ``(0x9E3779B9, 0xBB67AE85)`` between rounds.
    """
    counter = _as_u32_array(counter, "counter")
    key = _as_u32_array(key, "key")
    if counter.ndim < 1 or counter.shape[-1] != 4:
        raise ValueError(f"counter must have shape (..., 4), got {counter.shape}")
    if key.ndim < 1 or key.shape[-1] != 2:
        raise ValueError(f"key must have shape (2,) or (..., 2), got {key.shape}")
    if not 1 <= int(rounds) <= 16:
        raise ValueError(f"rounds must be in [1, 16], got {rounds}")
    try:
        batch = np.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    except ValueError:
        raise ValueError(f"counter shape {counter.shape} and key shape {key.shape} do not broadcast") from None
    c = np.broadcast_to(counter, batch + (4,)).reshape(-1, 4)               # (M, 4)
    c02 = c[:, 0::2].T.copy()                                               # (2, M), writable
    c13 = c[:, 1::2].T.copy()                                               # (2, M)
    if key.ndim == 1:
        k = key.reshape(2, 1)
    else:
        k = np.broadcast_to(key, batch + (2,)).reshape(-1, 2).T                 # (2, M)
    c02, c13 = _philox_lanes(c02, c13, k, int(rounds))
    out = np.empty(c.shape, dtype=np.uint32)                                # (M, 4)
    out[:, 0::2] = c02.T
    out[:, 1::2] = c13.T
    return out.reshape(batch + (4,))


def shape_tuple(shape, what: str) -> tuple:
    """``shape`` as a tuple of Python ints, each a non-negative integer (not a bool, float or string);
    otherwise ``ValueError(f"{what}, got {shape!r}")``."""
    if isinstance(shape, (str, bytes, dict)):
        raise ValueError(f"{what}, got {shape!r}")
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{what}, got {shape!r}") from None
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"{what}, got {shape!r}")
    return tuple(int(d) for d in dims)


def _prepare(seed, stream, index, step, sub, shape):
    """Validate the address of a draw; returns (seed, stream, index, step, sub, shape, size)."""
    seed = check_seed(seed)
    if isinstance(stream, (bool, np.bool_)) or not isinstance(stream, (int, np.integer)):
        raise ValueError(f"stream must be an integer in [0, 2**32), got {stream!r}")
    stream = int(stream)
    if not 0 <= stream < 2**32:
        raise ValueError(f"stream must be in [0, 2**32), got {stream}")
    index = _as_u32_array(np.atleast_1d(index), "index")
    if index.ndim != 1:
        raise ValueError(f"index must be a 1-D array of sample indices, got shape {index.shape}")
    step = _as_u32_array(step, "step")
    sub = _as_u32_array(sub, "sub")
    for name, v in (("step", step), ("sub", sub)):
        if v.ndim > 1 or (v.ndim == 1 and v.shape[0] != index.shape[0]):
            raise ValueError(f"{name} must be a scalar or have shape ({index.shape[0]},), got {v.shape}")
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    shape = shape_tuple(shape, "shape must be a tuple of non-negative integers")
    size = math.prod(shape)          # Python ints: exact for any shape (an int64 product can wrap)
    if size > 2**34:                 # blocks 0 .. 2**32 - 1 of 4 elements: c0 = element // 4 < 2**32
        raise ValueError(f"shape {shape} has more than 2**34 elements per sample: counter word c0 overflows")
    return seed, stream, index, step, sub, shape, size


# Performance: the work is done in slices of at most _CHUNK Philox blocks (4 elements each), in
# scratch arrays kept per thread. Fresh full-size temporaries would be page-faulted in on every call
# and cost more than the arithmetic; these stay in cache and are reused.
_CHUNK = 16384
_local = threading.local()


def _scratch() -> dict:
    """Per-thread scratch arrays for one chunk (152 bytes per block, 2.4 MiB in all)."""
    ws = getattr(_local, "ws", None)
    if ws is None:
        m = 2 * _CHUNK
        ws = {"c02": np.empty(m, np.uint32), "c13": np.empty(m, np.uint32),
              "p0": np.empty(m, np.uint64), "p1": np.empty(m, np.uint64),
              "k": np.empty(m, np.uint32), "j": np.empty(m, np.intp),
              "r": np.empty(m, np.float64), "z": np.empty(m, np.complex128),
              "e": np.empty(m, np.complex128)}
        _local.ws = ws
    return ws


def _chunks(n: int, n_blocks: int):
    """Yield (i0, i1, b0, b1): samples [i0, i1) x blocks [b0, b1), at most _CHUNK blocks each."""
    if n == 0 or n_blocks == 0:
        return
    if n_blocks >= _CHUNK:
        for i in range(n):
            for b0 in range(0, n_blocks, _CHUNK):
                yield i, i + 1, b0, min(n_blocks, b0 + _CHUNK)
    else:
        per = _CHUNK // n_blocks
        for i0 in range(0, n, per):
            yield i0, min(n, i0 + per), 0, n_blocks


def _view(ws: dict, name: str, shape: tuple) -> np.ndarray:
    """A C-contiguous view of shape ``shape`` at the start of scratch array ``name``."""
    return ws[name][: math.prod(shape)].reshape(shape)


def _block_lanes(ws, seed, stream, index, step, sub, i0, i1, b0, b1):
    """Philox output for samples [i0, i1) x blocks [b0, b1) as lanes (c0, c2) and (c1, c3), each (2, n, b).

    The counter of sample ``index[i]``, block ``b`` is ``(b, index[i], step, sub)``, the key
    ``(seed, stream)`` (module docstring). Results are views into the scratch arrays ``ws``.
    """
    n, nb = i1 - i0, b1 - b0
    c02 = _view(ws, "c02", (2, n, nb))
    c13 = _view(ws, "c13", (2, n, nb))
    c02[0] = np.arange(b0, b1, dtype=np.uint32)                  # c0 = element // 4
    c02[1] = step[i0:i1, None] if step.ndim else step            # c2 = step
    c13[0] = index[i0:i1, None]                                  # c1 = index
    c13[1] = sub[i0:i1, None] if sub.ndim else sub               # c3 = sub
    key = np.array([[seed], [stream]], dtype=np.uint32)          # k0 = seed, k1 = stream
    prods = (_view(ws, "p0", (2, n * nb)), _view(ws, "p1", (2, n * nb)))
    c02, c13 = _philox_lanes(c02.reshape(2, -1), c13.reshape(2, -1), key, PHILOX_ROUNDS, prods)
    return c02.reshape(2, n, nb), c13.reshape(2, n, nb)


def random_bits(seed, stream, index, step=0, shape=(), sub=0) -> np.ndarray:
    """uint32 words of shape ``(len(index),) + shape``: element ``e`` of sample ``index[i]``.

    ``step`` and ``sub`` are scalars or arrays of shape ``(len(index),)``.
    """
    seed, stream, index, step, sub, shape, size = _prepare(seed, stream, index, step, sub, shape)
    n, n_blocks = index.shape[0], (size + 3) // 4
    words = np.empty((n, n_blocks, 4), dtype=np.uint32)          # (N, B, word)
    ws = _scratch()
    for i0, i1, b0, b1 in _chunks(n, n_blocks):
        c02, c13 = _block_lanes(ws, seed, stream, index, step, sub, i0, i1, b0, b1)  # (2, n, b)
        for w, lane in ((0, c02[0]), (1, c13[0]), (2, c02[1]), (3, c13[1])):
            words[i0:i1, b0:b1, w] = lane
    return words.reshape(n, n_blocks * 4)[:, :size].reshape((n,) + shape)


def bits_to_uniform(words: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Map uint32 words to uniforms ``((w >> 8) | 1) * 2**-24``, strictly inside (0, 1).

    ``dtype`` is float32 or float64, the two that hold every such value exactly (float16 cannot:
    ``2**24 - 1`` overflows it)."""
    words = np.asarray(words)
    if words.dtype != np.uint32:
        raise ValueError(f"words must be uint32, got dtype {words.dtype}")
    try:   # None is refused too (np.dtype(None) would be float64, and None == np.dtype('f8') holds)
        ok = dtype is not None and np.dtype(dtype) in (np.dtype(np.float32), np.dtype(np.float64))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    u = ((words >> np.uint32(8)) | np.uint32(1)).astype(dtype)
    u *= np.dtype(dtype).type(2.0 ** -24)
    return u


# exp(2 pi i j / 2**12) and exp(2 pi i j / 2**24), j = 0 .. 4095. The Box-Muller angle 2 pi u1 is
# 2 pi k 2**-24 for a 24-bit integer k = 2**12 kh + kl, so exp(i 2 pi u1) = HI[kh] * LO[kl] by the
# angle-addition formulas, with an absolute error below 1e-15 (a few float64 roundings): the float32
# results equal those of a direct float64 cos/sin (checked in tests/test_rng.py).
_J = np.arange(4096, dtype=np.float64)
_ANGLE_HI = np.cos(_J * (2.0 * np.pi / 2**12)) + 1j * np.sin(_J * (2.0 * np.pi / 2**12))
_ANGLE_LO = np.cos(_J * (2.0 * np.pi / 2**24)) + 1j * np.sin(_J * (2.0 * np.pi / 2**24))
del _J


def _box_muller_lanes(w0: np.ndarray, w1: np.ndarray, ws: dict | None = None) -> np.ndarray:
    """Box-Muller on uint32 word arrays of equal shape S: complex128 S holding ``z0 + i z1``.

    ``r = sqrt(-2 ln u0)``, ``(z0, z1) = r (cos 2 pi u1, sin 2 pi u1)`` in float64 (module docstring);
    the complex layout puts z0 and z1 side by side in memory. With ``ws`` the result is a view into
    the scratch arrays; without, fresh arrays.
    """
    shape = w0.shape
    if ws is None:
        k, j = np.empty(shape, np.uint32), np.empty(shape, np.intp)
        r, z, e = np.empty(shape, np.float64), np.empty(shape, np.complex128), np.empty(shape, np.complex128)
    else:
        k, j, r, z, e = (_view(ws, name, shape) for name in ("k", "j", "r", "z", "e"))
    np.right_shift(w0, np.uint32(8), out=k)
    k |= np.uint32(1)                                  # u0 = k 2**-24 with k odd: never 0 or 1
    np.multiply(k, 2.0 ** -24, out=r)                  # exact in float64
    np.log(r, out=r)
    r *= -2.0
    np.sqrt(r, out=r)                                  # r = sqrt(-2 ln u0)
    np.right_shift(w1, np.uint32(8), out=k)
    k |= np.uint32(1)                                  # u1 = k 2**-24
    np.right_shift(k, np.uint32(12), out=j, casting="same_kind")
    np.take(_ANGLE_HI, j, out=z, mode="clip")          # exp(2 pi i kh / 2**12); j < 4096 always
    np.bitwise_and(k, np.uint32(4095), out=j, casting="same_kind")
    np.take(_ANGLE_LO, j, out=e, mode="clip")          # exp(2 pi i kl / 2**24)
    z *= e                                             # exp(2 pi i u1)
    z *= r
    return z


def bits_to_normal(words: np.ndarray) -> np.ndarray:
    """Box-Muller on word pairs along the last axis: float64 maths, one rounding to float32.

    words: uint32 (..., 2m). Pair ``(words[..., 2j], words[..., 2j+1])`` gives normals
    ``(z[..., 2j], z[..., 2j+1])`` (see the module docstring). Returns float32 of the same shape.
    """
    words = np.asarray(words)
    if words.dtype != np.uint32:
        raise ValueError(f"words must be uint32, got dtype {words.dtype}")
    if words.ndim < 1 or words.shape[-1] % 2:
        raise ValueError(f"bits_to_normal needs an even number of words on the last axis, got {words.shape}")
    z = _box_muller_lanes(words[..., 0::2], words[..., 1::2])     # (..., m) complex
    return z.view(np.float64).reshape(words.shape).astype(np.float32)


def uniform(seed, stream, index, step=0, shape=(), sub=0) -> np.ndarray:
    """float32 uniforms in (0, 1), shape ``(len(index),) + shape`` (see the module docstring)."""
    return bits_to_uniform(random_bits(seed, stream, index, step, shape, sub))


def normal(seed, stream, index, step=0, shape=(), sub=0) -> np.ndarray:
    """float32 standard normals, shape ``(len(index),) + shape``; element e of sample index[i].

    Equal to ``bits_to_normal(random_bits(...))`` (tested), computed without materialising the
    words: the Box-Muller pairs (w0, w1) and (w2, w3) of a block are the Philox lanes (c0, c1) and
    (c2, c3).
    """
    seed, stream, index, step, sub, shape, size = _prepare(seed, stream, index, step, sub, shape)
    n, n_blocks = index.shape[0], (size + 3) // 4
    z = np.empty((n, n_blocks, 2), dtype=np.complex64)   # (N, B, pair): (z0 + i z1, z2 + i z3) in memory
    ws = _scratch()
    for i0, i1, b0, b1 in _chunks(n, n_blocks):
        c02, c13 = _block_lanes(ws, seed, stream, index, step, sub, i0, i1, b0, b1)   # (2, n, b) each
        zc = _box_muller_lanes(c02, c13, ws)      # (2, n, b) complex128: pair (w0, w1), pair (w2, w3)
        z[i0:i1, b0:b1, 0] = zc[0]                # the one rounding to float32 (real and imaginary
        z[i0:i1, b0:b1, 1] = zc[1]                # parts separately) happens here
    return z.view(np.float32).reshape(n, n_blocks * 4)[:, :size].reshape((n,) + shape)


def _check_int(value, name: str, low: int, high: int, span: str) -> int:
    """``value`` as a Python int after checking that it is an integer (not a bool, not a float, not a
    string: nothing is truncated or parsed) in ``[low, high]``, which ``span`` spells for messages."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer in {span}, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {span}, got {value}")
    return value


def randint(seed, stream, index, high: int, step=0, sub=0) -> np.ndarray:
    """One integer in [0, high) per sample, int64 of shape (len(index),): ``(w0 * high) >> 32``."""
    high = _check_int(high, "high", 1, 2**32, "[1, 2**32]")
    w = random_bits(seed, stream, index, step, (1,), sub)[:, 0].astype(np.uint64)
    return ((w * np.uint64(high)) >> _SHIFT32).astype(np.int64)


def permutation(seed, stream, n: int, step=0) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, stream, step): argsort of random keys.

    Ties between the 32-bit keys are broken by position (stable sort), so the result is a
    deterministic function of its arguments. ``n`` is an integer in [0, 2**32] (the positions are
    the sample indices, counter word ``c1``).
    """
    n = _check_int(n, "n", 0, 2**32, "[0, 2**32]")   # before np.arange(n): indices lie in [0, 2**32)
    keys = random_bits(seed, stream, np.arange(n), step, (1,))[:, 0]
    return np.argsort(keys, kind="stable")
