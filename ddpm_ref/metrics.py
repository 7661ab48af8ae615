"""Sample-quality and likelihood-baseline metrics, in NumPy, with bounded memory.

What it is: the figures ``ddpm eval`` reports beside the DDPM bound (DDPM section 3.3):

* :func:`precision_recall`: improved precision and recall (Kynkaanniemi, Karras, Laine, Lehtinen &
  Aila 2019, "Improved precision and recall metric for assessing generative models", eq. 1-3), k = 3,
  here in pixel space (the paper uses VGG-16 features; 8x8 digits need none).
* :func:`energy_distance`: the energy distance between two sample sets (Szekely & Rizzo 2004/2013),
  ``2 E|X - Y| - E|X - X'| - E|Y - Y'|``, for the 2-D toys; :func:`energy_ratio`: its expected value
  for sets of n points against the same for two held-out sets (the floor), estimated from several
  sets with a standard error (why: the single-set figure is far too noisy to hold to a 1.2x bar).
* :func:`near_copy_share`: the share of samples that are near-copies of a training image.
* :func:`gaussian_bpd` and :func:`histogram_bpd`: two honest likelihood baselines in bits/dim on
  discretised images.

What it is not: FID/IS (no Inception network here), or a likelihood of the DDPM itself (that is
``ddpm_ref.diffusion.bits_per_dim``).

Memory: every all-pairs computation runs in row chunks of at most ``max_elements`` distances
(default 2**20, 8 MiB of float64) against the whole other set, so memory is O(chunk * M), never
O(N * M).

Distances are Euclidean on the flattened examples, in float64. In up to 16 dimensions (the toys)
they are summed directly from coordinate differences (exact zeros for identical points; about 4x
faster than a GEMM of rank 2). In more dimensions (images) they use ``|a - b|^2 = |a|^2 + |b|^2 -
2 a.b`` (one GEMM per chunk), whose rounding error is a few ``eps * (|a|^2 + |b|^2)``: squared
distances below ``64 eps (|a|^2 + |b|^2)`` are set to exactly 0 so identical points are at distance
0 (any two distinct 8-bit images differ by at least ``(2/255)^2`` in the [-1, 1] scale, about 1e8
times more than that floor for 8x8 images).

Bits/dim convention (comparable with the DDPM bound)
----------------------------------------------------
The DDPM bound is ``-log2 P(x)`` per dimension for a discrete distribution over the 256 bins of 8-bit
data (DDPM eq. 13, with x scaled to [-1, 1] and bins of width 2/255). The baselines are discrete
distributions over the same bins, given the set of values that can occur (``levels``: 256 for
general 8-bit images, the 17 values of :data:`ddpm_ref.data.DIGITS_LEVELS` for the digits; the
baselines may know it, and assign zero mass to bins that never occur, which is still a
distribution over the 256 bins). Each 8-bit value is replaced by its rank ``k`` among ``levels``:

* Gaussian: ``k + u`` with ``u ~ U[0, 1)`` (uniform dequantisation, Theis, van den Oord & Bethge
  2016; Ho et al. 2020 section 3.3 use the same argument): a full-covariance Gaussian density ``p``
  is fitted (maximum likelihood) to dequantised training images and evaluated on dequantised test
  images. ``E_u[-log2 p(k + u)]`` is an upper bound on ``-log2 P(k)`` for the discrete model
  ``P(k) = integral of p over the unit cube at k``, so the figure is an honest upper bound in
  bits/dim for a discrete model over the bins. (Dequantising in the 0..255 scale instead, with the
  occupied digit values 16 apart, wastes most of the density on values that never occur: 6.44
  bits/dim on digits instead of 2.95.)
* Histograms: independent per-pixel categorical distributions over the ``levels`` with add-one
  (Laplace) smoothing, ``P_d(k) = (count_d(k) + 1) / (N + L)``, fitted on the training split and
  evaluated on the test split.

Measured on the embedded digits (train 1,497 -> test 300; ``python -c "from ddpm_ref import metrics;
print(metrics.digits_baselines())"``): Gaussian 2.948 bits/dim, histograms 2.424 bits/dim.

Reference figures for real data (deterministic; the ceilings a sampler is compared with)
------------------------------------------------------------------------------------------
* digits, ``precision_recall(test, train)`` (300 real, 1,497 "fake"): precision 0.901, recall 0.870;
  with 1,000 training images as "fake" (the size of an evaluation sample; the first 1,000 of
  ``rng.permutation(0, Stream.EVAL, 1497)``): 0.897 / 0.860.
* digits, ``near_copy_share(test, train)``: 0.0 (threshold 1.025 = 0.5 x the median gap 2.049).
* moons, ``energy_distance`` between two held-out draws of 5,000 (seeds 0 and 1): 3.6e-4.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import rng
from .schedule import _check_float as _check_real

__all__ = [
    "PrecisionRecall", "NearCopies", "pairwise_sq_distances", "knn_radii", "nearest_distances",
    "coverage", "precision_recall", "energy_distance", "EnergyRatio", "energy_ratio", "near_copy_share",
    "levels_index", "gaussian_bpd", "histogram_bpd", "digits_baselines", "NEAR_COPY_RATIO", "DEQUANT_STEP",
]

DEFAULT_MAX_ELEMENTS = 1 << 20           # distances per chunk (8 MiB of float64)
NEAR_COPY_RATIO = 0.5                    # near-copy threshold / median train-train NN distance
DEQUANT_STEP = 3000                      # rng step of the dequantisation noise (train; test = +1)
_ROUNDING_FLOOR = 64.0 * np.finfo(np.float64).eps
_DIRECT_MAX_DIM = 16


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


class EnergyRatio(NamedTuple):
    """:func:`energy_ratio`'s result: expected single-set figures at ``n`` points and their ratio."""
    distance: float        # E[ED(n samples, n held-out)]
    floor: float           # E[ED(n held-out, other n held-out)]
    ratio: float           # distance / floor: 1 for a perfect model
    ratio_stderr: float    # delete-a-set jackknife standard error of the ratio
    population: float      # unbiased estimate of the energy distance between the two distributions
    n: int                 # the set size the expectations are for
    sets: int              # number of sample sets (= reference sets) used


class NearCopies(NamedTuple):
    share: float               # fraction of samples closer than `threshold` to a training image
    threshold: float           # NEAR_COPY_RATIO * median train-train nearest-neighbour distance
    distances: np.ndarray      # (N,) each sample's distance to its nearest training image
    train_median: float        # median over training images of the distance to their nearest other


def _flat(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty array of examples (N, ...), got shape {a.shape}")
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(a)).sum())} NaN or infinite values")
    return a


def _chunk_rows(m: int, max_elements: int) -> int:
    if int(max_elements) < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    return max(1, int(max_elements) // max(1, m))


def pairwise_sq_distances(a: np.ndarray, b: np.ndarray, a_sq=None, b_sq=None) -> np.ndarray:
    """Squared Euclidean distances (N, M) between rows of a (N, D) and b (M, D), float64.

    Up to 16 dimensions: direct differences; above: the GEMM expansion, with values below its
    rounding floor (module docstring) set to exactly 0.
    """
    if a.shape[1] <= _DIRECT_MAX_DIM:
        d2 = np.zeros((a.shape[0], b.shape[0]))
        for k in range(a.shape[1]):
            diff = a[:, k:k + 1] - b[None, :, k]                            # (N, M)
            d2 += diff * diff
        return d2
    a_sq = (a * a).sum(1) if a_sq is None else a_sq                     # (N,)
    b_sq = (b * b).sum(1) if b_sq is None else b_sq                     # (M,)
    scale = a_sq[:, None] + b_sq[None, :]                              # (N, M)
    d2 = scale - 2.0 * (a @ b.T)
    d2[d2 < _ROUNDING_FLOOR * scale] = 0.0
    return d2


def knn_radii(x, k: int = 3, max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """(N,) distance from each row of x to its k-th nearest *other* row (the k-NN ball radius)."""
    x = _flat(x, "x")
    n = x.shape[0]
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer in [1, N-1] = [1, {n - 1}], got {k!r}")
    k = int(k)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    x_sq = (x * x).sum(1)
    radii = np.empty(n)
    step = _chunk_rows(n, max_elements)
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        d2 = pairwise_sq_distances(x[i0:i1], x, x_sq[i0:i1], x_sq)       # (chunk, N)
        d2[np.arange(i1 - i0), np.arange(i0, i1)] = 0.0                  # the point itself
        # Entry 0 of the sorted row is the point itself (distance 0), entry k the k-th other point.
        radii[i0:i1] = np.sqrt(np.partition(d2, k, axis=1)[:, k])
    return radii


def nearest_distances(query, ref, max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """(N,) distance from each query row to its nearest row of ref."""
    q, r = _flat(query, "query"), _flat(ref, "ref")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"query and ref differ in dimension: {q.shape[1]} vs {r.shape[1]}")
    r_sq = (r * r).sum(1)
    out = np.empty(q.shape[0])
    step = _chunk_rows(r.shape[0], max_elements)
    for i0 in range(0, q.shape[0], step):
        out[i0:i0 + step] = np.sqrt(pairwise_sq_distances(q[i0:i0 + step], r, None, r_sq).min(1))
    return out


def coverage(query, ref, ref_radii, max_elements: int = DEFAULT_MAX_ELEMENTS) -> float:
    """Fraction of query rows inside at least one ball ``|q - ref_j| <= ref_radii[j]`` (eq. 1-2)."""
    q, r = _flat(query, "query"), _flat(ref, "ref")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"query and ref differ in dimension: {q.shape[1]} vs {r.shape[1]}")
    radii2 = np.asarray(ref_radii, dtype=np.float64) ** 2                # (M,)
    if radii2.shape != (r.shape[0],):
        raise ValueError(f"ref_radii must have shape ({r.shape[0]},), got {radii2.shape}")
    r_sq = (r * r).sum(1)
    inside = 0
    step = _chunk_rows(r.shape[0], max_elements)
    for i0 in range(0, q.shape[0], step):
        d2 = pairwise_sq_distances(q[i0:i0 + step], r, None, r_sq)      # (chunk, M)
        inside += int(np.any(d2 <= radii2[None, :], axis=1).sum())
    return inside / q.shape[0]


def precision_recall(real, fake, k: int = 3, max_elements: int = DEFAULT_MAX_ELEMENTS) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019), in pixel space.

    The real manifold is the union of balls around each real example with radius its distance to the
    k-th nearest other real example (eq. 2); likewise for the fake set. precision = the fraction of
    fake examples inside the real manifold (eq. 3); recall = the fraction of real examples inside
    the fake manifold. Both sets are (N, ...) arrays in the same scale; they need >= k + 1 rows.
    """
    real_f, fake_f = _flat(real, "real"), _flat(fake, "fake")
    if real_f.shape[1] != fake_f.shape[1]:
        raise ValueError(f"real and fake differ in dimension: {real_f.shape[1]} vs {fake_f.shape[1]}")
    real_r = knn_radii(real_f, k, max_elements)
    fake_r = knn_radii(fake_f, k, max_elements)
    precision = coverage(fake_f, real_f, real_r, max_elements)
    recall = coverage(real_f, fake_f, fake_r, max_elements)
    return PrecisionRecall(float(precision), float(recall))


def _sum_distances(a, b, max_elements: int) -> float:
    """Sum of |a_i - b_j| over all N * M pairs (including i = j when a is b), float64."""
    b_sq = (b * b).sum(1)
    total = 0.0
    # In few dimensions, small chunks (at most 2**14 pairs) keep the temporaries in cache (4x faster).
    cap = 1 << 14 if b.shape[1] <= _DIRECT_MAX_DIM else int(max_elements)
    step = _chunk_rows(b.shape[0], min(int(max_elements), cap))
    for i0 in range(0, a.shape[0], step):
        total += float(np.sqrt(pairwise_sq_distances(a[i0:i0 + step], b, None, b_sq)).sum())
    return total


def _mean_distance(a, b, max_elements: int) -> float:
    """Mean of |a_i - b_j| over all N * M pairs (including i = j when a is b)."""
    return _sum_distances(a, b, max_elements) / (a.shape[0] * b.shape[0])


def energy_distance(a, b, max_elements: int = DEFAULT_MAX_ELEMENTS) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between the empirical distributions of a, b.

    The V-statistic (all pairs, including each point with itself): it is the squared MMD with the
    distance kernel, so it is >= 0 and is exactly 0 when a and b are the same set. Not square-rooted.
    a (N, ...), b (M, ...), same dimension.
    """
    a, b = _flat(a, "a"), _flat(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    # Centre both on a's mean: distances are unchanged, the expansion's rounding error is smaller.
    mu = a.mean(0)
    a, b = a - mu, b - mu
    ab = _mean_distance(a, b, max_elements)
    aa = _mean_distance(a, a, max_elements)
    bb = _mean_distance(b, b, max_elements)
    return float(max(2.0 * ab - aa - bb, 0.0))


def energy_ratio(sample_sets, reference_sets, n=None, max_elements: int = DEFAULT_MAX_ELEMENTS) -> EnergyRatio:
    """The expected energy distance of n samples to n held-out points, over that of two held-out draws.

    ``energy_distance(x, r)`` of one set of n samples against one held-out set of n points is a very
    noisy figure: it is dominated by the few low-order moments (means, mode weights) of the two sets,
    so even for a perfect model it spreads over about 0.5x to 2x its mean (measured on the toys), and
    a ratio of the means of 16 such figures still came out 1.39 for one perfect-model trial. This function estimates what the figure is on
    average, from M sample sets and M held-out sets, with much less noise.

    For the V-statistic of :func:`energy_distance` on n points from P (samples) and m from Q (data),
    ``E[ED] = D + a_P / n + a_Q / m`` with ``D = 2 E|X - Y| - E|X - X'| - E|Y - Y'|`` the energy
    distance between the distributions (>= 0, 0 iff P = Q; Szekely & Rizzo 2013) and ``a_P = E|X - X'|``,
    ``a_Q = E|Y - Y'|`` the mean distances within each (the V-statistic's zero diagonal loses a 1/n
    share of them). So with m = n:

        distance = E[ED(n samples, n held-out)]      = D + (a_P + a_Q) / n
        floor    = E[ED(n held-out, n more held-out)] = 2 a_Q / n       (D = 0, P = Q)
        ratio    = distance / floor = 1 + n D / (2 a_Q) + (a_P - a_Q) / (2 a_Q)

    D, a_P and a_Q are estimated without bias from all the pooled points by U-statistics (pairs of
    distinct points), whose noise falls like 1 / (M n) instead of 1 / n. ``ratio_stderr`` is the
    delete-one-set jackknife (removing sample set j and held-out set j together).

    sample_sets, reference_sets: sequences of M >= 2 arrays (n_j, ...) each (the same M; sizes may
    differ). n: the set size the figures are for (default: the first sample set's size).
    Cost: all pairs of all points, 3 (M n)^2 / 2 distances (about 20 s for M = 8 sets of 5,000 2-D
    points on one core).
    """
    xs = [_flat(np.asarray(a, dtype=np.float64), f"sample set {j}") for j, a in enumerate(sample_sets)]
    ys = [_flat(np.asarray(b, dtype=np.float64), f"reference set {j}") for j, b in enumerate(reference_sets)]
    M = len(xs)
    if M < 2 or len(ys) != M:
        raise ValueError(f"energy_ratio needs the same number (>= 2) of sample and reference sets, got "
                         f"{M} and {len(ys)}")
    dims = {a.shape[1] for a in xs + ys}
    if len(dims) != 1:
        raise ValueError(f"all sets must have the same dimension, got {sorted(dims)}")
    if min(a.shape[0] for a in xs + ys) < 2:
        raise ValueError("every set needs at least 2 points")
    n = xs[0].shape[0] if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be a positive set size, got {n}")
    mu = np.concatenate(xs).mean(0)                                   # centre: smaller rounding error
    xs, ys = [a - mu for a in xs], [b - mu for b in ys]
    nx = np.array([a.shape[0] for a in xs], dtype=np.float64)         # (M,)
    ny = np.array([b.shape[0] for b in ys], dtype=np.float64)
    sxy = np.empty((M, M))                                            # block sums of distances
    sxx = np.zeros((M, M))
    syy = np.zeros((M, M))
    for i in range(M):
        for j in range(M):
            sxy[i, j] = _sum_distances(xs[i], ys[j], max_elements)
            if j >= i:
                sxx[i, j] = sxx[j, i] = _sum_distances(xs[i], xs[j], max_elements)
                syy[i, j] = syy[j, i] = _sum_distances(ys[i], ys[j], max_elements)

    def estimate(keep):
        Nx, Ny = nx[keep].sum(), ny[keep].sum()
        k2 = np.ix_(keep, keep)
        cross = sxy[k2].sum() / (Nx * Ny)
        a_p = sxx[k2].sum() / (Nx * (Nx - 1))                          # diagonal zeros not counted
        a_q = syy[k2].sum() / (Ny * (Ny - 1))
        pop = 2.0 * cross - a_p - a_q
        dist, floor = pop + (a_p + a_q) / n, 2.0 * a_q / n
        return dist, floor, dist / floor, pop

    if not syy.sum() > 0:
        raise ValueError("the reference sets have no spread (all points equal): the floor is 0")
    dist, floor, ratio, pop = estimate(np.ones(M, dtype=bool))
    jack = np.array([estimate(np.arange(M) != j)[2] for j in range(M)])
    se = float(np.sqrt((M - 1) / M * np.sum((jack - jack.mean()) ** 2)))
    return EnergyRatio(float(dist), float(floor), float(ratio), se, float(pop), n, M)


def near_copy_share(samples, train, ratio: float = NEAR_COPY_RATIO,
                    max_elements: int = DEFAULT_MAX_ELEMENTS) -> NearCopies:
    """The share of samples closer to some training image than ``ratio`` x the typical train-train gap.

    The typical gap is the median over training images of the distance to their nearest *other*
    training image. Why ``ratio = 0.5``: a sample that close to a training image is far closer to
    it than real, independently written digits are to each other. On the embedded digits the
    median gap is 2.05 in the [-1, 1] scale (threshold 1.02: an RMS per-pixel difference of 0.128,
    about one of the 17 grey levels); none of the 300 held-out test images comes that close to a
    training image (their smallest ratio is 0.56), so the false-positive rate on real data is 0,
    while an exact or lightly perturbed copy of a training image always counts.
    """
    s, t = _flat(samples, "samples"), _flat(train, "train")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"samples and train differ in dimension: {s.shape[1]} vs {t.shape[1]}")
    ratio = _check_real(ratio, "ratio", low=0.0)
    train_nn = knn_radii(t, 1, max_elements)                              # (M,)
    median = float(np.median(train_nn))
    threshold = ratio * median
    d = nearest_distances(s, t, max_elements)                             # (N,)
    return NearCopies(float(np.mean(d < threshold)), float(threshold), d, median)


# ---------------------------------------------------------------------------------------------
# Likelihood baselines (bits/dim over the 256 bins; see the module docstring)

def levels_index(u8, levels=None, name: str = "images") -> tuple:
    """(k int64 (N, D): each value's rank among ``levels``, L = len(levels)).

    u8: integer images (N, ...) with values in 0..255. levels: the sorted values that can occur
    (default all 256). Every value must be one of the levels.
    """
    u = np.asarray(u8)
    if u.ndim < 1 or u.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty array (N, ...), got shape {u.shape}")
    if u.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold 8-bit integers 0..255, got dtype {u.dtype} "
                         "(use ddpm_ref.data.to_uint8 on [-1, 1] data)")
    u = u.reshape(u.shape[0], -1).astype(np.int64)
    lv = np.arange(256, dtype=np.int64) if levels is None else np.asarray(levels).astype(np.int64)
    if lv.ndim != 1 or lv.size < 2 or np.any(np.diff(lv) <= 0) or lv[0] < 0 or lv[-1] > 255:
        raise ValueError(f"levels must be >= 2 strictly increasing values in 0..255, got {levels!r}")
    k = np.searchsorted(lv, u)                                            # (N, D)
    ok = (k < lv.size) & (lv[np.minimum(k, lv.size - 1)] == u)
    if not ok.all():
        bad = u[~ok][0]
        raise ValueError(f"{name} holds the value {bad}, which is not one of the {lv.size} levels")
    return k, int(lv.size)


def gaussian_bpd(train_u8, test_u8, levels=None, seed: int = 0) -> float:
    """Bits/dim of a full-covariance Gaussian fitted to uniformly dequantised training images.

    ``k + u`` (level rank plus ``u ~ U[0, 1)`` from ``rng.uniform(seed, Stream.DATA, index,
    DEQUANT_STEP (train) or DEQUANT_STEP + 1 (test), (D,))``); maximum-likelihood mean and
    covariance; returns the mean over test images of ``-log2 p(k + u) / D``. An upper bound on a
    discrete model's bits/dim over the 256 bins (module docstring).
    """
    k_tr, _ = levels_index(train_u8, levels, "train_u8")
    k_te, _ = levels_index(test_u8, levels, "test_u8")
    n, d = k_tr.shape
    if k_te.shape[1] != d:
        raise ValueError(f"train and test differ in dimension: {d} vs {k_te.shape[1]}")
    if n <= d:
        raise ValueError(f"a full-covariance Gaussian in {d} dimensions needs more than {d} training "
                         f"images, got {n}")
    u_tr = k_tr + rng.uniform(seed, rng.Stream.DATA, np.arange(n), DEQUANT_STEP, (d,)).astype(np.float64)
    u_te = k_te + rng.uniform(seed, rng.Stream.DATA, np.arange(k_te.shape[0]), DEQUANT_STEP + 1,
                              (d,)).astype(np.float64)
    mu = u_tr.mean(0)                                                     # (D,)
    centred = u_tr - mu
    cov = centred.T @ centred / n                                         # (D, D), maximum likelihood
    chol = np.linalg.cholesky(cov)        # positive definite: the dequantisation noise has variance 1/12
    z = np.linalg.solve(chol, (u_te - mu).T)                              # (D, N_test)
    log_det = 2.0 * np.log(np.diag(chol)).sum()
    nll = 0.5 * (d * np.log(2.0 * np.pi) + log_det + (z * z).sum(0))     # (N_test,) nats
    return float(nll.mean() / (d * np.log(2.0)))


def histogram_bpd(train_u8, test_u8, levels=None, alpha: float = 1.0) -> float:
    """Bits/dim of independent per-pixel histograms with add-``alpha`` (Laplace) smoothing.

    ``P_d(k) = (count_d(k) + alpha) / (N + L alpha)`` over the L levels, fitted on train, averaged
    ``-log2 P_d(k)`` over test images and pixels.
    """
    alpha = _check_real(alpha, "alpha (add-alpha smoothing; 0 would give a zero count infinite bits)",
                        low=0.0)
    k_tr, n_levels = levels_index(train_u8, levels, "train_u8")
    k_te, _ = levels_index(test_u8, levels, "test_u8")
    n, d = k_tr.shape
    if k_te.shape[1] != d:
        raise ValueError(f"train and test differ in dimension: {d} vs {k_te.shape[1]}")
    # counts[d, l]: one bincount over (pixel, level) pairs flattened to d * L + l.
    flat = (np.arange(d)[None, :] * n_levels + k_tr).ravel()
    counts = np.bincount(flat, minlength=d * n_levels).reshape(d, n_levels)   # (D, L)
    log_p = np.log2(counts + alpha) - np.log2(n + n_levels * alpha)           # (D, L)
    return float(-log_p[np.arange(d)[None, :], k_te].mean())


def digits_baselines(seed: int = 0) -> dict:
    """Both baselines on the embedded digits (train -> test, the 17 levels known): a dict of floats."""
    from .data import DIGITS_LEVELS, digits_uint8
    train, _ = digits_uint8("train")
    test, _ = digits_uint8("test")
    return {
        "gaussian_bpd": gaussian_bpd(train, test, DIGITS_LEVELS, seed=seed),
        "histogram_bpd": histogram_bpd(train, test, DIGITS_LEVELS),
    }
