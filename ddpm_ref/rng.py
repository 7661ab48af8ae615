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
  rounded once to float32.
* integers in [0, n): ``(w * n) >> 32`` (multiply-shift; the bias is below ``n / 2**32``).

The module is plain NumPy, vectorised over all counters at once; it generates normals for a
(64, 3, 32, 32) batch in a few milliseconds.
"""
from __future__ import annotations

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


def _philox_rounds(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """The Philox rounds on uint64 arrays holding 32-bit words (broadcasting); returns (c0, c1, c2, c3)."""
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    w0, w1 = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1)
    for r in range(rounds):
        p0 = c0 * m0                      # full 64-bit products: exact in uint64
        p1 = c2 * m1
        c0 = (p1 >> _SHIFT32) ^ c1 ^ k0   # hi1 ^ c1 ^ k0
        c1 = p1 & _MASK32                 # lo1
        c2 = (p0 >> _SHIFT32) ^ c3 ^ k1   # hi0 ^ c3 ^ k1
        c3 = p0 & _MASK32                 # lo0
        if r + 1 < rounds:                # bump the key between rounds
            k0 = (k0 + w0) & _MASK32
            k1 = (k1 + w1) & _MASK32
    return c0, c1, c2, c3


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
    c = counter.astype(np.uint64)
    k = key.astype(np.uint64)
    out = _philox_rounds(c[..., 0], c[..., 1], c[..., 2], c[..., 3], k[..., 0], k[..., 1], int(rounds))
    return np.stack(np.broadcast_arrays(*out), axis=-1).astype(np.uint32)


def _prepare(seed, stream, index, step, sub):
    seed = check_seed(seed)
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
    return seed, stream, index, step, sub


def _block_words(seed, stream, index, step, sub, n_blocks: int) -> np.ndarray:
    """uint32 (N, n_blocks, 4): the Philox output for every (sample, block) counter."""
    n = index.shape[0]
    # Counter words as uint64 arrays broadcasting to (N, n_blocks).
    c0 = np.arange(n_blocks, dtype=np.uint64)[None, :]
    c1 = index.astype(np.uint64)[:, None]
    c2 = np.broadcast_to(step.astype(np.uint64), (n,))[:, None] if step.ndim else np.uint64(step)
    c3 = np.broadcast_to(sub.astype(np.uint64), (n,))[:, None] if sub.ndim else np.uint64(sub)
    k0, k1 = np.uint64(seed), np.uint64(stream)
    shape = (n, n_blocks)
    c0, c1, c2, c3 = _philox_rounds(c0, c1, c2, c3, k0, k1)
    out = np.empty(shape + (4,), dtype=np.uint32)
    for j, w in enumerate((c0, c1, c2, c3)):
        out[..., j] = w
    return out


def random_bits(seed, stream, index, step=0, shape=(), sub=0) -> np.ndarray:
    """uint32 words of shape ``(len(index),) + shape``: element ``e`` of sample ``index[i]``.

    ``step`` and ``sub`` are scalars or arrays of shape ``(len(index),)``.
    """
    seed, stream, index, step, sub = _prepare(seed, stream, index, step, sub)
    shape = tuple(int(s) for s in np.atleast_1d(shape)) if shape != () else ()
    size = int(np.prod(shape, dtype=np.int64))
    n_blocks = (size + 3) // 4
    words = _block_words(seed, stream, index, step, sub, n_blocks)
    return words.reshape(index.shape[0], n_blocks * 4)[:, :size].reshape((index.shape[0],) + shape)


def bits_to_uniform(words: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Map uint32 words to uniforms ``((w >> 8) | 1) * 2**-24``, strictly inside (0, 1)."""
    u = ((words >> np.uint32(8)) | np.uint32(1)).astype(dtype)
    u *= dtype(2.0 ** -24) if dtype is not None else 2.0 ** -24
    return u


def bits_to_normal(words: np.ndarray) -> np.ndarray:
    """Box-Muller on word pairs along the last axis (length 4): float64 maths, one rounding to float32."""
    if words.shape[-1] % 2:
        raise ValueError(f"bits_to_normal needs an even number of words on the last axis, got {words.shape}")
    u = bits_to_uniform(words, np.float64)
    u0 = u[..., 0::2]
    u1 = u[..., 1::2]
    r = np.sqrt(-2.0 * np.log(u0))
    theta = (2.0 * np.pi) * u1
    z = np.empty(words.shape, dtype=np.float32)
    z[..., 0::2] = r * np.cos(theta)
    z[..., 1::2] = r * np.sin(theta)
    return z


def uniform(seed, stream, index, step=0, shape=(), sub=0) -> np.ndarray:
    """float32 uniforms in (0, 1), shape ``(len(index),) + shape`` (see the module docstring)."""
    return bits_to_uniform(random_bits(seed, stream, index, step, shape, sub))


def normal(seed, stream, index, step=0, shape=(), sub=0) -> np.ndarray:
    """float32 standard normals, shape ``(len(index),) + shape``; element e of sample index[i]."""
    seed, stream, index, step, sub = _prepare(seed, stream, index, step, sub)
    shape = tuple(int(s) for s in np.atleast_1d(shape)) if shape != () else ()
    size = int(np.prod(shape, dtype=np.int64))
    n_blocks = (size + 3) // 4
    words = _block_words(seed, stream, index, step, sub, n_blocks)   # (N, n_blocks, 4)
    z = bits_to_normal(words).reshape(index.shape[0], n_blocks * 4)
    return z[:, :size].reshape((index.shape[0],) + shape)


def randint(seed, stream, index, high: int, step=0, sub=0) -> np.ndarray:
    """One integer in [0, high) per sample, int64 of shape (len(index),): ``(w0 * high) >> 32``."""
    high = int(high)
    if not 1 <= high <= 2**32:
        raise ValueError(f"high must be in [1, 2**32], got {high}")
    w = random_bits(seed, stream, index, step, (1,), sub)[:, 0].astype(np.uint64)
    return ((w * np.uint64(high)) >> _SHIFT32).astype(np.int64)


def permutation(seed, stream, n: int, step=0) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, stream, step): argsort of random keys.

    Ties between the 32-bit keys are broken by position (stable sort), so the result is a
    deterministic function of its arguments.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    keys = random_bits(seed, stream, np.arange(n), step, (1,))[:, 0]
    return np.argsort(keys, kind="stable")
