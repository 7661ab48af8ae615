"""Tests for ddpm_ref/ops/activation.py: SiLU and the counter-RNG dropout."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gradcheck import check_op
from ddpm_ref import rng as ddpm_rng
from ddpm_ref.ops.activation import (dropout_backward, dropout_forward, dropout_mask, silu_backward,
                                     silu_forward)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_silu_gradients(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape) * 4
    # float64 centred differences: 1e-6 relative is a wide margin (see gradcheck.py).
    check_op(silu_forward, silu_backward, [x], (0,), rtol=1e-6)


def test_silu_matches_torch_and_extremes():
    torch = pytest.importorskip("torch", reason="torch is the optional outside oracle (extra: test)")
    x = np.array([-1e4, -100.0, -20.0, -1.0, 0.0, 0.5, 3.0, 100.0, 1e4], dtype=np.float32)
    with np.errstate(invalid="raise", divide="raise"):   # no NaN, no division by zero
        y, cache = silu_forward(x)
        dx = silu_backward(np.ones_like(x), cache)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.silu(xt)
    yt.sum().backward()
    # float32 element-wise maths: a few ulps; 1e-6 relative + 1e-30 absolute for the underflow tails.
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert y.dtype == dx.dtype == np.float32


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), p=st.sampled_from([0.1, 0.5]),
       seed=st.integers(0, 2**16))
@settings(max_examples=8)
def test_dropout_gradients(shape, p, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    index = np.arange(shape[0]) + 3
    f = lambda x: dropout_forward(x, p, seed=seed, index=index, step=2, layer=1)
    # Dropout is linear in x for a fixed mask: exact up to rounding, 1e-6 is a wide margin.
    check_op(f, dropout_backward, [x], (0,), rtol=1e-6)


def test_dropout_mask_contract():
    x = np.ones((4, 3, 5, 5), dtype=np.float32)
    idx = np.array([10, 11, 12, 13])
    y, _ = dropout_forward(x, 0.25, seed=5, index=idx, step=7, layer=2)
    u = ddpm_rng.uniform(5, ddpm_rng.Stream.DROPOUT, idx, 7, (3, 5, 5), sub=2)
    # The contract: keep where u >= p, kept values scaled by 1/(1-p); 1/0.75 is not exact in
    # float32, so the expectation uses the same float32 rounding and the comparison is exact.
    expected = np.where(u >= np.float32(0.25), np.float32(1 / 0.75), np.float32(0))
    np.testing.assert_array_equal(y, expected)
    assert y.dtype == np.float32


@given(p=st.one_of(st.floats(0.0, 0.999999), st.sampled_from([0.1, 0.5, 2.0 ** -24, 3 * 2.0 ** -24,
                                                            1 - 2.0 ** -24, 0.99999999])),
       seed=st.integers(0, 2**16))
@settings(max_examples=25)
def test_dropout_mask_equals_uniform_comparison(p, seed):
    """The integer-threshold mask is exactly ``rng.uniform(...) >= p`` for any p, including p
    values whose float32 threshold falls on odd or even multiples of 2^-24."""
    idx = np.array([0, 7, 2**31 + 5])
    u = ddpm_rng.uniform(seed, ddpm_rng.Stream.DROPOUT, idx, 11, (5, 64), sub=3)
    mask = dropout_mask((3, 5, 64), p, seed, idx, 11, 3)
    np.testing.assert_array_equal(mask, u >= np.float32(p))


def test_dropout_reproducible_and_independent_of_batch_order():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 4, 4)).astype(np.float32)
    idx = np.array([3, 1, 4, 15, 9, 2])
    y, _ = dropout_forward(x, 0.3, seed=1, index=idx, step=5, layer=0)
    y2, _ = dropout_forward(x, 0.3, seed=1, index=idx, step=5, layer=0)
    np.testing.assert_array_equal(y, y2)                      # same address -> same mask, bit for bit
    perm = np.array([5, 0, 3, 1, 4, 2])
    yp, _ = dropout_forward(x[perm], 0.3, seed=1, index=idx[perm], step=5, layer=0)
    np.testing.assert_array_equal(yp, y[perm])                 # reordering the batch reorders masks
    y_one, _ = dropout_forward(x[2:3], 0.3, seed=1, index=idx[2:3], step=5, layer=0)
    np.testing.assert_array_equal(y_one, y[2:3])               # batch of one: the same mask
    for kw in ({"seed": 2}, {"step": 6}, {"layer": 1}):        # any other address: another mask
        args = dict(seed=1, step=5, layer=0)
        args.update(kw)
        other, _ = dropout_forward(x, 0.3, index=idx, **args)
        assert not np.array_equal(other != 0, y != 0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p):
    n = 200_000
    x = np.ones((4, n // 4), dtype=np.float32)
    y, _ = dropout_forward(x, p, seed=3, index=np.arange(4), step=0, layer=0)
    kept = np.mean(y != 0)
    # Binomial: std of the kept fraction is sqrt(p(1-p)/n) <= 1.2e-3; 5 sigma bound.
    assert abs(kept - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    # Inverted dropout preserves the mean: E[y] = 1 (same 5-sigma bound scaled by 1/(1-p)).
    assert abs(y.mean() - 1.0) < 5 * np.sqrt(p * (1 - p) / n) / (1 - p)


def test_dropout_identity_cases():
    x = np.arange(6.0).reshape(2, 3)
    for kwargs in ({"p": 0.0}, {"p": 0.5, "train": False}):
        y, cache = dropout_forward(x, seed=0, index=np.arange(2), step=0, layer=0, **kwargs)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(dropout_backward(np.ones_like(x), cache), np.ones_like(x))


def test_dropout_errors():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="1.0"):
        dropout_forward(x, 1.0, 0, np.arange(2), 0, 0)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        dropout_forward(x, 0.1, 0, np.arange(3), 0, 0)
    with pytest.raises(ValueError, match="int64"):
        dropout_forward(np.zeros((2, 3), dtype=np.int64), 0.1, 0, np.arange(2), 0, 0)
    with pytest.raises(ValueError, match="int64"):
        silu_forward(np.zeros(3, dtype=np.int64))
