"""ddpm_ref.kernels.norm (GroupNorm, GroupNorm+SiLU fused) against ddpm_ref.ops.norm, fwd and bwd.

Tolerance table (reference in float64 on the same float32 inputs):
- y: rtol 1e-5, atol 2e-6. Statistics are float64 sums in the kernel, so the error is the float32
  rounding of xhat, gamma xhat + beta and the sigmoid (a few ulps of O(1) values).
- dx: atol 1e-5 * max(1, max|ref|). dx = r (dxhat - mean - xhat mean2) cancels terms of size
  |dxhat|; float32 rounding of each term (~6e-8 relative) times r (up to ~3 for our data) times a
  few terms.
- dgamma, dbeta: sums over N*S float32 terms (float64 accumulation, float32 products): atol
  1e-6 * N * S * max(1, max|ref|).
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_setup import kb, FULL, fast_simulator_barriers  # noqa: E402,F401  (GPU or simulator; skips without numba-cuda)

from ddpm_ref.kernels import norm  # noqa: E402
from ddpm_ref.ops import norm as ref  # noqa: E402


def _check(shape, groups, silu, eps, seed, version=2):
    r = np.random.default_rng(seed)
    x = (r.normal(size=shape) * 2 + 0.5).astype(np.float32)
    c = shape[1]
    gamma = r.normal(size=c).astype(np.float32)
    beta = r.normal(size=c).astype(np.float32)
    dy = r.normal(size=shape).astype(np.float32)
    f, b = (norm.group_norm_silu_forward, norm.group_norm_silu_backward) if silu else \
        (norm.group_norm_forward, norm.group_norm_backward)
    if version == 1:
        f = norm.group_norm_silu_forward_v1 if silu else norm.group_norm_forward_v1
    fr, br = (ref.group_norm_silu_forward, ref.group_norm_silu_backward) if silu else \
        (ref.group_norm_forward, ref.group_norm_backward)
    y, cache = f(kb.to_device(x), kb.to_device(gamma), kb.to_device(beta), groups, eps)
    y_ref, cache_ref = fr(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), groups, eps)
    np.testing.assert_allclose(kb.to_host(y), y_ref, rtol=1e-5, atol=2e-6)
    dx, dg, db = b(kb.to_device(dy), cache)
    dx_ref, dg_ref, db_ref = br(dy.astype(np.float64), cache_ref)
    np.testing.assert_allclose(kb.to_host(dx), dx_ref, rtol=1e-5, atol=1e-5 * max(1, np.abs(dx_ref).max()))
    ns = shape[0] * int(np.prod(shape[2:]))
    for got, want in ((dg, dg_ref), (db, db_ref)):
        np.testing.assert_allclose(kb.to_host(got), want, rtol=1e-5, atol=1e-6 * ns * max(1, np.abs(want).max()))


@settings(max_examples=6)
@given(n=st.integers(1, 2), groups=st.integers(1, 3), cg=st.integers(1, 3),
       spatial=st.sampled_from([(3, 3), (1, 5), (2,), (4, 1)]), silu=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-6]), seed=st.integers(0, 1000))
def test_group_norm_matches_reference(n, groups, cg, spatial, silu, eps, seed):
    _check((n, groups * cg) + spatial, groups, silu, eps, seed)


# Version 2's channel-major mapping at the simulator's 32 threads: (shape, groups) that give one
# channel per block with four-deep loads and a tail (cg 1, 144 positions); rounds of channels (cg 40 >
# 32 threads, the second round partial); runs of a non-power-of-two length (cg 3: 10 lanes each, 2
# threads idle) with fewer positions than lanes and with both loops; an odd spatial size.
@pytest.mark.parametrize("shape,groups", [((2, 6, 12, 12), 6), ((1, 40, 3, 3), 1), ((2, 9, 5, 5), 3),
                                          ((1, 3, 8, 8), 1), ((1, 6, 2, 1), 2), ((1, 4, 7, 9), 2)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_v2_mapping_edges(shape, groups, silu):
    _check(shape, groups, silu, 1e-5, 3)


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_v1_still_matches(silu):
    _check((2, 6, 3, 3), 3, silu, 1e-5, 4, version=1)


def test_group_norm_launch_sizes():
    """Version 2's block size: about 16 values per thread, a power of two from 32 to 128."""
    if kb.is_simulator():
        assert norm._launch(100, 4096) == (2, 32)
        return
    assert norm._launch(4096, 4096) == (4096, 128)
    assert norm._launch(4096, 12288) == (4096, 128)
    assert norm._launch(4096, 1024) == (4096, 64)
    assert norm._launch(4096, 64) == (4096, 32)
    assert norm._launch(10, None) == (10, 256)


def test_group_norm_errors():
    x = kb.to_device(np.zeros((1, 4, 2, 2), np.float32))
    g = kb.to_device(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="groups must divide the 4 channels"):
        norm.group_norm_forward(x, g, g, 3)
    with pytest.raises(ValueError, match="groups must be an integer, got 2.0"):    # as the reference
        norm.group_norm_forward(x, g, g, 2.0)
    with pytest.raises(ValueError, match="gamma"):
        norm.group_norm_forward(x, kb.to_device(np.ones(3, np.float32)), g, 2)
    _, cache = norm.group_norm_forward(x, g, g, 2)
    with pytest.raises(ValueError, match="other group-norm variant"):
        norm.group_norm_silu_backward(x, cache)


@pytest.mark.skipif(not FULL, reason="full-size shapes run on a real GPU only (DDPM_KERNELS_FULL=1)")
@pytest.mark.parametrize("c,hw", [(128, 32), (384, 32), (256, 16), (256, 4)])
def test_group_norm_full_size(c, hw):
    _check((8, c, hw, hw), 32, True, 1e-6, 0)
