"""Time every GEMM formulation of ddpm_ref.ops.conv at the presets' conv shapes.

What it measures: for each shape, the forward and backward wall time (median of --runs calls, after
one warm-up call) of the "shift", "im2col", "dense" and (stride 1) "winograd" paths, each forced in
turn (winograd's backward pass is the shift path's when forced), beside the path
``_choose_path`` picks on its own. This is the sweep behind the path choice: the table shows where
each formulation wins, and a changed cost model should be checked against it. The paths are timed
one after another per shape, so load from other processes hits all of them alike; set one BLAS thread
(``OPENBLAS_NUM_THREADS=1``) for the figures the choice was tuned on. No test asserts a time.

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.conv_paths [--runs 15] [--quick] [--forward]

``--forward`` times the forward pass only, which is all that sampling pays for (and the only pass
where "winograd" differs from the copy path it falls back on).

Shapes are (N, C, H, O, stride) for a 3x3 kernel: the digits preset at batch 128 (every 4x4 and 8x8
conv, conv_out, the downsampler), the small preset at batch 64, cifar's small levels at batch 8, and
the sampling batches (digits at 500, small at 16, cifar at 4: forward time is what sampling pays).
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import interleaved, stats
from ddpm_ref.ops import conv as conv_mod

SHAPES = [
    # digits preset, batch 128
    (128, 32, 4, 32, 1), (128, 64, 4, 32, 1), (128, 48, 4, 32, 1), (128, 16, 4, 32, 1),
    (128, 16, 8, 16, 1), (128, 32, 8, 32, 1), (128, 48, 8, 16, 1), (128, 16, 8, 1, 1),
    (128, 1, 8, 16, 1), (128, 16, 8, 16, 2),
    # small preset, batch 64
    (64, 64, 8, 64, 1), (64, 32, 16, 32, 2),
    # cifar preset, batch 8
    (8, 256, 4, 256, 1), (8, 256, 8, 256, 1), (8, 256, 8, 256, 2), (8, 256, 16, 256, 1),
    # sampling batches: the digits preset at 500, small at 16 (its 8x8 and 16x16 levels), cifar at 4
    (500, 32, 4, 32, 1), (500, 16, 8, 16, 1), (500, 16, 8, 1, 1),
    (16, 64, 8, 64, 1), (16, 128, 8, 64, 1), (16, 32, 8, 64, 1), (16, 32, 16, 32, 1), (16, 64, 16, 32, 1),
    (4, 256, 4, 256, 1), (4, 256, 8, 256, 1), (4, 512, 8, 256, 1), (4, 256, 16, 256, 1), (4, 128, 32, 128, 1),
]


def _median_ms(fn, runs):
    """Median wall time of ``runs`` calls after one warm-up call, in ms."""
    return stats(interleaved({"call": fn}, runs, warmup=1)["call"])["median_ms"]


def sweep(shapes, runs, forward_only=False):
    """Yields (shape, auto path, {path: (forward ms, backward ms)}); backward 0 with forward_only."""
    rng = np.random.default_rng(0)
    for N, C, H, O, stride in shapes:
        x = rng.standard_normal((N, C, H, H)).astype(np.float32)
        w = (rng.standard_normal((O, C, 3, 3)) * 0.1).astype(np.float32)
        b = np.zeros(O, np.float32)
        pad = 1 if stride == 1 else (0, 1, 0, 1)           # the DDPM downsampler pads right/bottom
        auto = conv_mod.conv2d_forward(x, w, b, stride, pad)[1]["path"]
        times = {}
        old = conv_mod._FORCED_PATH
        try:
            for path in ("shift", "im2col", "dense", "winograd"):
                if path in ("shift", "winograd") and stride != 1:
                    continue
                Ho = conv_mod.conv_output_size(H, 3, stride, 1 if stride == 1 else 0, 1)
                if path == "dense" and C * O * H * H * Ho * Ho > conv_mod._DENSE_MAX_ELEMENTS:
                    continue
                conv_mod._FORCED_PATH = path
                y, cache = conv_mod.conv2d_forward(x, w, b, stride, pad)
                dy = np.cos(y)
                times[path] = (_median_ms(lambda: conv_mod.conv2d_forward(x, w, b, stride, pad), runs),
                               0.0 if forward_only else
                               _median_ms(lambda: conv_mod.conv2d_backward(dy, cache), runs))
        finally:
            conv_mod._FORCED_PATH = old
        yield (N, C, H, O, stride), auto, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="timed calls per path and direction (default 15)")
    ap.add_argument("--quick", action="store_true", help="3 runs and the digits shapes only (a smoke run)")
    ap.add_argument("--forward", action="store_true",
                    help="time the forward pass only (what sampling pays); backward shows as 0")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    shapes, runs = (SHAPES[:10], 3) if args.quick else (SHAPES, args.runs)
    print(f"{'(N, C, H, O, stride)':24s} {'auto':8s} {'best':8s} auto/best  {'best fwd':8s}  "
          "ms per path (forward + backward); best: fwd+bwd (training), best fwd: sampling")
    for shape, auto, times in sweep(shapes, runs, args.forward):
        total = {p: f + b for p, (f, b) in times.items()}
        best = min(total, key=total.get)
        best_fwd = min(times, key=lambda p: times[p][0])
        cells = "  ".join(f"{p} {f:6.2f}+{b:6.2f}" for p, (f, b) in times.items())
        print(f"{str(shape):24s} {auto:8s} {best:8s} {total[auto] / total[best]:8.2f}x  {best_fwd:8s}  {cells}",
              flush=True)


if __name__ == "__main__":
    main()
