"""Tests for ddpm_ref/optim.py: AdamW against torch.optim.AdamW, clipping, warmup, EMA."""
import math

import numpy as np
import pytest

from ddpm_ref import optim


def _problem(seed, p=257):
    g = np.random.default_rng(seed)
    theta0 = g.standard_normal(p).astype(np.float32)
    grads = [g.standard_normal(p).astype(np.float32) * np.float32(10.0 ** g.uniform(-3, 1)) for _ in range(12)]
    return theta0, grads


@pytest.mark.parametrize("seed,wd,warmup,clip", [(0, 0.0, 0, None), (1, 0.01, 5, None), (2, 0.1, 3, 1.0),
                                                 (3, 0.0, 0, 0.5)])
def test_adamw_matches_torch(seed, wd, warmup, clip):
    torch = pytest.importorskip("torch")
    theta0, grads = _problem(seed)
    lr = 1e-2
    ours = theta0.copy()
    opt = optim.AdamW(ours.size, lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd, warmup=warmup,
                      max_grad_norm=clip)
    tp = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    topt = torch.optim.AdamW([tp], lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    for k, g in enumerate(grads, start=1):
        info = opt.step(ours, g.copy())
        tp.grad = torch.from_numpy(g.copy())
        tnorm = None
        if clip is not None:
            tnorm = float(torch.nn.utils.clip_grad_norm_([tp], clip))
        else:
            tnorm = float(torch.linalg.vector_norm(tp.grad.double()))
        assert info["lr"] == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12)
        # norms: ours sums squares in float64, torch in float32 -> agree to float32 rounding.
        assert info["grad_norm"] == pytest.approx(tnorm, rel=1e-5)
        topt.step()
        sched.step()
        # Same float32 arithmetic up to the order of a multiply/divide: a few ulps per step of a
        # lr-sized update, so absolute 1e-6 on O(1) weights over 12 steps.
        np.testing.assert_allclose(ours, tp.detach().numpy(), rtol=0, atol=1e-6)
    st = topt.state[tp]
    # moments: float32 sums of 12 terms whose scales differ by 1e4 (and, with clipping, a clip
    # coefficient that differs in the last ulp): 1e-5 of the largest entry.
    m_ref, v_ref = st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()
    np.testing.assert_allclose(opt.m, m_ref, rtol=1e-5, atol=1e-5 * np.abs(m_ref).max())
    np.testing.assert_allclose(opt.v, v_ref, rtol=1e-5, atol=1e-5 * np.abs(v_ref).max())
    assert opt.step_count == len(grads)


def test_clip_norm_exact():
    g = np.array([3.0, 4.0], np.float32)
    norm = optim.clip_grad_norm(g, 1.0)
    assert norm == 5.0  # 3-4-5: exact in float64
    # scaled by 1/(5 + 1e-6): float32 rounding of 0.6 and 0.8 only
    np.testing.assert_allclose(g, [0.6, 0.8], rtol=1e-6)
    g2 = np.array([0.3, 0.4], np.float32)
    assert optim.clip_grad_norm(g2, 1.0) == pytest.approx(0.5, rel=1e-7)  # float32 input rounding
    np.testing.assert_array_equal(g2, np.array([0.3, 0.4], np.float32))  # below the limit: untouched


def test_global_norm_large_buffer_float64_accuracy():
    # 3 chunks; reference in float64 numpy: chunked float64 sums agree to 1e-12 relative.
    g = np.random.default_rng(0).standard_normal(3 * (1 << 20) + 7).astype(np.float32)
    ref = math.sqrt(float(np.sum(g.astype(np.float64) ** 2)))
    assert optim.global_norm(g) == pytest.approx(ref, rel=1e-12)


def test_nonfinite_norm_leaves_grad():
    g = np.array([1.0, np.inf, 2.0], np.float32)
    n = optim.clip_grad_norm(g, 1.0)
    assert not math.isfinite(n)
    assert g[0] == 1.0 and g[2] == 2.0


def test_nonfinite_gradient_skips_update():
    p = np.ones(3, np.float32)
    opt = optim.AdamW(3, lr=0.1)
    info = opt.step(p, np.array([1.0, np.nan, 0.0], np.float32))
    assert info["skipped"] and not math.isfinite(info["grad_norm"])
    np.testing.assert_array_equal(p, 1.0)  # nothing moved
    assert opt.step_count == 0 and not opt.m.any() and not opt.v.any()


def test_warmup_lr():
    assert optim.warmup_lr(1e-3, 1, 4) == pytest.approx(2.5e-4, rel=1e-15)
    assert optim.warmup_lr(1e-3, 4, 4) == 1e-3
    assert optim.warmup_lr(1e-3, 100, 4) == 1e-3
    assert optim.warmup_lr(1e-3, 1, 0) == 1e-3


def test_ema_formula():
    # d = min(decay, (1 + s) / (10 + s)), s = k - 1
    assert optim.ema_decay(0.999, 1) == pytest.approx(0.1, rel=1e-15)
    assert optim.ema_decay(0.999, 11) == pytest.approx(11 / 20, rel=1e-15)
    assert optim.ema_decay(0.999, 10**6) == 0.999
    assert optim.ema_decay(0.999, 1, warmup=False) == 0.999
    g = np.random.default_rng(1)
    ema = g.standard_normal(100).astype(np.float32)
    p = g.standard_normal(100).astype(np.float32)
    ref = 0.9 * ema.astype(np.float64) + 0.1 * p.astype(np.float64)
    e1 = ema.copy()
    optim.ema_update(e1, p, 0.9)
    e2 = ema.copy()
    optim.ema_update(e2, p, 0.9, scratch=np.empty_like(p))
    np.testing.assert_allclose(e1, ref, rtol=0, atol=1e-6)  # two float32 roundings of O(1) values
    np.testing.assert_array_equal(e1, e2)  # the scratch path is the same arithmetic
    # a sequence converges to a constant target geometrically
    e = np.zeros(3, np.float32)
    target = np.ones(3, np.float32)
    for k in range(1, 51):
        optim.ema_update(e, target, optim.ema_decay(0.5, k))
    np.testing.assert_allclose(e, 1.0, atol=1e-6)  # 0.5**~45 ~ 0 plus float32 rounding


def test_state_roundtrip_and_errors():
    theta0, grads = _problem(5, 33)
    a = theta0.copy()
    opt = optim.AdamW(a.size, lr=1e-3)
    for g in grads[:5]:
        opt.step(a, g.copy())
    st = opt.state_dict()
    b = a.copy()
    opt2 = optim.AdamW(a.size, lr=1e-3)
    opt2.load_state_dict(st)
    for g in grads[5:]:
        opt.step(a, g.copy())
        opt2.step(b, g.copy())
    np.testing.assert_array_equal(a, b)  # resuming from the state is bit-identical
    with pytest.raises(ValueError, match="lr"):
        optim.AdamW(3, lr=-1.0)
    with pytest.raises(ValueError, match="beta1"):
        optim.AdamW(3, beta1=1.0)
    with pytest.raises(ValueError, match="float32"):
        opt.step(a.astype(np.float64), grads[0])
    with pytest.raises(ValueError, match="float32"):
        opt2.load_state_dict({"m": np.zeros(33), "v": np.zeros(33, np.float32), "step": 1})


def test_decay_mask():
    p = np.ones(4, np.float32)
    opt = optim.AdamW(4, lr=0.1, weight_decay=0.5, decay_mask=np.array([1, 1, 0, 0], bool))
    opt.step(p, np.zeros(4, np.float32))
    # zero gradient: only decay acts, theta * (1 - 0.1 * 0.5) = 0.95 on masked entries
    np.testing.assert_allclose(p, [0.95, 0.95, 1.0, 1.0], rtol=1e-7)
