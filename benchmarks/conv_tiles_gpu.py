"""Tile-size sweep of the version-3 implicit-GEMM convolution on a real GPU.

What it measures: forward + backward (dx, dw, db) of the convolutions that take most of the ``cifar``
training step (batch 128), for each tile configuration ``(BM, BN, BK, TX, TY)`` of
``kernels.conv._tiled_kernels_v3``, forced on every call, against the public choice (``_pick``:
128 x 128 x 8 or 64 x 64 x 8). Each figure is the median of ``--repeats`` CUDA-event timings after
two warm-ups (the first compiles). Prints a table and writes JSON (``--out``).

Usage: ``python benchmarks/conv_tiles_gpu.py --out tiles.json``. What it is not: a correctness test
(tests/test_kernels_conv.py checks every configuration's factory against the reference).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (count in the cifar U-Net, C, O, H, k, stride, padding): the shapes with the largest count x time
SHAPES = [(7, 128, 128, 32, 3, 1, 1), (7, 256, 256, 16, 3, 1, 1), (8, 256, 256, 8, 3, 1, 1),
          (2, 512, 256, 16, 3, 1, 1), (1, 256, 256, 32, 3, 1, 1), (2, 256, 128, 32, 3, 1, 1),
          (11, 256, 256, 4, 3, 1, 1), (3, 512, 256, 8, 3, 1, 1)]
CONFIGS = [(128, 128, 8, 16, 16), (128, 128, 16, 16, 16), (128, 64, 8, 16, 16), (64, 128, 8, 16, 16),
           (128, 256, 8, 16, 16), (256, 128, 8, 16, 16), (64, 64, 16, 16, 16), (128, 128, 8, 32, 8)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from ddpm_ref.kernels import runtime
    if runtime.backend() != "cuda":
        raise SystemExit("conv_tiles_gpu.py needs a real GPU")
    import cupy
    from ddpm_ref.kernels import conv as kc
    from bench_kernels import _timer
    time_it = _timer(cupy)
    tiles = {"pick": None}
    for cfg in CONFIGS:
        bm, bn, bk, tx, ty = cfg
        try:
            tiles["x".join(map(str, cfg))] = kc._tiled_kernels_v3("sweep_" + "_".join(map(str, cfg)), bm, bn, bk,
                                                                  tx=tx, ty=ty, register=False)
        except ValueError as exc:
            print(f"skip {cfg}: {exc}")
    rows = []
    for count, c, o, h, k, stride, pad in SHAPES:
        x = cupy.random.standard_normal((args.batch, c, h, h), dtype=cupy.float32)
        w = (cupy.random.standard_normal((o, c, k, k), dtype=cupy.float32) / np.sqrt(c * k * k)).astype(cupy.float32)
        b = cupy.zeros(o, dtype=cupy.float32)
        y, _ = kc.conv2d_forward(x, w, b, stride, pad)
        dy = cupy.random.standard_normal(y.shape, dtype=cupy.float32)
        row = {"count": count, "C": c, "O": o, "H": h}
        y_ref, cache_ref = kc.conv2d_forward(x, w, b, stride, pad)
        grads_ref = kc.conv2d_backward(dy, cache_ref)
        for name, t in tiles.items():
            if t is not None:                 # agreement with the public choice (a float32 reordering)
                try:
                    y_t, cache_t = kc._forward(t, x, w, b, stride, pad, None, None)
                    grads_t = kc._backward(t, t, dy, cache_t, True)
                    row[name + "_maxrel"] = max(float(abs(a - r).max() / abs(r).max())
                                                for a, r in zip((y_t,) + tuple(grads_t), (y_ref,) + tuple(grads_ref)))
                except Exception:
                    pass
            def run(t=t):
                if t is None:
                    _, cache = kc.conv2d_forward(x, w, b, stride, pad)
                    kc.conv2d_backward(dy, cache)
                else:
                    _, cache = kc._forward(t, x, w, b, stride, pad, None, None)
                    kc._backward(t, t, dy, cache, True)
            try:
                row[name] = time_it(run, args.repeats)
            except Exception as exc:          # a configuration that does not launch (registers, shared memory)
                row[name] = None
                print(f"{name} failed on {c}->{o}@{h}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        rows.append(row)
        print(json.dumps({k: (round(v * 1e3, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    total = {name: sum(r["count"] * r[name] for r in rows) if all(r.get(name) is not None for r in rows) else None
             for name in tiles}
    print("count-weighted total (ms):", {k: (None if v is None else round(v * 1e3, 2)) for k, v in total.items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "total_s": total, "batch": args.batch}, f, indent=1)
    return total


if __name__ == "__main__":
    main()
