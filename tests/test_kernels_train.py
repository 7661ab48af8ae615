"""A few training steps through the GPU kernels equal the same steps through the NumPy reference.

The network is a two-layer conv block with the U-Net's pieces, small enough for the CUDA simulator:

    x_t, eps = forward process (noise drawn by ddpm_ref.rng's contract)
    h    = conv3x3(x_t) + b1 + temb[t]              (fused epilogue: time-embedding add)
    g    = silu(group_norm(h))                       (fused GroupNorm+SiLU)
    pred = conv3x3(g) + b2 + x_t                     (fused epilogue: residual add)
    loss = mean_n mean_e (pred - eps)^2              (loss kernel regenerating eps: never stored)

then the hand-written backward pass and AdamW + EMA (one kernel over the flat parameter buffer).
The reference runs the same graph with ddpm_ref.ops / diffusion / optim in float32.

Tolerance table:
- losses: rtol 1e-5. Both are float64 sums of float32 squared errors of forward passes that differ
  by float32 accumulation order (conv K-sums, GroupNorm statistics: ~1e-6 relative).
- parameters after the steps: atol 2e-6. Each AdamW step moves a parameter by about lr = 1e-3 times
  m / sqrt(v), a ratio of gradients that agree to ~1e-5 relative, so the parameters agree to
  ~1e-3 * 1e-5 per step plus float32 rounding of O(1) values (6e-8); a wrong gradient sign would
  differ by ~2e-3.
"""
import numpy as np
import pytest

from kernel_setup import kb, fast_simulator_barriers, small_conv_tiles  # noqa: E402,F401  (GPU or simulator; skips without numba-cuda)
from ddpm_ref import diffusion, optim as ref_optim, rng  # noqa: E402

from ddpm_ref.kernels import conv as kconv, noise as knoise, norm as knorm, optim as koptim  # noqa: E402
from ddpm_ref.ops import conv as rconv, loss as rloss, norm as rnorm  # noqa: E402
from ddpm_ref.schedule import Schedule  # noqa: E402

C, HID, HW, GROUPS, N, T = 2, 4, 3, 2, 2, 20
SHAPES = [("w1", (HID, C, 3, 3)), ("b1", (HID,)), ("gamma", (HID,)), ("beta", (HID,)),
          ("w2", (C, HID, 3, 3)), ("b2", (C,))]
SIZES = [int(np.prod(s)) for _, s in SHAPES]
OFFSETS = np.concatenate([[0], np.cumsum(SIZES)])


pytestmark = pytest.mark.usefixtures("small_conv_tiles")


def _views(flat):
    return {name: flat[OFFSETS[i]:OFFSETS[i + 1]].reshape(shape) for i, (name, shape) in enumerate(SHAPES)}


def _step_reference(p, x0, t, temb, sched, seed, index, step):
    eps = rng.normal(seed, rng.Stream.TRAIN_NOISE, index, step, x0.shape[1:])
    xt = diffusion.q_sample(sched, x0, t, eps)
    h, c1 = rconv.conv2d_forward(xt, p["w1"], p["b1"], 1, 1)
    h = h + temb[t][:, :, None, None]
    g, c2 = rnorm.group_norm_silu_forward(h, p["gamma"], p["beta"], GROUPS, 1e-6)
    pred, c3 = rconv.conv2d_forward(g, p["w2"], p["b2"], 1, 1)
    pred = pred + xt
    loss, lc = rloss.mse_forward(pred, eps)
    dpred = rloss.mse_backward(lc)
    dg, dw2, db2 = rconv.conv2d_backward(dpred, c3)
    dh, dgamma, dbeta = rnorm.group_norm_silu_backward(dg, c2)
    _, dw1, db1 = rconv.conv2d_backward(dh, c1)
    grad = np.concatenate([a.ravel() for a in (dw1, db1, dgamma, dbeta, dw2, db2)]).astype(np.float32)
    return loss, grad


def _step_kernels(p, x0, t, temb, sched, seed, index, step):
    xt, _ = knoise.q_sample_target(sched, x0, t, seed, index, step, "epsilon", store_target=False)
    temb_t = kb.to_device(temb[t])                                                   # (N, HID)
    h, c1 = kconv.conv2d_forward(xt, p["w1"], p["b1"], 1, 1, temb=temb_t)
    g, c2 = knorm.group_norm_silu_forward(h, p["gamma"], p["beta"], GROUPS, 1e-6)
    pred, c3 = kconv.conv2d_forward(g, p["w2"], p["b2"], 1, 1, residual=xt)
    loss, _, dpred = knoise.mse_noise_loss(sched, pred, x0, t, seed, index, step, "epsilon")
    dg, dw2, db2 = kconv.conv2d_backward(dpred, c3)
    dh, dgamma, dbeta = knorm.group_norm_silu_backward(dg, c2)
    dx, dw1, db1 = kconv.conv2d_backward(dh, c1, input_grad=False)   # x_t needs no gradient
    assert dx is None
    xp = kb.xp()
    grad = xp.concatenate([a.ravel() for a in (dw1, db1, dgamma, dbeta, dw2, db2)])
    return loss, grad


def test_two_training_steps_match_reference():
    sched = Schedule.linear(T=T)
    r = np.random.default_rng(0)
    params0 = (r.normal(size=OFFSETS[-1]) * 0.3).astype(np.float32)
    params0[OFFSETS[2]:OFFSETS[3]] = 1.0                                   # gamma
    temb = r.normal(size=(T, HID)).astype(np.float32)
    data = r.uniform(-1, 1, size=(6, C, HW, HW)).astype(np.float32)
    seed = 11
    p_ref, ema_ref = params0.copy(), params0.copy()
    p_dev, ema_dev = kb.to_device(params0), kb.to_device(params0)
    opt_ref = ref_optim.AdamW(p_ref.size, lr=1e-3, max_grad_norm=1.0, warmup=2)
    opt_dev = koptim.AdamW(p_ref.size, lr=1e-3, max_grad_norm=1.0, warmup=2)
    for step in range(2):
        index = np.array([2 * step, 2 * step + 1])                         # data-set indices
        t = rng.randint(seed, rng.Stream.TIMESTEP, index, T, step)
        x0 = data[index]
        loss_ref, g_ref = _step_reference(_views(p_ref), x0, t, temb, sched, seed, index, step)
        loss_dev, g_dev = _step_kernels(_views(p_dev), kb.to_device(x0), t, temb, sched, seed, index, step)
        assert loss_dev == pytest.approx(loss_ref, rel=1e-5)
        np.testing.assert_allclose(kb.to_host(g_dev), g_ref, rtol=1e-4, atol=1e-6)  # float32 sums, ~1e-6 rel
        info_ref = opt_ref.step(p_ref, g_ref)
        d = ref_optim.ema_decay(0.999, step + 1)
        ref_optim.ema_update(ema_ref, p_ref, d)
        info_dev = opt_dev.step(p_dev, g_dev, ema=ema_dev, ema_d=d)
        assert info_dev["grad_norm"] == pytest.approx(info_ref["grad_norm"], rel=1e-5)
        np.testing.assert_allclose(kb.to_host(p_dev), p_ref, rtol=0, atol=2e-6)
        np.testing.assert_allclose(kb.to_host(ema_dev), ema_ref, rtol=0, atol=2e-6)
    assert np.abs(kb.to_host(p_dev) - params0).max() > 1e-4               # the steps did move them
