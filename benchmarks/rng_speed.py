"""Time ddpm_ref.rng.normal against numpy.random.Generator.standard_normal.

What it measures: float32 standard normals for a (64, 3, 32, 32) batch (a CIFAR-10 sized batch of
sampling or training noise), ours addressed by index = arange(64) through Philox4x32-10 and Box-Muller
(ddpm_ref.rng), numpy's from a PCG64 Generator (ziggurat). Also the bare Philox words (random_bits).
The runs are interleaved (ours, then numpy's, in turn) after a warm-up so that load from other
processes hits both alike. Figures: the median wall time, the minimum wall time, and the median CPU
time of the calling thread (``time.thread_time``: not inflated when a busy machine deschedules the
process, so the steadiest of the three on shared machines). No test asserts a time.

    python benchmarks/rng_speed.py [--runs 50] [--shape 64 3 32 32]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from ddpm_ref import rng


def _time(fn) -> tuple:
    """(wall seconds, this thread's CPU seconds) of one call."""
    c0, t0 = time.thread_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.thread_time() - c0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=50, help="timed runs of each (median reported; >= 20)")
    p.add_argument("--shape", type=int, nargs="+", default=[64, 3, 32, 32], help="batch shape (N, ...)")
    args = p.parse_args(argv)
    if args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    n, per_sample = args.shape[0], tuple(args.shape[1:])
    index = np.arange(n)
    gen = np.random.default_rng(0)
    cases = {
        "ddpm_ref.rng.normal": lambda: rng.normal(0, rng.Stream.SAMPLE_STEP, index, 0, per_sample),
        "ddpm_ref.rng.random_bits": lambda: rng.random_bits(0, rng.Stream.SAMPLE_STEP, index, 0, per_sample),
        "numpy Generator.standard_normal": lambda: gen.standard_normal(tuple(args.shape), dtype=np.float32),
    }
    for fn in cases.values():          # warm-up
        fn()
        fn()
    times = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, fn in cases.items():
            times[name].append(_time(fn))
    med = {name: float(np.median([w for w, _ in ts])) * 1e3 for name, ts in times.items()}
    best = {name: float(np.min([w for w, _ in ts])) * 1e3 for name, ts in times.items()}
    cpu = {name: float(np.median([c for _, c in ts])) * 1e3 for name, ts in times.items()}
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"python {platform.python_version()} numpy {np.__version__}")
    print(f"float32 normals of shape {tuple(args.shape)} ({int(np.prod(args.shape))} values), "
          f"median of {args.runs} interleaved runs")
    ref = "numpy Generator.standard_normal"
    print(f"{'generator':34s} {'median ms':>10s} {'vs numpy':>9s} {'min ms':>8s} {'vs numpy':>9s} "
          f"{'CPU ms':>8s} {'vs numpy':>9s}")
    for name, ms in med.items():
        print(f"{name:34s} {ms:10.3f} {ms / med[ref]:8.2f}x {best[name]:8.3f} {best[name] / best[ref]:8.2f}x "
              f"{cpu[name]:8.3f} {cpu[name] / cpu[ref]:8.2f}x")
    return med


if __name__ == "__main__":
    main()
