"""GPU kernel benchmarks: our Numba CUDA kernels against the GPU's own copy bandwidth and cuDNN.

What it measures (on a real NVIDIA GPU, CuPy arrays; refuses to run in the simulator):

1. Noise kernels vs a device-to-device copy. Bandwidth = bytes read + written / time:
   ``q_sample_target`` (read x0, write x_t and the target: 3 arrays), the same without the target
   (2 arrays), ``normal`` (write 1), ``mse_noise_loss`` (read pred and x0, write dpred: 3), against
   ``cupy`` copying one array (read 1 + write 1). Arrays of 65536 x 3 x 32 x 32 float32 (805 MB
   each) by default, so launch costs are negligible; both the kernel's throughput (back-to-back
   launches) and one public call are reported, v2 and v1. Target: >= 85% of the copy's GB/s.
2. Convolution forward + backward (dx, dw, db), the public choice and v1 / v2 / v3 each, on
   every convolution of the ``cifar`` preset U-Net
   (diffusers UNet2DModel, block_out (128, 256, 256, 256), 2 layers per block) at batch 128, each
   distinct shape timed once and weighted by how often it occurs, against PyTorch's cuDNN in FP32
   with TF32 off (``torch.backends.cudnn.allow_tf32 = False``), when torch with CUDA is installed.
   Target: within 1.25x of cuDNN.
3. GroupNorm+SiLU forward + backward and attention forward + backward on the CIFAR shapes (ours
   only, plus torch eager when present), for the record.

Each figure is the median of ``--repeats`` timed runs (CUDA events) after 2 warm-up runs (the first
also compiles the kernel). Writes a JSON file (``--out``, atomically, after every section) and
prints a table.

Usage: ``python benchmarks/bench_kernels.py --out results.json [--quick]``.
What it is not: a test (tests/test_kernels_*.py check the numbers) or an end-to-end training
benchmark (the U-Net on these kernels is not assembled yet).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import check_json_path, write_json  # noqa: E402


def save_result(path, result, t0):
    """Write ``result`` (with the seconds since ``t0``) to ``path`` atomically (:func:`write_json`):
    called after every section, so a timeout keeps what was measured and never leaves a torn file."""
    if path:
        result["seconds"] = round(time.time() - t0, 1)
        write_json(path, result)


def _timer(cupy):
    """time_it(fn, repeats): the median of ``repeats`` CUDA-event timings after two warm-up calls."""
    from ddpm_ref.kernels.runtime import event_times

    def time_it(fn, repeats):
        return float(np.median(event_times(fn, repeats, warmup=2)))
    return time_it


def cifar_conv_shapes(batch=128):
    """Every conv of the cifar preset U-Net: list of (count, C, O, H, k, stride, padding)."""
    shapes = {}

    def add(c, o, h, k=3, stride=1, padding=1):
        key = (c, o, h, k, stride, padding if isinstance(padding, int) else tuple(padding))
        shapes[key] = shapes.get(key, 0) + 1

    def resnet(cin, cout, h):
        add(cin, cout, h)
        add(cout, cout, h)
        if cin != cout:
            add(cin, cout, h, k=1, padding=0)

    chans = (128, 256, 256, 256)
    res = (32, 16, 8, 4)
    add(3, 128, 32)                                        # conv_in
    skips = [128]
    cin = 128
    for i, (cout, h) in enumerate(zip(chans, res)):
        for _ in range(2):
            resnet(cin, cout, h)
            cin = cout
            skips.append(cout)
        if i < 3:
            add(cout, cout, h, stride=2, padding=(0, 1, 0, 1))   # downsampler
            skips.append(cout)
    resnet(256, 256, 4)                                    # mid block
    resnet(256, 256, 4)
    prev = 256
    for i, (cout, h) in enumerate(zip(reversed(chans), reversed(res))):
        for _ in range(3):
            resnet(prev + skips.pop(), cout, h)
            prev = cout
        if i < 3:
            add(cout, cout, h * 2)                         # upsampler conv (after nearest x2)
    add(128, 3, 32)                                        # conv_out
    return [(n,) + key for key, n in shapes.items()]


def bench_noise(cupy, kn, time_it, repeats, n, launches=5):
    """Noise kernels vs a device-to-device copy of the same array size (n samples of 3x32x32).

    Two figures per case: "kernel" = ``launches`` back-to-back launches of the prepared kernel
    between two events, divided by ``launches`` (the host-side launch cost overlaps the previous
    kernel: the GPU's throughput); "call" = one call of the public function (argument checks, the
    per-sample table copied to the device, the launch, and for the loss the host read of the scalar
    loss). Bytes = arrays read + written, each ``n * 3072 * 4``.
    """
    from ddpm_ref.schedule import Schedule
    sched = Schedule.linear()
    shape = (3, 32, 32)
    x0 = cupy.random.uniform(-1, 1, (n,) + shape, dtype=cupy.float32)
    pred = cupy.random.standard_normal((n,) + shape, dtype=cupy.float32)
    t = np.random.default_rng(0).integers(0, 1000, n)
    index = np.arange(n)
    nbytes = x0.nbytes
    dst = cupy.empty_like(x0)

    def many(fn):
        def run():
            for _ in range(launches):
                fn()
        return run

    copy_s = time_it(many(lambda: dst.__setitem__(Ellipsis, x0)), repeats) / launches
    copy_gbs = 2 * nbytes / copy_s / 1e9
    rows = [{"name": "device-to-device copy", "bytes": 2 * nbytes, "seconds": copy_s, "GB/s": copy_gbs,
             "array_MB": nbytes / 1e6}]

    # Prepared v2 launches (kernel-only figures).
    q_launch, _, _ = kn._q_sample_plan(sched, x0, t, 1, index, 5, "v", None, 0, True)
    q1_launch, _, _ = kn._q_sample_plan(sched, x0, t, 1, index, 5, "epsilon", None, 0, False)
    m_launch, _ = kn._mse_plan(sched, pred, x0, t, 1, index, 5, "epsilon", None, None, 0, 1.0)
    out = cupy.empty((n, 3072), dtype=cupy.float32)
    params = kn._packed(n, np.asarray(index, np.uint32), np.full(n, 5, np.uint32), np.zeros(n, np.uint32))
    normal_args = (out, params, np.uint32(1), np.uint32(4), np.int32(0))
    normal_launch = lambda: kn._launch_tiles("normal", kn._NORMAL_KERNELS, n, 3072 // 4, normal_args)  # noqa: E731
    x2, xt2, tg2 = x0.reshape(n, -1), cupy.empty((n, 3072), cupy.float32), cupy.empty((n, 3072), cupy.float32)
    q_params = kn._packed(n, np.asarray(index, np.uint32), np.full(n, 5, np.uint32), np.zeros(n, np.uint32),
                          np.full(n, 0.5, np.float32), np.full(n, 0.5, np.float32))
    q_args = (x2, xt2, tg2, q_params, np.uint32(1), np.uint32(4), np.int32(0), np.int32(1))
    # The generator's cost decomposed: Philox words alone, words -> uniforms, words -> normals.
    bits = cupy.empty((n, 3072), dtype=cupy.uint32)
    bits_args = (bits, params, np.uint32(1), np.uint32(4))
    uniform_args = (out, params, np.uint32(1), np.uint32(4), np.int32(1))
    decomposition = [
        ("random_bits (Philox words)", 1, "kernel v2",
         many(lambda: kn._launch_tiles("random_bits", kn._BITS_KERNELS, n, 3072 // 4, bits_args)), launches),
        ("uniform", 1, "kernel v2",
         many(lambda: kn._launch_tiles("uniform", kn._NORMAL_KERNELS, n, 3072 // 4, uniform_args)), launches),
    ]
    # Each variant the autotuner chooses from (launch shape x register cap), forced: the same
    # numbers, only the time differs.
    shapes_cases = []
    for (g, th) in kn._tile_launches(n, 3072 // 4):
        for kern_n, kern_q in zip(kn._NORMAL_KERNELS, kn._Q_SAMPLE_KERNELS):
            label = kn._variant_label(kern_n, g)
            shapes_cases.append(("normal", 1, f"kernel v2, {label}",
                                 many(lambda g=g, th=th, k=kern_n: k[g, th](*normal_args)), launches))
            shapes_cases.append(("q_sample_target (x_t + target)", 3, f"kernel v2, {label}",
                                 many(lambda g=g, th=th, k=kern_q: k[g, th](*q_args)), launches))
    cases = [
        ("q_sample_target (x_t + target)", 3, "kernel v2", many(q_launch), launches),
        ("q_sample_target (x_t + target)", 3, "call v2", lambda: kn.q_sample_target_v2(sched, x0, t, 1, index, 5, "v"), 1),
        ("q_sample_target (x_t + target)", 3, "call v1", lambda: kn.q_sample_target_v1(sched, x0, t, 1, index, 5, "v"), 1),
        ("q_sample_target (x_t only)", 2, "kernel v2", many(q1_launch), launches),
        ("q_sample_target (x_t only)", 2, "call v2",
         lambda: kn.q_sample_target_v2(sched, x0, t, 1, index, 5, store_target=False), 1),
        ("normal", 1, "kernel v2", many(normal_launch), launches),
        ("normal", 1, "call v2", lambda: kn.normal_v2(1, 4, index, 5, shape), 1),
        ("normal", 1, "call v1", lambda: kn.normal_v1(1, 4, index, 5, shape), 1),
        ("mse_noise_loss (loss + dpred)", 3, "kernel v2", many(m_launch), launches),
        ("mse_noise_loss (loss + dpred)", 3, "call v2", lambda: kn.mse_noise_loss_v2(sched, pred, x0, t, 1, index, 5), 1),
        ("mse_noise_loss (loss + dpred)", 3, "call v1", lambda: kn.mse_noise_loss_v1(sched, pred, x0, t, 1, index, 5), 1),
    ] + decomposition + shapes_cases
    for name, arrays, how, fn, per in cases:
        s = time_it(fn, repeats) / per
        gbs = arrays * nbytes / s / 1e9
        rows.append({"name": f"{name} [{how}]", "bytes": arrays * nbytes, "seconds": s, "GB/s": gbs,
                     "fraction_of_copy": gbs / copy_gbs})
    return rows


def bench_conv(cupy, kc, time_it, repeats, batch, torch):
    rows = []
    for count, c, o, h, k, stride, padding in cifar_conv_shapes(batch):
        x = cupy.random.standard_normal((batch, c, h, h), dtype=cupy.float32)
        w = cupy.random.standard_normal((o, c, k, k), dtype=cupy.float32) * (1.0 / np.sqrt(c * k * k))
        w = w.astype(cupy.float32)
        b = cupy.zeros(o, dtype=cupy.float32)
        y, cache = kc.conv2d_forward(x, w, b, stride, padding)
        dy = cupy.random.standard_normal(y.shape, dtype=cupy.float32)

        def ours():
            _, cch = kc.conv2d_forward(x, w, b, stride, padding)
            kc.conv2d_backward(dy, cch)

        def inner_loop(index):
            """Version 3 with inner-loop variant ``index`` forced for every GEMM (autotuning off)."""
            def run():
                saved = (kc._pick, kc._b.AUTOTUNE)
                pick = saved[0]
                kc._b.AUTOTUNE = False
                kc._pick = lambda *a, **kw: pick(*a, **kw).variants[index]
                try:
                    ours()
                finally:
                    kc._pick, kc._b.AUTOTUNE = saved
            return run

        fwd_s = time_it(lambda: kc.conv2d_forward(x, w, b, stride, padding), repeats)
        tot_s = time_it(ours, repeats)
        loops = [t.label for t in kc.V3.variants]            # every tile size has the same loop variants
        v_s = {label: time_it(inner_loop(i), repeats) for i, label in enumerate(loops)}
        p, q = y.shape[2], y.shape[3]
        flops = 2.0 * batch * o * p * q * c * k * k * 3          # fwd + dx + dw GEMMs
        row = {"count": count, "C": c, "O": o, "H": h, "k": k, "stride": stride, "padding": padding,
               "ours_fwd_s": fwd_s, "ours_fwd_bwd_s": tot_s, "ours_TFLOPS": flops / tot_s / 1e12,
               "loops_fwd_bwd_s": v_s}
        if torch is not None:
            import torch.nn.functional as F
            xt = torch.as_tensor(x, device="cuda").requires_grad_(True)
            wt = torch.as_tensor(w, device="cuda").requires_grad_(True)
            bt = torch.as_tensor(b, device="cuda").requires_grad_(True)
            dyt = torch.as_tensor(dy, device="cuda")
            pad = padding if isinstance(padding, int) else None

            def peer():
                xin = xt if pad is not None else F.pad(xt, (padding[2], padding[3], padding[0], padding[1]))
                yt = F.conv2d(xin, wt, bt, stride=stride, padding=pad if pad is not None else 0)
                xt.grad = wt.grad = bt.grad = None
                yt.backward(dyt)

            def peer_fwd():
                with torch.no_grad():
                    xin = xt if pad is not None else F.pad(xt, (padding[2], padding[3], padding[0], padding[1]))
                    F.conv2d(xin, wt, bt, stride=stride, padding=pad if pad is not None else 0)

            row["cudnn_fwd_s"] = time_it(peer_fwd, repeats)
            row["cudnn_fwd_bwd_s"] = time_it(peer, repeats)
            row["ratio_fwd_bwd"] = tot_s / row["cudnn_fwd_bwd_s"]
        rows.append(row)
    summary = {"ours_weighted_s": sum(r["count"] * r["ours_fwd_bwd_s"] for r in rows),
               "loops_weighted_s": {label: sum(r["count"] * r["loops_fwd_bwd_s"][label] for r in rows)
                                    for label in rows[0]["loops_fwd_bwd_s"]} if rows else {},
               "autotuner": kc._b.tuning_report()}
    if torch is not None:
        summary["cudnn_weighted_s"] = sum(r["count"] * r["cudnn_fwd_bwd_s"] for r in rows)
        summary["ratio"] = summary["ours_weighted_s"] / summary["cudnn_weighted_s"]
    return rows, summary


def bench_norm_attention(cupy, knorm, katt, time_it, repeats, batch, torch):
    rows = []
    for c, h in ((128, 32), (256, 16), (256, 8), (256, 4)):
        x = cupy.random.standard_normal((batch, c, h, h), dtype=cupy.float32)
        g = cupy.ones(c, dtype=cupy.float32)
        bta = cupy.zeros(c, dtype=cupy.float32)
        dy = cupy.random.standard_normal(x.shape, dtype=cupy.float32)

        def ours():
            _, cache = knorm.group_norm_silu_forward(x, g, bta, 32, 1e-6)
            knorm.group_norm_silu_backward(dy, cache)

        def ours_v1():
            _, cache = knorm.group_norm_silu_forward_v1(x, g, bta, 32, 1e-6)
            knorm.group_norm_silu_backward(dy, cache)             # the cache's version: v1's kernel

        row = {"op": "group_norm_silu fwd+bwd", "shape": [batch, c, h, h], "ours_s": time_it(ours, repeats),
               "ours_v1_s": time_it(ours_v1, repeats),
               "bytes_min": 5 * x.nbytes}   # the least traffic: forward x -> y, backward x, dy -> dx
        row["ours_GBps_min_traffic"] = row["bytes_min"] / row["ours_s"] / 1e9
        if torch is not None:
            import torch.nn.functional as F
            xt = torch.as_tensor(x, device="cuda").requires_grad_(True)
            gt = torch.as_tensor(g, device="cuda").requires_grad_(True)
            bt = torch.as_tensor(bta, device="cuda").requires_grad_(True)
            dyt = torch.as_tensor(dy, device="cuda")

            def peer():
                xt.grad = gt.grad = bt.grad = None
                F.silu(F.group_norm(xt, 32, gt, bt, 1e-6)).backward(dyt)

            row["torch_s"] = time_it(peer, repeats)
            row["ratio"] = row["ours_s"] / row["torch_s"]
        rows.append(row)
    q = cupy.random.standard_normal((batch, 256, 256), dtype=cupy.float32)
    dout = cupy.random.standard_normal((batch, 256, 256), dtype=cupy.float32)

    def att():
        _, cache = katt.attention_forward(q, q, q)
        katt.attention_backward(dout, cache)

    rows.append({"op": "attention fwd+bwd (cuBLAS matmuls + our softmax)", "shape": [batch, 256, 256],
                 "ours_s": time_it(att, repeats)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="GPU kernel benchmarks (needs a real GPU and CuPy)",
                                     allow_abbrev=False)
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--noise-batch", type=int, default=65536,
                        help="samples of 3x32x32 for the bandwidth runs (65536: 805 MB per array)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (5)")
    parser.add_argument("--sections", nargs="+", default=["noise", "conv", "norm"],
                        choices=["noise", "conv", "norm"], help="which sections to run (default: all)")
    args = parser.parse_args(argv)
    try:
        check_json_path(args.out, "--out")               # before minutes of measurements
    except ValueError as e:
        parser.error(str(e))
    from ddpm_ref.kernels import runtime
    if runtime.backend() != "cuda":
        raise SystemExit("bench_kernels.py needs a real GPU (the simulator would take days)")
    import cupy
    import numba
    from ddpm_ref.kernels import attention, conv, noise, norm
    repeats = 5 if args.quick else args.repeats
    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
        else:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
    except ImportError:
        torch = None
    time_it = _timer(cupy)
    props = cupy.cuda.runtime.getDeviceProperties(0)
    result = {"machine": {"gpu": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                          "sms": props["multiProcessorCount"], "python": platform.python_version(),
                          "cupy": cupy.__version__, "numba": numba.__version__,
                          "numba_cuda": __import__("numba_cuda").__version__,
                          "torch": None if torch is None else torch.__version__,
                          "cuda_driver": cupy.cuda.runtime.driverGetVersion()},
              "repeats": repeats, "batch": args.batch}
    t0 = time.time()

    def save():                                  # after every section: a timeout keeps what was measured
        save_result(args.out, result, t0)

    if "noise" in args.sections:
        result["noise"] = bench_noise(cupy, noise, time_it, repeats, args.noise_batch)
        result["noise_autotuner"] = runtime.tuning_report()
        save()
        print(f"{'noise kernel':48s} {'GB/s':>8s} {'of copy':>8s} {'ms':>8s}")
        for r in result["noise"]:
            print(f"{r['name']:48s} {r['GB/s']:8.1f} {r.get('fraction_of_copy', 1.0):8.2%} {r['seconds'] * 1e3:8.3f}")
    if "conv" in args.sections:
        _conv_section(result, cupy, conv, time_it, repeats, args.batch, torch)
        save()
    if "norm" in args.sections:
        result["norm_attention"] = bench_norm_attention(cupy, norm, attention, time_it, repeats, args.batch, torch)
        for r in result["norm_attention"]:
            print(r)
    save()
    result["seconds"] = round(time.time() - t0, 1)
    return result


def _conv_section(result, cupy, conv, time_it, repeats, batch, torch):
    rows, summary = bench_conv(cupy, conv, time_it, repeats, batch, torch)
    result["conv"] = {"rows": rows, "summary": summary}
    loops = list(rows[0]["loops_fwd_bwd_s"]) if rows else []
    print(f"\n{'conv (count x C->O @H, k, s)':34s} {'ours ms':>9s} {'TFLOP/s':>8s} "
          + " ".join(f"{lab[:9] + ' ms':>12s}" for lab in loops) + f" {'cuDNN ms':>9s} {'ratio':>6s}")
    for r in rows:
        label = f"{r['count']} x {r['C']}->{r['O']} @{r['H']} k{r['k']} s{r['stride']}"
        peer = f"{r['cudnn_fwd_bwd_s'] * 1e3:9.3f} {r['ratio_fwd_bwd']:6.2f}" if "cudnn_fwd_bwd_s" in r else ""
        print(f"{label:34s} {r['ours_fwd_bwd_s'] * 1e3:9.3f} {r['ours_TFLOPS']:8.2f} "
              + " ".join(f"{r['loops_fwd_bwd_s'][lab] * 1e3:12.3f}" for lab in loops) + f" {peer}")
    print("conv summary (count-weighted fwd+bwd):", json.dumps(summary))


if __name__ == "__main__":
    main()
