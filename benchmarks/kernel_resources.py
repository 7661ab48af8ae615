"""Registers, spills and occupancy of every GPU kernel, from the compiler alone (no GPU needed).

What it reports: each kernel registered in ``ddpm_ref.kernels`` (``_jit.REGISTRY``) compiled to PTX by
Numba (``cuda.compile_ptx``, with the kernel's launch bounds) and assembled by ``ptxas -v`` for one
architecture (default sm_90): registers per thread, spill stores and loads, stack frame, static shared
memory, and the resulting blocks per multiprocessor for a given block size (registers and shared
memory only: 65536 registers, allocated per warp in units of 256; 228 KB of shared memory; at most 32
blocks and 2048 threads). That is the occupancy half of a kernel's speed; the other half needs a GPU
(benchmarks/bench_kernels.py).

With ``--loops`` it also disassembles each kernel (``nvdisasm``, from a CUDA toolkit or the
``nvidia-cuda-nvdisasm`` wheel) and reports its hottest loop, the backward branch whose body holds the
most FMAs: instructions in all, FFMAs, shared-memory loads (and how many of them are 16-byte
``LDS.128``), and the FMA share. An issue-bound loop (the convolution's, on an H200) runs at most at
that share of the FP32 peak, so it says which variant is worth timing on a GPU.

Needs NVVM and NVRTC (as the compile check) and ``ptxas`` from a CUDA toolkit on the PATH (or
``--ptxas``). Usage::

    python benchmarks/kernel_resources.py [--cc 9.0] [--threads 256] [--match conv] [--json out.json]
    python benchmarks/kernel_resources.py --match conv2d_fwd --loops [--nvdisasm PATH]
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


_SASS_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\s+`\((\.L_x_\d+)\)")


def loop_mix(sass: str):
    """The hottest loop of a kernel's ``nvdisasm`` listing: the body of the backward branch (a ``BRA``
    to a label at or before it) holding the most ``FFMA`` (the smallest such body on a tie). Returns
    ``{"instructions", "ffma", "lds", "lds128", "ffma_share", "outer"}``, or None when no loop holds an
    FFMA; ``outer`` is the static size of the smallest loop around it (None if none): what each of
    its trips adds to the hot loop's, e.g. a convolution's global loads and shared stores per K step."""
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _SASS_LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS_INSTR.match(line)
        if m:
            for name in pending:
                labels[name] = len(instrs)
            pending = []
            instrs.append(m.group(1))
    spans = []                                                            # (start, end) of each loop
    for end, ins in enumerate(instrs):
        m = _SASS_BRANCH.search(ins)
        if m and labels.get(m.group(1), end + 1) <= end:
            spans.append((labels[m.group(1)], end))
    best = None
    for start, end in spans:
        ffma = sum(1 for x in instrs[start:end + 1] if re.search(r"\bFFMA\b", x))
        if ffma and (best is None or (ffma, start - end) > (best[0], best[1] - best[2])):
            best = (ffma, start, end)
    if best is None:
        return None
    ffma, start, end = best
    body = instrs[start:end + 1]
    around = [e - s + 1 for s, e in spans if s <= start and end <= e and (s, e) != (start, end)]
    lds = [x for x in body if re.search(r"\bLDS\b|\bLDS\.", x)]
    return {"instructions": len(body), "ffma": ffma, "lds": len(lds),
            "lds128": sum(1 for x in lds if "LDS.128" in x), "ffma_share": ffma / len(body),
            "outer": min(around) if around else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", default="9.0")
    ap.add_argument("--threads", type=int, default=256, help="block size for the occupancy column")
    ap.add_argument("--match", default="", help="only kernels whose name contains this")
    ap.add_argument("--ptxas", default=shutil.which("ptxas"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--loops", action="store_true", help="also the hottest loop's instruction mix (nvdisasm)")
    ap.add_argument("--nvdisasm", default=shutil.which("nvdisasm"))
    args = ap.parse_args(argv)
    if not args.ptxas:
        raise SystemExit("ptxas not found: install a CUDA toolkit or pass --ptxas PATH")
    if args.loops and not args.nvdisasm:
        raise SystemExit("--loops needs nvdisasm: install a CUDA toolkit or the nvidia-cuda-nvdisasm wheel, "
                         "or pass --nvdisasm PATH")
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
            cubin = os.path.join(tmp, f"{name}.cubin")
            res = subprocess.run([args.ptxas, "-v", f"-arch=sm_{major}{minor}", "-O3", path, "-o", cubin],
                                 capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"ptxas failed on {name}: {res.stderr[-2000:]}")
            row = {"kernel": f"{module.rsplit('.', 1)[-1]}.{name}", "launch_bounds": bounds, **parse_ptxas(res.stderr)}
            if args.loops:
                dis = subprocess.run([args.nvdisasm, "-c", cubin], capture_output=True, text=True)
                if dis.returncode:
                    raise SystemExit(f"nvdisasm failed on {name}: {dis.stderr[-2000:]}")
                row["loop"] = loop_mix(dis.stdout)
            threads = bounds[0] if bounds else args.threads
            row["blocks_per_sm"] = blocks_per_sm(row["registers"], row["smem"], threads)
            row["warps_per_sm"] = row["blocks_per_sm"] * -(-threads // 32)
            rows.append(row)
    loops = "  hottest loop: instrs ffma lds (128-bit) share  outer" if args.loops else ""
    print(f"{'kernel':44s} {'regs':>5s} {'spill st/ld':>12s} {'stack':>6s} {'smem':>6s} {'blocks':>7s} {'warps':>6s}"
          + loops)
    for r in rows:
        line = (f"{r['kernel']:44s} {r['registers']:5d} {r['spill_stores']:5d}/{r['spill_loads']:<6d} "
                f"{r['stack_frame']:6d} {r['smem']:6d} {r['blocks_per_sm']:7d} {r['warps_per_sm']:6d}")
        lp = r.get("loop")
        if lp:
            line += (f"  {lp['instructions']:6d} {lp['ffma']:4d} {lp['lds']:3d} ({lp['lds128']:3d}) "
                     f"{lp['ffma_share']:5.0%}  {lp['outer'] if lp['outer'] is not None else '-':>5}")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cc": args.cc, "threads": args.threads, "kernels": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
