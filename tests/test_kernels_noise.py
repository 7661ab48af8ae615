"""ddpm_ref.kernels.noise against ddpm_ref.rng and ddpm_ref.diffusion (the noise contract on the GPU).

Runs in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set below before Numba is imported) at
tiny shapes, and on a real GPU at the same shapes plus full-size ones when DDPM_KERNELS_FULL=1
(benchmarks/gpu_check.sh).

Tolerance table (why each number is what it is):
- uint32 words and uniforms: exact. Integer Philox and an exact float32 mapping.
- normals: 1e-6 absolute (the contract). v1: Box-Muller in float64 then one rounding to float32;
  libdevice's float64 log/cos/sin may differ from the host libm in the last float64 bit, which can
  flip one float32 rounding (|z| < 6, so one float32 ulp is < 5e-7); in the simulator exact. v2:
  float32 Box-Muller (float64 tail), at most 4 float32 ulps of |z| < 4 = 9.5e-7 by the bound in
  kernels/rng.py; in the simulator a few ulps, so v2 is checked against 1e-6 there too.
- x_t, targets: 2 float32 ulps of the operands' magnitude (rtol 1e-6 on values of size <= ~5): the
  GPU may fuse ``a*x0 + b*eps`` into one FMA (one rounding instead of two); the simulator is exact.
- loss: rtol 1e-5; the kernel sums squares in float64, the reference in float32 (pairwise), so the
  reference is the less accurate one by ~D * 6e-8 relative.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_setup import kb, FULL, fast_simulator_barriers  # noqa: E402,F401  (GPU or simulator; skips without numba-cuda)
from ddpm_ref import diffusion, rng  # noqa: E402

from ddpm_ref.kernels import noise  # noqa: E402
from ddpm_ref.schedule import Schedule  # noqa: E402


shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
indices = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3)


VERSIONS = ("v1", "v2")


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=6)
@given(seed=st.integers(0, 2**32 - 1), stream=st.integers(0, 2**32 - 1), idx=indices, shape=shapes,
       step=st.integers(0, 2**32 - 1), sub=st.integers(0, 2**32 - 1))
def test_bits_uniform_normal_match_rng(version, seed, stream, idx, shape, step, sub):
    idx = np.array(idx, dtype=np.int64)
    w = kb.to_host(getattr(noise, f"random_bits_{version}")(seed, stream, idx, step, shape, sub))
    assert w.dtype == np.uint32 and w.shape == (len(idx),) + shape
    np.testing.assert_array_equal(w, rng.random_bits(seed, stream, idx, step, shape, sub))   # exact
    u = kb.to_host(getattr(noise, f"uniform_{version}")(seed, stream, idx, step, shape, sub))
    np.testing.assert_array_equal(u, rng.uniform(seed, stream, idx, step, shape, sub))       # exact
    z = kb.to_host(getattr(noise, f"normal_{version}")(seed, stream, idx, step, shape, sub))
    assert z.shape == (len(idx),) + shape
    np.testing.assert_allclose(z, rng.normal(seed, stream, idx, step, shape, sub), rtol=0, atol=1e-6)


def test_normal_v2_tail_and_many_words():
    # 2 samples x 1500 elements = 1500 Box-Muller pairs through the v2 kernel, plus a sample chosen
    # so that its first pair takes the float64 tail (-2 ln u0 >= 15): within 1e-6 everywhere.
    idx = np.array([0, 1])
    z = kb.to_host(noise.normal_v2(3, 4, idx, 9, (1500,)))
    np.testing.assert_allclose(z, rng.normal(3, 4, idx, 9, (1500,)), rtol=0, atol=1e-6)
    w = rng.random_bits(3, 4, np.arange(20000), 9, (2,))                     # first pair of each
    u0 = ((w[:, 0] >> 8) | 1) * 2.0**-24
    tail = np.flatnonzero(-2.0 * np.log(u0) >= 15.5)[:1]                      # a clear tail case
    assert tail.size == 1                                                     # P = 4e-4 per pair
    zt = kb.to_host(noise.normal_v2(3, 4, tail, 9, (2,)))
    ref = rng.normal(3, 4, tail, 9, (2,))
    assert np.hypot(*ref[0]) > np.sqrt(15)                                    # |z| pair radius
    np.testing.assert_allclose(zt, ref, rtol=0, atol=1e-6)


def test_per_sample_step_and_known_answer():
    # step and sub given per sample; and the Random123 known answer through the device path:
    # counter (0, 0, 0, 0), key (0, 0) -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    w = kb.to_host(noise.random_bits(0, 0, [0], 0, (4,), 0))
    assert [hex(int(x)) for x in w[0]] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]
    idx = np.array([5, 2, 9])
    step = np.array([0, 7, 2**32 - 1])
    sub = np.array([1, 0, 3])
    np.testing.assert_array_equal(kb.to_host(noise.random_bits(3, 4, idx, step, (2, 3), sub)),
                                  rng.random_bits(3, 4, idx, step, (2, 3), sub))


def test_bad_address_raises():
    with pytest.raises(ValueError, match="seed"):
        noise.normal(-1, 4, [0], 0, (3,))
    with pytest.raises(ValueError, match="index"):
        noise.normal(0, 4, [-5], 0, (3,))
    with pytest.raises(ValueError, match="step"):
        noise.random_bits(0, 4, [0, 1], [1, 2, 3], (3,))


def _schedule(kind):
    return Schedule.linear(T=50) if kind == "linear" else Schedule.cosine(T=50)


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=5)
@given(n=st.integers(1, 3), shape=st.sampled_from([(1, 3, 3), (2, 2, 5), (7,), (3, 1, 1), (3, 7, 7)]),
       prediction=st.sampled_from(["epsilon", "sample", "v"]), kind=st.sampled_from(["linear", "cosine"]),
       seed=st.integers(0, 2**32 - 1), step=st.integers(0, 10**6), data=st.data())
def test_q_sample_target_matches_reference(version, n, shape, prediction, kind, seed, step, data):
    q_sample_target = getattr(noise, f"q_sample_target_{version}")
    mse_noise_loss = getattr(noise, f"mse_noise_loss_{version}")
    sched = _schedule(kind)
    r = np.random.default_rng(seed % 1000)
    x0 = r.uniform(-1, 1, (n,) + shape).astype(np.float32)
    t = np.array(data.draw(st.lists(st.integers(0, sched.T - 1), min_size=n, max_size=n)), dtype=np.int64)
    index = np.array(data.draw(st.lists(st.integers(0, 10**9), min_size=n, max_size=n)), dtype=np.int64)
    eps = rng.normal(seed, rng.Stream.TRAIN_NOISE, index, step, shape)
    xt_ref = diffusion.q_sample(sched, x0, t, eps)
    target_ref = diffusion.training_target(sched, x0, t, eps, prediction)
    xt, target = q_sample_target(sched, kb.to_device(x0), t, seed, index, step, prediction)
    # FMA contraction on a GPU (v1: exact in the simulator); v2's eps within 9.5e-7 of the reference's
    # (rng.py), times b <= 1 and, for v, a <= 1: 1e-6 + float32 rounding of the sums
    tol = dict(rtol=1e-6, atol=1e-6 if version == "v1" else 1.5e-6)
    np.testing.assert_allclose(kb.to_host(xt), xt_ref, **tol)
    np.testing.assert_allclose(kb.to_host(target), target_ref, **tol)
    xt2, none = q_sample_target(sched, kb.to_device(x0), t, seed, index, step, prediction,
                                store_target=False)
    assert none is None
    np.testing.assert_array_equal(kb.to_host(xt2), kb.to_host(xt))    # same kernel, same bits

    # The loss kernel regenerates the same eps: with pred = the stored target the loss is exactly 0.
    loss0, per0, d0 = mse_noise_loss(sched, target, kb.to_device(x0), t, seed, index, step, prediction)
    assert loss0 == 0.0 and np.all(kb.to_host(per0) == 0) and np.all(kb.to_host(d0) == 0)

    # And against the reference MSE (written out: mean over elements, weights, mean over the batch).
    pred = r.normal(size=x0.shape).astype(np.float32)
    w = r.uniform(0.5, 2.0, n).astype(np.float32)
    loss, per, dpred = mse_noise_loss(sched, kb.to_device(pred), kb.to_device(x0), t, seed, index,
                                            step, prediction, weights=w, dloss=0.5)
    diff = pred.astype(np.float64) - target_ref.astype(np.float64)
    per_ref = (diff.reshape(n, -1) ** 2).mean(axis=1)
    np.testing.assert_allclose(kb.to_host(per), per_ref, rtol=1e-5)   # float32 output of a float64 sum
    assert loss == pytest.approx(float((per_ref * w).mean()), rel=1e-5)
    d = x0[0].size
    dref = 0.5 * 2.0 * diff * w.reshape((n,) + (1,) * len(shape)) / (n * d)
    np.testing.assert_allclose(kb.to_host(dpred), dref, rtol=1e-5, atol=1e-7)   # float32 products


def test_q_sample_validation():
    sched = Schedule.linear(T=10)
    x0 = kb.to_device(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="prediction"):
        noise.q_sample_target(sched, x0, np.array([1, 2]), 0, [0, 1], prediction="score")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\)"):
        noise.q_sample_target(sched, x0, np.array([1, 10]), 0, [0, 1])
    with pytest.raises(ValueError, match="index"):
        noise.q_sample_target(sched, x0, np.array([1, 2]), 0, [0])
    with pytest.raises(ValueError, match="float32"):
        noise.q_sample_target(sched, kb.to_device(np.zeros((2, 3))), np.array([1, 2]), 0, [0, 1])


def test_tile_kernels_do_not_depend_on_the_grid_or_the_register_cap(monkeypatch):
    # The autotuner picks among grid shapes (noise._tile_launches, noise._row_launches) and register-
    # capped twins of each kernel on a GPU; each element's value is fixed by its counter (and the loss
    # sums a sample in a fixed order), so every variant must write the same arrays: one block row per
    # sample, fewer rows than samples (blocks loop over samples), several blocks along a sample.
    sched = Schedule.linear(T=10)
    n, shape = 5, (3, 7, 7)                       # 147 values: 37 Philox blocks per sample
    x0 = np.random.default_rng(2).uniform(-1, 1, (n,) + shape).astype(np.float32)
    pred = np.random.default_rng(3).normal(size=(n,) + shape).astype(np.float32)
    t = np.array([0, 3, 9, 5, 1])
    grids = [((1, 5), 32), ((1, 2), 32), ((2, 1), 32), ((3, 2), 16)]
    rows = [(5, 32), (2, 32), (1, 32)]
    assert len(noise._Q_SAMPLE_KERNELS) == len(noise._NORMAL_KERNELS) == len(noise._MSE_KERNELS) == 3
    outs = []
    for i, gt in enumerate(grids):
        k = i % 3                                 # each register twin, on some grid
        monkeypatch.setattr(noise, "_tile_launches", lambda n_, nb, gt=gt: [gt])
        monkeypatch.setattr(noise, "_row_launches", lambda n_, r=rows[i % 3]: [r])
        for name in ("_Q_SAMPLE_KERNELS", "_NORMAL_KERNELS", "_MSE_KERNELS", "_BITS_KERNELS"):
            kernels = getattr(noise, name)
            monkeypatch.setattr(noise, name, (kernels[min(k, len(kernels) - 1)],))
        xt, target = noise.q_sample_target(sched, kb.to_device(x0), t, 11, np.arange(n), 4, "v")
        z = noise.normal(11, 4, np.arange(n), 4, shape)
        w = noise.random_bits(11, 4, np.arange(n), 4, shape)
        loss, per, dpred = noise.mse_noise_loss(sched, kb.to_device(pred), kb.to_device(x0), t, 11,
                                                np.arange(n), 4, "v")
        outs.append([kb.to_host(a) for a in (xt, target, z, w, per, dpred)] + [np.float64(loss)])
        monkeypatch.undo()
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)
    # The autotuner on these variants, with a fake timer: the fastest (here the 5th of 12) is kept.
    monkeypatch.setattr(noise, "_tile_launches", lambda n_, nb: grids)
    monkeypatch.setattr(kb, "_TUNED", {})
    timed = []

    def timer(fn):
        fn()
        timed.append(1)
        return 1.0 if len(timed) == 5 else 2.0

    out = kb.to_device(np.zeros((n, 147), np.float32))
    params = noise._packed(n, np.arange(n, dtype=np.uint32), np.full(n, 4, np.uint32), np.zeros(n, np.uint32))
    chosen = noise._launch_tiles("normal", noise._NORMAL_KERNELS, n, 37,
                                 (out, params, np.uint32(11), np.uint32(4), np.int32(0)), timer=timer)
    assert len(timed) == 12 and chosen == (noise._NORMAL_KERNELS[1],) + grids[1]
    assert kb.tuning_report() == {"noise.normal": {"grid 1x2, launch bounds (256, 6)": 1}}
    np.testing.assert_array_equal(kb.to_host(out), outs[0][2].reshape(n, 147))


@pytest.mark.skipif(not FULL, reason="full-size shapes run on a real GPU only (DDPM_KERNELS_FULL=1)")
def test_full_size_cifar_batch():
    sched = Schedule.linear()
    n, shape = 128, (3, 32, 32)
    index = np.arange(1000, 1000 + n)
    x0 = np.random.default_rng(0).uniform(-1, 1, (n,) + shape).astype(np.float32)
    t = np.random.default_rng(1).integers(0, 1000, n)
    eps = rng.normal(7, rng.Stream.TRAIN_NOISE, index, 123, shape)
    np.testing.assert_array_equal(kb.to_host(noise.random_bits(7, 4, index, 123, shape)),
                                  rng.random_bits(7, 4, index, 123, shape))
    np.testing.assert_allclose(kb.to_host(noise.normal(7, 4, index, 123, shape)), eps, rtol=0, atol=1e-6)
    for prediction in ("epsilon", "v"):
        xt, target = noise.q_sample_target(sched, kb.to_device(x0), t, 7, index, 123, prediction)
        np.testing.assert_allclose(kb.to_host(xt), diffusion.q_sample(sched, x0, t, eps), rtol=1e-6, atol=2e-6)
        np.testing.assert_allclose(kb.to_host(target),
                                   diffusion.training_target(sched, x0, t, eps, prediction), rtol=1e-6, atol=2e-6)


@pytest.mark.skipif(not FULL, reason="full-size shapes run on a real GPU only (DDPM_KERNELS_FULL=1)")
def test_full_size_normal_v2_many_words():
    # 4M Box-Muller pairs through the real libdevice logf / fsqrt_rn / sincospif (and ~2300 through
    # the float64 tail): the contract's 1e-6 everywhere (rng.py derives <= 9.5e-7), v1 as well.
    idx = np.arange(1024)
    ref = rng.normal(9, 4, idx, 3, (8192,))
    for version in VERSIONS:
        z = kb.to_host(getattr(noise, f"normal_{version}")(9, 4, idx, 3, (8192,)))
        err = float(np.abs(z - ref).max())
        assert err <= 1e-6, (version, err)


@pytest.mark.skipif(not kb.is_simulator(), reason="a fix to Numba's CUDA simulator")
def test_simulator_shared_array_is_one_array_per_block_and_line():
    """Every thread of a block gets the same shared array from one ``cuda.shared.array`` line, and
    distinct lines get distinct arrays, even when the threads reach it together with a tiny GIL
    switch interval. Unpatched, ~20% of these 64-thread trials hand out more than one array (the
    v2 kernels then read uninitialised memory: CI failed once this way), so 30 trials all but
    always catch a regression."""
    import sys
    import threading
    from numba.cuda.simulator import kernelapi

    def trial(n=64):
        shared = kernelapi.FakeCUDAShared(0)
        got = [None] * n
        barrier = threading.Barrier(n)

        def run(i):
            barrier.wait()
            a = shared.array(8, np.float32)
            b = shared.array(4, np.float64)
            got[i] = (a, b)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return got

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        results = [trial() for _ in range(30)]
    finally:
        sys.setswitchinterval(old)
    for got in results:
        assert len({id(a) for a, _ in got}) == 1
        assert len({id(b) for _, b in got}) == 1
        a, b = got[0]
        assert a is not b and a.shape == (8,) and a.dtype == np.float32 and b.dtype == np.float64
