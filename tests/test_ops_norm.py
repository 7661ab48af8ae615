"""Tests for ddpm_ref/ops/norm.py: GroupNorm (+ fused SiLU) gradient checks, torch oracle, errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gradcheck import check_op
from ddpm_ref.ops.activation import sigmoid, silu_forward
from ddpm_ref.ops.norm import (group_norm_backward, group_norm_forward, group_norm_silu_backward,
                               group_norm_silu_forward)

OPS = {"gn": (group_norm_forward, group_norm_backward),
       "gn_silu": (group_norm_silu_forward, group_norm_silu_backward)}


@st.composite
def gn_cases(draw):
    G = draw(st.integers(1, 4))
    per = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
    if per * int(np.prod(spatial)) == 1:   # one element per group: variance 0, gradient is 0/undefined
        spatial = spatial + (2,)
    # G == C (one group per channel) when per == 1; G == 1 (one group) when drawn.
    return dict(N=draw(st.integers(1, 3)), G=G, C=G * per, spatial=spatial,
                seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("op", list(OPS))
@given(case=gn_cases())
@settings(max_examples=15)
def test_group_norm_gradients(op, case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["N"], case["C"]) + case["spatial"]) * 2 + 1
    gamma = rng.standard_normal(case["C"])
    beta = rng.standard_normal(case["C"])
    fwd, bwd = OPS[op]
    f = lambda x, gamma, beta: fwd(x, gamma, beta, case["G"], eps=1e-5)
    # float64; normalisation amplifies by 1/std ~ 0.5 here, so 1e-6 relative is still wide.
    check_op(f, bwd, [x, gamma, beta], (0, 1, 2), rtol=1e-6)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 3), 3), ((1, 8, 4, 4), 8), ((3, 4, 7), 1),
                                          ((2, 32, 8, 8), 32)])
def test_group_norm_matches_torch(op, shape, groups):
    torch = pytest.importorskip("torch", reason="torch is the optional outside oracle (extra: test)")
    F = torch.nn.functional
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)   # offset mean: tests the centring
    gamma = rng.standard_normal(shape[1]).astype(np.float32)
    beta = rng.standard_normal(shape[1]).astype(np.float32)
    fwd, bwd = OPS[op]
    y, cache = fwd(x, gamma, beta, groups, eps=1e-6)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dg, db = bwd(dy, cache)
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    yt = F.group_norm(xt, groups, gt, bt, eps=1e-6)
    if op == "gn_silu":
        yt = F.silu(yt)
    yt.backward(torch.tensor(dy))
    # float32: normalised values carry ~1e-6 relative error from the statistics; reductions over up
    # to 128 elements ~1e-5. Tolerances 1e-4 are slack for summation order, not for a wrong formula.
    for ours, ref in ((y, yt.detach()), (dx, xt.grad), (dg, gt.grad), (db, bt.grad)):
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", list(OPS))
@given(case=gn_cases())
@settings(max_examples=10)
def test_group_norm_forward_matches_loop(op, case):
    """Independent oracle without torch: each (sample, group) normalised by its own loop."""
    rng = np.random.default_rng(case["seed"] + 1)
    N, C, G = case["N"], case["C"], case["G"]
    x = rng.standard_normal((N, C) + case["spatial"]) * 3 - 2
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    y, _ = OPS[op][0](x, gamma, beta, G, eps=1e-5)
    ref = np.empty_like(x)
    per = C // G
    for n in range(N):
        for g in range(G):
            slab = x[n, g * per:(g + 1) * per]
            ref[n, g * per:(g + 1) * per] = (slab - slab.mean()) / np.sqrt(slab.var() + 1e-5)
    ref = ref * gamma.reshape((1, C) + (1,) * len(case["spatial"])) + beta.reshape((1, C) + (1,) * len(case["spatial"]))
    if op == "gn_silu":
        ref = ref / (1 + np.exp(-ref))
    # float64, same formula evaluated in another order: ~1e-15; 1e-12 is slack for rounding only.
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_group_norm_statistics_are_stable_in_float32():
    """Large mean, small spread: a one-pass E[x^2] - E[x]^2 in float32 would lose every digit
    (1000^2 * 6e-8 = 0.06 of error against a variance of 0.01)."""
    rng = np.random.default_rng(2)
    x32 = (1000.0 + 0.1 * rng.standard_normal((2, 4, 16, 16))).astype(np.float32)
    y, _ = group_norm_forward(x32, np.ones(4, np.float32), np.zeros(4, np.float32), 2, eps=1e-5)
    x64 = x32.astype(np.float64).reshape(2, 2, -1)     # the same (rounded) inputs, exact statistics
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    # The float32 mean is off by about one ulp of 1000 (6e-5), i.e. 6e-4 of the spread 0.1: the
    # outputs may differ by that much, so 3e-3 absolute; a one-pass variance would be O(1) off.
    np.testing.assert_allclose(y, ref.reshape(y.shape), atol=3e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_silu_equals_the_pair_bit_for_bit(dtype):
    """The fused op computes -z directly and y = -z / (-1 - exp(-z)): exact negations of
    silu_forward's z / (1 + exp(-z)), so the two must agree exactly, including where exp(-z)
    overflows (z << 0: y = -0) and underflows (z >> 0: y = z)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 8, 5, 4)).astype(dtype)
    gamma = (rng.standard_normal(8) * 300).astype(dtype)      # |z| up to ~1000: both exp limits
    beta = rng.standard_normal(8).astype(dtype)
    y, _ = group_norm_silu_forward(x, gamma, beta, 4, eps=1e-6)
    z, _ = group_norm_forward(x, gamma, beta, 4, eps=1e-6)
    ref, _ = silu_forward(z)
    assert np.any(z < -200) and np.any(z > 200)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_silu_backward_uses_the_cached_denominator_exactly(dtype):
    """The fused backward takes sigmoid(z) = -1 / den from the forward's cached denominator
    den = -(1 + exp(-z)) instead of recomputing exp: the same bits as recomputing the sigmoid and
    running the chain rule through group_norm_backward, including where exp(-z) overflows
    (s = 0) and underflows (s = 1)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 8, 5, 4)).astype(dtype)
    gamma = (rng.standard_normal(8) * 300).astype(dtype)      # |z| up to ~1000: both exp limits
    beta = rng.standard_normal(8).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    _, cache = group_norm_silu_forward(x, gamma, beta, 4, eps=1e-6)
    z, cache_gn = group_norm_forward(x, gamma, beta, 4, eps=1e-6)
    assert np.any(z < -200) and np.any(z > 200)
    with np.errstate(over="ignore"):
        s = sigmoid(z)
    dz = 1 - s                                                # the fused backward's order of operations
    dz *= z
    dz += 1
    dz *= s
    dz *= dy
    for got, want in zip(group_norm_silu_backward(dy, cache), group_norm_backward(dz, cache_gn)):
        np.testing.assert_array_equal(got, want)


def test_group_norm_errors():
    g = np.ones(6)
    with pytest.raises(ValueError, match=r"6 channels.*\(2, 6, 4, 4\).*4 groups"):
        group_norm_forward(np.zeros((2, 6, 4, 4)), g, g, 4)
    with pytest.raises(ValueError, match=r"\(6,\)"):
        group_norm_forward(np.zeros((6,)), g, g, 3)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        group_norm_forward(np.zeros((2, 6, 4)), np.ones(5), g, 3)
    with pytest.raises(ValueError, match="int64"):
        group_norm_silu_forward(np.zeros((2, 6, 4), dtype=np.int64), g, g, 3)
    for bad in (2.5, "3", True):                         # 2.5 used to run as 2 groups
        with pytest.raises(ValueError, match="groups must be an integer"):
            group_norm_forward(np.zeros((2, 6, 4)), g, g, bad)
    _, cache = group_norm_silu_forward(np.zeros((2, 6, 4)), g, g, 3)
    with pytest.raises(ValueError, match=r"\(2, 6, 5\)"):
        group_norm_silu_backward(np.zeros((2, 6, 5)), cache)


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_backward_whatever_the_layout_of_dy(silu):
    """dy may be any view of the right shape: channels-last, Fortran order, transposed, strided.
    (A dy with channels-last memory used to lose two terms of dx: the result followed dy's layout,
    so the (N, G, K) reshape that received the in-place corrections was a copy.)"""
    r = np.random.default_rng(4)
    fwd, bwd = (group_norm_silu_forward, group_norm_silu_backward) if silu else \
        (group_norm_forward, group_norm_backward)
    for shape in ((2, 6, 3, 5), (3, 4, 7)):
        x = r.normal(size=shape)
        g, b = r.normal(size=shape[1]), r.normal(size=shape[1])
        dy = r.normal(size=shape)
        want = bwd(dy, fwd(x, g, b, 2)[1])
        views = [np.asfortranarray(dy), dy[::-1][::-1].copy()[::-1][::-1],
                 np.ascontiguousarray(np.moveaxis(dy, 1, -1)).transpose((0, dy.ndim - 1) + tuple(range(1, dy.ndim - 1)))]
        for view in views:
            got = bwd(view, fwd(x, g, b, 2)[1])
            for a, e in zip(got, want):
                # the same sums, reduced in another order for a strided dy: float64 rounding only
                # (the bug gave errors of order 1)
                np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)
