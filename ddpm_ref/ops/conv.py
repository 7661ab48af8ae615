"""2-D convolution (cross-correlation, as torch.nn.functional.conv2d) as a forward/backward pair.

What it is: ``y = conv2d(x, w) + b`` in NCHW layout for any kernel size, stride and zero padding
(symmetric int or ``(top, bottom, left, right)``; the DDPM downsampler pads (0, 1, 0, 1) and uses a
stride-2 3x3 kernel), with the forward pass and both backward passes handed to BLAS as GEMMs.
What it is not: no dilation, no groups, no autograd; the cache is returned, never stored.

The equation (cross-correlation, zero padding ``xp = pad(x)``):

    y[n, o, h, w] = b[o] + sum_{c, i, j} w[o, c, i, j] * xp[n, c, s*h + i, s*w + j]

and its gradients, each a sum over the same index set:

    dw[o, c, i, j] = sum_{n, h, w} dy[n, o, h, w] * xp[n, c, s*h + i, s*w + j]
    dxp[n, c, s*h + i, s*w + j] += sum_o w[o, c, i, j] * dy[n, o, h, w]      (then crop the pad)
    db[o]          = sum_{n, h, w} dy[n, o, h, w]

Five GEMM formulations, picked per call by ``_choose_path`` (all give the same numbers up to
rounding; the choice was measured on the digits, `small` and CIFAR preset shapes, at training and
sampling batches, in float32 with benchmarks/conv_paths.py, which times every path at every such
shape). Memory: the cache holds one copy of the (padded) input, or x itself;
an im2col buffer, where one is used, lives only inside a single call (rebuilt in the backward
pass, freed before the input-gradient GEMM allocates its own).

* "pointwise" (1x1 kernel, stride 1, no padding: the residual shortcuts): ``y_n = w x_n`` per image
  on the NCHW layout, ``dx_n = w^T dy_n``, ``dw = sum_n dy_n x_n^T``; no copies, the cache is x.
* "shift" (stride 1): the zero-padded input is laid out channel-major as one long row per
  channel, ``xr[c, q]``, images one after another on a grid of pitch ``Ws`` (see _shift_layout:
  the zero columns right of one image row double as the left padding of the next row, so a 3x3
  "same" conv at 32x32 uses a 33x33 grid per image). Output pixel ``(n, h, w)`` is computed at
  grid position ``q`` and for kernel offset ``(i, j)`` it reads ``xr[c, q + i*Ws + j]``: a
  *contiguous shift* of the whole row, so "im2col" here is kh*kw memcpy-speed slice copies
  (``col[(i, j, c), q] = xr[c, q + i*Ws + j]``, no strided gathers) followed by one GEMM
  ``w2 (O, kh*kw*C) @ col (kh*kw*C, M)``. Grid positions that are not output pixels are computed
  and thrown away (extra work ``Hs*Ws / (Ho*Wo)``: 1.06x at 32x32, 1.13x at 16x16). Backward:
  ``dw2 = dy @ col^T`` (col rebuilt from the cached xr, reduction over all M grid positions) and
  ``dcol = w2^T @ dy`` scattered back with one shifted slice add per offset; the zero dy at the
  thrown-away positions keeps those sums exact. Large buffers are split (see _offset_groups):
  one GEMM per kernel row, or per offset straight on the strided views with no copy at all.
  With few output channels (conv_out) the input gradient is instead one GEMM over kh*kw shifted
  copies of dy (a convolution of dy with the transposed kernel), no larger than dx.
* "im2col" (any stride; chosen for stride > 1 and for small images, where the shift method's
  thrown-away border dominates): ``col[(i, j, c), (n, h, w)] = xp[n, c, s*h + i, s*w + j]`` copied
  from a strided view of the padded input, then one GEMM ``w2 (O, K) @ col (K, N*Ho*Wo)``. The
  backward GEMMs are ``dw2 = dy2 @ col^T`` and ``dcol = w2^T @ dy2``, and ``dcol`` is scattered back
  with one strided slice add per kernel offset (kh*kw adds, no ``np.add.at``).

* "dense" (tiny images, any stride: the 4x4 level of the digits U-Net, conv_out's single output
  channel): the whole convolution as one dense matrix ``Wd[(c, p), (o, q)] = w[o, c, i, j]`` for
  every input pixel ``p`` that output pixel ``q`` reads through offset ``(i, j)`` (zero elsewhere:
  padding), so ``y = x2 @ Wd`` with ``x2 = x.reshape(N, C*H*W)`` straight from NCHW and the result
  already NCHW: no padding copy, no im2col, no col2im. Backward: ``dx2 = dy2 @ Wd^T`` and
  ``dWd = x2^T @ dy2``, whose entries at the (p, q) pairs of each offset are summed into ``dw``
  (one small GEMM with a 0/1 offset-membership matrix). It multiplies by zeros (at 4x4 with a
  3x3 kernel 256 pixel pairs per channel pair where 100 are real: 2.56x the work), but on tiny
  images the other paths' copies with 4- or 8-float inner loops cost several times their GEMMs (measured: a 4x4
  3x3 conv, 32 -> 32 channels, batch 128, spent ~75% of its forward time copying). Chosen by
  ``_dense_wins``; the matrix lives in the cache (at most _DENSE_MAX_ELEMENTS).

* "winograd" (3x3, stride 1, padding 1: every such conv from 8x8 to 32x32 with at least 32 input
  and output channels, which is most of the U-Net's work): Winograd's minimal filtering
  F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks", eq. 8).
  Each 2x2 output tile is ``Y = A^T [ (G g G^T) * (B^T d B) ] A`` summed over input channels, with
  d the 4x4 input tile around it (tiles overlap by 2), g the 3x3 kernel and ``*`` elementwise:

      B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
      G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
      A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

  so the channel sum becomes 16 GEMMs ``M[k] = V[k] (tiles, C) @ U[k]^T (C, O)`` (k = the 16
  positions of the 4x4 transformed tile) with 16 multiplications per tile instead of 36: 2.25x
  fewer flops than the other paths, paid for by the transforms (adds and subtracts over
  channel-last parity planes of the padded input, see _winograd_block, so that every NumPy loop
  runs over runs of at least W/2*C contiguous values and each transform stage is four array
  operations) and two transposing copies (NCHW in and out, one (C, HW) <-> (HW, C) transpose per
  image). The batch goes through in chunks of images sized for the cache (_WINOGRAD_CHUNK_ELEMENTS).
  Rounding: the transforms add up to 4 terms (input) and
  9 (output) before and after the GEMM, and G has halves: float32 results differ from the
  direct sum by a few ulps more than the other paths (measured ~2x their error against float64).
  Backward, from the cached x alone: the input gradient of a 3x3 "same" conv is itself a 3x3
  "same" conv, of dy with the kernel flipped and its channel axes swapped
  (``dx = conv(dy, w[:, :, ::-1, ::-1]^T)``, same min(C, O)), so it goes through this path too. The
  weight gradient is the transpose of the forward's algebra: per tile ``<dy_t, y_t> =
  <G^T [(A dy_t A^T) * (B^T d_t B)] G, g>``, so dw is 16 GEMMs ``(O, tiles) @ (tiles, C)`` reducing
  over every tile of the batch, then ``G^T . G`` (see _winograd_weight_grad).
  Chosen by ``_winograd_wins`` from the sweep of benchmarks/conv_paths.py.

Python loops run over the kh*kw kernel offsets only (and the four parity planes and the image
chunks of the Winograd path), never over pixels or channels.
"""
import functools
import os

import numpy as np

from ._checks import check_float as _check_float
from ._checks import check_int as _check_int

__all__ = ["conv2d_forward", "conv2d_backward", "conv_output_size"]

# Path choice for stride 1 (see _choose_path): im2col when the output is at most this many pixels
# per image (the shift method's thrown-away border is >= 27% extra work at 8x8 with a 3x3 kernel),
# its buffer stays below _IM2COL_MAX_ELEMENTS and the batch has at most _IM2COL_MAX_ROWS output
# rows (N*Ho): im2col's copies run one inner loop of Wo floats per (offset, channel, image, row),
# the shift path's one memcpy per (offset, channel), so im2col pays per row and wins only on
# small batches. Measured (one thread, float32, fwd+bwd, benchmarks/conv_paths.py):
# im2col wins at the cifar preset's 4x4 and 8x8 convs (batch 8: 32-64 rows, by 1.2-1.3x); the
# shift path at 256-1024 rows (the small preset at batch 64, the digits preset at batch 128: by
# 1.5x, up to 30x for conv_out's single output channel before the dense path took that one),
# and already at 128 rows (the small preset's 8x8 convs at the sampling batch 16, 32-128 -> 64
# channels: shift by 1.1-1.5x forward and 1.3-1.5x backward), hence the bound of 64 rows.
# Below _IM2COL_TINY column elements (conv_in's 1-3 input channels) im2col's copies are cheap
# whatever the batch: it won there by 1.1-1.4x (small's conv_in at batch 64, cifar's at batch 4).
_IM2COL_MAX_PIXELS = 100
_IM2COL_MAX_ELEMENTS = 3 << 19        # 1.5M elements: 6 MB in float32
_IM2COL_MAX_ROWS = 64
_IM2COL_TINY = 1 << 18
# The "dense" path (see _dense_wins): its matrix Wd holds C*H*W x O*Ho*Wo elements, at most this
# many (4M: 16 MB in float32; the digits preset's largest is 0.26M, cifar's 4x4 level would need
# 16.8M and is left to im2col).
_DENSE_MAX_ELEMENTS = 1 << 22
# ... and only for images of at most 8x8 in and out (H*W*Ho*Wo <= 64*64): at 16x16 the matrix is
# 98% zeros and the shift path won by 6x (small's conv_out at batch 64), which the cost model of
# _dense_wins, written against im2col, does not see.
_DENSE_MAX_PIXEL_PAIRS = 64 * 64
# The "winograd" path (see _winograd_wins): 3x3, stride 1, padding 1, images from 8x8 to 32x32 and
# at least 32 input and output channels, at any batch. Measured (one thread, float32, forward
# wall time, medians of interleaved runs, the parity-plane transforms of _winograd_block):
# winograd / best other path 0.62-0.68 at small's 8x8 convs at batch 16 (32-128 -> 64
# channels: 0.82 with 32 in), 0.89-0.95 at its 16x16 convs (32-96 -> 32), 0.77 at 64 -> 64;
# 0.59-0.65 at its 8x8 level and 0.76-0.86 at its 16x16 level at batch 64; 0.64-0.78 at cifar's
# 8x8 and 16x16 levels at batch 4 and 8, 0.71-0.82 at its 32x32 level (128-256 -> 128); 0.63-0.76
# at the digits shapes with 32 channels (batch 128 and 500). With 16 channels it was a tie
# (0.82 to 1.07), and at 4x4 the dense path (checked first) is faster over forward + backward.
_WINOGRAD_MIN_CHANNELS = 32
_WINOGRAD_MIN_SIZE = 8
_WINOGRAD_MAX_SIZE = 32
# _winograd transforms the batch in chunks of images whose transformed input (16 values per 2x2
# tile and channel: 4x the input) holds at most about this many elements (1 MB in float32), so that
# the transforms and GEMMs of a chunk stay in cache, but of at least _WINOGRAD_MIN_TILES tiles,
# so that each of the 16 GEMMs has that many rows. Measured at small's 16x16 convs at batch 16
# (64 -> 32 and 64 -> 64 channels): 0.78-0.85x the time of one chunk for the whole batch; cifar's
# 8x8 level with 512 channels at batch 4 was 1.4x slower in chunks of 32 tiles than of 64.
_WINOGRAD_CHUNK_ELEMENTS = 1 << 18
_WINOGRAD_MIN_TILES = 256
# Tests set this to "shift", "im2col", "dense" or "winograd" to force a path (None: choose; "shift"
# and "winograd" need stride 1 and fall back to "im2col" otherwise, "winograd" also needs a 3x3
# kernel with padding 1 and falls back to "shift"). Unpadded 1x1 convs always take "pointwise".
_FORCED_PATH = None


def _blas_threads():
    """BLAS thread count as the usual variables set it (read by OpenBLAS/MKL at load), else all CPUs."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        try:
            return max(1, int(os.environ[var]))
        except (KeyError, ValueError):
            continue
    return os.cpu_count() or 1


# The shift path stacks its kh*kw shifted views into one GEMM operand up to this many elements
# (64 MB in float32), else one kernel row at a time: the CIFAR preset's 128-channel convs at 32x32
# (batch 8, 10M elements) take one GEMM, its 256- and 384-channel ones at 32x32 (20M, 30M) three.
# With a single BLAS thread it does not stack at all (0): kh*kw GEMMs straight on the strided
# views copy nothing, which measured up to 25% faster at the `small` preset's shapes on one
# thread; with several threads each GEMM is a fork/join of the pool, and the stacked single GEMM
# measured 2-4x faster on this (shared, loaded) 2-core machine.
_STACK_MAX_ELEMENTS = 0 if _blas_threads() == 1 else 1 << 24


def _normalize_padding(padding):
    """int or (top, bottom, left, right) -> 4-tuple of non-negative ints."""
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, (bool, np.bool_)):
        p = int(padding)
        pads = (p, p, p, p)
    else:
        if not isinstance(padding, (tuple, list)):
            raise ValueError(f"padding must be an int or (top, bottom, left, right), got {padding!r}")
        pads = tuple(_check_int("padding entry", p) for p in padding)
        if len(pads) == 2:   # (vertical, horizontal), torch's convention for a pair
            pads = (pads[0], pads[0], pads[1], pads[1])
        if len(pads) != 4:
            raise ValueError(f"padding must be an int or (top, bottom, left, right), got {padding!r}")
    if min(pads) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pads


def conv_output_size(size, k, stride, pad_before, pad_after):
    """Output length along one axis: floor((size + pads - k) / stride) + 1."""
    return (size + pad_before + pad_after - k) // stride + 1


def _dense_wins(N, C, O, H, W, Ho, Wo, kh, kw):
    """Whether the "dense" path is expected to beat the copying paths: a cost model in nanoseconds
    whose constants were fitted to the sweep of benchmarks/conv_paths.py (one float32 BLAS thread
    on the 2-core development machine, where BLAS reaches ~50-65 flop/ns on these GEMMs):

    * dense: the GEMMs do ``2 N C O (H W)(Ho Wo)`` flops at ~50 flop/ns, and building/folding the
      matrix costs ~2 ns per element of it (``C O (H W)(Ho Wo)``);
    * im2col: its GEMMs do ``2 N C O kh kw Ho Wo`` flops at ~50 flop/ns, and its copies (padding,
      im2col, col2im) cost ~(1 + 16 / Wo) ns per element of the column buffer ``N C kh kw Ho Wo``:
      copies with inner loops of Wo floats, dominated by per-loop overhead when Wo is small.

    Forward and backward scale alike (three GEMMs each way), so one comparison serves both. On the
    sweep it picks the fastest path or one within ~12% of it (a near-tie at the 8x8 -> 4x4
    downsampler); it rules out cifar's 4x4 level (16.8M-element matrix) and every 8x8+ conv with
    more than a handful of output channels; images above 8x8 never get here
    (_DENSE_MAX_PIXEL_PAIRS).
    """
    pixels = (H * W) * (Ho * Wo)
    if pixels > _DENSE_MAX_PIXEL_PAIRS or C * O * pixels > _DENSE_MAX_ELEMENTS:
        return False
    dense = 2 * N * C * O * pixels / 50 + 2 * C * O * pixels
    col = N * C * kh * kw * Ho * Wo
    im2col = 2 * col * O / 50 + col * (1 + 16 / Wo)
    return dense < im2col


def _winograd_wins(N, C, O, H, W):
    """Whether a 3x3 stride-1 "same" conv should take the "winograd" path (see
    _WINOGRAD_MIN_CHANNELS for the measurements behind the bounds; N does not matter: the
    transforms work in chunks of images)."""
    return (_WINOGRAD_MIN_SIZE <= min(H, W) and max(H, W) <= _WINOGRAD_MAX_SIZE
            and min(C, O) >= _WINOGRAD_MIN_CHANNELS)


def _choose_path(N, C, O, H, W, Ho, Wo, kh, kw, stride, pads):
    """"pointwise" for unpadded 1x1; "dense" for tiny images where _dense_wins; "winograd" for the
    3x3 "same" convs where _winograd_wins; "im2col" for strided convs, tiny column buffers and small
    batches; else "shift"."""
    if kh == kw == 1 and stride == 1 and not any(pads):
        return "pointwise"
    winograd_fits = kh == kw == 3 and stride == 1 and tuple(pads) == (1, 1, 1, 1)
    if _FORCED_PATH is not None:
        if _FORCED_PATH in ("shift", "winograd") and stride != 1:
            return "im2col"
        return "shift" if _FORCED_PATH == "winograd" and not winograd_fits else _FORCED_PATH
    if _dense_wins(N, C, O, H, W, Ho, Wo, kh, kw):
        return "dense"
    if winograd_fits and _winograd_wins(N, C, O, H, W):
        return "winograd"
    return _copy_path(N, C, Ho, Wo, kh, kw, stride)


def _copy_path(N, C, Ho, Wo, kh, kw, stride):
    """"im2col" or "shift", by the rules in _choose_path's docstring."""
    if stride != 1:
        return "im2col"
    if kh * kw * C * N * Ho * Wo <= _IM2COL_TINY:
        return "im2col"
    if (Ho * Wo <= _IM2COL_MAX_PIXELS and kh * kw * C * N * Ho * Wo <= _IM2COL_MAX_ELEMENTS
            and N * Ho <= _IM2COL_MAX_ROWS):
        return "im2col"
    return "shift"


def conv2d_forward(x, w, b=None, stride=1, padding=1, temb=None, residual=None):
    """Convolve ``x (N, C, H, W)`` with ``w (O, C, kh, kw)``, add ``b (O,)``; returns ``(y, cache)``.

    ``y`` has shape ``(N, O, Ho, Wo)``, ``Ho = (H + top + bottom - kh) // stride + 1`` (likewise Wo),
    and the dtype of ``x`` (``w`` and ``b`` are cast to it). ``padding`` is an int (all four sides),
    a pair ``(vertical, horizontal)``, or ``(top, bottom, left, right)``.
    The cache holds the padded input (the only activation the backward pass needs) and the weight.

    The epilogue the GPU kernel fuses (``ddpm_ref.kernels.conv``, same signature): ``temb (N, O)`` is
    added to every pixel (the U-Net's time-embedding projection) and ``residual (N, O, Ho, Wo)`` is
    added as is: ``y = conv(x, w) + b + temb[:, :, None, None] + residual``. Their gradients are not
    the convolution's: ``dy.sum((2, 3))`` and ``dy`` itself, which the caller forms.
    """
    y, cache = _conv2d(x, w, b, stride, padding, temb)
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != y.shape:
            raise ValueError(f"conv2d residual must have the output's shape {y.shape}, got {residual.shape}")
        y += residual
    return y, cache


def _conv2d(x, w, b, stride, padding, temb=None):
    """:func:`conv2d_forward` without the residual: the convolution, its bias and ``temb``, the
    last two added in the one pass that writes y (``b + temb`` formed first, an (N, O) array)."""
    _check_float("x", x)
    _check_float("w", w)
    if x.ndim != 4:
        raise ValueError(f"conv2d expects x of shape (N, C, H, W), got shape {x.shape}")
    if w.ndim != 4:
        raise ValueError(f"conv2d expects w of shape (O, C, kh, kw), got shape {w.shape}")
    N, C, H, W = x.shape
    O, Cw, kh, kw = w.shape
    if Cw != C:
        raise ValueError(f"conv2d weight shape {w.shape} expects {Cw} input channels, x has shape {x.shape}")
    if b is not None:
        _check_float("b", b)
        if b.shape != (O,):
            raise ValueError(f"conv2d bias must have shape ({O},), got {b.shape}")
    stride = _check_int("stride", stride, 1)
    pt, pb, pl, pr = _normalize_padding(padding)
    Hp, Wp = H + pt + pb, W + pl + pr
    Ho = conv_output_size(H, kh, stride, pt, pb)
    Wo = conv_output_size(W, kw, stride, pl, pr)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv2d: kernel {(kh, kw)} does not fit input {x.shape} with padding "
                         f"{(pt, pb, pl, pr)}")
    dt = x.dtype
    w = w.astype(dt, copy=False)
    bias = None                               # (1 or N, O, 1, 1): b + temb, added as y is written
    if b is not None:
        bias = b.astype(dt, copy=False)[None, :, None, None]
    if temb is not None:
        _check_float("temb", temb)
        if temb.shape != (N, O):
            raise ValueError(f"conv2d temb must have shape ({N}, {O}) (batch, output channels), got {temb.shape}")
        temb = temb.astype(dt, copy=False)[:, :, None, None]
        bias = temb if bias is None else bias + temb
    path = _choose_path(N, C, O, H, W, Ho, Wo, kh, kw, stride, (pt, pb, pl, pr))

    if path == "pointwise":
        # 1x1, no padding: a GEMM per image straight on the NCHW layout, no copies at all;
        # the cache is x itself (which the caller usually holds anyway).
        y = np.matmul(w[:, :, 0, 0], x.reshape(N, C, H * W))             # (O, C) @ (N, C, HW)
        if bias is not None:
            y += bias[:, :, :, 0]                                         # (1 or N, O, 1)
        cache = {"path": path, "x": x}
        cache.update(w=w, has_bias=b is not None, x_shape=x.shape, stride=stride,
                     padding=(pt, pb, pl, pr), out_hw=(Ho, Wo))
        return y.reshape(N, O, Ho, Wo), cache
    if path == "dense":
        # One GEMM from NCHW to NCHW: y2 (N, O*Ho*Wo) = x2 (N, C*H*W) @ Wd (C*H*W, O*Ho*Wo).
        Wd = _dense_matrix(w, H, W, Ho, Wo, stride, pt, pl)
        y = (x.reshape(N, C * H * W) @ Wd).reshape(N, O, Ho, Wo)
        if bias is not None:
            y += bias
        cache = {"path": path, "x": x, "Wd": Wd}
        cache.update(w=w, has_bias=b is not None, x_shape=x.shape, stride=stride,
                     padding=(pt, pb, pl, pr), out_hw=(Ho, Wo))
        return y, cache
    if path == "winograd":
        y = _winograd(x, w, bias)                                         # (N, O, H, W)
        cache = {"path": path, "x": x}                                    # backward: winograd too
        cache.update(w=w, has_bias=b is not None, x_shape=x.shape, stride=stride,
                     padding=(pt, pb, pl, pr), out_hw=(Ho, Wo))
        return y, cache
    if path == "shift":
        Hs, Ws, base, M, L = _shift_layout(H, W, Ho, Wo, kh, kw, pt, pb, pl, pr, N)
        xr = _shift_input(x, Hs, Ws, base, M, L)                          # (C, L)
        w2 = w.transpose(0, 2, 3, 1).reshape(O, kh * kw * C)              # (O, K), K ordered (i, j, c)
        yr = tmp = None                                                   # (O, M) output on the grid
        for lo, hi in _offset_groups(kh, kw, C, M):
            col = _stack_shifts(xr, lo, hi, kw, Ws, M)                    # ((hi-lo) C, M)
            if yr is None:
                yr = w2[:, lo * C:hi * C] @ col                           # (O, (hi-lo) C) @ (.., M)
            else:
                if tmp is None:
                    tmp = np.empty((O, M), dtype=dt)                      # one scratch, reused
                np.matmul(w2[:, lo * C:hi * C], col, out=tmp)
                yr += tmp
            del col
        del tmp
        y_grid = yr.reshape(O, N, Hs, Ws)[:, :, :Ho, :Wo]                 # (O, N, Ho, Wo) view
        cache = {"path": path, "xr": xr}
    else:
        xp = _im2col_input(x, pt, pb, pl, pr)                             # (C, N, Hp, Wp)
        col = _im2col(xp, kh, kw, stride, Ho, Wo)                         # (kh*kw*C, N*Ho*Wo)
        w2 = w.transpose(0, 2, 3, 1).reshape(O, kh * kw * C)              # (O, K), K ordered (i, j, c)
        yr = w2 @ col                                                     # (O, N*Ho*Wo)
        del col
        y_grid = yr.reshape(O, N, Ho, Wo)
        cache = {"path": path, "xp": xp}

    y = np.empty((N, O, Ho, Wo), dtype=dt)                                # (N, O, Ho, Wo)
    if bias is None:
        np.copyto(y, y_grid.transpose(1, 0, 2, 3))
    else:
        np.add(y_grid.transpose(1, 0, 2, 3), bias, out=y)
    cache.update(w=w, has_bias=b is not None, x_shape=x.shape, stride=stride,
                 padding=(pt, pb, pl, pr), out_hw=(Ho, Wo))
    return y, cache


def _shift_layout(H, W, Ho, Wo, kh, kw, pt, pb, pl, pr, N):
    """Geometry of the "shift" path's flattened grid, shared by forward and backward.

    Image n's pixel (r, c) sits at ``base + n*Hs*Ws + r*Ws + c`` of a zero row of length L, with
    row pitch ``Ws = max(W + max(pl, pr), Wo)`` and ``Hs = max(H + max(pt, pb), Ho)`` rows per
    image: the zero columns W..Ws-1 of one row serve as the right padding of that row *and* the
    left padding of the next (likewise the zero rows between images), so a 3x3 "same" conv at
    32x32 works on a 33x33 grid per image rather than 34x34. Output (n, h, w) is computed at
    ``q = n*Hs*Ws + h*Ws + w`` and reads offset (i, j) at ``q + i*Ws + j``; ``base = pt*Ws + pl``
    puts the top-left padding before the first image.
    Returns (Hs, Ws, base, M, L) with M = N*Hs*Ws grid positions.
    """
    Ws = max(W + max(pl, pr), Wo)
    Hs = max(H + max(pt, pb), Ho)
    M = N * Hs * Ws
    base = pt * Ws + pl
    L = max(M + (kh - 1) * Ws + (kw - 1), base + M)
    return Hs, Ws, base, M, L


def _shift_input(x, Hs, Ws, base, M, L):
    """The "shift" path's input: x (N, C, H, W) on the zero grid of _shift_layout, (C, L)."""
    N, C, H, W = x.shape
    xr = np.zeros((C, L), dtype=x.dtype)      # (C, L) zero-padded input, one row per channel
    xr[:, base:base + M].reshape(C, N, Hs, Ws)[:, :, :H, :W] = x.transpose(1, 0, 2, 3)
    return xr


# Winograd F(2x2, 3x3) weight transform: U[(a, b)] = sum_{i, j} G[a, i] G[b, j] g[i, j], i.e. the
# (16, 9) matrix kron(G, G) applied to the 9 taps of every (o, c) kernel in one GEMM.
_WINOGRAD_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_WINOGRAD_GG = np.kron(_WINOGRAD_G, _WINOGRAD_G)                          # (16, 9)
_WINOGRAD_GG.flags.writeable = False


def _winograd(x, w, bias):
    """3x3 "same" convolution of x (N, C, H, W) by F(2x2, 3x3) (module docstring), plus ``bias``
    ((1 or N, O, 1, 1) or None), in chunks of images (_WINOGRAD_CHUNK_ELEMENTS)."""
    N, C, H, W = x.shape
    O = w.shape[0]
    dt = x.dtype
    U = (_WINOGRAD_GG.astype(dt) @ w.reshape(O * C, 9).T).reshape(16, O, C)   # G g G^T, (16, O, C)
    y = np.empty((N, O, H, W), dtype=dt)
    nb = _winograd_chunk(N, H, W, C)
    for n0 in range(0, N, nb):
        n1 = min(N, n0 + nb)
        b = bias if bias is None or bias.shape[0] == 1 else bias[n0:n1]
        _winograd_block(x[n0:n1], U, b, y[n0:n1])
    return y


def _winograd_chunk(N, H, W, channels):
    """Images per chunk of the winograd path: transformed arrays of 16 values per 2x2 tile and
    channel of at most about _WINOGRAD_CHUNK_ELEMENTS, but at least _WINOGRAD_MIN_TILES tiles."""
    tiles = ((H + 1) // 2) * ((W + 1) // 2)                              # 2x2 tiles per image
    nb = max(1, _WINOGRAD_CHUNK_ELEMENTS // (16 * tiles * channels), -(-_WINOGRAD_MIN_TILES // tiles))
    return min(N, nb)


def _winograd_weight_grad(x, dy):
    """``dw`` (O, C, 3, 3) of the 3x3 "same" conv of x (N, C, H, W) given dy (N, O, H, W), by the
    transpose of F(2x2, 3x3) (module docstring): per 2x2 tile the forward is bilinear,
    ``y_t = A^T [(G g G^T) * V_t] A`` with ``V_t = B^T d_t B``, so
    ``<dy_t, y_t> = <G^T [(A dy_t A^T) * V_t] G, g>`` and

        dw[o, c] = G^T ( sum_tiles (A dy_t[o] A^T) * V_t[c] ) G.

    The tile sum is 16 GEMMs ``M[k] = DY[k]^T (O, tiles) @ V[k] (tiles, C)`` whose reduction runs over
    all the batch's tiles (long GEMMs, 2.25x fewer flops than im2col's), accumulated over chunks of
    images; V is the forward's input transform. dy's odd last row/column pads to a zero tile half.
    """
    N, C, H, W = x.shape
    O = dy.shape[1]
    dt = x.dtype
    M = None                                                              # (16, O, C)
    nb = _winograd_chunk(N, H, W, max(C, O))
    for n0 in range(0, N, nb):
        n1 = min(N, n0 + nb)
        V = _winograd_input_transform(x[n0:n1])                           # (4, 4, n, th, tw, C)
        th, tw = V.shape[3:5]
        P = (n1 - n0) * th * tw
        # dy's tiles, channel-last: D[a, b, n, p, q, o] = dy[n, o, 2p + a, 2q + b] (0 past the edge)
        D = np.zeros((2, 2, n1 - n0, th, tw, O), dtype=dt)
        for a in range(2):
            for b in range(2):
                rows, cols = (H - a + 1) // 2, (W - b + 1) // 2
                D[a, b, :, :rows, :cols] = dy[n0:n1, :, a::2, b::2].transpose(0, 2, 3, 1)
        # A dy_t A^T, rows then columns: (A v) = (v0, v0 + v1, v0 - v1, -v1) for a pair v.
        R = np.empty((4, 2, n1 - n0, th, tw, O), dtype=dt)
        R[0] = D[0]
        np.add(D[0], D[1], out=R[1])
        np.subtract(D[0], D[1], out=R[2])
        np.negative(D[1], out=R[3])
        del D
        DY = np.empty((4, 4, n1 - n0, th, tw, O), dtype=dt)
        DY[:, 0] = R[:, 0]
        np.add(R[:, 0], R[:, 1], out=DY[:, 1])
        np.subtract(R[:, 0], R[:, 1], out=DY[:, 2])
        np.negative(R[:, 1], out=DY[:, 3])
        del R
        Mc = np.matmul(DY.reshape(16, P, O).transpose(0, 2, 1), V.reshape(16, P, C))  # (16, O, C)
        del DY, V
        if M is None:
            M = Mc
        else:
            M += Mc
    dw9 = _WINOGRAD_GG.T.astype(dt) @ M.reshape(16, O * C)                # G^T M G, (9, O*C)
    return np.ascontiguousarray(dw9.reshape(3, 3, O, C).transpose(2, 3, 0, 1))


def _winograd_block(x, U, bias, y):
    """3x3 "same" convolution of x (N, C, H, W) by F(2x2, 3x3) (module docstring), plus ``bias``
    ((1 or N, O, 1, 1) or None). Odd H or W: the last tile row/column is computed and cropped.

    Layout (chosen so that every NumPy loop runs over long contiguous runs): the zero-padded input
    is split by row and column parity into four channel-last planes per image,
    ``Q[r % 2, s % 2, n, r // 2, s // 2, c] = xpad[n, c, r, s]``. Tile (p, q) reads padded rows
    2p..2p+3, which are rows p, p and p+1, p+1 of the even and odd planes, and likewise for
    columns, so every term of ``B^T d B`` is a slice of a plane shifted by 0 or 1 along one axis
    (no stride-2 gathers), and each transform stage is four array operations covering all tiles,
    planes and positions at once. Tiles are ordered (n, p, q), so the output tiles assemble into a
    channel-last (N, H, W, O) array whose copy into NCHW is one (HW, O) -> (O, HW) transpose per
    image.
    """
    N, C, H, W = x.shape
    O = U.shape[1]
    dt = x.dtype
    V = _winograd_input_transform(x)                                      # (4, 4, N, th, tw, C)
    th, tw = V.shape[3:5]
    P = N * th * tw                                                       # tiles in the batch
    M = np.matmul(V.reshape(16, P, C), U.transpose(0, 2, 1))              # (16, P, C) @ (16, C, O)
    del V
    M = M.reshape(4, 4, N, th, tw, O)
    # Y = A^T M A: A^T on the rows of M, then on the columns, into the 2x2 tiles of yt.
    u = np.empty((2, 4, N, th, tw, O), dtype=dt)                          # (A^T M)[a, b]
    np.add(M[0], M[1], out=u[0])
    u[0] += M[2]
    np.subtract(M[1], M[2], out=u[1])
    u[1] -= M[3]
    del M
    yt = np.empty((N, th, 2, tw, 2, O), dtype=dt)                         # (N, 2 th, 2 tw, O)
    ya = yt.transpose(4, 2, 0, 1, 3, 5)                                   # (b, a, N, th, tw, O) view
    np.add(u[:, 0], u[:, 1], out=ya[0])
    ya[0] += u[:, 2]
    np.subtract(u[:, 1], u[:, 2], out=ya[1])
    ya[1] -= u[:, 3]
    del u, ya
    yt = yt.reshape(N, 2 * th, 2 * tw, O)[:, :H, :W]                      # (N, H, W, O)
    if bias is None:
        np.copyto(y, yt.transpose(0, 3, 1, 2))
    else:
        np.add(yt.transpose(0, 3, 1, 2), bias, out=y)


def _winograd_input_transform(x):
    """``V = B^T d B`` for the 4x4 input tile d of every 2x2 output tile of x (N, C, H, W) zero-padded
    by 1: (4, 4, N, th, tw, C), th, tw = ceil(H / 2), ceil(W / 2), channel-last (see _winograd_block
    for the layout)."""
    N, C, H, W = x.shape
    dt = x.dtype
    th, tw = (H + 1) // 2, (W + 1) // 2                                   # 2x2 output tiles
    # Parity planes: x row i is padded row i + 1, so odd rows of x land on the even plane from its
    # row 1 on, even rows on the odd plane from its row 0 on (likewise columns); the rest is zero.
    Q = np.zeros((2, 2, N, th + 1, tw + 1, C), dtype=dt)                  # (2, 2, N, th+1, tw+1, C)
    xt = x.transpose(0, 2, 3, 1)                                          # (N, H, W, C) view
    sel = ((slice(1, 1 + H // 2), slice(1, None, 2)), (slice(0, th), slice(0, None, 2)))
    selc = ((slice(1, 1 + W // 2), slice(1, None, 2)), (slice(0, tw), slice(0, None, 2)))
    for rp in range(2):
        for cp in range(2):
            Q[rp, cp, :, sel[rp][0], selc[cp][0]] = xt[:, sel[rp][1], selc[cp][1]]
    # B^T on the tiles' rows: d0..d3 = even[p], odd[p], even[p+1], odd[p+1], both column parities
    # at once; T[a, cp] is (N, th, tw+1, C).
    E, D = Q[0], Q[1]                                                     # (2, N, th+1, tw+1, C)
    T = np.empty((4, 2, N, th, tw + 1, C), dtype=dt)
    np.subtract(E[:, :, :th], E[:, :, 1:], out=T[0])                      # d0 - d2
    np.add(D[:, :, :th], E[:, :, 1:], out=T[1])                           # d1 + d2
    np.subtract(E[:, :, 1:], D[:, :, :th], out=T[2])                      # d2 - d1
    np.subtract(D[:, :, :th], D[:, :, 1:], out=T[3])                      # d1 - d3
    del Q, E, D
    # ... then on their columns, all four rows a at once: V[a, b] = (B^T d B)[a, b], (N, th, tw, C).
    Te, Td = T[:, 0], T[:, 1]                                             # (4, N, th, tw+1, C)
    V = np.empty((4, 4, N, th, tw, C), dtype=dt)
    np.subtract(Te[:, :, :, :tw], Te[:, :, :, 1:], out=V[:, 0])
    np.add(Td[:, :, :, :tw], Te[:, :, :, 1:], out=V[:, 1])
    np.subtract(Te[:, :, :, 1:], Td[:, :, :, :tw], out=V[:, 2])
    np.subtract(Td[:, :, :, :tw], Td[:, :, :, 1:], out=V[:, 3])
    del T, Te, Td
    return V


def _offset_groups(kh, kw, C, M):
    """Kernel offsets kk = i*kw + j in consecutive groups [lo, hi), one GEMM per group.

    All kh*kw offsets in one group (one GEMM with K = kh*kw*C: fewest BLAS calls, which matters
    most with several BLAS threads, each call being a fork/join) while the stacked buffer stays
    under _STACK_MAX_ELEMENTS, or when K = kh*kw*C <= 64; else one group per kernel row, else one
    offset at a time (no copy).
    """
    if kh * kw * C * M <= _STACK_MAX_ELEMENTS or (kh * kw * C <= 64 and kh * kw * C * M <= 1 << 24):
        # (few input channels, e.g. conv_in: kh*kw thin GEMMs would each write O x M; one
        # stacked GEMM writes it once, from a buffer that is small anyway)
        return [(0, kh * kw)]
    if kw * C * M <= _STACK_MAX_ELEMENTS:
        return [(i * kw, (i + 1) * kw) for i in range(kh)]
    return [(kk, kk + 1) for kk in range(kh * kw)]


def _stack_shifts(xr, lo, hi, kw, Ws, M):
    """Rows ``xr[:, off(kk):off(kk) + M]`` for kk in [lo, hi) stacked into ((hi-lo) C, M).

    Each block is a contiguous slice of every channel's row (a memcpy); a single offset is
    returned as a view without copying.
    """
    C = xr.shape[0]
    if hi - lo == 1:
        off = (lo // kw) * Ws + lo % kw
        return xr[:, off:off + M]                                         # (C, M) strided view
    col = np.empty(((hi - lo) * C, M), dtype=xr.dtype)                    # ((hi-lo) C, M)
    for kk in range(lo, hi):
        off = (kk // kw) * Ws + kk % kw
        col[(kk - lo) * C:(kk - lo + 1) * C] = xr[:, off:off + M]
    return col


@functools.lru_cache(maxsize=64)
def _dense_pairs(H, W, Ho, Wo, kh, kw, stride, pt, pl):
    """The (input pixel p, output pixel q, offset kk) triples of a conv's dense matrix, and the
    (kh*kw, P) 0/1 matrix saying which triple belongs to which offset (read-only arrays).

    Output pixel q = (h, v) reads input pixel p = (s h + i - pt, s v + j - pl) through offset
    kk = i*kw + j when that pixel is inside the image (else it reads padding: no triple).
    """
    h, v, i, j = np.meshgrid(np.arange(Ho), np.arange(Wo), np.arange(kh), np.arange(kw), indexing="ij")
    r, c = stride * h + i - pt, stride * v + j - pl
    inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
    p = (r * W + c)[inside]
    q = (h * Wo + v)[inside]
    kk = (i * kw + j)[inside]
    member = np.zeros((kh * kw, p.size))
    member[kk, np.arange(p.size)] = 1.0
    for a in (p, q, kk, member):
        a.flags.writeable = False
    return p, q, kk, member


def _dense_matrix(w, H, W, Ho, Wo, stride, pt, pl):
    """Wd (C*H*W, O*Ho*Wo): Wd[(c, p), (o, q)] = w[o, c, i, j] over the triples of _dense_pairs."""
    O, C, kh, kw = w.shape
    p, q, kk, _ = _dense_pairs(H, W, Ho, Wo, kh, kw, stride, pt, pl)
    Wd = np.zeros((C, H * W, O, Ho * Wo), dtype=w.dtype)
    # Advanced indices on axes 1 and 3 (split by a slice) index the triples on a leading axis:
    # Wd[:, p, :, q] is (P, C, O), filled from wk[kk] = w[:, :, i, j].T per triple.
    Wd[:, p, :, q] = w.transpose(2, 3, 1, 0).reshape(kh * kw, C, O)[kk]
    return Wd.reshape(C * H * W, O * Ho * Wo)


def _im2col_input(x, pt, pb, pl, pr):
    """The "im2col" path's input: x (N, C, H, W) zero-padded, channel-major, (C, N, Hp, Wp)."""
    N, C, H, W = x.shape
    xp = np.zeros((C, N, H + pt + pb, W + pl + pr), dtype=x.dtype)      # (C, N, Hp, Wp)
    xp[:, :, pt:pt + H, pl:pl + W] = x.transpose(1, 0, 2, 3)
    return xp


def _im2col(xp, kh, kw, stride, Ho, Wo):
    """col[(i, j, c), (n, h, w)] = xp[c, n, s*h + i, s*w + j]; xp is (C, N, Hp, Wp) C-contiguous."""
    C, N = xp.shape[:2]
    sc, sn, sh, sw = xp.strides
    view = np.lib.stride_tricks.as_strided(
        xp, shape=(kh, kw, C, N, Ho, Wo),
        strides=(sh, sw, sc, sn, stride * sh, stride * sw), writeable=False)
    return np.ascontiguousarray(view).reshape(kh * kw * C, N * Ho * Wo)    # (K, N*Ho*Wo)


def conv2d_backward(dy, cache, input_grad=True):
    """Gradients of ``conv2d_forward``: returns ``(dx, dw, db)`` shaped like ``x, w, b``.

    ``db`` is None when the forward pass had no bias; ``dx`` is None with ``input_grad=False``
    (a first layer whose input needs no gradient; the same keyword as ddpm_ref.kernels). See the module docstring for the sums; each
    is evaluated as GEMMs (kh*kw of them on the "shift" path, one or two on the "im2col" path).
    """
    _check_float("dy", dy)
    w = cache["w"]
    O, C, kh, kw = w.shape
    N, _, H, W = cache["x_shape"]
    Ho, Wo = cache["out_hw"]
    if dy.shape != (N, O, Ho, Wo):
        raise ValueError(f"conv2d_backward: dy has shape {dy.shape}, expected {(N, O, Ho, Wo)}")
    pt, pb, pl, pr = cache["padding"]
    stride = cache["stride"]
    Hp, Wp = H + pt + pb, W + pl + pr
    dt = dy.dtype
    w = w.astype(dt, copy=False)

    if cache["path"] == "pointwise":
        x3 = cache["x"].astype(dt, copy=False).reshape(N, C, H * W)       # (N, C, HW)
        dy3 = dy.reshape(N, O, H * W)                                     # (N, O, HW)
        db = dy3.sum(axis=(0, 2)) if cache["has_bias"] else None          # (O,)
        # dw = sum_n dy_n x_n^T: N GEMMs (O, HW) @ (HW, C), then a sum over the small (N, O, C)
        dw = np.matmul(dy3, x3.transpose(0, 2, 1)).sum(axis=0).reshape(O, C, 1, 1)
        if not input_grad:
            return None, dw, db
        dx = np.matmul(w[:, :, 0, 0].T, dy3)                              # (C, O) @ (N, O, HW)
        return dx.reshape(N, C, H, W), dw, db
    if cache["path"] == "dense":
        x2 = cache["x"].astype(dt, copy=False).reshape(N, C * H * W)     # (N, C*H*W)
        dy2 = dy.reshape(N, O * Ho * Wo)                                  # (N, O*Ho*Wo)
        db = dy.sum(axis=(0, 2, 3)) if cache["has_bias"] else None        # (O,)
        p, q, kk, member = _dense_pairs(H, W, Ho, Wo, kh, kw, stride, pt, pl)
        dWd = (x2.T @ dy2).reshape(C, H * W, O, Ho * Wo)                  # d loss / d Wd
        # dw[o, c, i, j] = sum of dWd[c, p, o, q] over the triples of offset (i, j).
        per_pair = dWd[:, p, :, q].reshape(p.size, C * O)                 # (P, C*O)
        dwk = member.astype(dt, copy=False) @ per_pair                    # (kh*kw, C*O)
        dw = np.ascontiguousarray(dwk.reshape(kh, kw, C, O).transpose(3, 2, 0, 1))  # (O, C, kh, kw)
        if not input_grad:
            return None, dw, db
        dx = dy2 @ cache["Wd"].astype(dt, copy=False).T                  # (N, C*H*W)
        return dx.reshape(N, C, H, W), dw, db
    if cache["path"] == "winograd":
        # dw by the transpose of the forward's F(2x2, 3x3) (_winograd_weight_grad). The input
        # gradient of a 3x3 stride-1 "same" conv is itself one: with dyp = dy zero-padded by 1,
        # dx[n, c, h, w] = sum_{o, i, j} w[o, c, 2 - i, 2 - j] dyp[n, o, h + i, w + j], the kernel
        # flipped and its channel axes swapped (same min(C, O)), so the winograd forward again.
        db = dy.sum(axis=(0, 2, 3)) if cache["has_bias"] else None        # (O,)
        dw = _winograd_weight_grad(cache["x"].astype(dt, copy=False), dy)
        if not input_grad:
            return None, dw, db
        w_flip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))   # (C, O, 3, 3)
        return _winograd(dy, w_flip, None), dw, db
    if cache["path"] == "shift":
        Hs, Ws, base, M, L = _shift_layout(H, W, Ho, Wo, kh, kw, pt, pb, pl, pr, N)
        xr = cache["xr"].astype(dt, copy=False)                           # (C, L)
        # dy on the output grid, zero where the forward threw positions away, so the sums below
        # run over real outputs only.
        dyr = np.zeros((O, N, Hs, Ws), dtype=dt)                          # (O, N, Hs, Ws)
        dyr[:, :, :Ho, :Wo] = dy.transpose(1, 0, 2, 3)
        dyr = dyr.reshape(O, M)                                           # (O, M)
        db = dyr.sum(axis=1) if cache["has_bias"] else None               # (O,)
        # dw[o, c, i, j] = sum_q dy[o, q] * xr[c, q + off(i, j)]: one GEMM per group of offsets,
        # the reduction running over all M grid positions.
        groups = _offset_groups(kh, kw, C, M)
        dw2 = np.empty((O, kh * kw * C), dtype=dt)                        # (O, K), K ordered (i, j, c)
        for lo, hi in groups:
            col = _stack_shifts(xr, lo, hi, kw, Ws, M)                    # ((hi-lo) C, M)
            dw2[:, lo * C:hi * C] = dyr @ col.T                           # (O, M) @ (M, (hi-lo) C)
            del col
        dw = np.ascontiguousarray(dw2.reshape(O, kh, kw, C).transpose(0, 3, 1, 2))  # (O, C, kh, kw)
        del dw2
        if not input_grad:
            return None, dw, db
        if kh * kw * O <= C and kh * kw > 1:
            # Few output channels (conv_out): the input gradient as a convolution of dy,
            # dxr[c, p] = sum_{i, j, o} w[o, c, i, j] dy[o, p - off(i, j)]: stack the kh*kw shifted
            # copies of dy (no larger than dx) and do one GEMM, with no scatter-adds over C x M.
            # Only the M positions from `base` on hold input pixels, so only those are computed.
            F = (kh - 1) * Ws + (kw - 1)                                # largest offset
            dye = np.zeros((O, F + base + M), dtype=dt)                 # (O, F + base + M) front margin
            dye[:, F:F + M] = dyr
            dcol = np.empty((kh * kw * O, M), dtype=dt)                 # (K', M), K' ordered (i, j, o)
            for i in range(kh):
                for j in range(kw):
                    off, kk = i * Ws + j, i * kw + j
                    dcol[kk * O:(kk + 1) * O] = dye[:, F + base - off:F + base - off + M]
            del dye
            dx_grid = w.transpose(1, 2, 3, 0).reshape(C, kh * kw * O) @ dcol   # (C, K') @ (K', M)
            del dcol
        elif kh * kw == 1 and base == 0:
            dx_grid = w[:, :, 0, 0].T @ dyr                             # (C, O) @ (O, M)
        else:
            # dxr[c, q + off(i, j)] += sum_o w[o, c, i, j] * dy[o, q]: the transpose of the forward
            # shift, one GEMM per group of offsets, then one shifted add per offset.
            dxr = np.zeros((C, L), dtype=dt)                            # (C, L)
            w2t = w.transpose(2, 3, 1, 0).reshape(kh * kw * C, O)      # (K, O), K ordered (i, j, c)
            dcol = None
            for lo, hi in groups:
                if dcol is None or dcol.shape[0] != (hi - lo) * C:
                    dcol = np.empty(((hi - lo) * C, M), dtype=dt)       # scratch, reused per group
                np.matmul(w2t[lo * C:hi * C], dyr, out=dcol)            # ((hi-lo) C, O) @ (O, M)
                for kk in range(lo, hi):
                    off = (kk // kw) * Ws + kk % kw
                    dxr[:, off:off + M] += dcol[(kk - lo) * C:(kk - lo + 1) * C]
            del dcol
            dx_grid = dxr[:, base:base + M]                             # (C, M) the input pixels' slots
        dx = dx_grid.reshape(C, N, Hs, Ws)[:, :, :H, :W]                  # (C, N, H, W) view
        return np.ascontiguousarray(dx.transpose(1, 0, 2, 3)), dw, db     # (N, C, H, W)

    xp = cache["xp"].astype(dt, copy=False)                               # (C, N, Hp, Wp)
    dy2 = np.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(O, N * Ho * Wo)  # (O, P)
    db = dy2.sum(axis=1) if cache["has_bias"] else None                   # (O,)
    col = _im2col(xp, kh, kw, stride, Ho, Wo)                             # (K, P), rebuilt
    dw2 = dy2 @ col.T                                                     # (O, K), K = (i, j, c)
    del col
    dw = np.ascontiguousarray(dw2.reshape(O, kh, kw, C).transpose(0, 3, 1, 2))  # (O, C, kh, kw)
    if not input_grad:
        return None, dw, db
    w2 = w.transpose(0, 2, 3, 1).reshape(O, kh * kw * C)                  # (O, K)
    dcol = (w2.T @ dy2).reshape(kh, kw, C, N, Ho, Wo)                     # (kh, kw, C, N, Ho, Wo)
    # col2im: each kernel offset owns a strided sub-grid of the padded input; add its slab.
    dxp = np.zeros((C, N, Hp, Wp), dtype=dt)                              # (C, N, Hp, Wp)
    hs, ws = stride * (Ho - 1) + 1, stride * (Wo - 1) + 1
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + hs:stride, j:j + ws:stride] += dcol[i, j]
    del dcol
    dx = np.ascontiguousarray(dxp[:, :, pt:pt + H, pl:pl + W].transpose(1, 0, 2, 3))  # (N, C, H, W)
    return dx, dw, db
