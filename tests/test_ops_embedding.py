"""Tests for ddpm_ref/ops/embedding.py: diffusers' timestep embedding, sinusoidal gradients, lookup."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gradcheck import check_op
from ddpm_ref.ops.embedding import (embedding_backward, embedding_forward, sinusoidal_backward,
                                    sinusoidal_forward, timestep_embedding)


@pytest.mark.parametrize("dim,flip,shift", [(128, False, 1), (512, False, 1), (33, False, 1),
                                            (64, True, 0), (32, True, 0.5)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    torch = pytest.importorskip("torch", reason="torch is the optional outside oracle (extra: test)")
    emb_mod = pytest.importorskip("diffusers.models.embeddings", reason="diffusers is the reference")
    for t in (np.arange(1000), np.linspace(0.0, 999.0, 37).astype(np.float32)):
        ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift)
        ref = emb_mod.get_timestep_embedding(torch.tensor(t), dim, flip_sin_to_cos=flip,
                                             downscale_freq_shift=shift).numpy()
        assert ours.dtype == np.float32 and ours.shape == ref.shape == (len(t), dim)
        # Frequencies and arguments are rounded in float32 exactly as diffusers does (bitwise the
        # same); we then take sin/cos of that float32 argument correctly rounded, while torch's
        # float32 sin is off by up to ~3.1e-5 for arguments near 1000 (measured against float64).
        np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-5)
        if dim % 2:
            assert np.all(ours[:, -1] == 0)


def test_timestep_embedding_known_values():
    # t = 0: sin(0) = 0 and cos(0) = 1 exactly; dim 6, shift 1: f = exp(-ln(1e4) k / 2) = 1, 1e-2, 1e-4.
    emb = timestep_embedding(np.array([0, 1]), 6)
    np.testing.assert_array_equal(emb[0], [0, 0, 0, 1, 1, 1])
    expected = np.array([math.sin(1), math.sin(1e-2), math.sin(1e-4), math.cos(1), math.cos(1e-2), math.cos(1e-4)])
    # float32 frequencies (relative error 6e-8) and one rounding of each feature: 1e-7 absolute.
    np.testing.assert_allclose(emb[1], expected, rtol=0, atol=1e-7)


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=2), dim=st.integers(4, 9),
       flip=st.booleans(), scale=st.sampled_from([1.0, 25.0]), seed=st.integers(0, 2**16))
def test_sinusoidal_gradients(shape, dim, flip, scale, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    f = lambda x: sinusoidal_forward(x, dim, flip_sin_to_cos=flip, scale=scale)
    # float64: curvature up to (scale f)^2 = 625 makes the O(eps^2) truncation ~1e-9 of the
    # gradient scale; 1e-6 relative still catches any wrong sign or frequency.
    check_op(f, sinusoidal_backward, [x], (0,), rtol=1e-6)


def test_sinusoidal_matches_timestep_embedding():
    t = np.array([0.0, 3.0, 999.0])
    y, _ = sinusoidal_forward(t, 64)
    # float64 features of the same formula against the float32 diffusers-style embedding: the
    # float32 argument rounding (up to 6e-5 at t = 999) bounds the difference.
    np.testing.assert_allclose(y, timestep_embedding(t, 64), rtol=0, atol=1e-4)
    assert y.dtype == np.float64


@given(num=st.integers(1, 5), dim=st.integers(1, 4), n=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_embedding_lookup_gradients(num, dim, n, seed):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((num, dim))
    ids = rng.integers(0, num, size=n)                     # repeats likely: tests the scatter-add
    f = lambda table: embedding_forward(ids, table)
    check_op(f, embedding_backward, [table], (0,), rtol=1e-6)
    y, cache = embedding_forward(ids, table)
    np.testing.assert_array_equal(y, table[ids])
    dtable = embedding_backward(np.ones((n, dim)), cache)
    # All-ones dy: each row's gradient counts how often it was read (exact integers).
    np.testing.assert_array_equal(dtable[:, 0], np.bincount(ids, minlength=num))


def test_embedding_errors():
    table = np.zeros((3, 2))
    with pytest.raises(ValueError, match="float64"):
        embedding_forward(np.array([0.0, 1.0]), table)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        embedding_forward(np.array([0, 3]), table)
    with pytest.raises(ValueError, match=r"\(2, 2, 1\)"):
        timestep_embedding(np.zeros((2, 2, 1)), 8)
    with pytest.raises(ValueError, match="dim must be an integer, got 5.5"):   # was a width-5 embedding
        timestep_embedding(np.zeros(2), 5.5)
    with pytest.raises(ValueError, match="dim=2"):
        timestep_embedding(np.zeros(2), 2)                 # half - freq_shift = 0: division by zero
    with pytest.raises(ValueError, match="int64"):
        sinusoidal_forward(np.zeros(3, dtype=np.int64), 8)
