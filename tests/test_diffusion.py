"""Tests for the forward process, parameterisations, targets, loss weights, timestep samplers, the
Gaussian oracle and the hybrid loss's hand-written gradient (ddpm_ref/diffusion.py)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_ref import diffusion as D
from ddpm_ref import rng
from ddpm_ref.schedule import Schedule

LIN = Schedule.linear(1000)
COS = Schedule.cosine(200)
ZT = Schedule.linear(100, 1e-4, 0.2).rescale_zero_terminal_snr()


# ----------------------------------------------------------------------------- forward process
@pytest.mark.parametrize("t_index", [0, 10, 250, 999])
def test_q_sample_moments(t_index):
    # x_t | x_0 ~ N(sqrt(ab) x0, (1 - ab)): n = 20000 draws per element and 4 elements.
    # 5-sigma bounds: mean error < 5 sqrt((1-ab)/n); for the variance the sample variance has
    # standard deviation (1-ab) sqrt(2/(n-1)), so the relative error is < 5 sqrt(2/n).
    n = 20000
    x0 = np.broadcast_to(np.array([-1.0, -0.3, 0.4, 1.0]), (n, 4)).copy()
    t = np.full(n, t_index)
    noise = rng.normal(123, rng.Stream.TRAIN_NOISE, np.arange(n), 0, (4,)).astype(np.float64)
    xt = D.q_sample(LIN, x0, t, noise)
    ab = LIN.alpha_bar[t_index]
    sd = math.sqrt(1 - ab)
    np.testing.assert_array_less(np.abs(xt.mean(0) - math.sqrt(ab) * x0[0]), 5 * sd / math.sqrt(n))
    np.testing.assert_array_less(np.abs(xt.var(0, ddof=1) / (1 - ab) - 1), 5 * math.sqrt(2 / n))


def test_q_sample_dtype_and_per_sample_t():
    x0 = np.ones((3, 2, 2, 2), np.float32)
    noise = np.zeros_like(x0)
    t = np.array([0, 5, 999])
    xt = D.q_sample(LIN, x0, t, noise)
    assert xt.dtype == np.float32
    # float32 rounding of sqrt(alpha_bar): rtol 1e-7
    np.testing.assert_allclose(xt[:, 0, 0, 0], LIN.sqrt_alpha_bar[t], rtol=1e-7)
    mean, var, log_var = D.q_mean_variance(LIN, x0.astype(np.float64), t)
    np.testing.assert_allclose(var[:, 0, 0, 0], 1 - LIN.alpha_bar[t], rtol=1e-15)
    np.testing.assert_allclose(np.exp(log_var[:, 0, 0, 0]), 1 - LIN.alpha_bar[t], rtol=1e-13)


def _conditioning(ab_prev, alpha):
    """x_{t-1} | (x0, x_t) by Gaussian conditioning of the joint built from independent normals."""
    A = np.array([[1.0, 0, 0], [math.sqrt(ab_prev), math.sqrt(1 - ab_prev), 0], [0, 0, 0]])
    A[2] = math.sqrt(alpha) * A[1] + [0, 0, math.sqrt(1 - alpha)]
    S = A @ A.T
    coef = np.linalg.solve(S[np.ix_([0, 2], [0, 2])], S[1, [0, 2]])
    return coef, S[1, 1] - S[1, [0, 2]] @ coef


@pytest.mark.parametrize("s", [LIN, COS, ZT])
def test_q_posterior_matches_gaussian_conditioning(s):
    r = np.random.default_rng(0)
    t = np.array([0, 1, s.T // 2, s.T - 1])
    x0 = r.standard_normal((4, 3))
    xt = r.standard_normal((4, 3))
    mean, var, log_var = D.q_posterior(s, x0, xt, t)
    for i, ti in enumerate(t):
        coef, v = _conditioning(s.alpha_bar_prev[ti], s.alphas[ti])
        # conditioning solve error << 1e-9 (condition number <= 1/beta_1 = 1e4)
        np.testing.assert_allclose(mean[i], coef[0] * x0[i] + coef[1] * xt[i], atol=1e-9)
        np.testing.assert_allclose(var[i], v, atol=1e-9)
    np.testing.assert_allclose(log_var[1:], np.log(var[1:]), rtol=1e-13)
    assert np.all(np.isfinite(log_var))                   # clipped at t index 0


# ----------------------------------------------------------------------------- parameterisations
@settings(max_examples=20)
@given(st.sampled_from([LIN, COS]), st.integers(0, 2**31), st.integers(1, 5))
def test_conversions_invert_each_other(s, seed, n):
    r = np.random.default_rng(seed)
    t = r.integers(0, s.T, n)
    x0 = r.uniform(-1, 1, (n, 2, 3))
    eps = r.standard_normal((n, 2, 3))
    xt = D.q_sample(s, x0, t, eps)
    v = D.training_target(s, x0, t, eps, "v")
    # float64: the worst amplification is 1/sqrt(alpha_bar_T) ~ 160 (linear) or 2e4 (cosine, where
    # alpha_bar_T = 2.4e-9): errors ~2e4 * 1e-16 * |x| ~ 1e-11; atol 1e-8 is a safe margin.
    tol = dict(atol=1e-8, rtol=1e-8)
    np.testing.assert_allclose(D.x0_from_eps(s, xt, t, eps), x0, **tol)
    np.testing.assert_allclose(D.eps_from_x0(s, xt, t, x0), eps, **tol)
    np.testing.assert_allclose(D.v_from_eps(s, xt, t, eps), v, **tol)
    np.testing.assert_allclose(D.v_from_x0(s, xt, t, x0), v, **tol)
    np.testing.assert_allclose(D.x0_from_v(s, xt, t, v), x0, **tol)
    np.testing.assert_allclose(D.eps_from_v(s, xt, t, v), eps, **tol)
    for prediction, out in (("epsilon", eps), ("sample", x0), ("v", v)):
        np.testing.assert_allclose(D.training_target(s, x0, t, eps, prediction), out, **tol)
        x0_hat, eps_hat = D.to_x0_eps(s, out, xt, t, prediction)
        np.testing.assert_allclose(x0_hat, x0, **tol)
        np.testing.assert_allclose(eps_hat, eps, **tol)


def test_v_at_zero_terminal_snr():
    # alpha_bar_T = 0: x_T = eps, v = -x0; x0 and eps are still recoverable from v (not from eps).
    t = np.array([ZT.T - 1])
    x0, eps = np.array([[0.3, -0.2]]), np.array([[1.1, 0.4]])
    xt = D.q_sample(ZT, x0, t, eps)
    v = D.training_target(ZT, x0, t, eps, "v")
    np.testing.assert_allclose(v, -x0, atol=1e-15)
    np.testing.assert_allclose(D.x0_from_v(ZT, xt, t, v), x0, atol=1e-15)
    np.testing.assert_allclose(D.eps_from_v(ZT, xt, t, v), eps, atol=1e-15)


def test_split_output():
    out = np.arange(2 * 6 * 2, dtype=np.float32).reshape(2, 6, 2)
    mean, v = D.split_output(out, "learned_range")
    assert mean.shape == (2, 3, 2) and v.shape == (2, 3, 2)
    np.testing.assert_array_equal(np.concatenate([mean, v], 1), out)
    same, none = D.split_output(out, "fixed_small")
    assert same is not None and none is None and same.shape == out.shape


# ----------------------------------------------------------------------------- loss weights
@pytest.mark.parametrize("gamma", [0.5, 5.0, 1e4])
def test_min_snr_weights_equal_in_every_space(gamma):
    # The same prediction error, expressed in eps, x0 and v space, must give the same weighted loss:
    # min(SNR, gamma) |x0 - x0_hat|^2 (Hang et al. 2023). float64 identities: rtol 1e-9.
    r = np.random.default_rng(1)
    t = np.array([0, 3, 100, 500, 999])
    x0 = r.uniform(-1, 1, (5, 4))
    eps = r.standard_normal((5, 4))
    xt = D.q_sample(LIN, x0, t, eps)
    x0_hat = x0 + 0.1 * r.standard_normal((5, 4))
    errs = {"sample": x0_hat - x0,
            "epsilon": D.eps_from_x0(LIN, xt, t, x0_hat) - eps,
            "v": D.v_from_x0(LIN, xt, t, x0_hat) - D.training_target(LIN, x0, t, eps, "v")}
    want = np.minimum(LIN.snr[t], gamma) * np.sum((x0_hat - x0) ** 2, 1)
    for prediction, err in errs.items():
        w = D.loss_weights(LIN, t, prediction, "min_snr", gamma)
        assert w.shape == (5,) and w.dtype == np.float64
        np.testing.assert_allclose(w * np.sum(err ** 2, 1), want, rtol=1e-9)
        np.testing.assert_array_equal(D.loss_weights(LIN, t, prediction), np.ones(5))


def test_min_snr_weight_finite_at_zero_snr():
    t = np.array([ZT.T - 1])
    assert D.loss_weights(ZT, t, "epsilon", "min_snr")[0] == 1.0      # limit of min(1, gamma/SNR)
    assert D.loss_weights(ZT, t, "sample", "min_snr")[0] == 0.0
    assert D.loss_weights(ZT, t, "v", "min_snr")[0] == 0.0


# ----------------------------------------------------------------------------- timestep samplers
def test_uniform_sampler_is_index_addressed():
    s = D.UniformSampler(1000)
    t, w = s.sample(7, np.arange(64), step=3)
    t2, _ = s.sample(7, np.arange(64)[::-1], step=3)
    np.testing.assert_array_equal(t2, t[::-1])                # depends on the index, not the position
    np.testing.assert_array_equal(t, rng.randint(7, rng.Stream.TIMESTEP, np.arange(64), 1000, 3))
    assert w.dtype == np.float64 and np.all(w == 1.0) and t.min() >= 0 and t.max() < 1000


def _warm(sampler, losses_per_t):
    T = sampler.T
    for _ in range(sampler.history):
        sampler.update(np.arange(T), losses_per_t)


def test_loss_aware_warmup_and_history():
    s = D.LossAwareSampler(5, history=3)
    u = D.UniformSampler(5)
    np.testing.assert_array_equal(s.sample(1, np.arange(50), 2)[0], u.sample(1, np.arange(50), 2)[0])
    s.update(np.array([2, 2, 2]), np.array([1.0, 2.0, 3.0]))
    assert not s.warmed_up and s.loss_counts[2] == 3
    s.update(np.array([2]), np.array([4.0]))                   # full: the oldest (1.0) drops out
    np.testing.assert_array_equal(s.loss_history[2], [2.0, 3.0, 4.0])
    np.testing.assert_allclose(s.weights(), 0.2, rtol=0)       # uniform until every t is full
    _warm(s, np.array([1.0, 1.0, 2.0, 4.0, 8.0]))
    assert s.warmed_up
    w = np.array([1.0, 1.0, 2.0, 4.0, 8.0])
    want = w / w.sum() * 0.999 + 0.001 / 5                    # sqrt(mean L^2) = L for constant L
    np.testing.assert_allclose(s.weights(), want, rtol=1e-14)


def test_loss_aware_draws_follow_p_and_weights_are_unbiased():
    T, n = 8, 40000
    s = D.LossAwareSampler(T, history=2, uniform_prob=0.05)
    L = np.array([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8])
    _warm(s, L)
    p = s.weights()
    t, w = s.sample(11, np.arange(n), step=5)
    np.testing.assert_allclose(w, 1.0 / (T * p[t]), rtol=1e-15)
    freq = np.bincount(t, minlength=T) / n
    # each frequency is a binomial proportion: 5-sigma bound sqrt(p (1 - p) / n)
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n))
    # importance weighting: E_{t~p}[L_t / (T p_t)] = mean_t L_t; 5 standard errors of the estimate
    est = w * L[t]
    assert abs(est.mean() - L.mean()) < 5 * est.std() / math.sqrt(n)


def test_loss_aware_state_dict_resume_is_exact(tmp_path):
    a = D.LossAwareSampler(6, history=2)
    r = np.random.default_rng(0)
    for step in range(20):
        t, _ = a.sample(3, np.arange(8) + 8 * step, step)
        a.update(t, r.uniform(0, 2, 8) * (t + 1))
    path = tmp_path / "s.npz"
    np.savez(path, **a.state_dict())
    b = D.LossAwareSampler(6, history=2)
    with np.load(path, allow_pickle=False) as f:
        b.load_state_dict(dict(f))
    assert b.warmed_up == a.warmed_up
    for step in range(20, 25):
        ta, wa = a.sample(3, np.arange(8), step)
        tb, wb = b.sample(3, np.arange(8), step)
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(wa, wb)
        losses = np.linspace(0.1, 1, 8)
        a.update(ta, losses)
        b.update(tb, losses)
    np.testing.assert_array_equal(a.loss_history, b.loss_history)


def _state(**change):
    a = D.LossAwareSampler(4, history=2)
    _warm(a, np.arange(4) + 1.0)
    st = a.state_dict()
    st.update(change)
    return st


def _hist(i, j, value):
    h = _state()["loss_history"].copy()
    h[i, j] = value
    return h


@pytest.mark.parametrize("change, match", [
    (dict(uniform_prob=np.array(5.0)), r"uniform_prob must be in \[0, 1\], got array\(5\.\)"),
    (dict(uniform_prob=np.array(np.nan)), r"uniform_prob must be in \[0, 1\], got array\(nan\)"),
    (dict(uniform_prob=-0.1), r"uniform_prob must be in \[0, 1\], got -0.1"),
    (dict(uniform_prob=True), r"uniform_prob must be a number in \[0, 1\], got True"),
    (dict(uniform_prob="0.5"), r"uniform_prob must be a number in \[0, 1\], got '0.5'"),
    (dict(loss_history=_hist(0, 0, np.inf)), r"loss_history must be finite, got inf at \[0, 0\]"),
    (dict(loss_history=_hist(2, 1, np.nan)), r"loss_history must be finite, got nan at \[2, 1\]"),
    (dict(loss_history=np.ones((4, 2), bool)), r"loss_history must hold real numbers .*dtypes bool"),
    (dict(loss_history=[[1.0, 2.0], [1.0]]), r"loss_history and loss_counts must be arrays of shape \(4, 2\)"),
    (dict(T=np.array(4.6)), r"state 'T' must be an integer, got array\(4.6\)"),
    (dict(T=4.0), r"state 'T' must be an integer, got 4.0"),
    (dict(history=True), r"state 'history' must be an integer, got True"),
    (dict(history="2"), r"state 'history' must be an integer, got '2'"),
    (dict(loss_counts=np.array([2.7, 2, 2, 2])), r"loss_counts integers, got dtypes float64 and float64"),
    (dict(loss_counts=np.array([2, 3, 2, 2])), r"loss_counts must lie in \[0, 2\], got range \[2, 3\]"),
])
def test_loss_aware_load_state_dict_checks_like_init_and_update(change, match):
    b = D.LossAwareSampler(4, history=2)
    with pytest.raises(ValueError, match=match):
        b.load_state_dict(_state(**change))
    # nothing was loaded: still the fresh sampler
    assert not b.warmed_up and b.uniform_prob == 0.001 and not b.loss_history.any()


def test_loss_aware_load_state_dict_takes_plain_python_values_and_copies():
    st = _state()
    plain = {"T": 4, "history": 2, "uniform_prob": 0.25, "loss_history": st["loss_history"].tolist(),
             "loss_counts": st["loss_counts"].tolist()}
    b = D.LossAwareSampler(4, history=2)
    b.load_state_dict(plain)
    assert b.warmed_up and b.uniform_prob == 0.25
    np.testing.assert_array_equal(b.loss_history, st["loss_history"])
    b.update(np.array([0]), np.array([9.0]))
    assert plain["loss_history"][0] == [1.0, 1.0] and np.all(st["loss_history"][0] == 1.0)


@pytest.mark.parametrize("state, match", [
    ({"T": 4.9}, r"UniformSampler state 'T' must be an integer, got 4.9"),
    ({"T": True}, r"must be an integer, got True"),
    ({"T": np.array([4])}, r"must be an integer, got array\(\[4\]\)"),
    ({}, r"UniformSampler state is missing 'T'"),
    ([4], r"UniformSampler state must be a dict, got list"),
])
def test_uniform_load_state_dict_takes_only_an_integer_T(state, match):
    with pytest.raises(ValueError, match=match):
        D.UniformSampler(4).load_state_dict(state)
    D.UniformSampler(4).load_state_dict({"T": np.int32(4)})
    D.UniformSampler(4).load_state_dict(D.UniformSampler(4).state_dict())


# ----------------------------------------------------------------------------- Gaussian oracle
@pytest.mark.parametrize("t_index", [0, 300, 999])
def test_gaussian_oracle_is_the_conditional_mean(t_index):
    # Orthogonality principle: E[x0 - x0_hat(xt)] = 0 and E[(x0 - x0_hat) xt] = 0 for the MMSE
    # estimator. Checked by Monte Carlo with n = 40000; bounds are 5 standard errors.
    n, mu, sd = 40000, np.array([0.2, -0.5]), np.array([0.5, 0.1])
    r = np.random.default_rng(t_index)
    x0 = mu + sd * r.standard_normal((n, 2))
    eps = r.standard_normal((n, 2))
    t = np.full(n, t_index)
    xt = D.q_sample(LIN, x0, t, eps)
    outs = {p: D.gaussian_oracle_denoiser(LIN, mu, sd, p)(xt, t) for p in D.PREDICTIONS}
    x0_hat, eps_hat = D.to_x0_eps(LIN, outs["epsilon"], xt, t, "epsilon")
    for p in ("sample", "v"):            # all three predictions describe the same estimate
        a, b = D.to_x0_eps(LIN, outs[p], xt, t, p)
        np.testing.assert_allclose(a, x0_hat, atol=1e-9)     # float64 conversion round-off
        np.testing.assert_allclose(b, eps_hat, atol=1e-9)
    for resid in (x0 - x0_hat, eps - eps_hat):
        for z in (resid, resid * xt):
            assert np.all(np.abs(z.mean(0)) < 5 * z.std(0) / math.sqrt(n) + 1e-12)
    assert outs["epsilon"].dtype == np.float64
    assert D.gaussian_oracle_denoiser(LIN, 0.0, 1.0)(xt.astype(np.float32), t).dtype == np.float32


def test_gaussian_oracle_defined_at_zero_terminal_snr():
    f = D.gaussian_oracle_denoiser(ZT, 0.3, 0.5, "epsilon")
    x = np.array([[0.7, -1.2]])
    t = np.array([ZT.T - 1])
    np.testing.assert_allclose(f(x, t), x, rtol=1e-15)       # x_T = eps exactly when alpha_bar_T = 0


# ----------------------------------------------------------------------------- hybrid VB gradient
def _hybrid_case(s, t, prediction, seed=0):
    """A batch where the decoder is in its interesting regime: x0 on the 256-level grid including
    both edge bins, and model means within about a bin of x0."""
    r = np.random.default_rng(seed)
    n = t.shape[0]
    k = r.integers(0, 256, (n, 2, 3))
    k[0, 0, 0], k[-1, 0, 1] = 0, 255
    x0 = -1.0 + k / 127.5
    eps = r.standard_normal(x0.shape)
    xt = D.q_sample(s, x0, t, eps)
    # within about a bin of x0 at t index 0 (the decoder); a visible error elsewhere (the KL terms)
    err = np.where((t == 0)[:, None, None], 0.004, 0.3)
    x0_guess = x0 + err * r.standard_normal(x0.shape)
    mean_part = {"epsilon": D.eps_from_x0(s, xt, t, x0_guess), "sample": x0_guess,
                 "v": D.v_from_x0(s, xt, t, x0_guess)}[prediction]
    v_part = r.uniform(-0.9, 0.9, x0.shape)
    return x0, xt, np.concatenate([mean_part, v_part], axis=1)


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
@pytest.mark.parametrize("s", [LIN, COS])
def test_hybrid_vb_gradient_matches_finite_differences(s, prediction):
    t = np.array([0, 0, 1, 7, s.T // 2, s.T - 1])
    x0, xt, out = _hybrid_case(s, t, prediction)
    vb, d_out = D.hybrid_vb_loss(s, out, x0, xt, t, prediction)
    np.testing.assert_allclose(vb, D.vb_terms_bpd(s, out, x0, xt, t, prediction, "learned_range"),
                               rtol=1e-14)                      # the same quantity, same code path
    assert np.all(d_out[:, :2] == 0.0)                         # the mean half is a constant
    r = np.random.default_rng(5)
    proj = r.standard_normal(vb.shape)                         # random projection of the output
    dvb = proj
    _, d_proj = D.hybrid_vb_loss(s, out, x0, xt, t, prediction, dvb=dvb)
    np.testing.assert_allclose(d_proj, d_out * proj[:, None, None], rtol=1e-14)
    h = 1e-6
    num = np.zeros_like(out)
    for idx in np.ndindex(*out.shape):
        if idx[1] < 2:
            continue
        i = idx[0]                                             # only sample i's term moves
        plus, minus = out.copy(), out.copy()
        plus[idx] += h
        minus[idx] -= h
        num[idx] = proj[i] * (D.hybrid_vb_loss(s, plus, x0, xt, t, prediction)[0][i]
                              - D.hybrid_vb_loss(s, minus, x0, xt, t, prediction)[0][i]) / (2 * h)
    # Centred differences in float64, row by row (each sample's term has its own scale). Truncation
    # O(h^2 f''') is ~1e-12 relative. Round-off: the KL sums O(1) terms that cancel to O(delta^2)
    # (-1 + exp(delta) - delta), so each vb_i carries ~1e-16 absolute rounding and the difference
    # quotient ~1e-16 / h / (D ln 2) ~ 3e-11 absolute. Hence atol = 1e-7 * (row max) + 1e-10, rtol 1e-5.
    for i in range(out.shape[0]):
        row = np.abs(d_proj[i]).max()
        assert row > 0, i
        np.testing.assert_allclose(d_proj[i], num[i], rtol=1e-5, atol=1e-7 * row + 1e-10)
    # rows 0-3 (t index 0, 0, 1, 7) have gradients far above that floor, so they test something
    assert np.all(np.abs(d_proj[:4]).reshape(4, -1).max(1) > 1e-6)
    scale = np.abs(d_proj).max()
    # the decoder rows (t index 0) really carry gradient
    assert np.abs(d_proj[:2, 2:]).max() > 1e-3 * scale


def test_hybrid_scale_is_lambda_T():
    # improved-diffusion: loss = mse + vb * T / 1000 = mse + lambda T vb with lambda = 0.001.
    assert D.hybrid_vb_scale(LIN) == pytest.approx(1.0, rel=1e-15)
    assert D.hybrid_vb_scale(Schedule.linear(4000)) == pytest.approx(4.0, rel=1e-15)
    assert D.hybrid_vb_scale(LIN, 0) == 0.0 and D.hybrid_vb_scale(LIN, np.float32(0.002)) == pytest.approx(2.0)


def test_model_log_variance_shape_is_checked():
    t = np.array([0, 5])
    want = D.model_log_variance(LIN, "fixed_small", t)[:, None, None]
    for shape in ((2, 3, 4), [2, 3, 4], (np.int64(2), 3, 4), np.array([2, 3, 4])):
        out = D.model_log_variance(LIN, "fixed_small", t, shape=shape)
        assert out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, np.broadcast_to(want, (2, 3, 4)))


# ----------------------------------------------------------------------------- errors
X = np.zeros((2, 3))
T2 = np.array([0, 1])


@pytest.mark.parametrize("call, match", [
    (lambda: D.q_sample(LIN, X, np.array([0.0, 1.0]), X), r"integer array.*float64"),
    (lambda: D.q_sample(LIN, X, np.array([[0, 1]]), X), r"shape \(N,\), got shape \(1, 2\)"),
    (lambda: D.q_sample(LIN, X, np.array([0, 1000]), X), r"\[0, 1000\), got t = 1000"),
    (lambda: D.q_sample(LIN, X, np.array([-1, 0]), X), r"got t = -1"),
    (lambda: D.q_sample(LIN, X, np.array([0]), X), r"t has 1 entries but the batch has N = 2"),
    (lambda: D.q_sample(LIN, X, T2, np.zeros((2, 4))), r"same shape, got \(2, 3\) and \(2, 4\)"),
    (lambda: D.q_sample(LIN, 1.0, np.array([0]), 1.0), r"batch axis"),
    (lambda: D.q_sample(LIN, np.array(["a", "b"]), T2, X), r"float array, got dtype <U1"),
    (lambda: D.q_sample("linear", X, T2, X), r"Schedule, got str"),
    (lambda: D.q_posterior(LIN, X, np.zeros((3, 3)), T2), r"same shape"),
    (lambda: D.x0_from_eps(LIN, X, T2, np.zeros((2, 2))), r"xt and eps must have the same shape"),
    (lambda: D.split_output(np.zeros((2, 3, 4)), "learned_range"), r"even number of channels.*\(2, 3, 4\)"),
    (lambda: D.split_output(X, "learned"), r"variance must be one of .*got 'learned'"),
    (lambda: D.to_x0_eps(LIN, np.zeros((2, 6)), X, T2, "epsilon"), r"xt's shape \(2, 3\), got \(2, 6\)"),
    (lambda: D.training_target(LIN, X, T2, X, "eps"), r"prediction must be one of .*got 'eps'"),
    (lambda: D.loss_weights(LIN, T2, "epsilon", "snr"), r"weighting must be one of .*got 'snr'"),
    (lambda: D.loss_weights(LIN, T2, "epsilon", "min_snr", gamma=0.0), r"gamma must be .*got 0.0"),
    (lambda: D.loss_weights(LIN, T2, "epsilon", "min_snr", gamma="x"), r"gamma must be .*got 'x'"),
    (lambda: D.UniformSampler(0), r"T must be an integer >= 1, got 0"),
    (lambda: D.LossAwareSampler(10, history=0), r"history must be an integer >= 1, got 0"),
    (lambda: D.LossAwareSampler(10, uniform_prob=1.5), r"uniform_prob must be in \[0, 1\], got 1.5"),
    (lambda: D.LossAwareSampler(10).update(np.array([10]), np.array([1.0])), r"\[0, 10\), got range \[10, 10\]"),
    (lambda: D.LossAwareSampler(10).update(np.array([1]), np.array([np.nan])), r"losses must be finite"),
    (lambda: D.LossAwareSampler(10).update(np.array([1, 2]), np.array([1.0])), r"losses must have t's shape"),
    (lambda: D.LossAwareSampler(10).load_state_dict(D.LossAwareSampler(11).state_dict()),
     r"state is for T = 11, history = 10; this sampler has T = 10"),
    (lambda: D.LossAwareSampler(10).load_state_dict({"T": 10}), r"missing 'history'"),
    (lambda: D.UniformSampler(10).load_state_dict({"T": 5}), r"T = 5, this sampler has T = 10"),
    (lambda: D.gaussian_oracle_denoiser(LIN, 0.0, 0.0), r"s \(the data standard deviation\) must be positive"),
    (lambda: D.gaussian_oracle_denoiser(LIN, np.nan, 1.0), r"mu must be finite"),
    (lambda: D.gaussian_oracle_denoiser(LIN, 0.0, 1.0, "x0"), r"prediction must be one of"),
    (lambda: D.hybrid_vb_loss(LIN, np.zeros((2, 3)), X, X, T2), r"even number of channels"),
    (lambda: D.hybrid_vb_loss(LIN, np.zeros((2, 4)), X, X, T2), r"shape \(N, 2C, ...\) = \(2, 6\)"),
    (lambda: D.hybrid_vb_loss(LIN, np.zeros((2, 6)), X + 2, X, T2), r"\[-1, 1\].*got range \[2, 2\]"),
    (lambda: D.hybrid_vb_loss(LIN, np.zeros((2, 6)), X, X, T2, dvb=np.ones(3)), r"dvb must have shape \(2,\)"),
    (lambda: D.model_log_variance(LIN, "learned_range", T2), r"needs v_interp"),
    (lambda: D.model_log_variance(LIN, "fixed_small", T2, shape=(3, 4)), r"starting with N = 2 .*got \(3, 4\)"),
    (lambda: D.model_log_variance(LIN, "fixed_large", T2, shape=()), r"starting with N = 2 .*got \(\)"),
    (lambda: D.model_log_variance(LIN, "fixed_small", T2, shape=4), r"tuple of non-negative integers .*got 4"),
    (lambda: D.model_log_variance(LIN, "fixed_small", T2, shape=(2.5,)), r"got \(2.5,\)"),
    (lambda: D.model_log_variance(LIN, "fixed_small", T2, shape=(2, -1)), r"got \(2, -1\)"),
    (lambda: D.model_log_variance(LIN, "fixed_small", T2, shape=(True, 3)), r"got \(True, 3\)"),
    (lambda: D.model_log_variance(LIN, "fixed_small", T2, shape="23"), r"got '23'"),
    (lambda: D.model_log_variance(LIN, "fixed_small", np.array([3]), shape=(5, 3)), r"N = 1 .*got \(5, 3\)"),
    (lambda: D.hybrid_vb_loss(LIN, np.zeros((2, 2)), np.zeros(2), np.zeros(2), T2),
     r"x0 of shape \(N, C, ...\).*got x0 of shape \(2,\) and model_output of shape \(2, 2\)"),
    # bools and numeric strings are not numbers
    (lambda: D.loss_weights(LIN, T2, "sample", "min_snr", True), r"gamma must be a positive number, got True"),
    (lambda: D.loss_weights(LIN, T2, "sample", "min_snr", "5"), r"gamma must be a positive number, got '5'"),
    (lambda: D.loss_weights(LIN, T2, "sample", "min_snr", None), r"gamma must be a positive number, got None"),
    (lambda: D.LossAwareSampler(5, uniform_prob=True), r"uniform_prob must be a number in \[0, 1\], got True"),
    (lambda: D.LossAwareSampler(5, uniform_prob="0.5"), r"uniform_prob must be a number .*got '0.5'"),
    (lambda: D.LossAwareSampler(5, uniform_prob=np.nan), r"uniform_prob must be in \[0, 1\], got nan"),
    (lambda: D.LossAwareSampler(10).update(np.array([1]), np.array([True])), r"losses must be .*real numbers, got dtype bool"),
    (lambda: D.q_sample(LIN, np.ones((2, 3), bool), T2, X), r"x0 must be a float array, got dtype bool"),
    (lambda: D.q_sample(LIN, X, T2, np.ones((2, 3), bool)), r"noise must be a float array, got dtype bool"),
    (lambda: D.gaussian_oracle_denoiser(LIN, True, 1.0), r"mu must be a real number or array"),
    (lambda: D.gaussian_oracle_denoiser(LIN, 0.0, "1"), r"s \(the data standard deviation\) must be a real"),
    (lambda: D.hybrid_vb_scale(LIN, float("nan")), r"lam must be a finite number >= 0, got nan"),
    (lambda: D.hybrid_vb_scale(LIN, -1), r"lam must be a finite number >= 0, got -1"),
    (lambda: D.hybrid_vb_scale(LIN, float("inf")), r"got inf"),
    (lambda: D.hybrid_vb_scale(LIN, True), r"lam must be a finite number >= 0, got True"),
    (lambda: D.hybrid_vb_scale(LIN, "0.001"), r"got '0.001'"),
    (lambda: D.hybrid_vb_scale(LIN, None), r"got None"),
])
def test_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- reverse-step moments
def test_p_mean_matches_ddpm_eq11_and_variances():
    # DDPM eq. 11: mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t), an independent
    # form of the posterior mean at x0_hat; float64: rtol 1e-10.
    r = np.random.default_rng(3)
    t = np.array([0, 1, 500, 999])
    xt = r.standard_normal((4, 3))
    eps = r.standard_normal((4, 3))
    pm = D.p_mean_variance(LIN, eps, xt, t, "epsilon", "fixed_small")
    b = LIN.betas[t][:, None]
    want = (xt - b / np.sqrt(1 - LIN.alpha_bar[t])[:, None] * eps) / np.sqrt(LIN.alphas[t])[:, None]
    np.testing.assert_allclose(pm["mean"], want, rtol=1e-10, atol=1e-12)
    # fixed_large uses beta~ at index 1 for the first step (REFERENCE pitfall), beta_t elsewhere
    lv = D.model_log_variance(LIN, "fixed_large", t)
    assert lv[0] == np.log(LIN.posterior_variance[1])
    np.testing.assert_array_equal(lv[1:], np.log(LIN.betas[t[1:]]))
    assert D.model_log_variance(LIN, "fixed_small", t)[0] == np.log(LIN.posterior_variance[1])
    # learned_range: v = -1 gives log beta~ (clipped), v = +1 gives log beta, v = 0 the midpoint
    v = np.array([-1.0, 1.0, 0.0, 0.0])[:, None] * np.ones((4, 3))
    lr = D.model_log_variance(LIN, "learned_range", t, v)
    lo, hi = LIN.posterior_log_variance_clipped[t], np.log(LIN.betas[t])
    np.testing.assert_allclose(lr[:, 0], [lo[0], hi[1], (lo[2] + hi[2]) / 2, (lo[3] + hi[3]) / 2], rtol=1e-14)
