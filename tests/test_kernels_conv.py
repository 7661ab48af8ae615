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
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_setup import kb, FULL, fast_simulator_barriers  # noqa: E402,F401  (GPU or simulator; skips without numba-cuda)

from ddpm_ref.kernels import conv  # noqa: E402
from ddpm_ref.ops import conv as ref  # noqa: E402


def _close(got, want, k, what):
    want = np.asarray(want)
    atol = 2e-7 * k * max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(kb.to_host(got), want, rtol=1e-5, atol=atol, err_msg=what)


# A tiny tile configuration built by the same factory as v1 and v2 (16 x 16 tiles on 4 x 4 threads,
# K steps of 4): in the simulator it covers many row, column and K tiles at a sixteenth of the cost.
TINY = conv._tiled_kernels("tiny", 16, 16, 4, tx=4, ty=4, register=False)
TINY3 = conv._tiled_kernels_v3("tiny3", 16, 16, 4, tx=4, ty=4, register=False)   # version 3, same sizes


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
    if version in ("tiny", "tiny3", "V3", "V3L"):
        tiles = {"tiny": TINY, "tiny3": TINY3, "V3": conv.V3, "V3L": conv.V3L}[version]
        fwd = lambda x, w, b, s, p, temb, residual: conv._forward(tiles, x, w, b, s, p, temb, residual)  # noqa: E731
        bwd = lambda dy, cache: conv._backward(tiles, tiles, dy, cache, True)  # noqa: E731
    else:
        fwd = getattr(conv, f"conv2d_forward{'_' + version if version else ''}")
        bwd = getattr(conv, f"conv2d_backward{'_' + version if version else ''}")
    y, cache = fwd(kb.to_device(x), kb.to_device(w), None if b is None else kb.to_device(b), stride, padding,
                   temb=None if temb is None else kb.to_device(temb),
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


@settings(max_examples=8)
@given(n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(2, 6), w_=st.integers(2, 7),
       o=st.integers(1, 20), k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from([0, 1, (0, 1, 0, 1), (1, 0, 2, 1)]), bias=st.booleans(),
       fuse=st.booleans(), seed=st.integers(0, 1000))
def test_conv_matches_reference(n, c, h, w_, o, k, stride, padding, bias, fuse, seed):
    # The tiny tiles: up to 2 row tiles (o <= 20), several column tiles (N P Q up to 98) and K
    # tiles (C kh kw up to 27 in steps of 4), partial tiles everywhere, split-K for dw.
    pads = (padding,) * 4 if isinstance(padding, int) else padding
    if h + pads[0] + pads[1] < k or w_ + pads[2] + pads[3] < k:
        return  # the kernel does not fit; covered by test_conv_errors
    _check(n, c, h, w_, o, k, stride, padding, bias, fuse, seed, "tiny")


@settings(max_examples=6)
@given(n=st.integers(1, 2), c=st.integers(1, 9), h=st.integers(2, 6), w_=st.integers(2, 7),
       o=st.integers(1, 20), k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from([0, 1, (0, 1, 0, 1), (1, 0, 2, 1)]), bias=st.booleans(),
       fuse=st.booleans(), seed=st.integers(0, 1000))
def test_conv_v3_matches_reference(n, c, h, w_, o, k, stride, padding, bias, fuse, seed):
    # Version 3 on the tiny tiles (K steps of 4 channels per kernel offset, so c up to 9 covers
    # partial channel steps; o up to 20 partial output-channel steps of dx; dw's split-K slices of
    # N P Q rows advance their (n, p, q) by carries across rows and samples).
    pads = (padding,) * 4 if isinstance(padding, int) else padding
    if h + pads[0] + pads[1] < k or w_ + pads[2] + pads[3] < k:
        return
    _check(n, c, h, w_, o, k, stride, padding, bias, fuse, seed, "tiny3")


@pytest.mark.parametrize("version", ["v1", "v2", "v3", "V3", "V3L"])   # v3 picks V3S here; V3 / V3L force 128 x 128 / 256 x 128
def test_conv_production_tiles(version):
    # The production configurations (256 threads per block) once each, on the DDPM downsampler
    # (3x3, stride 2, pad (0, 1, 0, 1)) with a fused epilogue: v1 and v2 come from the same factory
    # as the tiny tiles, so this checks their constants (gather passes, partial tiles, K > BK).
    # V3 (version 3's 128 x 128 tiles, forced) on a 1x1 convolution: its 3x3 logic is the code
    # V3S ("v3" here) and the tiny version-3 tiles run, and one K step keeps the simulator quick.
    if version in ("V3", "V3L"):
        _check(1, 2, 3, 4, 3, 1, 1, 0, True, True, 1, version)
    else:
        _check(1, 2, 3, 4, 3, 3, 2, (0, 1, 0, 1), True, True, 1, version)


# The variants of version 3 (the plain strided loop; the blocked mapping, plain and unrolled by four):
# same FMAs in the same order, so bit-identical outputs; the autotuner relies on it. Tiles of 16 x 16
# on 4 x 4 threads: 4 x 4 outputs per thread, one run of four each way in the blocked mapping.
PAIR3 = conv._tiled_variants_v3("pair3", 16, 16, 4, tx=4, ty=4, register=False)
# ... and 64 x 32 tiles on 4 x 8 threads: 8 x 8 outputs per thread, two runs of four each way, so the
# blocked mapping's run offset (4 TY, 4 TX) is exercised too.
PAIR3W = conv._tiled_variants_v3("pair3w", 64, 32, 4, tx=4, ty=8, register=False)


def _run_all(tiles, x, w, b, dy, stride, padding, temb=None, residual=None):
    y, cache = conv._forward(tiles, x, w, b, stride, padding, temb, residual)
    dx, dw, db = conv._backward(tiles, tiles, dy, cache, True)
    return [kb.to_host(a) for a in (y, dx, dw, db)]


@pytest.mark.parametrize("k,stride,padding,family", [(3, 1, 1, "pair3"), (3, 2, (0, 1, 0, 1), "pair3"),
                                                     (1, 1, 0, "pair3"), (1, 1, 0, "pair3w")])
def test_conv_variants_bit_identical(k, stride, padding, family):
    # One image (42 output columns: three column tiles of 16, two of 32), to keep the simulator quick;
    # the wide family's mapping does not depend on the kernel size, so it runs the 1x1 case only.
    tiles = {"pair3": PAIR3, "pair3w": PAIR3W}[family]
    r = np.random.default_rng(7)
    xh = r.normal(size=(1, 9, 7, 6)).astype(np.float32)                   # C 9: three K steps of 4
    wh = r.normal(size=(18, 9, k, k)).astype(np.float32)                  # O 18: two row tiles of 16
    bh = r.normal(size=18).astype(np.float32)
    x, w, b = kb.to_device(xh), kb.to_device(wh), kb.to_device(bh)
    y_ref, _ = ref.conv2d_forward(xh.astype(np.float64), wh.astype(np.float64), bh.astype(np.float64),
                                  stride, padding)
    # The forward's whole epilogue (bias, temb, residual), whose two loops follow the mapping too.
    temb_h = r.normal(size=y_ref.shape[:2]).astype(np.float32)
    res_h = r.normal(size=y_ref.shape).astype(np.float32)
    temb, residual = kb.to_device(temb_h), kb.to_device(res_h)
    dy = kb.to_device(r.normal(size=y_ref.shape).astype(np.float32))
    assert [t.label for t in tiles.variants] == ["plain", "plain blocked", "unrolled blocked"]
    want = _run_all(tiles, x, w, b, dy, stride, padding, temb, residual)
    _close(want[0], y_ref + temb_h[:, :, None, None] + res_h, 9 * k * k,
           f"{family} y")                                                  # the first variant is right ...
    for other in tiles.variants[1:]:                                       # ... and the others equal it
        for got, ref_ in zip(_run_all(other, x, w, b, dy, stride, padding, temb, residual), want):
            np.testing.assert_array_equal(got, ref_)


def test_loop_variants_need_bk_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        conv._tiled_kernels_v3("bad", 16, 16, 2, tx=4, ty=4, register=False)
    with pytest.raises(ValueError, match="loop must be"):
        conv._tiled_kernels_v3("bad", 16, 16, 4, tx=4, ty=4, register=False, loop="pipelined")
    with pytest.raises(ValueError, match="mapping must be"):
        conv._tiled_kernels_v3("bad", 16, 16, 4, tx=4, ty=4, register=False, mapping="diagonal")
    with pytest.raises(ValueError, match=r"runs of 4 outputs: 2 x 4 per thread"):     # 8 x 16 tile, 4 x 4 threads
        conv._tiled_kernels_v3("bad", 8, 16, 4, tx=4, ty=4, register=False, mapping="blocked")


def test_autotuner_keeps_the_faster_loop(monkeypatch):
    monkeypatch.setattr(kb, "_TUNED", {})
    r = np.random.default_rng(8)
    x = r.normal(size=(1, 5, 4, 4)).astype(np.float32)
    w = r.normal(size=(6, 5, 3, 3)).astype(np.float32)
    want, _ = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), None, 1, 1)
    times = itertools.cycle([2.0, 1.0, 3.0])   # variants timed in order: the plain blocked one "wins"
    timed = []

    def timer(fn):
        fn()
        timed.append(1)
        return next(times)

    real = conv._launch_tuned
    monkeypatch.setattr(conv, "_launch_tuned", lambda kind, tiles, grid, args: real(kind, tiles, grid, args, timer))
    y, _ = conv._forward(PAIR3, kb.to_device(x), kb.to_device(w), None, 1, 1, None, None)
    _close(y, want, 45, "y after tuning")
    assert len(timed) == 3 and len(kb._TUNED) == 1
    assert next(iter(kb._TUNED.values()))[1] is PAIR3.variants[1]
    assert kb.tuning_report() == {"conv.fwd": {"plain blocked": 1}}
    y2, _ = conv._forward(PAIR3, kb.to_device(x), kb.to_device(w), None, 1, 1, None, None)   # cached: no timing
    assert len(timed) == 3
    np.testing.assert_array_equal(kb.to_host(y2), kb.to_host(y))
    x3 = kb.to_device(r.normal(size=(1, 5, 5, 4)).astype(np.float32))           # a new shape: tuned again
    conv._forward(PAIR3, x3, kb.to_device(w), None, 1, 1, None, None)
    assert len(kb._TUNED) == 2 and len(timed) == 6


def test_tile_choice():
    # The public functions pick v2 for GEMMs with both sides >= 96 and enough 128 x 128 tiles to
    # fill the GPU (always for the split-K weight gradient), else v1.
    assert conv._pick(3, 10**6) is conv.V1 and conv._pick(128, 50) is conv.V1
    assert conv._pick(128, 128 * 1024) is conv.V2 and conv._pick(128, 1152, split=True) is conv.V2
    assert (conv.V1.BM, conv.V1.BN, conv.V2.BM, conv.V2.BN) == (64, 64, 128, 128)
    # version 3 (the public choice): the same rule between V3S and V3, and V3L (256 x 128) for GEMMs
    # of >= 256 rows with >= 8192 columns or split-K (the H200 tile sweep, benchmarks/conv_tiles_gpu.py)
    assert conv._pick(3, 10**6, v3=True) is conv.V3S and conv._pick(128, 50, v3=True) is conv.V3S
    assert conv._pick(128, 128 * 1024, v3=True) is conv.V3 and conv._pick(128, 1152, split=True, v3=True) is conv.V3
    assert conv._pick(256, 8192, v3=True) is conv.V3L and conv._pick(256, 2304, split=True, v3=True) is conv.V3L
    assert conv._pick(256, 4096, v3=True) is not conv.V3L
    assert ((conv.V3.BM, conv.V3.BN, conv.V3.TX, conv.V3.TY), (conv.V3L.BM, conv.V3L.BN)) == \
        ((128, 128, 32, 8), (256, 128))


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
    with pytest.raises(ValueError, match="stride must be an integer, got 1.5"):    # as the reference
        conv.conv2d_forward(x, kb.to_device(np.zeros((3, 2, 3, 3), np.float32)), stride=1.5)
    with pytest.raises(ValueError, match="temb"):
        conv.conv2d_forward(x, kb.to_device(np.zeros((3, 2, 3, 3), np.float32)),
                            temb=kb.to_device(np.zeros((1, 4), np.float32)))


@pytest.mark.skipif(not FULL, reason="full-size shapes run on a real GPU only (DDPM_KERNELS_FULL=1)")
@pytest.mark.parametrize("c,o,hw,stride,padding", [(128, 128, 32, 1, 1), (256, 256, 8, 1, 1),
                                                   (128, 128, 32, 2, (0, 1, 0, 1)), (3, 128, 32, 1, 1),
                                                   (256, 128, 16, 1, 1)])
@pytest.mark.parametrize("version", ["", "v1", "v2", "v3"])
def test_conv_full_size(c, o, hw, stride, padding, version):
    _check(4, c, hw, hw, o, 3, stride, padding, True, True, 0, version)
