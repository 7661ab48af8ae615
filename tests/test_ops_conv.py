"""Tests for ddpm_ref/ops/conv.py: gradient checks (float64), a naive-loop oracle, torch, errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gradcheck import check_op
from ddpm_ref.ops import conv as conv_mod
from ddpm_ref.ops.conv import conv2d_backward, conv2d_forward

PATHS = ("shift", "im2col", "dense", "winograd")   # every non-pointwise formulation, forced in turn


def expected_path(path, stride, k=3, pads=(1, 1, 1, 1)):
    """The path a forced conv takes: "shift" and "winograd" need stride 1 and fall back to im2col;
    "winograd" also needs a 3x3 kernel with padding 1 and falls back to shift."""
    if path in ("shift", "winograd") and stride != 1:
        return "im2col"
    if path == "winograd" and (k != 3 or tuple(pads) != (1, 1, 1, 1)):
        return "shift"
    return path


class force_path:
    """Make every padded or strided conv take the named path (restored on exit)."""

    def __init__(self, path):
        assert path in PATHS
        self.path = path

    def __enter__(self):
        self.old = conv_mod._FORCED_PATH
        conv_mod._FORCED_PATH = self.path

    def __exit__(self, *exc):
        conv_mod._FORCED_PATH = self.old


def naive_conv2d(x, w, b, stride, pads):
    """Independent oracle: the defining sum, one output pixel at a time (small shapes only)."""
    pt, pb, pl, pr = pads
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    xp = np.zeros((N, C, H + pt + pb, W + pl + pr))
    xp[:, :, pt:pt + H, pl:pl + W] = x
    Ho = (H + pt + pb - kh) // stride + 1
    Wo = (W + pl + pr - kw) // stride + 1
    y = np.zeros((N, O, Ho, Wo))
    for h in range(Ho):
        for v in range(Wo):
            patch = xp[:, :, stride * h:stride * h + kh, stride * v:stride * v + kw]   # (N, C, kh, kw)
            y[:, :, h, v] = np.einsum("ncij,ocij->no", patch, w)
    if b is not None:
        y += b[None, :, None, None]
    return y


@st.composite
def conv_cases(draw):
    k = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.sampled_from([1, 2]))
    pad = draw(st.one_of(st.integers(0, 2), st.tuples(*[st.integers(0, 2)] * 4)))
    pads = pad if isinstance(pad, tuple) else (pad,) * 4
    H = draw(st.integers(max(1, k - pads[0] - pads[1]), 7))
    W = draw(st.integers(max(1, k - pads[2] - pads[3]), 7))
    return dict(N=draw(st.integers(1, 3)), C=draw(st.integers(1, 4)), O=draw(st.integers(1, 4)),
                H=H, W=W, k=k, stride=stride, pad=pad, pads=pads, bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def make(case, dtype=np.float64):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["N"], case["C"], case["H"], case["W"])).astype(dtype)
    w = rng.standard_normal((case["O"], case["C"], case["k"], case["k"])).astype(dtype)
    b = rng.standard_normal(case["O"]).astype(dtype) if case["bias"] else None
    return x, w, b


@pytest.mark.parametrize("path", list(PATHS))
@given(case=conv_cases())
@settings(max_examples=25)
def test_conv_gradients(path, case):
    x, w, b = make(case)
    with force_path(path):
        fwd = lambda x, w, b: conv2d_forward(x, w, b, stride=case["stride"], padding=case["pad"])
        args, wrt = ([x, w, b], (0, 1, 2)) if b is not None else ([x, w, None], (0, 1, None))
        # float64 centred differences: see gradcheck.py for why 1e-6 relative is a safe margin.
        check_op(fwd, conv2d_backward, args, wrt, rtol=1e-6)


@pytest.mark.parametrize("path", list(PATHS))
@given(case=conv_cases())
@settings(max_examples=25)
def test_conv_forward_matches_naive_loop(path, case):
    x, w, b = make(case)
    with force_path(path):
        y, cache = conv2d_forward(x, w, b, stride=case["stride"], padding=case["pad"])
    if case["k"] == 1 and case["stride"] == 1 and not any(case["pads"]):
        assert cache["path"] == "pointwise"          # unpadded 1x1: GEMMs on NCHW directly
    else:
        assert cache["path"] == expected_path(path, case["stride"], case["k"], case["pads"])
    ref = naive_conv2d(x, w, b, case["stride"], case["pads"])
    # Same sums in a different order, float64: agreement to ~1e-15 relative; 1e-12 leaves margin.
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stack_limit,groups", [(0, 9), (3000, 3), (1 << 40, 1)])
@pytest.mark.parametrize("pad", [1, (0, 2, 1, 0)])
def test_conv_shift_offset_groupings(stack_limit, groups, pad):
    """The shift path's GEMMs over all 9 offsets at once, per kernel row, or one offset at a time
    (chosen by buffer size) give the same convolution and gradients."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 8, 5, 6))      # 8 channels: K = 72 > 64, so the limit decides
    w = rng.standard_normal((4, 8, 3, 3))
    b = rng.standard_normal(4)
    old = conv_mod._STACK_MAX_ELEMENTS
    conv_mod._STACK_MAX_ELEMENTS = stack_limit
    try:
        with force_path("shift"):
            y, cache = conv2d_forward(x, w, b, padding=pad)
            assert cache["path"] == "shift"
            Hs, Ws, base, M, L = conv_mod._shift_layout(5, 6, *y.shape[2:], 3, 3, *cache["padding"], 2)
            assert len(conv_mod._offset_groups(3, 3, 8, M)) == groups
            pads = pad if isinstance(pad, tuple) else (pad,) * 4
            # Naive-loop oracle, float64: 1e-12 (see test_conv_forward_matches_naive_loop).
            np.testing.assert_allclose(y, naive_conv2d(x, w, b, 1, pads), rtol=1e-12, atol=1e-12)
            fwd = lambda x, w, b: conv2d_forward(x, w, b, padding=pad)
            check_op(fwd, conv2d_backward, [x, w, b], (0, 1, 2), rtol=1e-6)
    finally:
        conv_mod._STACK_MAX_ELEMENTS = old


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("C,O,k", [(1, 10, 3), (10, 1, 3), (2, 19, 3), (1, 4, 2), (3, 3, 1)])
def test_conv_gradients_channel_extremes(path, C, O, k):
    """Few input channels (conv_in: stacked-shift forward) and few output channels (conv_out:
    input gradient as one GEMM over shifted copies of dy), and 1x1 kernels, on both paths."""
    rng = np.random.default_rng(C * 100 + O)
    x = rng.standard_normal((2, C, 5, 6))
    w = rng.standard_normal((O, C, k, k))
    b = rng.standard_normal(O)
    with force_path(path):
        y, _ = conv2d_forward(x, w, b, padding=k // 2)
        # Naive-loop oracle, float64: 1e-12 (see test_conv_forward_matches_naive_loop).
        np.testing.assert_allclose(y, naive_conv2d(x, w, b, 1, (k // 2,) * 4), rtol=1e-12, atol=1e-12)
        fwd = lambda x, w, b: conv2d_forward(x, w, b, padding=k // 2)
        check_op(fwd, conv2d_backward, [x, w, b], (0, 1, 2), rtol=1e-6)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape,k,stride,pad", [
    ((2, 5, 9, 8), 3, 1, 1),               # odd sizes, 3x3 same padding
    ((1, 4, 8, 8), 3, 2, (0, 1, 0, 1)),    # the DDPM downsampler: pad right/bottom, stride 2
    ((3, 6, 5, 5), 1, 1, 0),               # 1x1 shortcut (the "pointwise" path)
    ((2, 6, 5, 4), 1, 1, 1),               # padded 1x1 (shift / im2col paths)
    ((2, 3, 7, 6), 3, 2, 1),               # stride 2, symmetric pad
])
def test_conv_matches_torch_float32(path, shape, k, stride, pad):
    torch = pytest.importorskip("torch", reason="torch is the optional outside oracle (extra: test)")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((4, shape[1], k, k)) * 0.3).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    with force_path(path):
        y, cache = conv2d_forward(x, w, b, stride=stride, padding=pad)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx, dw, db = conv2d_backward(dy, cache)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == np.float32
    pads = pad if isinstance(pad, tuple) else (pad,) * 4
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    yt = F.conv2d(F.pad(xt, (pads[2], pads[3], pads[0], pads[1])), wt, bt, stride=stride)
    yt.backward(torch.tensor(dy))
    # float32 sums of at most a few hundred O(1) terms: differences ~1e-6 relative; 1e-4 is slack
    # for a different summation order, far below the O(1) error of any indexing mistake.
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-3)


def test_conv_paths_agree_on_a_large_float32_case():
    """The shift, im2col and dense formulations give the same float32 numbers at a U-Net-like size."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 16, 16, 16)).astype(np.float32)
    w = (rng.standard_normal((8, 16, 3, 3)) * 0.1).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    outs = {}
    for path in PATHS:
        with force_path(path):
            y, cache = conv2d_forward(x, w, b)
            assert cache["path"] == path
            dy = np.cos(y)                          # any fixed dy
            outs[path] = (y,) + conv2d_backward(dy, cache)
    # 144-term float32 dot products (forward, dx) and 512-term sums (dw, db) in different orders:
    # a few ulps of the magnitudes involved; 1e-4 absolute covers it.
    for other in ("im2col", "dense"):
        for a, c in zip(outs["shift"], outs[other]):
            np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (1, 1, 0), (3, 2, (0, 1, 0, 1))])
def test_conv_backward_without_input_grad(path, k, stride, pad):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 6, 6))
    w = rng.standard_normal((4, 3, k, k))
    with force_path(path):
        y, cache = conv2d_forward(x, w, np.zeros(4), stride=stride, padding=pad)
        dy = rng.standard_normal(y.shape)
        dx, dw, db = conv2d_backward(dy, cache)
        none, dw2, db2 = conv2d_backward(dy, cache, input_grad=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)     # the same computation, bit for bit
    np.testing.assert_array_equal(db2, db)


@pytest.mark.parametrize("N,C,H,O,stride,path", [
    (128, 32, 4, 32, 1, "dense"),     # the digits preset's 4x4 level, batch 128
    (128, 16, 8, 1, 1, "dense"),      # its conv_out: one output channel
    (128, 16, 8, 16, 2, "im2col"),    # its downsampler, 8x8 -> 4x4 (dense within 10%: a tie)
    (128, 16, 8, 16, 1, "shift"),     # its 8x8 level: many rows, so no im2col; 16 channels: no winograd
    (8, 256, 4, 256, 1, "im2col"),    # cifar's 4x4 level at batch 8: the dense matrix is too big
    (8, 256, 8, 256, 1, "winograd"),  # cifar's 8x8 level at batch 8 (backward: im2col, 64 rows)
    (64, 64, 8, 64, 1, "winograd"),   # the small preset's 8x8 level at batch 64
    (8, 128, 32, 128, 1, "winograd"), # cifar's 32x32 level
    (8, 128, 32, 128, 2, "im2col"),   # cifar's first downsampler
    (64, 32, 16, 1, 1, "shift"),      # small's conv_out at batch 64: 16x16 is too big for dense
    (64, 1, 16, 32, 1, "im2col"),     # small's conv_in: a tiny column buffer
    (4, 3, 32, 128, 1, "im2col"),     # cifar's conv_in at sampling batch 4
    (16, 32, 8, 64, 1, "winograd"),   # small's 8x8 level at sampling batch 16, 32 channels in
    (16, 64, 8, 64, 1, "winograd"),   # ... with 64 channels in and out
    (16, 128, 8, 64, 1, "winograd"),  # ... its widest 8x8 conv
    (16, 32, 16, 32, 1, "winograd"),  # small's 16x16 level (0.9x shift's time)
    (4, 256, 8, 256, 1, "winograd"),  # cifar's 8x8 level at sampling batch 4
    (4, 512, 16, 256, 1, "winograd"), # cifar's 16x16 level at sampling batch 4
    (8, 256, 16, 256, 1, "winograd"), # ... and at training batch 8 (2048 output pixels)
    (4, 128, 32, 128, 1, "winograd"), # cifar's 32x32 level at sampling batch 4 ...
    (4, 256, 32, 128, 1, "winograd"), # ... its up path
    (8, 256, 32, 128, 1, "winograd"), # ... and at training batch 8
    (16, 32, 64, 32, 1, "shift"),     # 64x64 images: not measured, left to the shift path
    (4, 512, 4, 256, 1, "im2col"),    # cifar's 4x4 level at sampling batch 4
])
def test_conv_path_choice_at_preset_shapes(N, C, H, O, stride, path):
    """The choice the sweep in benchmarks/conv_paths.py measured as fastest (or within ~10% of it)
    at the presets' shapes; pins _choose_path so that a change to it is deliberate."""
    pads = 1 if stride == 1 else (0, 1, 0, 1)
    Ho = conv_mod.conv_output_size(H, 3, stride, *(pads[:2] if stride != 1 else (1, 1)))
    assert conv_mod._choose_path(N, C, O, H, H, Ho, Ho, 3, 3, stride,
                                 (1,) * 4 if stride == 1 else pads) == path


@pytest.mark.parametrize("shape", [(3, 64, 8, 8, 64), (2, 16, 7, 5, 8)])
def test_conv_winograd_float32_accuracy(shape):
    """Winograd's transforms add and subtract up to 4 inputs before and 9 products after the GEMM
    (and G has halves): its float32 error against the float64 sum may be a few times the direct
    paths' but stays at float32 rounding. Both are measured against float64 here; winograd's must
    be under 1e-5 of the output scale (the direct path's is ~1e-6) and within 10x the direct one.
    The odd 7x5 image exercises the cropped last tile row and column."""
    N, C, H, W, O = shape
    rng = np.random.default_rng(13)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = (rng.standard_normal((O, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    ref = conv2d_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))[0]
    errors = {}
    for path in ("winograd", "shift"):
        with force_path(path):
            y, cache = conv2d_forward(x, w, b)
        assert cache["path"] == path and y.dtype == np.float32
        errors[path] = np.abs(y - ref).max() / np.abs(ref).max()
    assert errors["winograd"] < 1e-5
    assert errors["winograd"] < 10 * max(errors["shift"], 1e-7)


def test_conv_winograd_chunks_match_one_chunk(monkeypatch):
    """The winograd path transforms the batch in chunks of images; chunks of 2 images with a
    shorter last one (N = 5) give the whole-batch result bit for bit, including a per-sample
    ``temb`` (the bias is then (N, O, 1, 1) and is sliced per chunk) and a residual."""
    rng = np.random.default_rng(15)
    N, C, H, W, O = 5, 6, 9, 8, 7
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((O, C, 3, 3)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    temb = rng.standard_normal((N, O)).astype(np.float32)
    res = rng.standard_normal((N, O, H, W)).astype(np.float32)
    with force_path("winograd"):
        monkeypatch.setattr(conv_mod, "_WINOGRAD_CHUNK_ELEMENTS", 1 << 30)
        y1 = conv2d_forward(x, w, b, temb=temb, residual=res)[0]
        tiles = ((H + 1) // 2) * ((W + 1) // 2)
        monkeypatch.setattr(conv_mod, "_WINOGRAD_CHUNK_ELEMENTS", 2 * 16 * tiles * C)
        monkeypatch.setattr(conv_mod, "_WINOGRAD_MIN_TILES", 1)
        y2, cache = conv2d_forward(x, w, b, temb=temb, residual=res)
    assert cache["path"] == "winograd"
    np.testing.assert_array_equal(y1, y2)
    ref = conv2d_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                         temb=temb.astype(np.float64), residual=res.astype(np.float64))[0]
    assert np.abs(y2 - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("N,C,H,W,O,chunk_images", [
    (4, 64, 8, 8, 48, None),     # one chunk
    (16, 32, 8, 8, 64, None),    # small's 8x8 level at sampling batch 16
    (5, 40, 9, 11, 32, 2),       # odd image (cropped last tiles, half-empty dy tiles), chunks 2, 2, 1
    (3, 32, 16, 16, 32, 1),      # one image per chunk: dw accumulates over three chunks
])
def test_conv_winograd_backward(monkeypatch, N, C, H, W, O, chunk_images):
    """A winograd forward keeps x only. dx is the "same" conv of dy with the kernel flipped and its
    channel axes swapped, taken by the winograd forward (bit for bit that call); dw is the
    transpose of F(2x2, 3x3), accumulated over chunks of images. Both against the float64 gradient
    of the direct sum (the shift path in float64) within winograd's float32 bound (1e-5 of the
    scale, as test_conv_winograd_float32_accuracy); db is dy's sum."""
    if chunk_images is not None:
        tiles = ((H + 1) // 2) * ((W + 1) // 2)
        monkeypatch.setattr(conv_mod, "_WINOGRAD_CHUNK_ELEMENTS", chunk_images * 16 * tiles * max(C, O))
        monkeypatch.setattr(conv_mod, "_WINOGRAD_MIN_TILES", 1)
    rng = np.random.default_rng(14)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = (rng.standard_normal((O, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    y, cache = conv2d_forward(x, w, b)
    assert cache["path"] == "winograd" and set(cache) >= {"x", "w"} and "xr" not in cache
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = conv2d_backward(dy, cache)
    assert dx.dtype == dw.dtype == db.dtype == np.float32
    w_flip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    dx_fwd, cache_f = conv2d_forward(dy, w_flip)
    assert cache_f["path"] == "winograd"
    np.testing.assert_array_equal(dx, dx_fwd)
    with force_path("shift"):
        dx64, dw64, db64 = conv2d_backward(dy.astype(np.float64), conv2d_forward(
            x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))[1])
    assert np.abs(dx - dx64).max() < 1e-5 * np.abs(dx64).max()
    assert np.abs(dw - dw64).max() < 1e-5 * np.abs(dw64).max()
    np.testing.assert_allclose(db, db64, rtol=1e-5, atol=1e-4)   # float32 sums of N*H*W values
    dx_none, dw2, db2 = conv2d_backward(dy, cache, input_grad=False)
    assert dx_none is None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


def test_conv_float64_stays_float64():
    x = np.ones((1, 2, 4, 4))
    y, cache = conv2d_forward(x, np.ones((3, 2, 3, 3)), np.zeros(3))
    assert y.dtype == np.float64
    # Interior pixels see all 2*3*3 ones, corners 2*2*2 (zero padding): exact small integers.
    assert y[0, 0, 1, 1] == 18.0 and y[0, 0, 0, 0] == 8.0
    assert conv2d_backward(np.ones_like(y), cache)[2] is not None


@pytest.mark.parametrize("x_shape,w_shape,kwargs,match", [
    ((2, 3, 4), (4, 3, 3, 3), {}, r"\(2, 3, 4\)"),                      # wrong rank of x
    ((2, 3, 4, 4), (4, 3, 3), {}, r"\(4, 3, 3\)"),                      # wrong rank of w
    ((2, 3, 4, 4), (4, 2, 3, 3), {}, r"\(4, 2, 3, 3\)"),                # channel mismatch
    ((2, 3, 2, 2), (4, 3, 5, 5), {"padding": 0}, r"does not fit"),      # kernel larger than input
    ((2, 3, 4, 4), (4, 3, 3, 3), {"padding": (1, 1, 1)}, r"padding"),   # 3-tuple padding
    ((2, 3, 4, 4), (4, 3, 3, 3), {"padding": -1}, r"padding"),
    ((2, 3, 4, 4), (4, 3, 3, 3), {"stride": 0}, r"stride"),
    # non-integers are refused, not truncated by int() (stride 1.5 used to run as 1, "11" as (1, 1))
    ((2, 3, 4, 4), (4, 3, 3, 3), {"stride": 1.5}, r"stride must be an integer, got 1\.5"),
    ((2, 3, 4, 4), (4, 3, 3, 3), {"stride": "2"}, r"stride must be an integer"),
    ((2, 3, 4, 4), (4, 3, 3, 3), {"padding": (0.7, 0.7, 0.7, 0.7)}, r"padding entry must be an integer"),
    ((2, 3, 4, 4), (4, 3, 3, 3), {"padding": "11"}, r"padding must be an int or"),
    ((2, 3, 4, 4), (4, 3, 3, 3), {"padding": True}, r"padding must be an int or"),
])
def test_conv_errors(x_shape, w_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        conv2d_forward(np.zeros(x_shape), np.zeros(w_shape), **kwargs)


def test_conv_rejects_integers_and_bad_bias():
    with pytest.raises(ValueError, match="floating-point.*int64"):
        conv2d_forward(np.zeros((1, 1, 3, 3), dtype=np.int64), np.zeros((1, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        conv2d_forward(np.zeros((1, 1, 3, 3)), np.zeros((2, 1, 3, 3)), np.zeros(3))
    y, cache = conv2d_forward(np.zeros((1, 1, 3, 3)), np.zeros((2, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 3\)"):
        conv2d_backward(np.zeros((1, 2, 2, 3)), cache)


@pytest.mark.parametrize("path", PATHS)
def test_conv_epilogue_adds_temb_and_residual(path):
    """conv2d_forward(..., temb, residual) = conv + b + temb[:, :, None, None] + residual, on every path;
    the cache (and so the backward pass) is the plain convolution's. The op adds b + temb in the
    pass that writes y (one rounding of b + temb more than here), float64: a few ulps."""
    r = np.random.default_rng(7)
    x, w, b = r.standard_normal((2, 3, 5, 5)), r.standard_normal((4, 3, 3, 3)), r.standard_normal(4)
    temb, res = r.standard_normal((2, 4)), r.standard_normal((2, 4, 5, 5))
    with force_path(path):
        y0, c0 = conv2d_forward(x, w, b, 1, 1)
        y, c = conv2d_forward(x, w, b, 1, 1, temb=temb, residual=res)
        np.testing.assert_allclose(y, y0 + temb[:, :, None, None] + res, rtol=0, atol=1e-13)
        dy = r.standard_normal(y.shape)
        for g, g0 in zip(conv2d_backward(dy, c), conv2d_backward(dy, c0)):
            np.testing.assert_array_equal(g, g0)
    # without a bias, and on the 1x1 "pointwise" path (which no forced path reaches)
    y, _ = conv2d_forward(x, w, None, 1, 1, temb=temb)
    np.testing.assert_allclose(y, conv2d_forward(x, w, None, 1, 1)[0] + temb[:, :, None, None], rtol=0, atol=1e-13)
    y, _ = conv2d_forward(x, w[:, :, :1, :1], b, 1, 0, temb=temb)
    y0 = conv2d_forward(x, w[:, :, :1, :1], b, 1, 0)[0]
    np.testing.assert_allclose(y, y0 + temb[:, :, None, None], rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match=r"temb must have shape \(2, 4\).*\(4, 2\)"):
        conv2d_forward(x, w, b, 1, 1, temb=temb.T)
    with pytest.raises(ValueError, match=r"residual must have the output's shape"):
        conv2d_forward(x, w, b, 1, 1, residual=res[:, :3])
