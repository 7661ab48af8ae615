"""Time one DDPM training step of the NumPy U-Net against diffusers' UNet2DModel on PyTorch CPU.

A step is: forward on x_t (train mode, dropout on), the L_simple MSE against eps (DDPM eq. 14),
backward to every parameter, and (unless --no-optim) the AdamW update (ddpm_ref.optim.AdamW vs
torch.optim.AdamW). Both sides run the same configuration (``UNetConfig.diffusers_kwargs()``), batch
and thread count. Timing: one subprocess builds both networks and alternates their steps (ours,
torch, ours, torch, ...), so that both see the same machine load (this matters on a shared machine);
the median of the timed steps is reported. Memory: each (framework, preset) runs in a subprocess of
its own, so that neither contaminates the other's peak: the worker builds the model, reads its RSS
(the baseline: interpreter, libraries, parameters, inputs), runs two steps and reports the peak RSS
(VmHWM) and the peak above the baseline (the step's own working memory).

    python benchmarks/train_step.py                       # small@64 and cifar@8, 1 thread, 5 steps
    python benchmarks/train_step.py --threads 2 --repeats 7
    python benchmarks/train_step.py --profile cifar:8     # time spent per op in our cifar step

Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small:64,cifar:8", help="comma list of preset:batch")
    ap.add_argument("--threads", type=int, default=1, help="BLAS / torch intra-op threads (both sides)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--no-optim", action="store_true", help="leave out the AdamW update")
    ap.add_argument("--profile", default=None, metavar="PRESET:BATCH", help="per-op time breakdown of ours")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


ARGS = _parse()
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)          # before numpy is imported

import numpy as np  # noqa: E402


def _rss_kib(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _inputs(cfg, batch):
    rs = np.random.default_rng(0)
    x = rs.standard_normal((batch, cfg.in_channels, cfg.image_size, cfg.image_size)).astype(np.float32)
    eps = rs.standard_normal((batch, cfg.model_out_channels, cfg.image_size, cfg.image_size)).astype(np.float32)
    t = rs.integers(0, 1000, batch)
    return x, eps, t


def _ours(preset, batch, steps, warmup, optim):
    from ddpm_ref.models import UNet
    from ddpm_ref.ops import loss as L
    from ddpm_ref.optim import AdamW
    model = UNet.from_preset(preset)
    params = model.init_params(0)
    x, eps, t = _inputs(model.config, batch)
    opt = AdamW(model.num_params, lr=2e-4) if optim else None
    grad = model.layout.zeros(np.float32)
    index = np.arange(batch)

    def step(k):
        out, cache = model.forward(params, x, t, train=True, seed=0, index=index, step=k)
        loss, lc = L.mse_forward(out, eps)
        dout = L.mse_backward(lc)
        del out, lc
        model.backward(dout, cache, out=grad)
        if opt is not None:
            opt.step(params, grad)
        return float(loss)

    return step, model.num_params


def _torch(preset, batch, steps, warmup, optim):
    import torch
    import diffusers
    from ddpm_ref.models import UNet
    torch.set_num_threads(ARGS.threads)
    torch.manual_seed(0)
    model = UNet.from_preset(preset)
    net = diffusers.UNet2DModel(**model.config.diffusers_kwargs()).train()
    x, eps, t = (torch.from_numpy(a) for a in _inputs(model.config, batch))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4) if optim else None

    def step(k):
        net.zero_grad(set_to_none=True)
        out = net(x, t).sample
        loss = torch.nn.functional.mse_loss(out, eps)
        loss.backward()
        if opt is not None:
            opt.step()
        return float(loss)

    return step, sum(p.numel() for p in net.parameters())


def worker(spec):
    what, rest = spec.split(":", 1)
    optim = not ARGS.no_optim
    if what == "mem":                                  # mem:KIND:PRESET:BATCH, one framework alone
        kind, preset, batch = rest.split(":")
        build = _ours if kind == "ours" else _torch
        step, nparams = build(preset, int(batch), ARGS.repeats, ARGS.warmup, optim)
        base = _rss_kib()
        for k in range(2):
            step(k)
        print(json.dumps(dict(params=nparams, base_mib=base / 1024, peak_mib=_rss_kib("VmHWM") / 1024)))
        return
    preset, batch = rest.split(":")                    # time:PRESET:BATCH, both, steps alternating
    steps = {"ours": _ours(preset, int(batch), ARGS.repeats, ARGS.warmup, optim)[0],
             "torch": _torch(preset, int(batch), ARGS.repeats, ARGS.warmup, optim)[0]}
    times = {"ours": [], "torch": []}
    for k in range(ARGS.warmup + ARGS.repeats):
        for kind, step in steps.items():
            t0 = time.perf_counter()
            step(k)
            if k >= ARGS.warmup:
                times[kind].append(time.perf_counter() - t0)
    print(json.dumps({kind: dict(median_s=float(np.median(v)), times=v) for kind, v in times.items()}))


def profile(spec):
    """Per-op wall time of our training step (wraps every public op function the U-Net calls)."""
    preset, batch = spec.split(":")
    import ddpm_ref.ops as ops_pkg
    from ddpm_ref.ops import activation, attention, conv, embedding, linear, loss, norm, resample
    totals = {}

    def wrap(mod, name):
        fn = getattr(mod, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            key = name
            if name.startswith("conv2d") and name.endswith("forward"):
                x, w = a[0], a[1]
                key = f"{name} k{w.shape[2]} s{a[3] if len(a) > 3 else 1} {x.shape[2]}x{x.shape[3]}"
            elif name == "conv2d_backward":
                key = f"{name} {a[0].shape[2]}x{a[0].shape[3]}"
            tot = totals.setdefault(key, [0.0, 0])
            tot[0] += time.perf_counter() - t0
            tot[1] += 1
            return r

        setattr(mod, name, timed)

    for mod in (activation, attention, conv, embedding, linear, loss, norm, resample):
        for name in getattr(mod, "__all__", [n for n in dir(mod) if n.endswith(("_forward", "_backward"))]):
            if callable(getattr(mod, name, None)) and (name.endswith(("_forward", "_backward"))
                                                       or name == "timestep_embedding"):
                wrap(mod, name)
    step, _ = _ours(preset, int(batch), 1, 1, not ARGS.no_optim)
    step(0)
    totals.clear()
    n = max(ARGS.repeats, 1)
    t0 = time.perf_counter()
    for k in range(n):
        step(1 + k)
    wall = (time.perf_counter() - t0) / n
    print(f"our {preset} step at batch {batch}, {ARGS.threads} thread(s): {wall * 1e3:.1f} ms per step "
          f"(mean of {n}); per op, ms per step:")
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    for key, (s, c) in rows:
        print(f"  {key:<40s} {s / n * 1e3:9.1f} ms  {100 * s / n / wall:5.1f}%  ({c // n} calls)")
    ops_total = sum(s for s, _ in totals.values()) / n
    print(f"  {'(rest: model glue, grad copies, AdamW)':<40s} {(wall - ops_total) * 1e3:9.1f} ms  "
          f"{100 * (wall - ops_total) / wall:5.1f}%")


def main():
    if ARGS.worker:
        return worker(ARGS.worker)
    if ARGS.profile:
        return profile(ARGS.profile)
    import torch
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python "
          f"{platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; "
          f"threads {ARGS.threads}; median of {ARGS.repeats} steps after {ARGS.warmup} warm-up; "
          f"step = forward + MSE + backward{'' if ARGS.no_optim else ' + AdamW'}")
    header = f"{'preset':<8}{'batch':>6}{'params':>12}{'ours ms':>10}{'torch ms':>10}{'ratio':>7}" \
             f"{'ours peak MiB':>15}{'torch peak MiB':>16}{'ratio':>7}{'ours +MiB':>11}{'torch +MiB':>12}"
    print(header)
    for item in ARGS.presets.split(","):
        preset, batch = item.split(":")
        res = {}
        for spec in (f"time:{preset}:{batch}", f"mem:ours:{preset}:{batch}", f"mem:torch:{preset}:{batch}"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec,
                   "--threads", str(ARGS.threads), "--repeats", str(ARGS.repeats), "--warmup", str(ARGS.warmup)]
            if ARGS.no_optim:
                cmd.append("--no-optim")
            outp = subprocess.run(cmd, capture_output=True, text=True)
            if outp.returncode:
                sys.exit(f"worker {spec} failed:\n{outp.stderr}")
            res[spec.split(":")[0] + (":" + spec.split(":")[1] if spec.startswith("mem") else "")] = \
                json.loads(outp.stdout.strip().splitlines()[-1])
        tm, o, p = res["time"], res["mem:ours"], res["mem:torch"]
        to, tt = tm["ours"]["median_s"], tm["torch"]["median_s"]
        print(f"{preset:<8}{int(batch):>6}{o['params']:>12,}{to * 1e3:>10.1f}{tt * 1e3:>10.1f}"
              f"{to / tt:>7.2f}{o['peak_mib']:>15.0f}{p['peak_mib']:>16.0f}"
              f"{o['peak_mib'] / p['peak_mib']:>7.2f}{o['peak_mib'] - o['base_mib']:>11.0f}"
              f"{p['peak_mib'] - p['base_mib']:>12.0f}")
    print("peak = VmHWM of the worker process; +MiB = peak minus the RSS after building the model "
          "and inputs (the step's own working memory).")


if __name__ == "__main__":
    main()
