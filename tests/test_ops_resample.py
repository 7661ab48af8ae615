"""Tests for ddpm_ref/ops/resample.py: upsampling, average pooling, concatenation."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gradcheck import check_op
from ddpm_ref.ops.resample import (avg_pool2d_backward, avg_pool2d_forward, concat_backward, concat_forward,
                                   upsample_nearest2x_backward, upsample_nearest2x_forward)

shapes4 = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))


@given(shape=shapes4, seed=st.integers(0, 2**16))
def test_upsample_gradients_and_values(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    # Linear op, float64: finite differences exact to rounding; 1e-6 is a wide margin.
    check_op(upsample_nearest2x_forward, upsample_nearest2x_backward, [x], (0,), rtol=1e-6)
    y, _ = upsample_nearest2x_forward(x)
    # Oracle: np.repeat along both spatial axes (copies, so exact equality).
    np.testing.assert_array_equal(y, np.repeat(np.repeat(x, 2, axis=2), 2, axis=3))


@given(shape=shapes4, k=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_avg_pool_gradients_and_values(shape, k, seed):
    N, C, H, W = shape
    x = np.random.default_rng(seed).standard_normal((N, C, H * k, W * k))
    check_op(lambda x: avg_pool2d_forward(x, k), avg_pool2d_backward, [x], (0,), rtol=1e-6)
    y, _ = avg_pool2d_forward(x, k)
    # Oracle: explicit loop over output pixels; k*k-term means agree to ~1e-16, 1e-13 is slack.
    ref = np.zeros((N, C, H, W))
    for h in range(H):
        for w in range(W):
            ref[:, :, h, w] = x[:, :, h * k:(h + 1) * k, w * k:(w + 1) * k].mean(axis=(2, 3))
    np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-13)


def test_resample_match_torch_float32():
    torch = pytest.importorskip("torch", reason="torch is the optional outside oracle (extra: test)")
    F = torch.nn.functional
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 4)).astype(np.float32)
    up, _ = upsample_nearest2x_forward(x)
    np.testing.assert_array_equal(up, F.interpolate(torch.tensor(x), scale_factor=2.0, mode="nearest").numpy())
    pool, _ = avg_pool2d_forward(x, 2)
    # 4-term float32 means: one or two ulps of difference in summation order.
    np.testing.assert_allclose(pool, F.avg_pool2d(torch.tensor(x), 2).numpy(), rtol=1e-6, atol=1e-6)
    assert up.dtype == pool.dtype == np.float32


@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3), axis=st.sampled_from([1, -1, 0]),
       seed=st.integers(0, 2**16))
def test_concat_gradients_and_values(sizes, axis, seed):
    rng = np.random.default_rng(seed)
    base = [2, 3, 4]
    xs = []
    for s in sizes:
        shape = list(base)
        shape[axis] = s
        xs.append(rng.standard_normal(shape))
    fwd = lambda *xs: concat_forward(list(xs), axis=axis)
    check_op(fwd, concat_backward, xs, tuple(range(len(xs))), rtol=1e-6)
    y, cache = concat_forward(xs, axis=axis)
    np.testing.assert_array_equal(y, np.concatenate(xs, axis=axis))
    for part, x in zip(concat_backward(y, cache), xs):
        np.testing.assert_array_equal(part, x)   # the backward of y returns each input exactly


def test_resample_errors():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        upsample_nearest2x_forward(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\(5, 4\).*k=2"):
        avg_pool2d_forward(np.zeros((1, 1, 5, 4)), 2)
    with pytest.raises(ValueError, match="int64"):
        avg_pool2d_forward(np.zeros((1, 1, 4, 4), dtype=np.int64))
    for bad in (1.5, 2.9, "2"):                          # 2.9 used to pool by 2
        with pytest.raises(ValueError, match="k must be an integer"):
            avg_pool2d_forward(np.zeros((1, 1, 4, 4)), bad)
    with pytest.raises(ValueError, match=r"\(1, 2, 5\)"):
        concat_forward([np.zeros((1, 2, 4)), np.zeros((1, 2, 5))], axis=1)
    with pytest.raises(ValueError, match="empty"):
        concat_forward([])
    _, cache = upsample_nearest2x_forward(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 5\)"):
        upsample_nearest2x_backward(np.zeros((1, 1, 4, 5)), cache)
