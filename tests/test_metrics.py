"""Tests for ddpm_ref/metrics.py: k-NN precision/recall, energy distance, near-copies, bits/dim baselines.

Oracles: brute-force loops over all pairs (independent of the chunked GEMM code), hand-computed
tiny cases, and torch.distributions for the Gaussian log-density.
"""
import numpy as np
import pytest

from ddpm_ref import metrics as M
from ddpm_ref import rng
from ddpm_ref.data import DIGITS_LEVELS, load_dataset


def _naive_dist(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.array([[np.sqrt(((x - y) ** 2).sum()) for y in b] for x in a])


def _naive_pr(real, fake, k):
    drr, dff, dfr = _naive_dist(real, real), _naive_dist(fake, fake), _naive_dist(fake, real)
    rad_r = np.sort(drr, 1)[:, k]                       # column 0 is the point itself
    rad_f = np.sort(dff, 1)[:, k]
    prec = np.mean([(dfr[i] <= rad_r).any() for i in range(len(fake))])
    rec = np.mean([(dfr[:, j] <= rad_f).any() for j in range(len(real))])
    return prec, rec


# ---------------------------------------------------------------------------------------------
# Distances and k-NN

def test_pairwise_distances_and_radii_match_brute_force_under_any_chunking():
    r = np.random.default_rng(0)
    a, b = r.normal(size=(23, 5)), r.normal(size=(17, 5))
    d2 = M.pairwise_sq_distances(a, b)
    # float64 expansion vs direct differences: relative error ~1e-15 per entry, 1e-12 is generous
    np.testing.assert_allclose(np.sqrt(d2), _naive_dist(a, b), rtol=1e-12, atol=1e-12)
    expected = np.sort(_naive_dist(a, a), 1)[:, 3]
    for max_el in (1, 7, 100, 1 << 22):                 # 1 row per chunk .. everything at once
        np.testing.assert_allclose(M.knn_radii(a, 3, max_el), expected, rtol=1e-12)
        np.testing.assert_allclose(M.nearest_distances(b, a, max_el), _naive_dist(b, a).min(1), rtol=1e-12)
    assert np.all(M.pairwise_sq_distances(a, a)[np.arange(23), np.arange(23)] == 0.0)   # exact zeros
    with pytest.raises(ValueError, match="k must be"):
        M.knn_radii(a[:3], 3)
    for bad in (2.5, True, None):                         # not silently truncated to an integer
        with pytest.raises(ValueError, match="k must be an integer"):
            M.knn_radii(a, bad)


def test_precision_recall_known_configurations():
    r = np.random.default_rng(1)
    x = r.normal(size=(40, 1, 3, 3))
    assert M.precision_recall(x, x) == (1.0, 1.0)                    # identical sets: exact
    assert M.precision_recall(x, x + 100.0) == (0.0, 0.0)            # disjoint, far apart: exact
    # fake = a tight cluster at one real point: every fake lies in that point's ball (precision 1);
    # the fake balls are tiny, so only real points within them count (recall = 1/40 here).
    fake = x[:1] + 1e-3 * r.normal(size=(10, 1, 3, 3))
    prec, rec = M.precision_recall(x, fake)
    assert prec == 1.0 and rec == pytest.approx(1 / 40)
    # random configurations against the brute-force definition (Kynkaanniemi et al. eq. 1-3):
    # both are fractions of finite sets, so they must agree exactly.
    for seed in range(3):
        rs = np.random.default_rng(10 + seed)
        real, fake = rs.normal(size=(30, 4)), rs.normal(size=(25, 4)) * 1.3 + 0.4
        got = M.precision_recall(real, fake, k=3, max_elements=50)
        assert got == pytest.approx(_naive_pr(real, fake, 3), abs=0)


def test_precision_recall_digits_train_against_test():
    tr, te = load_dataset("digits"), load_dataset("digits", "test")
    pr = M.precision_recall(te.x, tr.x)
    # Recorded on this data (deterministic: fixed split, no randomness): the real-vs-real figures
    # with 1,497 training images as "fake"; exact fractions of 1,497 and 300.
    assert pr.precision == pytest.approx(1349 / 1497, abs=1e-12)
    assert pr.recall == pytest.approx(261 / 300, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Energy distance

def test_energy_distance_hand_computed_and_properties():
    a, b = np.array([[0.0], [1.0]]), np.array([[3.0]])
    # E|X-Y| = (3 + 2) / 2 = 2.5; E|X-X'| = (0 + 1 + 1 + 0) / 4 = 0.5; E|Y-Y'| = 0
    assert M.energy_distance(a, b) == pytest.approx(2 * 2.5 - 0.5 - 0.0, abs=1e-12)
    r = np.random.default_rng(2)
    x, y = r.normal(size=(50, 2)), r.normal(size=(60, 2)) + 0.5
    assert M.energy_distance(x, x) == 0.0                              # V-statistic: exactly 0
    d = M.energy_distance(x, y)
    dxy, dxx, dyy = _naive_dist(x, y).mean(), _naive_dist(x, x).mean(), _naive_dist(y, y).mean()
    assert d == pytest.approx(2 * dxy - dxx - dyy, rel=1e-10)          # float64 sums of 3,000 terms
    assert d > 0.1                                                     # a 0.5 shift is clearly seen
    assert M.energy_distance(y, x) == pytest.approx(d, rel=1e-12)
    assert M.energy_distance(x, y, max_elements=13) == pytest.approx(d, rel=1e-12)


def test_energy_distance_toy_floor_is_small_and_a_shift_is_not():
    a = load_dataset("moons", "test", n=1000).x
    b = load_dataset("moons", "test", seed=1, n=1000).x
    floor = M.energy_distance(a, b)
    # Two independent draws of n = m = 1,000: the V-statistic's expectation is E|X - X'| (1/n + 1/m),
    # about 2.6e-3 for moons (E|X - X'| ~ 1.3), with fluctuations of the same order. Recorded value
    # (deterministic draws) to float32-input precision.
    assert floor == pytest.approx(0.0057768817, rel=1e-6)
    assert 0 < floor < 0.02
    assert M.energy_distance(a, b + np.float32(0.5)) > 20 * floor     # a 0.5 shift: ~0.3


def _naive_energy_ratio(xs, ys, n):
    """The definition, by explicit all-pairs loops: U-statistics over the pooled sets."""
    x, y = np.concatenate(xs), np.concatenate(ys)
    dxy, dxx, dyy = _naive_dist(x, y), _naive_dist(x, x), _naive_dist(y, y)
    a_p = dxx.sum() / (len(x) * (len(x) - 1))                     # pairs of distinct points only
    a_q = dyy.sum() / (len(y) * (len(y) - 1))
    pop = 2 * dxy.mean() - a_p - a_q
    return pop + (a_p + a_q) / n, 2 * a_q / n, pop


def test_energy_ratio_matches_the_definition_and_its_jackknife():
    g = np.random.default_rng(5)
    xs = [g.normal(size=(k, 2)) + 0.3 for k in (30, 25, 40)]         # unequal set sizes are allowed
    ys = [g.normal(size=(k, 2)) for k in (20, 35, 30)]
    r = M.energy_ratio(xs, ys, n=50, max_elements=7)
    dist, floor, pop = _naive_energy_ratio(xs, ys, 50)
    assert (r.distance, r.floor, r.population) == pytest.approx((dist, floor, pop), rel=1e-10)
    assert r.ratio == pytest.approx(dist / floor, rel=1e-10) and (r.n, r.sets) == (50, 3)
    jack = [np.divide(*_naive_energy_ratio(xs[:j] + xs[j + 1:], ys[:j] + ys[j + 1:], 50)[:2]) for j in range(3)]
    assert r.ratio_stderr == pytest.approx(np.sqrt(2 / 3 * np.sum((np.array(jack) - np.mean(jack)) ** 2)),
                                           rel=1e-8)
    assert M.energy_ratio(xs, ys).n == 30                            # default n: the first set's size


def test_energy_ratio_expectations_hold_on_a_toy():
    # The floor is E[ED(two held-out draws of n)] = 2 E|Y - Y'| / n. Its check: the mean of 300
    # independent single-draw figures (n = 100) matches it to within 3 standard errors of that mean
    # (the figures' coefficient of variation is about 0.8, so 3 se ~ 14%).
    def moons(seed, n):
        return load_dataset("moons", "test", seed=seed, n=n).x

    singles = np.array([M.energy_distance(moons(2 * i, 100), moons(2 * i + 1, 100)) for i in range(300)])
    est = M.energy_ratio([moons(1000 + j, 2000) for j in range(4)], [moons(2000 + j, 2000) for j in range(4)],
                         n=100)
    se_mean = singles.std(ddof=1) / np.sqrt(singles.size)
    assert abs(singles.mean() - est.floor) < 3 * se_mean
    # held-out draws in the samples' place: a perfect model, ratio 1 within a few standard errors
    assert abs(est.ratio - 1) < 4 * est.ratio_stderr + 0.02
    # a shifted model is seen, far beyond its standard error (measured: 26 +- 2.8): a 0.1 shift adds
    # D ~ 0.014 to E[ED], 25 times the floor at n = 5,000
    shifted = M.energy_ratio([moons(1000 + j, 2000) + np.float32(0.1) for j in range(4)],
                             [moons(2000 + j, 2000) for j in range(4)], n=5000)
    assert shifted.ratio > 5 and (shifted.ratio - 1) > 5 * shifted.ratio_stderr
    assert shifted.population > 0


def test_energy_ratio_errors():
    a = np.zeros((5, 2))
    with pytest.raises(ValueError, match="same number"):
        M.energy_ratio([a], [a])
    with pytest.raises(ValueError, match="same number"):
        M.energy_ratio([a, a], [a, a, a])
    with pytest.raises(ValueError, match="dimension"):
        M.energy_ratio([a, a], [a, np.zeros((5, 3))])
    with pytest.raises(ValueError, match="at least 2 points"):
        M.energy_ratio([a, a[:1]], [a, a])
    with pytest.raises(ValueError, match="n must be"):
        M.energy_ratio([a, a], [a, a], n=0)
    with pytest.raises(ValueError, match="no spread"):
        M.energy_ratio([a + 1, a], [a, a])


# ---------------------------------------------------------------------------------------------
# Near-copies

def test_near_copy_share():
    tr, te = load_dataset("digits"), load_dataset("digits", "test")
    held_out = M.near_copy_share(te.x, tr.x)
    # Recorded on the embedded digits (module docstring): median train-train gap 2.049, threshold
    # half of it; no held-out image is that close to a training image.
    assert held_out.train_median == pytest.approx(2.0491762887, rel=1e-8)
    assert held_out.threshold == pytest.approx(0.5 * held_out.train_median, rel=1e-15)
    assert held_out.share == 0.0 and held_out.distances.shape == (300,)
    copies = M.near_copy_share(tr.x[:50], tr.x)
    assert copies.share == 1.0 and np.all(copies.distances == 0.0)    # exact copies: distance 0
    noisy = tr.x[:40] + 0.05 * np.random.default_rng(3).normal(size=tr.x[:40].shape)
    # noise of 0.05 per pixel over 64 pixels moves an image by about 0.4 < threshold 1.02
    assert M.near_copy_share(noisy, tr.x).share == 1.0
    mixed = np.concatenate([tr.x[:10], te.x[:30]])
    assert M.near_copy_share(mixed, tr.x).share == pytest.approx(10 / 40)
    for bad in (0.0, -1.0, None, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ratio must be"):
            M.near_copy_share(te.x[:5], tr.x[:20], ratio=bad)


# ---------------------------------------------------------------------------------------------
# Bits/dim baselines

def test_histogram_bpd_hand_computed():
    train = np.array([[0, 255], [0, 255], [255, 255]], np.uint8)
    test = np.array([[0, 0]], np.uint8)
    # pixel 0: P(0) = (2 + 1) / (3 + 256); pixel 1: P(0) = (0 + 1) / (3 + 256)
    expected = -(np.log2(3 / 259) + np.log2(1 / 259)) / 2
    assert M.histogram_bpd(train, test) == pytest.approx(expected, rel=1e-12)
    # with two known levels {0, 255}: L = 2
    expected2 = -(np.log2(3 / 5) + np.log2(1 / 5)) / 2
    assert M.histogram_bpd(train, test, levels=[0, 255]) == pytest.approx(expected2, rel=1e-12)
    with pytest.raises(ValueError, match="not one of the 2 levels"):
        M.histogram_bpd(train, np.array([[0, 7]], np.uint8), levels=[0, 255])
    with pytest.raises(ValueError, match="8-bit integers"):
        M.histogram_bpd(train.astype(np.float32), test)
    for bad in (0.0, float("inf"), float("nan"), None):   # inf used to give nan bits, silently
        with pytest.raises(ValueError, match="alpha"):
            M.histogram_bpd(train, test, alpha=bad)


def test_gaussian_bpd_matches_torch_log_density():
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(4)
    n, m, d = 40, 7, 3
    train = r.integers(0, 256, (n, d), dtype=np.uint8)
    test = r.integers(0, 256, (m, d), dtype=np.uint8)
    got = M.gaussian_bpd(train, test, seed=5)
    # oracle: the same dequantisation noise (the documented rng addresses), torch's density
    u_tr = train + rng.uniform(5, rng.Stream.DATA, np.arange(n), M.DEQUANT_STEP, (d,)).astype(np.float64)
    u_te = test + rng.uniform(5, rng.Stream.DATA, np.arange(m), M.DEQUANT_STEP + 1, (d,)).astype(np.float64)
    mu = u_tr.mean(0)
    cov = (u_tr - mu).T @ (u_tr - mu) / n
    dist = torch.distributions.MultivariateNormal(torch.tensor(mu), covariance_matrix=torch.tensor(cov))
    expected = -dist.log_prob(torch.tensor(u_te)).mean().item() / (d * np.log(2))
    assert got == pytest.approx(expected, rel=1e-10)                   # float64 both sides
    with pytest.raises(ValueError, match="needs more than 3"):
        M.gaussian_bpd(train[:3], test)


def test_digits_baselines_reproduce_the_calibration_figures():
    b = M.digits_baselines()
    # The calibration: about 2.95 (dequantised Gaussian) and 2.43 (per-pixel histograms).
    # Deterministic (fixed split, counter-RNG noise): recorded values to 1e-9 relative (BLAS
    # summation order may change the last digits), and the stated ranges.
    assert b["gaussian_bpd"] == pytest.approx(2.94771817266, rel=1e-9)
    assert b["histogram_bpd"] == pytest.approx(2.42372292511, rel=1e-9)
    assert 2.9 < b["gaussian_bpd"] < 3.0 and 2.4 < b["histogram_bpd"] < 2.45
    # Without the 17-level structure (dequantising on all 256 values) the Gaussian wastes its mass
    # on values that never occur: much worse, as the metrics docstring says.
    tr, te = load_dataset("digits").uint8(), load_dataset("digits", "test").uint8()
    assert M.gaussian_bpd(tr, te) == pytest.approx(6.4434567246, rel=1e-9)
    assert M.histogram_bpd(tr, te, DIGITS_LEVELS) == pytest.approx(b["histogram_bpd"], rel=1e-15)
