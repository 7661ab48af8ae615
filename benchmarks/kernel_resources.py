"""Registers, spills and occupancy of every GPU kernel, from the compiler alone (no GPU needed).

What it reports: each kernel registered in ``ddpm_ref.kernels`` (``_jit.REGISTRY``) compiled to PTX by
Numba (``cuda.compile_ptx``, with the kernel's launch bounds) and assembled by ``ptxas -v`` for one
architecture (default sm_90): registers per thread, spill stores and loads, stack frame, static shared
memory, and the resulting blocks per multiprocessor for a given block size (registers and shared
memory only: 65536 registers, allocated per warp in units of 256; 228 KB of shared memory; at most 32
blocks and 2048 threads). That is the occupancy half of a kernel's speed; the other half needs a GPU
(benchmarks/bench_kernels.py).

Needs NVVM and NVRTC (as the compile check) and ``ptxas`` from a CUDA toolkit on the PATH (or
``--ptxas``). Usage::

    python benchmarks/kernel_resources.py [--cc 9.0] [--threads 256] [--match conv] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_INFO = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes cumulative stack size)?"
                   r"(?:, (\d+) bytes smem)?")


def blocks_per_sm(regs: int, smem: int, threads: int) -> int:
    """Resident blocks per multiprocessor on sm_80/sm_90 from registers and shared memory alone."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_smem = (228 * 1024) // (smem + 1024) if smem else 32          # 1 KB reserved per block
    return max(0, min(by_regs, by_smem, 32, 2048 // threads))


def parse_ptxas(stderr: str) -> dict:
    """The numbers of ``ptxas -v`` output for one kernel (the first function's lines)."""
    out = {"registers": None, "spill_stores": 0, "spill_loads": 0, "stack_frame": 0, "smem": 0}
    for line in stderr.splitlines():
        m = _INFO.search(line)
        if m and out["registers"] is None:
            out["stack_frame"], out["spill_stores"], out["spill_loads"] = (int(g) for g in m.groups())
        m = _USED.search(line)
        if m and out["registers"] is None:
            out["registers"] = int(m.group(1))
            out["smem"] = int(m.group(3) or 0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", default="9.0")
    ap.add_argument("--threads", type=int, default=256, help="block size for the occupancy column")
    ap.add_argument("--match", default="", help="only kernels whose name contains this")
    ap.add_argument("--ptxas", default=shutil.which("ptxas"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not args.ptxas:
        raise SystemExit("ptxas not found: install a CUDA toolkit or pass --ptxas PATH")
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    from ddpm_ref.kernels import MODULES
    from ddpm_ref.kernels.runtime import cuda_module
    cuda = cuda_module()
    for name in MODULES:
        importlib.import_module(f"ddpm_ref.kernels.{name}")
    from ddpm_ref.kernels._jit import REGISTRY
    major, minor = (int(p) for p in args.cc.split("."))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for module, name, func, sigs in REGISTRY:
            if args.match not in name:
                continue
            bounds = getattr(func, "_launch_bounds", None)
            ptx, _ = cuda.compile_ptx(func, sigs[0], cc=(major, minor), launch_bounds=bounds)
            path = os.path.join(tmp, f"{name}.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            res = subprocess.run([args.ptxas, "-v", f"-arch=sm_{major}{minor}", "-O3", path, "-o", os.devnull],
                                 capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"ptxas failed on {name}: {res.stderr[-2000:]}")
            row = {"kernel": f"{module.rsplit('.', 1)[-1]}.{name}", "launch_bounds": bounds, **parse_ptxas(res.stderr)}
            threads = bounds[0] if bounds else args.threads
            row["blocks_per_sm"] = blocks_per_sm(row["registers"], row["smem"], threads)
            row["warps_per_sm"] = row["blocks_per_sm"] * -(-threads // 32)
            rows.append(row)
    print(f"{'kernel':44s} {'regs':>5s} {'spill st/ld':>12s} {'stack':>6s} {'smem':>6s} {'blocks':>7s} {'warps':>6s}")
    for r in rows:
        print(f"{r['kernel']:44s} {r['registers']:5d} {r['spill_stores']:5d}/{r['spill_loads']:<6d} "
              f"{r['stack_frame']:6d} {r['smem']:6d} {r['blocks_per_sm']:7d} {r['warps_per_sm']:6d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cc": args.cc, "threads": args.threads, "kernels": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
