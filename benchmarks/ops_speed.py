"""Time ddpm_ref's hand-written ops against PyTorch CPU at the U-Net's real shapes.

What it is: conv2d forward+backward (and GroupNorm+SiLU forward+backward) at the shapes of the
`cifar` preset (batch 8) and the `small` preset (batch 64), float32, each timed as the median of
``--repeats`` runs after a warm-up, next to torch.nn.functional with the same thread count
(torch.set_num_threads(n) and OPENBLAS/OMP/MKL_NUM_THREADS=n for NumPy's BLAS, set before NumPy
is imported). Prints one table row per shape with both times and the ratio ours / torch.
What it is not: a test (nothing is asserted) or the whole-model benchmark (see the U-Net one).

The two libraries are timed in alternating blocks (all repeats of one, then of the other) rather
than call by call: a BLAS thread pool that is still spinning from the previous call slows the
other library's pool down, which would penalise whichever ran second.

Usage:  python benchmarks/ops_speed.py [--threads 2] [--repeats 5] [--preset cifar|small|all] [--no-torch]
"""
import argparse
import os
import platform
import sys
import time


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", choices=["cifar", "small", "all"], default="all")
    ap.add_argument("--no-torch", action="store_true", help="time ddpm_ref only")
    ap.add_argument("--op", choices=["conv", "gn", "all"], default="all")
    return ap.parse_args()


ARGS = parse()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402  (after the thread variables)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ddpm_ref.ops import conv2d_backward, conv2d_forward  # noqa: E402
from ddpm_ref.ops import group_norm_silu_backward, group_norm_silu_forward  # noqa: E402

# (label, N, C_in, C_out, H, k, stride, padding): every distinct convolution of the preset.
CONV_SHAPES = {
    "cifar": [
        ("conv_in 3->128 @32", 8, 3, 128, 32, 3, 1, 1),
        ("res 128->128 @32", 8, 128, 128, 32, 3, 1, 1),
        ("res 256->128 @32", 8, 256, 128, 32, 3, 1, 1),
        ("res 384->128 @32", 8, 384, 128, 32, 3, 1, 1),
        ("up 256->256 @32", 8, 256, 256, 32, 3, 1, 1),
        ("down 128 s2 @32", 8, 128, 128, 32, 3, 2, (0, 1, 0, 1)),
        ("res 128->256 @16", 8, 128, 256, 16, 3, 1, 1),
        ("res 256->256 @16", 8, 256, 256, 16, 3, 1, 1),
        ("res 512->256 @16", 8, 512, 256, 16, 3, 1, 1),
        ("down 256 s2 @16", 8, 256, 256, 16, 3, 2, (0, 1, 0, 1)),
        ("res 256->256 @8", 8, 256, 256, 8, 3, 1, 1),
        ("res 512->256 @8", 8, 512, 256, 8, 3, 1, 1),
        ("res 256->256 @4", 8, 256, 256, 4, 3, 1, 1),
        ("res 512->256 @4", 8, 512, 256, 4, 3, 1, 1),
        ("1x1 384->128 @32", 8, 384, 128, 32, 1, 1, 0),
        ("1x1 512->256 @16", 8, 512, 256, 16, 1, 1, 0),
        ("conv_out 128->3 @32", 8, 128, 3, 32, 3, 1, 1),
    ],
    "small": [
        ("conv_in 1->32 @16", 64, 1, 32, 16, 3, 1, 1),
        ("res 32->32 @16", 64, 32, 32, 16, 3, 1, 1),
        ("res 64->32 @16", 64, 64, 32, 16, 3, 1, 1),
        ("down 32 s2 @16", 64, 32, 32, 16, 3, 2, (0, 1, 0, 1)),
        ("res 32->64 @8", 64, 32, 64, 8, 3, 1, 1),
        ("res 64->64 @8", 64, 64, 64, 8, 3, 1, 1),
        ("res 128->64 @8", 64, 128, 64, 8, 3, 1, 1),
        ("1x1 96->32 @16", 64, 96, 32, 16, 1, 1, 0),
        ("conv_out 32->1 @16", 64, 32, 1, 16, 3, 1, 1),
    ],
}
# (label, N, C, H, groups)
GN_SHAPES = {
    "cifar": [("gn+silu 128 @32", 8, 128, 32, 32), ("gn+silu 256 @16", 8, 256, 16, 32),
              ("gn+silu 512 @8", 8, 512, 8, 32)],
    "small": [("gn+silu 32 @16", 64, 32, 16, 8), ("gn+silu 64 @8", 64, 64, 8, 8)],
}


def median_ms(fn, repeats):
    fn()                                             # warm-up (allocations, thread pools)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def conv_cases(preset, torch):
    rng = np.random.default_rng(0)
    for label, N, C, O, H, k, s, p in CONV_SHAPES[preset]:
        x = rng.standard_normal((N, C, H, H), dtype=np.float32)
        w = (rng.standard_normal((O, C, k, k), dtype=np.float32) / np.sqrt(C * k * k)).astype(np.float32)
        b = np.zeros(O, np.float32)
        y, _ = conv2d_forward(x, w, b, s, p)
        dy = rng.standard_normal(y.shape, dtype=np.float32)

        def ours(x=x, w=w, b=b, s=s, p=p, dy=dy):
            _, cache = conv2d_forward(x, w, b, s, p)
            conv2d_backward(dy, cache)

        theirs = None
        if torch is not None:
            F = torch.nn.functional
            pads = (p, p, p, p) if isinstance(p, int) else p
            xt = torch.tensor(x, requires_grad=True)
            wt = torch.tensor(w, requires_grad=True)
            bt = torch.tensor(b, requires_grad=True)
            dyt = torch.tensor(dy)

            def theirs(xt=xt, wt=wt, bt=bt, s=s, pads=pads, dyt=dyt):
                xin = xt if pads == (pads[0],) * 4 else F.pad(xt, (pads[2], pads[3], pads[0], pads[1]))
                y = F.conv2d(xin, wt, bt, stride=s, padding=pads[0] if pads == (pads[0],) * 4 else 0)
                xt.grad = wt.grad = bt.grad = None
                y.backward(dyt)

        flops = 3 * 2 * N * O * C * k * k * y.shape[2] * y.shape[3]   # forward + two backward GEMMs
        yield label, ours, theirs, flops


def gn_cases(preset, torch):
    rng = np.random.default_rng(1)
    for label, N, C, H, G in GN_SHAPES[preset]:
        x = rng.standard_normal((N, C, H, H), dtype=np.float32)
        g = np.ones(C, np.float32)
        b = np.zeros(C, np.float32)
        dy = rng.standard_normal(x.shape, dtype=np.float32)

        def ours(x=x, g=g, b=b, G=G, dy=dy):
            _, cache = group_norm_silu_forward(x, g, b, G, 1e-6)
            group_norm_silu_backward(dy, cache)

        theirs = None
        if torch is not None:
            F = torch.nn.functional
            xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
            dyt = torch.tensor(dy)

            def theirs(xt=xt, gt=gt, bt=bt, G=G, dyt=dyt):
                y = F.silu(F.group_norm(xt, G, gt, bt, 1e-6))
                xt.grad = gt.grad = bt.grad = None
                y.backward(dyt)

        yield label, ours, theirs, 0


def main():
    torch = None
    if not ARGS.no_torch:
        try:
            import torch
        except ImportError:
            print("torch not installed (pip install ddpm-ref[torch]): timing ddpm_ref alone")
    if torch is not None:
        torch.set_num_threads(ARGS.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, threads={ARGS.threads}, "
          f"numpy {np.__version__}" + (f", torch {torch.__version__}" if torch is not None else ""))
    print(f"# median of {ARGS.repeats} runs after one warm-up, float32, forward+backward")
    print(f"{'shape':24s} {'ours ms':>9s} {'torch ms':>9s} {'ratio':>6s} {'GFLOP/s':>8s}")
    presets = ["cifar", "small"] if ARGS.preset == "all" else [ARGS.preset]
    totals = {}
    for preset in presets:
        gens = []
        if ARGS.op in ("conv", "all"):
            gens.append(conv_cases(preset, torch))
        if ARGS.op in ("gn", "all"):
            gens.append(gn_cases(preset, torch))
        for gen in gens:
            for label, ours, theirs, flops in gen:
                # Alternate blocks twice (ours, torch, ours, torch) and keep each one's median
                # over all its runs, so drift in machine load hits both sides alike.
                t_ours, t_torch = [], []
                for _ in range(2):
                    t_ours.append(median_ms(ours, ARGS.repeats))
                    if theirs is not None:
                        t_torch.append(median_ms(theirs, ARGS.repeats))
                a = float(np.median(t_ours))
                tot = totals.setdefault(preset, [0.0, 0.0])
                tot[0] += a
                gf = f"{flops / a / 1e6:8.1f}" if flops else f"{'':8s}"
                if t_torch:
                    t = float(np.median(t_torch))
                    tot[1] += t
                    print(f"{label:24s} {a:9.2f} {t:9.2f} {a / t:6.2f} {gf}")
                else:
                    print(f"{label:24s} {a:9.2f} {'-':>9s} {'-':>6s} {gf}")
                sys.stdout.flush()
    for preset, (a, t) in totals.items():
        if t:
            print(f"# {preset}: sum over the rows above: ours {a:.1f} ms, torch {t:.1f} ms, ratio {a / t:.2f}")


if __name__ == "__main__":
    main()
