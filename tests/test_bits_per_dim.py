"""Tests for the variational bound in bits/dim (ddpm_ref/diffusion.py): the prior golden value, the
Gaussian KL and discretised decoder against independent numerics, the full bound for Gaussian data
and the exact optimal denoiser against the exact entropy of the discretised data, unbiasedness of
the subset estimate, batch and index invariance, and every ValueError."""
import math

import numpy as np
import pytest

from ddpm_ref import diffusion as D
from ddpm_ref.schedule import Schedule

LIN = Schedule.linear(1000)
SHORT = Schedule.linear(100, 1e-4, 0.2)        # a short schedule that still ends near N(0, I)
LN2 = math.log(2.0)


def _exact_cdf(z):
    return np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in np.ravel(z)]).reshape(np.shape(z))


def _bin_edges():
    """Edges of the 256 bins of data in [-1, 1] (bin k is centred on -1 + 2k/255), outer ones infinite."""
    inner = -1.0 + (2.0 * np.arange(1, 256) - 1.0) / 255.0
    return np.concatenate([[-np.inf], inner, [np.inf]])


def _discretise(x):
    return -1.0 + np.clip(np.round((x + 1.0) * 127.5), 0, 255) / 127.5


def _discrete_gaussian_probs(mu, s):
    """Exact bin probabilities of N(mu, s^2) discretised into the 256 bins (math.erf)."""
    cdf = np.array([0.0] + list(_exact_cdf((_bin_edges()[1:-1] - mu) / s)) + [1.0])
    return np.diff(cdf)


# ----------------------------------------------------------------------------- pieces
def test_prior_golden_value():
    # REFERENCE.md: about 2.9e-05 bits/dim at x0 = 1 for the linear schedule (two digits given).
    p = D.prior_bpd(LIN, np.ones((2, 3, 4)))
    assert p.shape == (2,)
    assert abs(p[0] - 2.9e-5) < 0.05e-5
    # At x0 = 1 the KL of N(sqrt(ab), 1 - ab) from N(0, 1) is 0.5 (-log(1 - ab) - ab + ab) exactly;
    # float64 evaluation of both: rtol 1e-9.
    ab = LIN.alpha_bar[-1]
    np.testing.assert_allclose(p, -0.5 * math.log1p(-ab) / LN2, rtol=1e-9)
    z = LIN.rescale_zero_terminal_snr()
    np.testing.assert_allclose(D.prior_bpd(z, np.ones((1, 3))), 0.0, atol=1e-15)   # q(x_T|x0) = N(0, I)


def test_normal_kl_against_numerical_integration():
    # KL(p||q) = int p log(p/q) on a fine grid (trapezoid, 2e5 points over +-12 sd): error ~1e-9.
    for m1, lv1, m2, lv2 in [(0.3, -1.0, -0.2, 0.5), (0.0, 0.0, 0.0, 0.0), (1.0, -4.0, 0.9, -3.0)]:
        s1 = math.exp(0.5 * lv1)
        x = np.linspace(m1 - 12 * s1, m1 + 12 * s1, 200001)
        logp = -0.5 * ((x - m1) ** 2 / math.exp(lv1) + lv1 + math.log(2 * math.pi))
        logq = -0.5 * ((x - m2) ** 2 / math.exp(lv2) + lv2 + math.log(2 * math.pi))
        want = np.trapezoid(np.exp(logp) * (logp - logq), x)
        np.testing.assert_allclose(D.normal_kl(m1, lv1, m2, lv2), want, atol=1e-8)


def test_approx_cdf_accuracy():
    z = np.linspace(-8, 8, 4001)
    err = np.abs(D.approx_standard_normal_cdf(z) - _exact_cdf(z))
    assert err.max() < 2e-4            # the documented accuracy of the tanh approximation
    assert np.all(np.diff(D.approx_standard_normal_cdf(z)) >= 0)


@pytest.mark.parametrize("mean, log_scale", [(0.0, math.log(0.01)), (0.7, math.log(0.3)),
                                             (-0.99, math.log(0.005)), (1.5, math.log(2.0))])
def test_discretized_likelihood_is_a_distribution_over_the_bins(mean, log_scale):
    centres = -1.0 + np.arange(256) / 127.5
    logp = D.discretized_gaussian_log_likelihood(centres, mean, log_scale)
    p = np.exp(logp)
    # The bin probabilities telescope to exactly 1; clamping at 1e-12 adds at most 256e-12.
    assert abs(p.sum() - 1.0) < 1e-9
    # Against exact (erf) bin probabilities: each is a difference of two CDF values, each off by
    # at most 2e-4 (tanh approximation), so 4e-4 absolute.
    exact = _discrete_gaussian_probs(mean, math.exp(log_scale))
    np.testing.assert_allclose(p, exact, atol=4e-4)


def test_vb_terms_vanish_for_a_perfect_mean():
    # With x0_hat = x0 and the posterior variance (fixed_small), p(x_{t-1}|x_t) = q(x_{t-1}|x_t, x0):
    # every KL term is 0 (float64 cancellation leaves ~1e-16).
    r = np.random.default_rng(0)
    t = np.array([1, 2, 50, 999])
    x0 = _discretise(r.uniform(-1, 1, (4, 5)))
    xt = D.q_sample(LIN, x0, t, r.standard_normal((4, 5)))
    vb = D.vb_terms_bpd(LIN, x0, x0, xt, t, "sample", "fixed_small")
    np.testing.assert_allclose(vb, 0.0, atol=1e-12)
    # the decoder at a perfect mean, with sigma = sqrt(beta~_2) = 0.0074 and bin half-width 1/255:
    # P(bin) = 2 Phi(0.53) - 1 = 0.40 in the interior, so about 1.3 bits per interior dimension.
    x0_mid = np.full((1, 5), 1.0 / 127.5 - 1.0 + 0.5)
    x0_mid = _discretise(x0_mid)
    nll = D.vb_terms_bpd(LIN, x0_mid, x0_mid, x0_mid, np.array([0]), "sample", "fixed_small")
    sigma = math.sqrt(LIN.posterior_variance[1])
    want = -math.log2(2 * _exact_cdf((1 / 255) / sigma) - 1)
    np.testing.assert_allclose(nll, want, rtol=1e-3)   # tanh-CDF approximation error (< 2e-4 abs)


# ----------------------------------------------------------------------------- the full bound
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_gaussian_data_bound_is_finite_and_not_below_the_true_nll(variance):
    # Data: x0 ~ N(mu, s^2) per dimension, discretised into the 256 bins; its exact entropy H (bits)
    # is a lower bound on any model's expected NLL, and the variational bound lies above the model's
    # NLL. Per sample the bound is compared with the sample's own true NLL -log2 P(x0) (average H):
    # the paired difference removes the data variability. Bound: mean difference > -5 standard errors.
    mu, s, n, dims = 0.1, 0.4, 256, 4
    r = np.random.default_rng(1)
    x0 = _discretise(mu + s * r.standard_normal((n, dims)))
    probs = _discrete_gaussian_probs(mu, s)
    H = -np.sum(probs[probs > 0] * np.log2(probs[probs > 0]))
    k = np.round((x0 + 1) * 127.5).astype(int)
    true_nll = -np.log2(probs[k]).mean(1)                       # bits/dim, per sample
    # the Monte Carlo mean of the true NLL estimates H (5 standard errors)
    assert abs(true_nll.mean() - H) < 5 * true_nll.std() / math.sqrt(n)
    # batch_size 8192 rows = 32 timesteps of the 256 samples per denoiser call (fewer, larger calls)
    res = D.bits_per_dim(LIN, D.gaussian_oracle_denoiser(LIN, mu, s), x0, variance=variance, seed=3,
                         batch_size=8192)
    total = res["total"]
    assert np.all(np.isfinite(total))
    np.testing.assert_allclose(total, res["prior"] + res["decoder"] + res["kl"], rtol=1e-14)
    np.testing.assert_allclose(res["decoder"] + res["terms"][:, 1:].sum(1) + res["prior"], total, rtol=1e-14)
    gap = total - true_nll
    se = gap.std() / math.sqrt(n)
    assert gap.mean() > -5 * se, (gap.mean(), se)
    # and the bound is a meaningful one: measured gaps (bound - true NLL, bits/dim) are 0.14 +- 0.06
    # (fixed_large) and 0.76 +- 0.07 (fixed_small) against H = 7.63 bits/dim; the larger fixed_small
    # gap is the price of its too-small reverse variances at large t. 1.5 is a loose sanity ceiling.
    assert gap.mean() < 1.5
    assert np.all(res["timesteps"] == np.arange(LIN.T))


def test_bound_is_the_same_for_every_prediction_type():
    # The oracle in eps, x0 and v form is one estimator, so the bound agrees up to float64
    # conversion round-off (amplified by 1/sqrt(alpha_bar) <= 10 at most here): rtol 1e-9.
    r = np.random.default_rng(2)
    x0 = _discretise(0.2 + 0.3 * r.standard_normal((6, 3)))
    totals = [D.bits_per_dim(SHORT, D.gaussian_oracle_denoiser(SHORT, 0.2, 0.3, p), x0, prediction=p,
                             seed=5)["total"] for p in D.PREDICTIONS]
    np.testing.assert_allclose(totals[1], totals[0], rtol=1e-9)
    np.testing.assert_allclose(totals[2], totals[0], rtol=1e-9)


def test_subset_estimate_is_unbiased_and_reuses_the_same_noise():
    # For each sample, E_subset[estimate] = full bound exactly (given the noise, which is addressed
    # by (index, t) and so shared by both). Paired differences over n = 300 samples (the same data
    # point repeated): |mean| < 5 standard errors.
    n, k = 300, 11
    x0 = np.tile(_discretise(np.array([[0.5, -0.3, 0.9]])), (n, 1))
    f = D.gaussian_oracle_denoiser(SHORT, 0.0, 0.5)
    full = D.bits_per_dim(SHORT, f, x0, seed=9)
    sub = D.bits_per_dim(SHORT, f, x0, seed=9, timesteps=k)
    assert sub["terms"].shape == (n, k) and sub["timesteps"].shape == (n, k)
    ts = sub["timesteps"]
    assert np.all(ts[:, 0] == 0) and np.all(np.diff(ts[:, 1:], axis=1) > 0)   # distinct KL steps
    # the subset's terms are exactly the full bound's terms at the chosen timesteps
    np.testing.assert_array_equal(sub["terms"], np.take_along_axis(full["terms"], ts, axis=1))
    np.testing.assert_array_equal(sub["decoder"], full["decoder"])
    d = sub["total"] - full["total"]
    assert d.std() > 0                                           # subsets differ between samples
    assert abs(d.mean()) < 5 * d.std() / math.sqrt(n), (d.mean(), d.std())
    # K = T is the full bound, bit for bit
    np.testing.assert_array_equal(D.bits_per_dim(SHORT, f, x0[:3], seed=9, timesteps=SHORT.T)["total"],
                                  full["total"][:3])


def test_batch_size_and_index_offset_do_not_change_the_result():
    r = np.random.default_rng(4)
    x0 = _discretise(r.uniform(-1, 1, (7, 2, 2))).astype(np.float32)
    f = D.gaussian_oracle_denoiser(SHORT, 0.0, 0.5)
    calls = []
    a = D.bits_per_dim(SHORT, f, x0, seed=1, timesteps=6, progress=lambda done, total: calls.append((done, total)))
    b = D.bits_per_dim(SHORT, f, x0, seed=1, timesteps=6, batch_size=3)
    c = D.bits_per_dim(SHORT, f, x0[4:], seed=1, timesteps=6, index_offset=4)
    for key in ("total", "terms", "timesteps"):
        np.testing.assert_array_equal(a[key], b[key])            # bit-identical
        np.testing.assert_array_equal(a[key][4:], c[key])
    assert calls == [(7 * i, 42) for i in range(1, 7)]          # rows done, N K rows in all
    d = D.bits_per_dim(SHORT, f, x0, seed=2, timesteps=6)
    assert not np.array_equal(a["total"], d["total"])            # the seed matters


def test_learned_range_bound_with_labels():
    # A learned-range model output (the oracle mean plus v = 0: the log-variance halfway between
    # log beta~ and log beta) gives a finite, positive bound, and the labels reach the denoiser.
    x0 = _discretise(np.array([[0.1, 0.2], [-0.4, 0.0]]))
    base = D.gaussian_oracle_denoiser(SHORT, 0.0, 0.5)
    seen = []

    def f(x, t, y=None):
        seen.append(None if y is None else y.copy())
        return np.concatenate([base(x, t), np.zeros_like(x)], axis=1)

    res = D.bits_per_dim(SHORT, f, x0, variance="learned_range", y=np.array([3, 1]), timesteps=4)
    assert np.all(np.isfinite(res["total"])) and np.all(res["total"] > 0)
    assert all(np.array_equal(y, [3, 1]) for y in seen) and len(seen) == 4


def test_empty_batch_gives_empty_results():
    # N = 0, like q_sample and vb_terms_bpd: empty (0,) float64 results, no reshape error.
    x0 = np.zeros((0, 3, 4, 4), np.float32)
    t0 = np.zeros(0, np.int64)
    den = D.gaussian_oracle_denoiser(SHORT, 0.0, 0.5)
    prior = D.prior_bpd(SHORT, x0)
    assert prior.shape == (0,) and prior.dtype == np.float64
    for timesteps in (None, 4):
        res = D.bits_per_dim(SHORT, den, x0, timesteps=timesteps)
        for key in ("total", "prior", "decoder", "kl"):
            assert res[key].shape == (0,) and res[key].dtype == np.float64, key
        assert res["terms"].shape == res["timesteps"].shape == (0, timesteps or SHORT.T)
    vb, d_out = D.hybrid_vb_loss(SHORT, np.zeros((0, 6, 4, 4), np.float32), x0, x0, t0)
    assert vb.shape == (0,) and vb.dtype == np.float64
    assert d_out.shape == (0, 6, 4, 4) and d_out.dtype == np.float32
    # and a one-row batch still averages over its elements
    one = D.prior_bpd(SHORT, np.ones((1, 3, 4, 4)))
    assert one.shape == (1,) and one[0] == pytest.approx(D.prior_bpd(SHORT, np.ones((1, 1)))[0], rel=1e-14)


X0 = np.zeros((2, 3))
F = D.gaussian_oracle_denoiser(SHORT, 0.0, 1.0)


@pytest.mark.parametrize("call, match", [
    (lambda: D.bits_per_dim(SHORT, F, X0, timesteps=1), r"K must lie in \[2, T = 100\].*got 1"),
    (lambda: D.bits_per_dim(SHORT, F, X0, timesteps=101), r"got 101"),
    (lambda: D.bits_per_dim(SHORT, F, X0, timesteps=2.5), r"None, 'all' or an integer K, got 2.5"),
    (lambda: D.bits_per_dim(SHORT, F, X0, timesteps="some"), r"got 'some'"),
    (lambda: D.bits_per_dim(SHORT, F, X0, batch_size=0), r"batch_size must be an integer >= 1, got 0"),
    (lambda: D.bits_per_dim(SHORT, F, X0 + 1.5), r"\[-1, 1\].*got range \[1.5, 1.5\]"),
    (lambda: D.bits_per_dim(SHORT, F, X0 * np.nan), r"finite, found 6 non-finite"),
    (lambda: D.bits_per_dim(SHORT, F, X0, y=np.array([1, 2, 3])), r"y must be an integer array of shape \(2,\)"),
    (lambda: D.bits_per_dim(SHORT, "oracle", X0), r"callable.*got str"),
    (lambda: D.bits_per_dim(SHORT, F, X0, seed=-1), r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    (lambda: D.bits_per_dim(SHORT, F, X0, index_offset=-2), r"index_offset .*got -2"),
    (lambda: D.bits_per_dim(SHORT, F, X0, variance="fixed"), r"variance must be one of"),
    (lambda: D.bits_per_dim(SHORT, F, X0, prediction="x0"), r"prediction must be one of"),
    (lambda: D.bits_per_dim(SHORT, lambda x, t, y=None: x[:1], X0), r"denoiser returned an output of shape \(1, 3\), expected batch size 2"),
    (lambda: D.bits_per_dim(SHORT, F, X0, variance="learned_range"), r"even number of channels"),
    (lambda: D.vb_terms_bpd(SHORT, X0, X0, X0, np.array([0, 100])), r"got t = 100"),
    (lambda: D.bits_per_dim(SHORT, F, X0, progress=3), r"progress must be a callable"),
])
def test_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
