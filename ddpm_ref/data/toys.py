"""Two-dimensional toy distributions, generated in NumPy from the counter RNG.

What it is: five standard 2-D test distributions for diffusion models (the set popularised by FFJORD,
Grathwohl et al. 2019, and used for DDPM toy experiments): ``swiss_roll``, ``moons``, ``8gaussians``,
``checkerboard``, ``rings``. What it is not: a random-number source of its own: every number comes
from :mod:`ddpm_ref.rng` with stream ``Stream.DATA``.

Addressing: point ``i`` of a draw uses counter index ``index_offset + i`` and the given ``step`` (the
split: :func:`ddpm_ref.data.load_dataset` uses step 0 for "train" and step 1 for "test"), and
``sub`` = the toy's number, so a point does not depend on how many points are drawn, and two toys
never share numbers. Each point takes 4 uniforms (``sub = id``) and 2 normals (``sub = id + 16``).

Scale: each toy is defined at a fixed scale chosen so that every coordinate has a standard
deviation of about 1 and mean about 0 (the analytic per-axis standard deviations are given in each
docstring; the test suite checks them on 20,000 points). The scale is a constant, never estimated
from the drawn points, so it does not depend on ``n``.
"""
from __future__ import annotations

import numpy as np

from .. import rng

__all__ = ["TOYS", "toy_data", "swiss_roll", "moons", "eight_gaussians", "checkerboard", "rings"]


def _draws(n: int, seed: int, index_offset: int, step: int, toy_id: int):
    """(u float64 (n, 4) uniforms in (0, 1), z float64 (n, 2) standard normals) for n points."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (a number of points), got {n!r}")
    if isinstance(index_offset, bool) or not isinstance(index_offset, (int, np.integer)):
        raise ValueError(f"index_offset must be an integer, got {index_offset!r}")
    n, index_offset = int(n), int(index_offset)
    if index_offset < 0 or index_offset + n > 2**32:
        raise ValueError(f"index_offset + n must lie in [0, 2**32], got {index_offset} + {n}")
    index = np.arange(index_offset, index_offset + n, dtype=np.int64)
    u = rng.uniform(seed, rng.Stream.DATA, index, step, (4,), sub=toy_id).astype(np.float64)
    z = rng.normal(seed, rng.Stream.DATA, index, step, (2,), sub=toy_id + 16).astype(np.float64)
    return u, z


def swiss_roll(n: int, seed: int = 0, index_offset: int = 0, step: int = 0) -> np.ndarray:
    """A 2-D Swiss roll: angle ``a = 1.5 pi (1 + 2 u)``, point ``(a cos a, a sin a) + 0.5 z``.

    The exact mean ``(E[a cos a], E[a sin a]) = (2, 2 / (3 pi))`` is subtracted and the result
    divided by 6.8 (per-axis standard deviations before the division about 6.6 and 7.0, after about
    0.98 and 1.03).
    """
    u, z = _draws(n, seed, index_offset, step, 1)
    a = 1.5 * np.pi * (1.0 + 2.0 * u[:, 0])                                    # (n,)
    x = np.stack([a * np.cos(a), a * np.sin(a)], axis=1) + 0.5 * z             # (n, 2)
    x -= np.array([2.0, 2.0 / (3.0 * np.pi)])
    return (x / 6.8).astype(np.float32)


def moons(n: int, seed: int = 0, index_offset: int = 0, step: int = 0) -> np.ndarray:
    """Two interleaving half circles (scikit-learn's ``make_moons``), noise 0.1, centred and scaled.

    Each point picks a moon with probability 1/2 and an angle ``theta`` uniform on [0, pi]: the
    upper moon is ``(cos theta, sin theta)``, the lower ``(1 - cos theta, 0.5 - sin theta)``; add
    ``0.1 z``, subtract the mean ``(0.5, 0.25)`` and multiply by 1.15 (per-axis standard deviations
    before scaling about 0.87 and 0.50; after about 1.0 and 0.58).
    """
    u, z = _draws(n, seed, index_offset, step, 2)
    theta = np.pi * u[:, 0]                                                    # (n,)
    lower = u[:, 1] < 0.5
    x = np.where(lower, 1.0 - np.cos(theta), np.cos(theta))
    y = np.where(lower, 0.5 - np.sin(theta), np.sin(theta))
    pts = np.stack([x, y], axis=1) + 0.1 * z - np.array([0.5, 0.25])          # (n, 2)
    return (1.15 * pts).astype(np.float32)


def eight_gaussians(n: int, seed: int = 0, index_offset: int = 0, step: int = 0) -> np.ndarray:
    """Eight Gaussians (std 0.1) with centres evenly spaced on a circle of radius sqrt(2).

    Per-axis variance: ``r**2 / 2 + 0.1**2 = 1.01``, so a standard deviation of about 1.005.
    """
    u, z = _draws(n, seed, index_offset, step, 3)
    k = np.minimum(np.floor(8.0 * u[:, 0]), 7.0)                              # component 0..7
    angle = k * (np.pi / 4.0)
    centres = np.sqrt(2.0) * np.stack([np.cos(angle), np.sin(angle)], axis=1)  # (n, 2)
    return (centres + 0.1 * z).astype(np.float32)


def checkerboard(n: int, seed: int = 0, index_offset: int = 0, step: int = 0) -> np.ndarray:
    """Uniform on the 8 "black" cells of a 4x4 board of unit cells on [-2, 2]^2, times sqrt(3)/2.

    Cell ``(i, j)`` (column i, row j, each 0..3) is black when ``i + j`` is even. Each coordinate is
    uniform on [-2, 2] (standard deviation 4/sqrt(12) = 1.155) before the scaling, exactly 1 after.
    """
    u, _ = _draws(n, seed, index_offset, step, 4)
    i = np.minimum(np.floor(4.0 * u[:, 0]), 3.0)                              # column 0..3
    j = 2.0 * np.minimum(np.floor(2.0 * u[:, 1]), 1.0) + np.mod(i, 2.0)       # a row with i + j even
    x = i + u[:, 2] - 2.0
    y = j + u[:, 3] - 2.0
    return (np.stack([x, y], axis=1) * (np.sqrt(3.0) / 2.0)).astype(np.float32)


def rings(n: int, seed: int = 0, index_offset: int = 0, step: int = 0) -> np.ndarray:
    """Four concentric rings of radii ``k * s`` (k = 1..4, equally likely), s = 0.5, noise std 0.05.

    Per-axis variance ``s**2 E[k**2] / 2 + 0.05**2 = 0.25 * 7.5 / 2 + 0.0025 = 0.94``: a standard
    deviation of about 0.97.
    """
    u, z = _draws(n, seed, index_offset, step, 5)
    k = np.minimum(np.floor(4.0 * u[:, 0]), 3.0) + 1.0                        # ring 1..4
    angle = 2.0 * np.pi * u[:, 1]
    pts = 0.5 * k[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)  # (n, 2)
    return (pts + 0.05 * z).astype(np.float32)


TOYS = {
    "swiss_roll": swiss_roll,
    "moons": moons,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "rings": rings,
}


def toy_data(name: str, n: int, seed: int = 0, index_offset: int = 0, step: int = 0) -> np.ndarray:
    """float32 (n, 2) points of the toy ``name`` (one of :data:`TOYS`)."""
    if name not in TOYS:
        raise ValueError(f"unknown toy distribution {name!r}; expected one of {sorted(TOYS)}")
    return TOYS[name](n, seed=seed, index_offset=index_offset, step=step)
