"""A fixed set of kernel launches for Nsight Compute (``ncu``): where the slowest kernels stall.

What it does: launches, once each and in this order, the kernels whose speed the GPU targets measure,
at benchmark sizes, with autotuning off so that every variant runs exactly once:

1. ``philox_float_kernel_v2`` (normals) and ``q_sample_kernel_v2`` at 65536 x 3072 values, in every
   variant the autotuner chooses from (the plain and persistent grids, each register cap);
2. the cifar preset's most frequent convolution (128 -> 128 channels, 3x3, 32x32, batch 128): forward,
   dx and dw of the 128 x 128 tiles in each variant (plain strided; plain and unrolled blocked);
3. GroupNorm+SiLU forward and backward at (128, 128, 32, 32), versions 1 and 2.

Run it under ncu, for example (benchmarks/gpu_check.sh does)::

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python benchmarks/profile_gpu.py > ncu.txt

Without ncu it prints each launch's time (between two device synchronisations), a useful table in
itself. Sizes are flags (the smoke test runs it in the simulator at toy size).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DDPM_AUTOTUNE", "0")


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise-samples", type=int, default=65536, help="samples of --noise-size values")
    ap.add_argument("--noise-size", type=int, default=3072)
    ap.add_argument("--batch", type=int, default=128, help="batch of the convolution and GroupNorm")
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--hw", type=int, default=32)
    ap.add_argument("--groups", type=int, default=32)
    args = ap.parse_args(argv)
    from ddpm_ref.kernels import runtime
    saved_autotune = runtime.AUTOTUNE
    runtime.AUTOTUNE = False
    try:
        return _launches(args)
    finally:
        runtime.AUTOTUNE = saved_autotune


def _launches(args):
    """Each kernel of the module docstring, once, timed; returns [(label, seconds)]."""
    from ddpm_ref.kernels import runtime
    from ddpm_ref.kernels import conv as kc, noise as kn, norm as knorm
    try:
        import cupy

        def sync():
            cupy.cuda.Device().synchronize()
    except ImportError:                     # the simulator (the smoke test): host clock, no cupy
        cupy = None

        def sync():
            pass
    xp = runtime.xp()
    r = np.random.default_rng(0)

    def dev(a):
        return runtime.to_device(np.ascontiguousarray(a, dtype=np.float32))

    rows = []

    def timed(label, fn):
        fn()                                   # compile outside the measured launch
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        rows.append((label, time.perf_counter() - t0))
        print(f"{label:60s} {rows[-1][1] * 1e3:9.3f} ms", flush=True)

    n, size = args.noise_samples, args.noise_size
    nb = (size + 3) // 4
    idx = np.arange(n, dtype=np.uint32)
    params = kn._packed(n, idx, np.full(n, 5, np.uint32), np.zeros(n, np.uint32),
                        np.full(n, 0.5, np.float32), np.full(n, 0.5, np.float32))
    x0 = dev(r.uniform(-1, 1, (n, size)))
    out, xt, tg = (xp.empty((n, size), dtype=xp.float32) for _ in range(3))
    for grid, threads in kn._tile_launches(n, nb):
        for kern_n, kern_q in zip(kn._NORMAL_KERNELS, kn._Q_SAMPLE_KERNELS):
            label = kn._variant_label(kern_n, grid)
            timed(f"normal {label}", lambda: kern_n[grid, threads](
                out, params, np.uint32(1), np.uint32(4), np.int32(0)))
            timed(f"q_sample {label}", lambda: kern_q[grid, threads](
                x0, xt, tg, params, np.uint32(1), np.uint32(4), np.int32(0), np.int32(1)))

    B, C, H = args.batch, args.channels, args.hw
    x = dev(r.standard_normal((B, C, H, H)))
    w = dev(r.standard_normal((C, C, 3, 3)) / np.sqrt(9 * C))
    b = dev(np.zeros(C))
    dy = dev(r.standard_normal((B, C, H, H)))
    pick = kc._pick
    for variant in kc.V3.variants:         # every GEMM of this convolution on this variant
        kc._pick = lambda *a, v=variant, **k: v
        try:
            y, cache = kc.conv2d_forward(x, w, b, 1, 1)
            timed(f"conv fwd {variant.label}", lambda: kc.conv2d_forward(x, w, b, 1, 1))
            timed(f"conv bwd {variant.label}", lambda: kc.conv2d_backward(dy, cache))
        finally:
            kc._pick = pick
    g = dev(np.ones(C))
    beta = dev(np.zeros(C))
    for version, fwd in (("v1", knorm.group_norm_silu_forward_v1), ("v2", knorm.group_norm_silu_forward)):
        _, cache = fwd(x, g, beta, args.groups, 1e-6)
        timed(f"group_norm_silu fwd {version}", lambda: fwd(x, g, beta, args.groups, 1e-6))
        timed(f"group_norm_silu bwd {version}", lambda: knorm.group_norm_silu_backward(dy, cache))
    return rows


if __name__ == "__main__":
    main()
