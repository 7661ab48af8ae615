"""2-D convolution on the GPU: implicit GEMM, shared-memory tiled, with a fused epilogue.

What it is: the GPU twin of ``ddpm_ref/ops/conv.py`` (same names, signatures and ``(y, cache)``
contract, on device float32 arrays). The equations are the reference's (cross-correlation with zero
padding ``(top, bottom, left, right)`` and stride ``s``):

    y[n, o, p, q]  = b[o] + sum_{c, r, t} w[o, c, r, t] x[n, c, s p - top + r, s q - left + t]
    dx[n, c, h, v] = sum_{o, r, t: (h + top - r) = s p, (v + left - t) = s q} w[o, c, r, t] dy[n, o, p, q]
    dw[o, c, r, t] = sum_{n, p, q} dy[n, o, p, q] x[n, c, s p - top + r, s q - left + t]
    db[o]          = sum_{n, p, q} dy[n, o, p, q]

Each of the three sums is a GEMM whose operands are *gathered on the fly* from x, w and dy while a
tile is loaded into shared memory ("implicit GEMM"): no im2col buffer ever exists in global memory.

=========  =================  ========================  ===========================================
kernel     rows (M)           columns                   reduction (K)
=========  =================  ========================  ===========================================
forward    o  (O)             (n, p, q)  (N P Q)        (c, r, t)  (C kh kw)
dx         c  (C)             (n, h, v)  (N H W)        (o, r, t)  (O kh kw), non-integer p, q skipped
dw         o  (O)             (c, r, t)  (C kh kw)      (n, p, q)  (N P Q), split over blockIdx.z
=========  =================  ========================  ===========================================

Tiling (all three kernels; one block of 16 x 16 threads per BM x BN output tile; each thread owns a
TM x TN register tile with rows ``ty + 16 i`` and columns ``tx + 16 j``, so a warp's stores are
coalesced and its shared-memory reads conflict-free; K is consumed BK = 8 at a time through two
shared tiles ``As (BK, BM)`` and ``Bs (BK, BN)``; the Bs column a thread gathers is fixed for the
whole kernel, so its pixel coordinates are decoded once):

* v1: 64 x 64 tiles, 4 x 4 per thread: 8 shared-memory loads per 16 FMAs. Wastes little on small
  layers (few channels, 4x4 images).
* v2: 128 x 128 tiles, 8 x 8 per thread: 16 loads per 64 FMAs, the classic SGEMM configuration,
  for the large CIFAR layers.

* v3 (:func:`_tiled_kernels_v3`, in three tile sizes, V3S 64 x 64, V3 128 x 128 and V3L 256 x 128):
  forward and dx with the reduction ordered (kernel offset, channel) so the gather needs no integer
  division per element; dw with each gathered row's (n, p, q) advanced by carries instead of divided
  out; all three with register prefetch of the next K step's global loads during the current step's
  FMAs and unsigned shared-tile indices (no wraparound code in the FMA loop). Each tile size comes in
  variants with bit-identical results (the inner loop plain or unrolled by four, a thread's outputs
  strided or in blocked runs of four that load 16 bytes at a time), and the launcher times them on
  the first launch of each problem (:func:`_launch_tuned`).

The public ``conv2d_forward`` / ``conv2d_backward`` run v3, with the tile size picked per GEMM
(``_pick``); ``conv2d_forward_v1`` / ``_v2`` / ``_v3`` force a version, for the benchmarks.

The forward epilogue fuses ``+ b[o]``, optionally ``+ temb[n, o]`` (the U-Net's time-embedding add,
which the reference does as a separate broadcast add right after the conv) and ``+ residual[n, o, p,
q]`` (the residual connection), in that order, so one kernel writes the block output.

The weight gradient splits K (N P Q, up to 131072 on the CIFAR shapes) across ``blockIdx.z`` into a
``(splits, O, C kh kw)`` partial buffer that is then summed (CuPy's reduction; deterministic, no
atomics). db is a per-channel float64 reduction kernel.

Registers: the main loop keeps the TM x TN accumulators in registers in both versions (checked in
the PTX: no local memory there); v2's forward epilogue, too large for the compiler to unroll
fully, reads them back through 256 bytes of per-thread local memory once per tile, which costs
nothing next to the main loop.

What it is not: tuned to cuDNN's level (2.5x its time on the cifar preset; no tensor cores: FP32
like the reference). The plain strided forward kernel is issue-bound (Nsight Compute on an H200):
of about 100 instructions in its inner loop, 64 are FMAs, 20 four-byte shared-memory loads and 17
loop and address bookkeeping. The blocked variants bring that to 83 (plain) and 73 (unrolled) per
64 FMAs (:func:`_tiled_kernels_v3`, with the whole K step's counts); no GPU has timed them yet.
Future versions go beside v1, v2 and v3 (llm.c's dev/cuda style), each validated by the same tests.
"""
from __future__ import annotations

import numpy as np

from . import runtime as _b
from ._jit import cuda, device, kernel
from numba import float32, float64, int32, uint64

# Padding and output-size rules are the reference's, not a copy of them.
from ddpm_ref.ops._checks import check_int  # noqa: E402
from ddpm_ref.ops.conv import _normalize_padding, conv_output_size  # noqa: E402


__all__ = ["conv2d_forward", "conv2d_backward", "conv_output_size", "conv2d_forward_v1",
           "conv2d_backward_v1", "conv2d_forward_v2", "conv2d_backward_v2", "conv2d_forward_v3",
           "conv2d_backward_v3"]

_F4 = "float32[:, :, :, ::1]"
_F3 = "float32[:, :, ::1]"
_F2 = "float32[:, ::1]"
_F1 = "float32[::1]"


class Tiles:
    """One tile configuration: the three tiled kernels built for it, and its sizes."""

    def __init__(self, version, BM, BN, BK, TX, TY, fwd, dx, dw, v3=False, label=""):
        self.version, self.BM, self.BN, self.BK, self.TX, self.TY = version, BM, BN, BK, TX, TY
        self.fwd, self.dx, self.dw = fwd, dx, dw
        self.v3 = v3                   # version 3's argument layout (flat x / dy, transposed w)
        self.label = label or version  # the variant's name in the autotuner's report
        self.variants = [self]         # same tiles, same numbers, other code: the autotuner's choice


def _tiled_kernels(version, BM, BN, BK, tx=16, ty=16, register=True):
    """Build the forward, dx and dw kernels for a BM x BN block tile, BK-deep shared-memory steps.

    Each of the ty x tx threads owns a TM x TN register tile (TM = BM / ty, TN = BN / tx) with rows
    ``ty + TY i`` and columns ``tx + TX j``. The sizes are closure constants: Numba freezes them, so
    the shared and local arrays have compile-time shapes and the register loops unroll. The
    production configurations use 16 x 16 threads; the tests also build a tiny one (16 x 16 tiles
    on 4 x 4 threads, ``register=False``) to cover many tiles in every direction cheaply in the
    simulator, where each thread costs a Python thread.
    """
    TX = tx
    TY = ty
    NT = TX * TY
    TM = BM // TY
    TN = BN // TX
    A_ROWS_PER_PASS = NT // BK     # rows of As gathered per pass (BM / A_ROWS_PER_PASS passes)
    B_ROWS_PER_PASS = NT // BN     # rows of Bs gathered per pass (BK / B_ROWS_PER_PASS passes)
    # As rows padded by 4 floats: the gather writes As[ak, m] with ak = tid % BK fastest, so without
    # padding the 8 values of ak hit one bank (8-way conflict); with row length = 4 mod 32 words the
    # writes of a warp (ak 0..7, m 0..3) fall on 32 distinct banks (4 ak + m). Reads As[kk, ty + TY i] are
    # broadcasts either way.
    BM_PAD = BM + 4
    if BM % TY or BN % TX or NT % BK or NT % BN or BM % A_ROWS_PER_PASS or BK % B_ROWS_PER_PASS:
        raise ValueError(f"tile {BM}x{BN}x{BK} does not fit {TY}x{TX} threads")

    @kernel(f"void({_F4}, {_F2}, {_F1}, {_F2}, {_F3}, {_F3}, int32, int32, int32, int32, int32)",
            name=f"conv2d_fwd_kernel_{version}", register=register)
    def conv2d_fwd_kernel(x, w2, bias, temb, residual, y3, stride, pad_top, pad_left, out_w, flags):
        """y3 (N, O, P*Q) = w2 (O, C*kh*kw) @ im2col(x) (+ bias (flag 1), + temb (2), + residual (4)).

        out_w is Q, the output width; kh*kw is recovered as w2.shape[1] // C and kw from x via ``flags``
        bits 8.. (kw << 8).
        """
        N = x.shape[0]
        C = x.shape[1]
        H = x.shape[2]
        W = x.shape[3]
        O = w2.shape[0]
        K = w2.shape[1]
        KW = flags >> 8
        RS = K // C
        PQ = y3.shape[2]
        Q = out_w
        NPQ = N * PQ
        As = cuda.shared.array((BK, BM_PAD), float32)
        Bs = cuda.shared.array((BK, BN), float32)
        acc = cuda.local.array((TM, TN), float32)
        a_reg = cuda.local.array(TM, float32)
        b_reg = cuda.local.array(TN, float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TX + tx
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = float32(0.0)
        # The Bs column this thread gathers: output pixel col = (n, p, q), decoded once.
        bj = tid % BN
        bk = tid // BN
        col = n0 + bj
        col_ok = col < NPQ
        bn = col // PQ
        pq = col - bn * PQ
        bp = pq // Q
        h_base = bp * stride - pad_top
        w_base = (pq - bp * Q) * stride - pad_left
        ak = tid % BK
        am = tid // BK
        for k0 in range(0, K, BK):
            for l in range(BM // A_ROWS_PER_PASS):
                m = am + A_ROWS_PER_PASS * l
                k = k0 + ak
                v = float32(0.0)
                if m0 + m < O and k < K:
                    v = w2[m0 + m, k]
                As[ak, m] = v
            for l in range(BK // B_ROWS_PER_PASS):
                kk = bk + B_ROWS_PER_PASS * l
                k = k0 + kk
                v = float32(0.0)
                if col_ok and k < K:
                    c = k // RS
                    rs = k - c * RS
                    r = rs // KW
                    h = h_base + r
                    ww = w_base + (rs - r * KW)
                    if h >= 0 and h < H and ww >= 0 and ww < W:
                        v = x[bn, c, h, ww]
                Bs[kk, bj] = v
            cuda.syncthreads()
            for kk in range(BK):
                for i in range(TM):
                    a_reg[i] = As[kk, ty + TY * i]
                for j in range(TN):
                    b_reg[j] = Bs[kk, tx + TX * j]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a_reg[i] * b_reg[j]
            cuda.syncthreads()
        # Epilogue, in two loops: the first reads acc (a simple body, so the compiler unrolls it and
        # acc stays in registers), the second adds temb and the residual to what this thread just
        # wrote (cache hits), without touching acc.
        for i in range(TM):
            o = m0 + ty + TY * i
            if o < O:
                for j in range(TN):
                    cj = n0 + tx + TX * j
                    if cj < NPQ:
                        n = cj // PQ
                        v = acc[i, j]
                        if flags & 1:
                            v += bias[o]
                        y3[n, o, cj - n * PQ] = v
        if flags & 6:
            for i in range(TM):
                o = m0 + ty + TY * i
                if o < O:
                    for j in range(TN):
                        cj = n0 + tx + TX * j
                        if cj < NPQ:
                            n = cj // PQ
                            p = cj - n * PQ
                            v = y3[n, o, p]
                            if flags & 2:
                                v += temb[n, o]
                            if flags & 4:
                                v += residual[n, o, p]
                            y3[n, o, p] = v

    @kernel(f"void({_F3}, {_F2}, {_F3}, int32, int32, int32, int32, int32, int32)",
            name=f"conv2d_dx_kernel_{version}", register=register)
    def conv2d_dx_kernel(dy3, w2, dx3, stride, pad_top, pad_left, out_w, in_w, kw):
        """dx3 (N, C, H*W) = w2^T gathered (C, O*kh*kw) @ gathered dy (O*kh*kw, N*H*W)."""
        N = dy3.shape[0]
        O = dy3.shape[1]
        PQ = dy3.shape[2]
        C = dx3.shape[1]
        HW = dx3.shape[2]
        W = in_w
        Q = out_w
        P = PQ // Q
        RS = w2.shape[1] // C
        K = O * RS
        NHW = N * HW
        As = cuda.shared.array((BK, BM_PAD), float32)
        Bs = cuda.shared.array((BK, BN), float32)
        acc = cuda.local.array((TM, TN), float32)
        a_reg = cuda.local.array(TM, float32)
        b_reg = cuda.local.array(TN, float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TX + tx
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = float32(0.0)
        bj = tid % BN
        bk = tid // BN
        col = n0 + bj
        col_ok = col < NHW
        bn = col // HW
        hw = col - bn * HW
        bh = hw // W
        h_base = bh + pad_top              # h + top = s p + r
        w_base = hw - bh * W + pad_left
        ak = tid % BK
        am = tid // BK
        for k0 in range(0, K, BK):
            for l in range(BM // A_ROWS_PER_PASS):
                m = am + A_ROWS_PER_PASS * l      # c
                k = k0 + ak                       # (o, r, t)
                v = float32(0.0)
                if m0 + m < C and k < K:
                    o = k // RS
                    v = w2[o, (m0 + m) * RS + (k - o * RS)]
                As[ak, m] = v
            for l in range(BK // B_ROWS_PER_PASS):
                kk = bk + B_ROWS_PER_PASS * l
                k = k0 + kk
                v = float32(0.0)
                if col_ok and k < K:
                    o = k // RS
                    rs = k - o * RS
                    r = rs // kw
                    hp = h_base - r
                    wp = w_base - (rs - r * kw)
                    if hp >= 0 and wp >= 0:
                        p = hp // stride
                        q = wp // stride
                        if p * stride == hp and q * stride == wp and p < P and q < Q:
                            v = dy3[bn, o, p * Q + q]
                Bs[kk, bj] = v
            cuda.syncthreads()
            for kk in range(BK):
                for i in range(TM):
                    a_reg[i] = As[kk, ty + TY * i]
                for j in range(TN):
                    b_reg[j] = Bs[kk, tx + TX * j]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a_reg[i] * b_reg[j]
            cuda.syncthreads()
        for i in range(TM):
            c = m0 + ty + TY * i
            if c < C:
                for j in range(TN):
                    cj = n0 + tx + TX * j
                    if cj < NHW:
                        n = cj // HW
                        dx3[n, c, cj - n * HW] = acc[i, j]


    @kernel(f"void({_F3}, {_F4}, {_F3}, int32, int32, int32, int32, int32, int32)",
            name=f"conv2d_dw_kernel_{version}", register=register)
    def conv2d_dw_kernel(dy3, x, part, stride, pad_top, pad_left, out_w, kw, k_chunk):
        """part[z] (O, C*kh*kw) = dy (O, K_z) @ gathered x (K_z, C*kh*kw) over K slice z of N*P*Q."""
        N = dy3.shape[0]
        O = dy3.shape[1]
        PQ = dy3.shape[2]
        C = x.shape[1]
        H = x.shape[2]
        W = x.shape[3]
        Q = out_w
        CRS = part.shape[2]
        RS = CRS // C
        K = N * PQ
        k_begin = cuda.blockIdx.z * k_chunk
        k_end = min(K, k_begin + k_chunk)
        As = cuda.shared.array((BK, BM_PAD), float32)
        Bs = cuda.shared.array((BK, BN), float32)
        acc = cuda.local.array((TM, TN), float32)
        a_reg = cuda.local.array(TM, float32)
        b_reg = cuda.local.array(TN, float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TX + tx
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = float32(0.0)
        bj = tid % BN
        bk = tid // BN
        col = n0 + bj                      # (c, r, t)
        col_ok = col < CRS
        bc = col // RS
        rs = col - bc * RS
        br = rs // kw
        bt = rs - br * kw
        ak = tid % BK
        am = tid // BK
        for k0 in range(k_begin, k_end, BK):
            for l in range(BM // A_ROWS_PER_PASS):
                m = am + A_ROWS_PER_PASS * l      # o
                k = k0 + ak                       # (n, p, q)
                v = float32(0.0)
                if m0 + m < O and k < k_end:
                    n = k // PQ
                    v = dy3[n, m0 + m, k - n * PQ]
                As[ak, m] = v
            for l in range(BK // B_ROWS_PER_PASS):
                kk = bk + B_ROWS_PER_PASS * l
                k = k0 + kk
                v = float32(0.0)
                if col_ok and k < k_end:
                    n = k // PQ
                    pq = k - n * PQ
                    p = pq // Q
                    h = p * stride - pad_top + br
                    ww = (pq - p * Q) * stride - pad_left + bt
                    if h >= 0 and h < H and ww >= 0 and ww < W:
                        v = x[n, bc, h, ww]
                Bs[kk, bj] = v
            cuda.syncthreads()
            for kk in range(BK):
                for i in range(TM):
                    a_reg[i] = As[kk, ty + TY * i]
                for j in range(TN):
                    b_reg[j] = Bs[kk, tx + TX * j]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a_reg[i] * b_reg[j]
            cuda.syncthreads()
        z = cuda.blockIdx.z
        for i in range(TM):
            o = m0 + ty + TY * i
            if o < O:
                for j in range(TN):
                    cj = n0 + tx + TX * j
                    if cj < CRS:
                        part[z, o, cj] = acc[i, j]

    return Tiles(version, BM, BN, BK, TX, TY, conv2d_fwd_kernel, conv2d_dx_kernel, conv2d_dw_kernel)


# v1: 64 x 64 tiles, 4 x 4 per thread (0.5 shared loads per FMA); v2: 128 x 128 tiles, 8 x 8 per
# thread (0.25 shared loads per FMA: the classic SGEMM configuration), for the large CIFAR layers.
V1 = _tiled_kernels("v1", 64, 64, 8)
V2 = _tiled_kernels("v2", 128, 128, 8)


# ---------------------------------------------------------------------------------------------
# Version 3: K reordered to (kernel offset, channel), division-free gathers, register prefetch
# ---------------------------------------------------------------------------------------------

def _tiled_kernels_v3(version, BM, BN, BK, tx=16, ty=16, register=True, loop="plain", launch_bounds=None,
                      mapping="strided"):
    """Forward, dx and dw kernels, version 3.

    Differences from :func:`_tiled_kernels` (same thread layout, shared tiles and register tiles):

    * The reduction index is ordered ``(r, t)`` outer, channel inner, and each BK step covers
      BK channels of one kernel offset (channels padded to a multiple of BK with zeros). The
      pixel a thread gathers and its bounds check are then fixed for a whole run of channels:
      the inner gather is one multiply-add and one load, with no integer division per element
      (v1/v2 divide ``k`` by ``kh kw`` and by ``kw`` for every gathered element). The weights are
      read through a host-side transposed copy, ``(O, kh kw, C)`` for the forward pass and
      ``(kh kw, O, C)`` for dx (w is small: one CuPy transpose per call).
    * Register prefetch (software double buffering): the global loads of step s + 1 are issued
      before the FMAs of step s, so their latency hides behind the arithmetic instead of stalling
      every step.
    * x and dy are read through flat views with per-offset base indices; the shared tiles are
      read with unsigned indices, so Numba emits no negative-index wraparound in the FMA loop (in
      v1/v2 that bookkeeping is about as many instructions as the FMAs there).
    * ``loop``, the FMA loop over a step's BK rows: "plain", per row its shared-memory loads then its
      FMAs (:func:`_tile_step_plain`, the loop as first written); "unrolled", the same four rows to
      an iteration (:func:`_tile_step_unrolled`: Numba does not unroll the loop itself, and its
      bookkeeping is 17 of about 100 instructions per row). The same FMAs in the same order.
    * ``mapping``, which outputs of the block tile a thread owns: "strided", rows ``ty + TY i`` and
      columns ``tx + TX j``, one value per shared-memory load; "blocked", runs of four consecutive
      rows and columns, rows ``4 TY (i // 4) + 4 ty + i % 4`` and likewise columns, so that ptxas
      merges each run's four loads into one 16-byte ``LDS.128``. A warp's runs are consecutive
      16-byte pieces of a shared row: conflict-free loads, or broadcasts. Which thread computes an
      output changes neither its FMAs nor their order. The epilogue's stores are then four-strided
      within a warp (fewer full sectors), once per tile.
    * ``launch_bounds`` caps the registers.

    Every combination gives bit-identical results; which is fastest depends on the shape and the
    GPU, and the launcher times the family's variants on first use of a problem
    (:func:`_launch_tuned`). In the sm_90 machine code of the 128 x 128 tiles (32 x 8 threads,
    ``benchmarks/kernel_resources.py --loops``): registers, the inner loop's instructions per row
    of 64 FMAs (forward kernel), and the instructions of one whole K step (8 rows, 512 FMAs, with
    the global prefetch, shared stores and barriers around them) for fwd / dx / dw:

    =================  ===========  =======================  ==================  =============
    variant            registers    inner loop, one row      K step              FMA share
    =================  ===========  =======================  ==================  =============
    plain, strided     128/120/126  97 (20 four-byte loads)  1003 / 1128 / 1224  51 / 45 / 42%
    plain, blocked     127/128/128  83 (5 LDS.128)           891 / 979 / 1109    57 / 52 / 46%
    unrolled, blocked  168/168/130  72.5 (5 LDS.128)         807 / 897 / 1010    63 / 57 / 51%
    =================  ===========  =======================  ==================  =============

    The global gathers and the shared stores index with unsigned integers too (no wraparound code):
    before that, the plain strided K step was 1093 / 1203 instructions (fwd / dx). The about 220
    instructions per K step outside the FMA loop are what a deeper BK would amortise, at the cost of
    twice the prefetch registers (over 128: one block per multiprocessor).

    The strided loads may also cost shared-memory bandwidth: a warp of 32 x 8 threads shares one ty,
    so its 16 A loads per row are broadcasts that each take a shared-memory cycle; at one such cycle
    per multiprocessor per clock, 20 cycles per row against 16 issue cycles for its 64 FMAs on the
    four schedulers; blocked, 8 (a count, not yet checked by Nsight Compute). The unrolled blocked
    loop's 168 registers leave one block of 256 threads per multiprocessor instead of two, so it
    relies on its own instruction-level parallelism to hide latency (capped at 128 registers by
    launch bounds it spills 100 to 156 bytes; unrolled by two it takes as many registers).
    """
    TX = tx
    TY = ty
    NT = TX * TY
    TM = BM // TY
    TN = BN // TX
    A_ROWS_PER_PASS = NT // BK
    B_ROWS_PER_PASS = NT // BN
    NA = BM // A_ROWS_PER_PASS     # A values a thread gathers per step
    NB = BK // B_ROWS_PER_PASS     # B values a thread gathers per step
    BM_PAD = BM + 4                # as v1/v2: conflict-free As stores
    if BM % TY or BN % TX or NT % BK or NT % BN or BM % A_ROWS_PER_PASS or BK % B_ROWS_PER_PASS:
        raise ValueError(f"tile {BM}x{BN}x{BK} does not fit {TY}x{TX} threads")
    if BK % 4:
        raise ValueError(f"version 3 needs BK a multiple of 4, got {BK}")
    if loop not in ("plain", "unrolled"):
        raise ValueError(f"loop must be 'plain' or 'unrolled', got {loop!r}")
    if mapping not in ("strided", "blocked"):
        raise ValueError(f"mapping must be 'strided' or 'blocked', got {mapping!r}")
    if mapping == "blocked" and (TM % 4 or TN % 4):
        raise ValueError(f"the blocked mapping needs runs of 4 outputs: {TM} x {TN} per thread")

    if mapping == "strided":
        @device
        def _row(ty, i):
            """The block-tile row of a thread's register row i (column: _col)."""
            return ty + TY * i

        @device
        def _col(tx, j):
            return tx + TX * j
    else:
        @device
        def _row(ty, i):
            return TY * 4 * (i // 4) + 4 * ty + i % 4

        @device
        def _col(tx, j):
            return TX * 4 * (j // 4) + 4 * tx + j % 4

    @device
    def _load_row(As, Bs, k, a, b, ty, tx):
        """Row k of the shared tiles into the register sets a (TM) and b (TN); unsigned indices, so
        no negative-index wraparound code."""
        ku = uint64(k)
        for i in range(TM):
            a[i] = As[ku, uint64(_row(ty, i))]
        for j in range(TN):
            b[j] = Bs[ku, uint64(_col(tx, j))]

    @device
    def _fma_row(acc, a, b):
        for i in range(TM):
            for j in range(TN):
                acc[i, j] += a[i] * b[j]

    @device
    def _tile_step_plain(As, Bs, acc, a_reg, b_reg, ty, tx):
        """acc += As^T Bs over the BK rows of the shared tiles: per row, its loads, then its FMAs."""
        for kk in range(BK):
            _load_row(As, Bs, kk, a_reg, b_reg, ty, tx)
            _fma_row(acc, a_reg, b_reg)

    @device
    def _tile_step_unrolled(As, Bs, acc, a_reg, b_reg, ty, tx):
        """:func:`_tile_step_plain` with four rows written out per iteration (BK is a multiple of 4)."""
        for kk in range(0, BK, 4):
            _load_row(As, Bs, kk, a_reg, b_reg, ty, tx)
            _fma_row(acc, a_reg, b_reg)
            _load_row(As, Bs, kk + 1, a_reg, b_reg, ty, tx)
            _fma_row(acc, a_reg, b_reg)
            _load_row(As, Bs, kk + 2, a_reg, b_reg, ty, tx)
            _fma_row(acc, a_reg, b_reg)
            _load_row(As, Bs, kk + 3, a_reg, b_reg, ty, tx)
            _fma_row(acc, a_reg, b_reg)

    _step = {"plain": _tile_step_plain, "unrolled": _tile_step_unrolled}[loop]

    @kernel(f"void(float32[::1], {_F3}, {_F1}, {_F2}, {_F3}, {_F3}, int32, int32, int32, int32, int32, "
            f"int32, int32, int32)", name=f"conv2d_fwd_kernel_{version}", register=register,
            launch_bounds=launch_bounds)
    def conv2d_fwd_kernel(x1, w3, bias, temb, residual, y3, C, H, W, stride, pad_top, pad_left,
                          out_w, flags):
        """y3 (N, O, P*Q) = w3 (O, kh*kw, C) @ im2col(x) in (offset, channel) order (+ epilogue).

        x1 is x (N, C, H, W) flattened; kw = flags >> 8."""
        O = w3.shape[0]
        RS = w3.shape[1]
        KW = flags >> 8
        PQ = y3.shape[2]
        N = y3.shape[0]
        Q = out_w
        NPQ = N * PQ
        HW = H * W
        CB = (C + BK - 1) // BK              # channel steps per kernel offset
        S = RS * CB                          # BK steps in all
        As = cuda.shared.array((BK, BM_PAD), float32)
        Bs = cuda.shared.array((BK, BN), float32)
        acc = cuda.local.array((TM, TN), float32)
        a_reg = cuda.local.array(TM, float32)
        b_reg = cuda.local.array(TN, float32)
        a_pre = cuda.local.array(NA, float32)
        b_pre = cuda.local.array(NB, float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TX + tx
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = float32(0.0)
        bj = tid % BN
        bk = tid // BN
        col = n0 + bj
        col_ok = col < NPQ
        bn = col // PQ
        pq = col - bn * PQ
        bp = pq // Q
        h_base = bp * stride - pad_top
        w_base = (pq - bp * Q) * stride - pad_left
        x_base = bn * C * HW                 # x1 index of x[bn, 0, 0, 0]
        ak = tid % BK
        am = tid // BK
        # The step being loaded: kernel offset rs (r, t) and first channel c0.
        rs = 0
        c0 = 0
        r = 0
        t = 0
        inside = False
        pix = x_base
        for s in range(S + 1):
            if s > 0:                        # the prefetched step s - 1 goes to shared memory
                for l in range(NA):
                    As[uint64(ak), uint64(am + A_ROWS_PER_PASS * l)] = a_pre[l]
                for l in range(NB):
                    Bs[uint64(bk + B_ROWS_PER_PASS * l), uint64(bj)] = b_pre[l]
                cuda.syncthreads()
            if s < S:                        # prefetch step s into registers
                if c0 == 0:                  # a new kernel offset: the gathered pixel moves
                    h = h_base + r
                    ww = w_base + t
                    inside = col_ok and h >= 0 and h < H and ww >= 0 and ww < W
                    pix = x_base + h * W + ww
                for l in range(NA):
                    m = m0 + am + A_ROWS_PER_PASS * l
                    c = c0 + ak
                    v = float32(0.0)
                    if m < O and c < C:
                        v = w3[uint64(m), uint64(rs), uint64(c)]
                    a_pre[l] = v
                for l in range(NB):
                    c = c0 + bk + B_ROWS_PER_PASS * l
                    v = float32(0.0)
                    if inside and c < C:
                        v = x1[uint64(pix + c * HW)]
                    b_pre[l] = v
                c0 += BK                     # advance to the next step (no division)
                if c0 >= C:
                    c0 = 0
                    rs += 1
                    t += 1
                    if t == KW:
                        t = 0
                        r += 1
            if s > 0:                        # FMAs on step s - 1 while step s's loads fly
                _step(As, Bs, acc, a_reg, b_reg, ty, tx)
                cuda.syncthreads()
        for i in range(TM):
            o = m0 + _row(ty, i)
            if o < O:
                for j in range(TN):
                    cj = n0 + _col(tx, j)
                    if cj < NPQ:
                        n = cj // PQ
                        v = acc[i, j]
                        if flags & 1:
                            v += bias[o]
                        y3[n, o, cj - n * PQ] = v
        if flags & 6:
            for i in range(TM):
                o = m0 + _row(ty, i)
                if o < O:
                    for j in range(TN):
                        cj = n0 + _col(tx, j)
                        if cj < NPQ:
                            n = cj // PQ
                            p = cj - n * PQ
                            v = y3[n, o, p]
                            if flags & 2:
                                v += temb[n, o]
                            if flags & 4:
                                v += residual[n, o, p]
                            y3[n, o, p] = v

    @kernel(f"void(float32[::1], {_F3}, {_F3}, int32, int32, int32, int32, int32, int32, int32, int32)",
            name=f"conv2d_dx_kernel_{version}", register=register,
            launch_bounds=launch_bounds)
    def conv2d_dx_kernel(dy1, wt, dx3, O, P, Q, stride, pad_top, pad_left, in_w, kw):
        """dx3 (N, C, H*W) = wt (kh*kw, O, C) gathered @ gathered dy, reduction in (offset, o) order.

        dy1 is dy (N, O, P, Q) flattened."""
        N = dx3.shape[0]
        C = dx3.shape[1]
        HW = dx3.shape[2]
        RS = wt.shape[0]
        W = in_w
        PQ = P * Q
        NHW = N * HW
        OB = (O + BK - 1) // BK
        S = RS * OB
        As = cuda.shared.array((BK, BM_PAD), float32)
        Bs = cuda.shared.array((BK, BN), float32)
        acc = cuda.local.array((TM, TN), float32)
        a_reg = cuda.local.array(TM, float32)
        b_reg = cuda.local.array(TN, float32)
        a_pre = cuda.local.array(NA, float32)
        b_pre = cuda.local.array(NB, float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TX + tx
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = float32(0.0)
        bj = tid % BN
        bk = tid // BN
        col = n0 + bj
        col_ok = col < NHW
        bn = col // HW
        hw = col - bn * HW
        bh = hw // W
        h_base = bh + pad_top              # h + top = s p + r
        w_base = hw - bh * W + pad_left
        dy_base = bn * O * PQ              # dy1 index of dy[bn, 0, 0, 0]
        ak = tid % BK
        am = tid // BK
        rs = 0
        o0 = 0
        r = 0
        t = 0
        inside = False
        pix = dy_base
        for s in range(S + 1):
            if s > 0:
                for l in range(NA):
                    As[uint64(ak), uint64(am + A_ROWS_PER_PASS * l)] = a_pre[l]
                for l in range(NB):
                    Bs[uint64(bk + B_ROWS_PER_PASS * l), uint64(bj)] = b_pre[l]
                cuda.syncthreads()
            if s < S:
                if o0 == 0:                  # a new kernel offset: the source pixel moves
                    hp = h_base - r
                    wp = w_base - t
                    p = hp // stride
                    q = wp // stride
                    inside = (col_ok and hp >= 0 and wp >= 0 and p * stride == hp and q * stride == wp
                              and p < P and q < Q)
                    pix = dy_base + p * Q + q
                for l in range(NA):
                    m = m0 + am + A_ROWS_PER_PASS * l      # c
                    o = o0 + ak
                    v = float32(0.0)
                    if m < C and o < O:
                        v = wt[uint64(rs), uint64(o), uint64(m)]
                    a_pre[l] = v
                for l in range(NB):
                    o = o0 + bk + B_ROWS_PER_PASS * l
                    v = float32(0.0)
                    if inside and o < O:
                        v = dy1[uint64(pix + o * PQ)]
                    b_pre[l] = v
                o0 += BK
                if o0 >= O:
                    o0 = 0
                    rs += 1
                    t += 1
                    if t == kw:
                        t = 0
                        r += 1
            if s > 0:
                _step(As, Bs, acc, a_reg, b_reg, ty, tx)
                cuda.syncthreads()
        for i in range(TM):
            c = m0 + _row(ty, i)
            if c < C:
                for j in range(TN):
                    cj = n0 + _col(tx, j)
                    if cj < NHW:
                        n = cj // HW
                        dx3[n, c, cj - n * HW] = acc[i, j]

    @kernel(f"void(float32[::1], float32[::1], {_F3}, int32, int32, int32, int32, int32, int32, int32, int32, "
            f"int32, int32, int32, int32)", name=f"conv2d_dw_kernel_{version}", register=register,
            launch_bounds=launch_bounds)
    def conv2d_dw_kernel(dy1, x1, part, N, O, P, Q, C, H, W, stride, pad_top, pad_left, kw, k_chunk):
        """part[z] (O, C*kh*kw) = dy (O, K_z) @ gathered x (K_z, C*kh*kw) over K slice z of N*P*Q.

        dy1, x1: dy (N, O, P, Q) and x (N, C, H, W) flattened. Each gathered K row's (n, p, q) is
        decoded once and then advanced by BK per step (a carry or two, no division), kept in int32
        (each below 2**31; the products that index x are formed in int64 all the same, Numba's
        integer arithmetic being at least 64-bit): with int64 the 128 x 128 kernel took 162
        registers, one block of 256 threads per multiprocessor; with int32, 128, two blocks."""
        CRS = part.shape[2]
        RS = CRS // C
        PQ = P * Q
        HW = H * W
        K = N * PQ
        k_begin = cuda.blockIdx.z * k_chunk
        k_end = min(K, k_begin + k_chunk)
        S = (k_end - k_begin + BK - 1) // BK
        As = cuda.shared.array((BK, BM_PAD), float32)
        Bs = cuda.shared.array((BK, BN), float32)
        acc = cuda.local.array((TM, TN), float32)
        a_reg = cuda.local.array(TM, float32)
        b_reg = cuda.local.array(TN, float32)
        a_pre = cuda.local.array(NA, float32)
        b_pre = cuda.local.array(NB, float32)
        bn_s = cuda.local.array(NB, int32)
        bp_s = cuda.local.array(NB, int32)
        bq_s = cuda.local.array(NB, int32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TX + tx
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = float32(0.0)
        bj = tid % BN
        bk = tid // BN
        col = n0 + bj                      # (c, r, t)
        col_ok = col < CRS
        bc = col // RS
        rs = col - bc * RS
        br = rs // kw
        bt = rs - br * kw
        x_c = bc * HW                      # offset of channel bc inside one sample
        ak = tid % BK
        am = tid // BK
        ka = k_begin + ak                  # the A row this thread gathers: (na, pqa)
        na = ka // PQ
        pqa = ka - na * PQ
        for l in range(NB):                # the B rows: (n, p, q), decoded once
            kb = k_begin + bk + B_ROWS_PER_PASS * l
            n_ = kb // PQ
            pq_ = kb - n_ * PQ
            p_ = pq_ // Q
            bn_s[l] = n_
            bp_s[l] = p_
            bq_s[l] = pq_ - p_ * Q
        for s in range(S + 1):
            if s > 0:
                for l in range(NA):
                    As[uint64(ak), uint64(am + A_ROWS_PER_PASS * l)] = a_pre[l]
                for l in range(NB):
                    Bs[uint64(bk + B_ROWS_PER_PASS * l), uint64(bj)] = b_pre[l]
                cuda.syncthreads()
            if s < S:
                k0 = k_begin + s * BK
                ok_a = k0 + ak < k_end
                for l in range(NA):
                    m = m0 + am + A_ROWS_PER_PASS * l      # o
                    v = float32(0.0)
                    if m < O and ok_a:
                        v = dy1[uint64((na * O + m) * PQ + pqa)]
                    a_pre[l] = v
                for l in range(NB):
                    v = float32(0.0)
                    if col_ok and k0 + bk + B_ROWS_PER_PASS * l < k_end:
                        h = bp_s[l] * stride - pad_top + br
                        ww = bq_s[l] * stride - pad_left + bt
                        if h >= 0 and h < H and ww >= 0 and ww < W:
                            v = x1[uint64(bn_s[l] * C * HW + x_c + h * W + ww)]
                    b_pre[l] = v
                pqa += BK                          # advance every decoded row by BK
                while pqa >= PQ:
                    pqa -= PQ
                    na += 1
                for l in range(NB):
                    q_ = bq_s[l] + BK
                    p_ = bp_s[l]
                    n_ = bn_s[l]
                    while q_ >= Q:
                        q_ -= Q
                        p_ += 1
                    while p_ >= P:
                        p_ -= P
                        n_ += 1
                    bn_s[l] = n_
                    bp_s[l] = p_
                    bq_s[l] = q_
            if s > 0:
                _step(As, Bs, acc, a_reg, b_reg, ty, tx)
                cuda.syncthreads()
        z = cuda.blockIdx.z
        for i in range(TM):
            o = m0 + _row(ty, i)
            if o < O:
                for j in range(TN):
                    cj = n0 + _col(tx, j)
                    if cj < CRS:
                        part[z, o, cj] = acc[i, j]

    label = loop + (f" {launch_bounds}" if launch_bounds else "")
    label += " blocked" if mapping == "blocked" else ""
    return Tiles(version, BM, BN, BK, TX, TY, conv2d_fwd_kernel, conv2d_dx_kernel, conv2d_dw_kernel, v3=True,
                 label=label)


def _tiled_variants_v3(version, BM, BN, BK, tx=16, ty=16, register=True):
    """Version 3 tiles with the plain strided inner loop (the one measured fastest on an H200 so far,
    first, so it is the one that runs without autotuning); in ``.variants``, the same tiles with the
    blocked mapping, plain and unrolled, for :func:`_launch_tuned` to choose from per problem. All
    compute bit-identical results."""
    main = _tiled_kernels_v3(version, BM, BN, BK, tx=tx, ty=ty, register=register, loop="plain")
    for loop in ("plain", "unrolled"):
        main.variants.append(_tiled_kernels_v3(f"{version}_{loop}_blk", BM, BN, BK, tx=tx, ty=ty,
                                               register=register, loop=loop, mapping="blocked"))
    return main


# v3 in the two tile sizes of v1 and v2 (the public functions' size choice applies to them too).
# Version 3 in three tile sizes, chosen per GEMM by :func:`_pick`. On an H200 at the cifar preset's
# convolutions (batch 128, forward + backward; benchmarks/conv_tiles_gpu.py), the 128 x 128 tiles ran
# about 5% faster with 32 x 8 threads (16 x 4 outputs per thread) than with 16 x 16 on every shape,
# and 256 x 128 tiles (16 x 16 threads, 16 x 8 outputs each) 10 to 25% faster again where the GEMM
# has at least 256 rows and many columns.
# Each in its variants, chosen per problem by the autotuner. On an H200 (Nsight Compute,
# benchmarks/profile_gpu.py, 128 -> 128 channels, 3x3, 32x32, batch 128) the forward kernel took
# 1.55 ms plain (120 registers, 80% of issue slots busy) and 2.05 ms with the shared loads of row
# k + 1 pipelined before the FMAs of row k (150 registers, half the occupancy); over the cifar
# preset's convolutions the autotuner chose the plain loop for about three problems in four, and the
# total stayed where the plain loop alone puts it (0.261 against 0.263 s). The pipelined loop is gone
# (as is a register-capped twin that spilled and won 2 of 78 problems), and so is the strided loop
# unrolled by four, never timed: the blocked plain loop has about its FMA share (75 against 73%) with
# a quarter of its shared loads. The blocked variants are unmeasured on a GPU so far.
V3 = _tiled_variants_v3("v3", 128, 128, 8, tx=32, ty=8)
V3S = _tiled_variants_v3("v3s", 64, 64, 8)
V3L = _tiled_variants_v3("v3l", 256, 128, 8)


_DB_THREADS = 256


@kernel(f"void({_F3}, {_F1})")
def conv2d_db_kernel(dy3, db):
    """db[o] = sum_{n, pq} dy3[n, o, pq], one block per channel (grid-stride), float64 accumulation."""
    partial = cuda.shared.array(_DB_THREADS, float64)
    N = dy3.shape[0]
    O = dy3.shape[1]
    PQ = dy3.shape[2]
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    for o in range(cuda.blockIdx.x, O, cuda.gridDim.x):
        s = 0.0
        for e in range(tid, N * PQ, nthreads):
            n = e // PQ
            s += float64(dy3[n, o, e - n * PQ])
        partial[tid] = s
        cuda.syncthreads()
        step = nthreads // 2
        while step > 0:
            if tid < step:
                partial[tid] += partial[tid + step]
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            db[o] = float32(partial[0])
        cuda.syncthreads()


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _ceil(a, b):
    return (a + b - 1) // b


def _dummy(xp, ndim):
    return xp.zeros((1,) * ndim, dtype=xp.float32)


def _forward(tiles, x, w, b, stride, padding, temb, residual):
    """Validate, then one launch of ``tiles.fwd``; returns ``(y, cache)``."""
    _b.check_array(x, "x", ndim=4)
    _b.check_array(w, "w", ndim=4)
    N, C, H, W = (int(s) for s in x.shape)
    O, Cw, KH, KW = (int(s) for s in w.shape)
    if Cw != C:
        raise ValueError(f"w has {Cw} input channels but x has {C}: w {tuple(w.shape)}, x {tuple(x.shape)}")
    stride = check_int("stride", stride, 1)            # as the reference: refused, not truncated
    pt, pb, pl, pr = _normalize_padding(padding)
    P = conv_output_size(H, KH, stride, pt, pb)
    Q = conv_output_size(W, KW, stride, pl, pr)
    if P < 1 or Q < 1:
        raise ValueError(f"the kernel {KH}x{KW} does not fit the padded input {H}x{W} with padding "
                         f"{(pt, pb, pl, pr)}: output {P}x{Q}")
    if KW >= 1 << 20:
        raise ValueError(f"kernel width {KW} is too large")
    xp = _b.xp()
    flags = KW << 8
    if b is not None:
        _b.check_array(b, "b", shape=(O,))
        flags |= 1
    else:
        b = _dummy(xp, 1)
    if temb is not None:
        _b.check_array(temb, "temb", shape=(N, O))
        flags |= 2
    else:
        temb = _dummy(xp, 2)
    if residual is not None:
        _b.check_array(residual, "residual", shape=(N, O, P, Q))
        residual3 = residual.reshape(N, O, P * Q)
        flags |= 4
    else:
        residual3 = _dummy(xp, 3)
    if tiles is None:
        tiles = _pick(O, N * P * Q)
    elif tiles == "v3":
        tiles = _pick(O, N * P * Q, v3=True)
    y = xp.empty((N, O, P, Q), dtype=xp.float32)
    grid = (_ceil(N * P * Q, tiles.BN), _ceil(O, tiles.BM))
    if tiles.v3:                       # version 3: x flat, weights as (O, kh kw, C)
        w3 = xp.ascontiguousarray(w.reshape(O, C, KH * KW).transpose(0, 2, 1))
        _launch_tuned("fwd", tiles, grid, (x.reshape(-1), w3, b, temb, residual3, y.reshape(N, O, P * Q),
                                           np.int32(C), np.int32(H), np.int32(W), np.int32(stride),
                                           np.int32(pt), np.int32(pl), np.int32(Q), np.int32(flags)))
    else:
        tiles.fwd[grid, (tiles.TX, tiles.TY)](x, w.reshape(O, C * KH * KW), b, temb, residual3,
                                  y.reshape(N, O, P * Q), np.int32(stride), np.int32(pt),
                                  np.int32(pl), np.int32(Q), np.int32(flags))
    cache = {"x": x, "w": w, "has_bias": (flags & 1) == 1, "stride": stride,
             "padding": (pt, pb, pl, pr), "out_hw": (P, Q)}
    return y, cache


def _launch_tuned(kind, tiles, grid, args, timer=None):
    """Launch ``tiles``' ``kind`` kernel ("fwd", "dx" or "dw") on ``grid`` with ``args``; when the tiles
    come in several variants (``tiles.variants``: inner loops, register caps), the fastest for this
    problem (``runtime.tuned``: timed on the first launch of each distinct problem on a real GPU;
    all write bit-identical outputs). Returns the variant that ran."""
    key = (f"conv.{kind}", tiles.version, tuple(grid),
           tuple(int(a) if isinstance(a, (int, np.integer)) else tuple(a.shape) for a in args))
    return _b.tuned(key, tiles.variants, lambda t: getattr(t, kind)[grid, (t.TX, t.TY)](*args),
                    label=lambda t: t.label, timer=timer)


# Tests of whole models in the simulator set this to small version-3 tiles (16 x 16, 16 threads), so
# that a U-Net's dozens of launches cost seconds, not minutes, of simulated threads; the production
# tiles have tests of their own. None (always, outside tests): the heuristic of :func:`_pick`.
FORCED_TILES = None


def _pick(rows: int, cols: int, split: bool = False, v3: bool = False):
    """Tile choice (a heuristic, to be confirmed by benchmarks/bench_kernels.py on the GPU): the
    128 x 128 tiles when both GEMM sides are large and there are enough tiles to fill every SM
    (split-K always fills them), else the 64 x 64 tiles, which waste less on small layers.
    ``v3=True``: the same choice between version 3's V3S 64 x 64 and V3 128 x 128, plus V3L 256 x 128
    for GEMMs of at least 256 rows and, unless split-K, 8192 columns (the tile sweep above)."""
    if FORCED_TILES is not None and FORCED_TILES.v3 == v3:
        return FORCED_TILES
    small, big = (V3S, V3) if v3 else (V1, V2)
    if rows < 96 or cols < 96:
        return small
    if v3 and rows >= 256 and (split or cols >= 8192):
        return V3L                     # tall GEMMs with many columns: the 256 x 128 tiles
    if split:
        return big
    return big if _ceil(rows, 128) * _ceil(cols, 128) >= _b.sm_count() else small


def _dw_splits(grid_xy: int, k_total: int, bk: int) -> int:
    """How many K slices for the weight gradient: enough blocks to fill the GPU (2 per SM)."""
    target = 2 * _b.sm_count()
    return max(1, min(_ceil(k_total, bk), _ceil(target, grid_xy)))


def _backward(dx_tiles, dw_tiles, dy, cache, input_grad):
    x, w = cache["x"], cache["w"]
    N, C, H, W = (int(s) for s in x.shape)
    O, _, KH, KW = (int(s) for s in w.shape)
    P, Q = cache["out_hw"]
    pt, pb, pl, pr = cache["padding"]
    stride = cache["stride"]
    _b.check_array(dy, "dy", shape=(N, O, P, Q))
    xp = _b.xp()
    dy3 = dy.reshape(N, O, P * Q)
    w2 = w.reshape(O, C * KH * KW)
    dx = None
    if input_grad:                     # dx: rows c, columns (n, h, v), reduction (o, r, t)
        t = _pick(C, N * H * W, v3=True) if dx_tiles == "v3" else (dx_tiles or _pick(C, N * H * W))
        dx = xp.empty((N, C, H, W), dtype=xp.float32)
        grid = (_ceil(N * H * W, t.BN), _ceil(C, t.BM))
        if t.v3:                       # version 3: dy flat, weights as (kh kw, O, C)
            wt = xp.ascontiguousarray(w.reshape(O, C, KH * KW).transpose(2, 0, 1))
            _launch_tuned("dx", t, grid, (dy.reshape(-1), wt, dx.reshape(N, C, H * W), np.int32(O), np.int32(P),
                                          np.int32(Q), np.int32(stride), np.int32(pt), np.int32(pl),
                                          np.int32(W), np.int32(KW)))
        else:
            t.dx[grid, (t.TX, t.TY)](dy3, w2, dx.reshape(N, C, H * W), np.int32(stride), np.int32(pt),
                                 np.int32(pl), np.int32(Q), np.int32(W), np.int32(KW))
    # dw: rows o, columns (c, r, t), reduction (n, p, q) split over blockIdx.z
    crs = C * KH * KW
    t = _pick(O, crs, split=True, v3=True) if dw_tiles == "v3" else (dw_tiles or _pick(O, crs, split=True))
    gx, gy = _ceil(crs, t.BN), _ceil(O, t.BM)
    k_total = N * P * Q
    splits = _dw_splits(gx * gy, k_total, t.BK)
    k_chunk = _ceil(_ceil(k_total, splits), t.BK) * t.BK
    splits = _ceil(k_total, k_chunk)
    part = xp.empty((splits, O, crs), dtype=xp.float32)
    if t.v3:
        _launch_tuned("dw", t, (gx, gy, splits), (dy.reshape(-1), x.reshape(-1), part, np.int32(N), np.int32(O),
                                                  np.int32(P), np.int32(Q), np.int32(C), np.int32(H),
                                                  np.int32(W), np.int32(stride), np.int32(pt), np.int32(pl),
                                                  np.int32(KW), np.int32(k_chunk)))
    else:
        t.dw[(gx, gy, splits), (t.TX, t.TY)](dy3, x, part, np.int32(stride), np.int32(pt), np.int32(pl),
                                         np.int32(Q), np.int32(KW), np.int32(k_chunk))
    dw = part.sum(axis=0).reshape(O, C, KH, KW) if splits > 1 else part.reshape(O, C, KH, KW)
    db = None
    if cache["has_bias"]:
        db = xp.empty(O, dtype=xp.float32)
        threads = 32 if _b.is_simulator() else _DB_THREADS
        blocks = min(O, 2) if _b.is_simulator() else min(O, 65535)
        conv2d_db_kernel[blocks, threads](dy3, db)
    return dx, dw, db


def conv2d_forward(x, w, b=None, stride=1, padding=1, temb=None, residual=None):
    """Implicit-GEMM convolution with the fused epilogue; returns ``(y, cache)``.

    x (N, C, H, W), w (O, C, kh, kw), b (O,) or None; optional temb (N, O) broadcast over pixels and
    residual (N, O, P, Q), both added in the epilogue (y = conv + b + temb + residual). The cache
    holds x and w (the only things the backward pass needs). Runs version 3 (division-free gathers,
    register prefetch), with the tile size chosen per call (:func:`_pick`): on an H200 it measured
    2.5x faster than the best of v1/v2 over the cifar preset's convolutions (forward + backward at
    batch 128, 0.33 s vs 0.84 s; benchmarks/bench_kernels.py). ``conv2d_forward_v1`` / ``_v2`` /
    ``_v3`` force one version.
    """
    return _forward("v3", x, w, b, stride, padding, temb, residual)


def conv2d_backward(dy, cache, input_grad=True):
    """Gradients of :func:`conv2d_forward`: ``(dx, dw, db)`` (db None without bias; dx None with
    ``input_grad=False``, for a first layer whose input needs no gradient).

    With a fused temb/residual epilogue, their gradients are ``dy.sum((2, 3))`` and ``dy`` itself:
    the caller forms those (they are not the convolution's). Version 3, as :func:`conv2d_forward`.
    """
    return _backward("v3", "v3", dy, cache, input_grad)


def conv2d_forward_v1(x, w, b=None, stride=1, padding=1, temb=None, residual=None):
    """:func:`conv2d_forward` with the 64 x 64 tiles (4 x 4 per thread)."""
    return _forward(V1, x, w, b, stride, padding, temb, residual)


def conv2d_backward_v1(dy, cache, input_grad=True):
    """:func:`conv2d_backward` with the 64 x 64 tiles."""
    return _backward(V1, V1, dy, cache, input_grad)


def conv2d_forward_v2(x, w, b=None, stride=1, padding=1, temb=None, residual=None):
    """:func:`conv2d_forward` with the 128 x 128 tiles (8 x 8 per thread)."""
    return _forward(V2, x, w, b, stride, padding, temb, residual)


def conv2d_backward_v2(dy, cache, input_grad=True):
    """:func:`conv2d_backward` with the 128 x 128 tiles."""
    return _backward(V2, V2, dy, cache, input_grad)


def conv2d_forward_v3(x, w, b=None, stride=1, padding=1, temb=None, residual=None):
    """:func:`conv2d_forward` with version 3 (division-free gathers, register prefetch), 64 x 64 or
    128 x 128 tiles chosen as the public function chooses between v1 and v2."""
    return _forward("v3", x, w, b, stride, padding, temb, residual)


def conv2d_backward_v3(dy, cache, input_grad=True):
    """:func:`conv2d_backward` with version 3 (dx and dw), tile size picked as the public function does."""
    return _backward("v3", "v3", dy, cache, input_grad)
