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


def _torch_lambda(warmup, schedule, total):
    """torch LambdaLR factor for update s + 1, the spec of optim.scheduled_lr written out independently."""
    def f(s):
        k = s + 1
        if k <= warmup:
            return k / warmup
        if schedule == "constant":
            return 1.0
        p = min(1.0, (k - warmup) / (total + 1 - warmup))
        return 0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else 1 - p
    return f


@pytest.mark.parametrize("seed,wd,warmup,clip,schedule", [
    (0, 0.0, 0, None, "constant"), (1, 0.01, 5, None, "constant"), (2, 0.1, 3, 1.0, "constant"),
    (3, 0.0, 0, 0.5, "constant"), (4, 0.1, 3, None, "cosine"), (5, 0.01, 0, 1.0, "linear")])
def test_adamw_matches_torch(seed, wd, warmup, clip, schedule):
    torch = pytest.importorskip("torch")
    theta0, grads = _problem(seed)
    lr = 1e-2
    ours = theta0.copy()
    total = len(grads) if schedule != "constant" else None      # the decay reaches its end in this run
    opt = optim.AdamW(ours.size, lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd, warmup=warmup,
                      max_grad_norm=clip, schedule=schedule, total=total)
    tp = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    topt = torch.optim.AdamW([tp], lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, _torch_lambda(warmup, schedule, total))
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


def test_scheduled_lr_decay():
    lr = 1e-3
    # constant: warmup only, whatever total says
    assert optim.scheduled_lr(lr, 7, 4, "constant", 10) == optim.warmup_lr(lr, 7, 4) == lr
    # warmup then cosine over total = 104 updates: progress (k - 4) / (104 + 1 - 4) = (k - 4) / 101
    assert optim.scheduled_lr(lr, 2, 4, "cosine", 104) == pytest.approx(5e-4, rel=1e-15)   # still warming up
    assert optim.scheduled_lr(lr, 4, 4, "cosine", 104) == lr                              # end of warmup: p = 0
    assert optim.scheduled_lr(lr, 4 + 101 // 2, 4, "cosine", 104) == pytest.approx(
        lr * 0.5 * (1 + math.cos(math.pi * 50 / 101)), rel=1e-15)
    # the last update (k = total) still moves, at the small rate of p = 100/101; beyond total: 0
    last = optim.scheduled_lr(lr, 104, 4, "cosine", 104)
    assert 0 < last == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 100 / 101)), rel=1e-12)
    assert last < 3e-4 * lr
    assert optim.scheduled_lr(lr, 105, 4, "cosine", 104) == 0.0
    assert optim.scheduled_lr(lr, 10**6, 4, "linear", 104) == 0.0
    # linear: lr (1 - p); no warmup: p = k / (total + 1)
    assert optim.scheduled_lr(lr, 5, 0, "linear", 9) == pytest.approx(lr * 0.5, rel=1e-15)
    assert optim.scheduled_lr(lr, 9, 0, "linear", 9) == pytest.approx(lr * 0.1, rel=1e-12)
    # monotone non-increasing after the warmup
    rates = [optim.scheduled_lr(lr, k, 10, "cosine", 500) for k in range(10, 502)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    opt = optim.AdamW(3, lr=lr, warmup=4, schedule="cosine", total=104)
    assert opt.lr_at(104) == last and (opt.schedule, opt.total) == ("cosine", 104)
    with pytest.raises(ValueError, match="'step'"):
        optim.scheduled_lr(lr, 5, 0, "step", 9)
    with pytest.raises(ValueError, match="total > warmup = 4 updates, got total=None"):
        optim.scheduled_lr(lr, 5, 4, "cosine")
    with pytest.raises(ValueError, match="schedule must be one of .* got 'exp'"):
        optim.AdamW(3, schedule="exp", total=10)
    with pytest.raises(ValueError, match="needs an integer total > warmup = 10 updates, got total=10"):
        optim.AdamW(3, warmup=10, schedule="linear", total=10)
    with pytest.raises(ValueError, match="got total=None"):
        optim.AdamW(3, schedule="cosine")


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
    np.testing.assert_allclose(e1, ref, rtol=0, atol=1e-6)  # two float32 roundings of O(1) values
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


def test_train_config_lr_schedule_reaches_the_optimizer():
    # TrainConfig.lr_schedule decays over cfg.steps through Trainer's AdamW; configs saved before the
    # field existed (no "lr_schedule" key) load as "constant", their old behaviour.
    from ddpm_ref.data import load_dataset
    from ddpm_ref.train import TrainConfig, Trainer

    kw = dict(data="moons", model="mlp", preset="tiny", T=100, batch=8, steps=6, warmup=2, lr=1e-2)
    tr = Trainer(TrainConfig(lr_schedule="cosine", **kw), load_dataset("moons", split="train", n=64))
    rates = [tr.train_step()["lr"] for _ in range(6)]
    assert rates == [optim.scheduled_lr(1e-2, k, 2, "cosine", 6) for k in range(1, 7)]
    assert rates[1] == 1e-2 and 0 < rates[5] < rates[4] < rates[2]
    old = TrainConfig(**kw).to_dict()
    del old["lr_schedule"]
    assert TrainConfig.from_dict(old).lr_schedule == "constant"
    with pytest.raises(ValueError, match="lr_schedule must be one of .* got 'step'"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="steps must exceed warmup = 100, got steps=100"):
        TrainConfig(lr_schedule="linear", steps=100)


def _whole_buffer_adamw(theta, m, v, g, k, lr, b1, b2, eps, wd, mask):
    """One AdamW update as whole-array float32 passes (the arithmetic before chunking), in place."""
    f32 = np.float32
    if wd:
        theta[mask] *= f32(1.0 - lr * wd)
    m *= f32(b1)
    m += g * f32(1.0 - b1)
    v *= f32(b2)
    v += (g * g) * f32(1.0 - b2)
    denom = np.sqrt(v) / f32(math.sqrt(1.0 - b2 ** k)) + f32(eps)
    theta -= (m / denom) * f32(lr / (1.0 - b1 ** k))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 15])
def test_chunked_update_is_the_whole_buffer_arithmetic(monkeypatch, chunk):
    # AdamW's update and the EMA run chunk by chunk (optim._UPDATE_CHUNK); elementwise, so every
    # chunking, including chunks that do not divide the size (257), must give the same bits as
    # whole-array passes, with a decay mask, over several updates.
    monkeypatch.setattr(optim, "_UPDATE_CHUNK", chunk)
    theta0, grads = _problem(3)
    mask = np.random.default_rng(4).random(theta0.size) < 0.6
    a, ref = theta0.copy(), theta0.copy()
    m, v = np.zeros_like(ref), np.zeros_like(ref)
    opt = optim.AdamW(a.size, lr=3e-3, weight_decay=0.1, decay_mask=mask, max_grad_norm=None)
    for k, g in enumerate(grads[:6], start=1):
        opt.step(a, g.copy())
        _whole_buffer_adamw(ref, m, v, g, k, 3e-3, opt.beta1, opt.beta2, opt.eps, 0.1, mask)
    np.testing.assert_array_equal(a, ref)
    np.testing.assert_array_equal(opt.m, m)
    np.testing.assert_array_equal(opt.v, v)
    ema = theta0.copy()
    optim.ema_update(ema, a, 0.75)
    np.testing.assert_array_equal(ema, theta0 * np.float32(0.75) + a * np.float32(0.25))


def test_global_norm_chunks_match_one_float64_sum(monkeypatch):
    # The reused float64 buffer, over chunks that do not divide the size, against one float64 sum.
    monkeypatch.setattr(optim, "_CHUNK", 10)
    g = np.random.default_rng(5).standard_normal(97).astype(np.float32)
    ref = math.sqrt(float(np.sum(g.astype(np.float64) ** 2)))
    assert optim.global_norm(g) == pytest.approx(ref, rel=1e-14)


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=float("inf")), "eps must be a finite number > 0, got inf"),
    (dict(eps=True), r"eps must be .* got True \(bool\)"),
    (dict(lr=True), r"lr must be .* got True \(bool\)"),
    (dict(lr="0.1"), r"lr must be .* got '0.1' \(str\)"),
    (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
    (dict(weight_decay=True), "weight_decay must be"),
    (dict(beta2=False), "beta2 must be"),
    (dict(max_grad_norm=True), "max_grad_norm must be"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be"),
    (dict(warmup=2.7), r"warmup must be an integer >= 0, got 2.7 \(float\)"),
    (dict(warmup="3"), "warmup must be an integer"),
    (dict(warmup=True), "warmup must be an integer"),
    (dict(warmup=float("inf")), "warmup must be an integer"),
    (dict(warmup=float("nan")), "warmup must be an integer"),
    (dict(size=2.5), r"size must be an integer >= 1, got 2.5"),
    (dict(size=True), "size must be an integer"),
    (dict(size="4"), "size must be an integer"),
    (dict(total=2.5), "total must be an integer"),
    (dict(total=0), "total must be an integer >= 1"),
    (dict(decay_mask=np.array([0.5, np.nan, 0, 2])), r"decay_mask must be a bool array of shape \(4,\), got float64"),
    (dict(decay_mask=np.ones(3, bool)), r"decay_mask must be a bool array of shape \(4,\), got bool array of shape \(3,\)"),
])
def test_adamw_refuses_coerced_or_out_of_range_arguments(kwargs, match):
    kw = {"size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        optim.AdamW(**kw)


def test_adamw_accepts_numpy_scalars_and_copies_the_mask():
    opt = optim.AdamW(np.int64(4), lr=np.float32(0.5), warmup=np.int64(2), total=np.int64(9), max_grad_norm=1,
                      schedule="linear", weight_decay=0, decay_mask=[True, True, False, False])
    assert (opt.size, opt.warmup, opt.total) == (4, 2, 9) and type(opt.size) is int and type(opt.lr) is float
    mask = np.zeros(4, bool)
    opt = optim.AdamW(4, lr=0.1, weight_decay=0.5, decay_mask=mask)
    mask[:] = True                                # the caller's later edit does not reach the optimizer
    p = np.ones(4, np.float32)
    opt.step(p, np.zeros(4, np.float32))
    np.testing.assert_array_equal(p, 1.0)
    assert optim.AdamW(4, max_grad_norm=float("inf")).max_grad_norm == math.inf   # measure only


def test_failed_step_changes_nothing():
    g0 = np.random.default_rng(0).standard_normal(8).astype(np.float32) * 10
    opt = optim.AdamW(8, lr=0.1, max_grad_norm=1.0)
    p = np.ones(8, np.float32)
    p.flags.writeable = False
    g = g0.copy()
    with pytest.raises(ValueError, match="params is read-only"):
        opt.step(p, g)
    assert opt.step_count == 0 and not opt.m.any() and not opt.v.any()
    np.testing.assert_array_equal(g, g0)          # not clipped either
    ro = g0.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="grad is read-only, but max_grad_norm clips it in place"):
        opt.step(np.ones(8, np.float32), ro)
    assert opt.step_count == 0 and not opt.m.any() and not opt.v.any()
    # the retry on writable buffers is a clean first step
    p, ref_p = np.ones(8, np.float32), np.ones(8, np.float32)
    opt.step(p, g0.copy())
    optim.AdamW(8, lr=0.1, max_grad_norm=1.0).step(ref_p, g0.copy())
    np.testing.assert_array_equal(p, ref_p)
    # without clipping the gradient is only read: a read-only one is fine
    optim.AdamW(8, lr=0.1).step(np.ones(8, np.float32), ro)


@pytest.mark.parametrize("change,match", [
    (dict(step=2.9), "optimizer step must be an integer >= 0, got 2.9"),
    (dict(step=True), "optimizer step must be an integer >= 0, got True"),
    (dict(step="5"), "optimizer step must be an integer >= 0, got '5'"),
    (dict(step=float("inf")), "optimizer step must be an integer >= 0, got inf"),
    (dict(step=float("nan")), "optimizer step must be an integer >= 0, got nan"),
    (dict(step=-1), "optimizer step must be an integer >= 0, got -1"),
    (dict(step=None), r"optimizer state is missing \['step'\]"),
    (dict(v=-np.ones(4, np.float32)), "optimizer state 'v' must be finite and >= 0"),
    (dict(v=np.full(4, np.nan, np.float32)), "optimizer state 'v' must be finite and >= 0"),
    (dict(m=np.array([0, np.inf, 0, 0], np.float32)), "optimizer state 'm' contains NaN or inf"),
])
def test_load_state_dict_refuses_bad_states_and_changes_nothing(change, match):
    opt = optim.AdamW(4, lr=0.1)
    opt.step(np.ones(4, np.float32), np.arange(4, dtype=np.float32))
    before = opt.state_dict()
    state = {"m": np.zeros(4, np.float32), "v": np.zeros(4, np.float32), "step": 3, **change}
    state = {k: v for k, v in state.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert after["step"] == before["step"] == 1
    np.testing.assert_array_equal(after["m"], before["m"])
    np.testing.assert_array_equal(after["v"], before["v"])
    opt.load_state_dict({"m": np.zeros(4, np.float32), "v": np.zeros(4, np.float32), "step": np.int64(3)})
    assert opt.step_count == 3 and type(opt.step_count) is int


@pytest.mark.parametrize("call,match", [
    (lambda: optim.warmup_lr(1.0, -5, 10), "k .* must be an integer >= 1, got -5"),
    (lambda: optim.warmup_lr(1.0, 0, 0), "k .* must be an integer >= 1, got 0"),
    (lambda: optim.scheduled_lr(1.0, 0, 10), "k .* must be an integer >= 1, got 0"),
    (lambda: optim.scheduled_lr(1.0, 2.5, 10), "k .* must be an integer >= 1, got 2.5"),
    (lambda: optim.scheduled_lr(float("nan"), 1, 0), "lr must be a finite number >= 0, got nan"),
    (lambda: optim.scheduled_lr(-1.0, 1, 0), "lr must be a finite number >= 0, got -1.0"),
    (lambda: optim.scheduled_lr(True, 1, 0), "lr must be"),
    (lambda: optim.scheduled_lr(1.0, 1, -5, "linear", 10), "warmup must be an integer >= 0, got -5"),
    (lambda: optim.scheduled_lr(1.0, 10, 0, "cosine", 10.9), "total must be an integer >= 1 .* got total=10.9"),
    (lambda: optim.scheduled_lr(1.0, 1, 0, "constant", True), "total must be an integer"),
    (lambda: optim.ema_decay(1.5, 10**6), r"EMA decay must be a finite number in \[0, 1\], got 1.5"),
    (lambda: optim.ema_decay(-0.5, 10), r"EMA decay must be a finite number in \[0, 1\], got -0.5"),
    (lambda: optim.ema_decay(0.9999, 0), "k .* must be an integer >= 1, got 0"),
    (lambda: optim.ema_decay(0.9999, -9), "k .* must be an integer >= 1, got -9"),
    (lambda: optim.ema_decay(0.9999, 3, warmup="no"), "EMA warmup must be True or False"),
    (lambda: optim.ema_update(np.zeros(2, np.float32), np.zeros(2, np.float32), True), "EMA decay must be"),
    (lambda: optim.clip_grad_norm(np.ones(2, np.float32), "1"), "max_norm must be"),
])
def test_schedule_helpers_refuse_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_schedule_helpers_accept_what_the_trainer_passes():
    # the trainer asks for k = optimizer count + 1 >= 1, NumPy integers included
    assert optim.scheduled_lr(1e-3, np.int64(3), np.int64(4), "cosine", np.int64(10)) == pytest.approx(7.5e-4)
    assert optim.warmup_lr(0, 1, 0) == 0.0
    assert optim.ema_decay(0.0, 1) == 0.0 and optim.ema_decay(1.0, 10**9, warmup=np.bool_(False)) == 1.0


def test_ema_update_with_ema_aliasing_params():
    x = np.full(4, 2.0, np.float32)
    optim.ema_update(x, x, 0.5)                   # d * x + (1 - d) * x = x
    np.testing.assert_array_equal(x, 2.0)
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="ema is read-only"):
        optim.ema_update(ro, np.ones(4, np.float32), 0.5)
