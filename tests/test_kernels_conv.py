"""ddpm_ref.kernels.conv (implicit-GEMM convolution) against ddpm_ref.ops.conv, forward and backward.

Shapes are drawn by hypothesis and are not multiples of the 64 x 64 x 8 tile (odd sizes, 1x1 and
3x3 kernels, stride 2 with the downsampler's (0, 1, 0, 1) padding, single-element batches), so the
bounds checks of every gather are exercised. The simulator runs them at tiny sizes; a real GPU also
runs the CIFAR preset's channel counts (DDPM_KERNELS_FULL=1).

Tolerance table: the reference runs in float64 on the same float32 inputs; the kernels accumulate K
products in float32 (K = C kh kw for y, O kh kw for dx, N P Q for dw, in a different order from
BLAS, plus FMA contraction on a GPU). The float32 rounding error of such a sum is bounded by about
K * 6e-8 * sum |terms|; with standard-normal data the terms are O(1), so we allow
atol = 2e-7 * K * max(1, max|ref|) and rtol 1e-5.
"""
import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("numba_cuda", reason="the GPU kernel tests need numba-cuda (the `test` extra)")

from ddpm_ref.kernels import runtime as kb  # noqa: E402

try:
    kb.require_gpu()
except kb.GPUUnavailableError as exc:
    pytest.skip(f"no GPU and the simulator is off in this process: {exc}", allow_module_level=True)

from ddpm_ref.kernels import conv  # noqa: E402
from ddpm_ref.ops import conv as ref  # noqa: E402

SIM = kb.is_simulator()
FULL = os.environ.get("DDPM_KERNELS_FULL", "0") == "1" and not SIM


@pytest.fixture(autouse=True, scope="module")
def _fast_simulator_barriers():
    old = sys.getswitchinterval()   # cheaper simulated syncthreads() (see test_kernels_norm.py)
    if SIM:
        sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def _close(got, want, k, what):
    want = np.asarray(want)
    atol = 2e-7 * k * max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(kb.to_host(got), want, rtol=1e-5, atol=atol, err_msg=what)


def _check(n, c, h, w_, o, k, stride, padding, bias, fuse, seed, version=""):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, c, h, w_)).astype(np.float32)
    w = r.normal(size=(o, c, k, k)).astype(np.float32)
    b = r.normal(size=o).astype(np.float32) if bias else None
    y_ref, cache_ref = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64),
                                          None if b is None else b.astype(np.float64), stride, padding)
    temb = residual = None
    want = y_ref.copy()
    if fuse:
        temb = r.normal(size=(n, o)).astype(np.float32)
        residual = r.normal(size=y_ref.shape).astype(np.float32)
        want = want + temb[:, :, None, None] + residual
    fwd = getattr(conv, f"conv2d_forward{'_' + version if version else ''}")
    bwd = getattr(conv, f"conv2d_backward{'_' + version if version else ''}")
    y, cache = fwd(kb.to_device(x), kb.to_device(w), None if b is None else kb.to_device(b),
                                   stride, padding, temb=None if temb is None else kb.to_device(temb),
                                   residual=None if residual is None else kb.to_device(residual))
    assert tuple(y.shape) == y_ref.shape
    _close(y, want, c * k * k, "y")
    dy = r.normal(size=y_ref.shape).astype(np.float32)
    dx, dw, db = bwd(kb.to_device(dy), cache)
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(dy.astype(np.float64), cache_ref)
    _close(dx, dx_ref, o * k * k, "dx")
    _close(dw, dw_ref, n * y_ref.shape[2] * y_ref.shape[3], "dw")
    if bias:
        _close(db, db_ref, n * y_ref.shape[2] * y_ref.shape[3], "db")
    else:
        assert db is None and db_ref is None


@settings(max_examples=4)
@given(n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(2, 6), w_=st.integers(2, 6),
       o=st.integers(1, 5), k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from([0, 1, (0, 1, 0, 1), (1, 0, 2, 1)]), bias=st.booleans(),
       fuse=st.booleans(), seed=st.integers(0, 1000), version=st.sampled_from(["", "v1"]))
def test_conv_matches_reference(n, c, h, w_, o, k, stride, padding, bias, fuse, seed, version):
    pads = (padding,) * 4 if isinstance(padding, int) else padding
    if h + pads[0] + pads[1] < k or w_ + pads[2] + pads[3] < k:
        return  # the kernel does not fit; covered by test_conv_errors
    _check(n, c, h, w_, o, k, stride, padding, bias, fuse, seed, version)


def test_conv_downsampler_and_more_than_one_tile():
    # The DDPM downsampler (3x3, stride 2, pad (0, 1, 0, 1)), and output channel counts above one
    # row tile (66 = 64 + 2 for v1's 64-row tiles).
    _check(1, 2, 5, 5, 3, 3, 2, (0, 1, 0, 1), True, False, 1, "v1")
    _check(1, 1, 2, 2, 66, 1, 1, 0, True, True, 2, "v1")
    # v2 is the same kernel text with larger constant tiles (one factory builds both), so v1's
    # hypothesis cases cover the index logic; this case checks v2's gather passes, partial tiles and
    # K > BK (a 3x3 kernel: 9 and 27 reduction terms) at the smallest cost in the simulator.
    _check(1, 1, 2, 1, 3, 3, 1, 1, True, True, 3, "v2")


def test_conv_errors():
    x = kb.to_device(np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="input channels"):
        conv.conv2d_forward(x, kb.to_device(np.zeros((3, 1, 3, 3), np.float32)))
    with pytest.raises(ValueError, match="float32"):
        conv.conv2d_forward(kb.to_device(np.zeros((1, 2, 4, 4))), kb.to_device(np.zeros((3, 2, 3, 3))))
    with pytest.raises(ValueError, match="padding"):
        conv.conv2d_forward(x, kb.to_device(np.zeros((3, 2, 3, 3), np.float32)), padding=(1, 2, 3))
    with pytest.raises(ValueError, match="does not fit"):
        conv.conv2d_forward(x, kb.to_device(np.zeros((3, 2, 7, 7), np.float32)), padding=0)
    with pytest.raises(ValueError, match="temb"):
        conv.conv2d_forward(x, kb.to_device(np.zeros((3, 2, 3, 3), np.float32)),
                            temb=kb.to_device(np.zeros((1, 4), np.float32)))


@pytest.mark.skipif(not FULL, reason="full-size shapes run on a real GPU only (DDPM_KERNELS_FULL=1)")
@pytest.mark.parametrize("c,o,hw,stride,padding", [(128, 128, 32, 1, 1), (256, 256, 8, 1, 1),
                                                   (128, 128, 32, 2, (0, 1, 0, 1)), (3, 128, 32, 1, 1),
                                                   (256, 128, 16, 1, 1)])
@pytest.mark.parametrize("version", ["", "v1", "v2"])
def test_conv_full_size(c, o, hw, stride, padding, version):
    _check(4, c, hw, hw, o, 3, stride, padding, True, True, 0, version)
