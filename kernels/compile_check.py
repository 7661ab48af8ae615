"""Compile every registered GPU kernel to PTX for a given compute capability, without a GPU.

What it is: the check that catches kernels that run in Numba's CUDA simulator but break when really
compiled (typing, integer promotion, unsupported Python). It imports every kernel module listed in
``ddpm_ref.kernels.MODULES`` with the simulator *off* and calls ``numba.cuda.compile_ptx`` on each
kernel with the signatures its launcher uses (``_jit.REGISTRY``). It needs NVVM and NVRTC (the
``nvidia-cuda-nvrtc`` wheel, and libnvvm from a CUDA toolkit or the ``nvidia-nvvm`` wheel), not a GPU.

Run: ``NUMBA_ENABLE_CUDASIM=0 python -m ddpm_ref.kernels.compile_check [--cc 9.0] [--shard i/n]``. Prints one JSON
line ``{"cc": ..., "compiled": {name: ptx_chars}, "failed": {name: error}, "seconds": ...}``; exit
status 0 when all compiled, 1 when some failed, 3 when the toolchain itself is missing (with the
reason in "toolchain").
What it is not: a test of the numbers (tests/test_kernels_*.py do that).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 for H100 (sm_90)")
    parser.add_argument("--shard", default="0/1", help="compile only every n-th kernel from the i-th: 'i/n'")
    args = parser.parse_args(argv)
    shard, shards = (int(p) for p in args.shard.split("/"))
    if not 0 <= shard < shards:
        raise SystemExit(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}")
    major, minor = (int(p) for p in args.cc.split("."))
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        print(json.dumps({"toolchain": "NUMBA_ENABLE_CUDASIM is set: unset it to compile for real"}))
        return 3
    t0 = time.time()
    from . import MODULES
    from .runtime import cuda_module
    cuda = cuda_module()
    try:                                   # the toolchain: NVVM + NVRTC, no GPU needed
        def _probe(out):
            out[0] = 1.0
        cuda.compile_ptx(_probe, "void(float32[::1])", cc=(major, minor))
    except Exception as exc:  # DynamicLibNotFoundError, NvvmSupportError, ... depends on the machine
        print(json.dumps({"toolchain": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}))
        return 3
    for name in MODULES:
        importlib.import_module(f"{__package__}.{name}")
    from ._jit import REGISTRY
    compiled, failed = {}, {}
    for number, (module, name, func, sigs) in enumerate(REGISTRY):
        if number % shards != shard:
            continue
        for sig in sigs:
            key = f"{module.rsplit('.', 1)[-1]}.{name}"
            try:
                ptx, _ = cuda.compile_ptx(func, sig, cc=(major, minor),
                                          launch_bounds=getattr(func, "_launch_bounds", None))
                if f".target sm_{major}{minor}" not in ptx:
                    raise RuntimeError(f"PTX does not target sm_{major}{minor}")
                compiled[key] = len(ptx)
            except Exception as exc:  # report every kernel, not just the first failure
                failed[key] = f"{type(exc).__name__}: {exc}"[:2000]
    print(json.dumps({"cc": f"{major}.{minor}", "compiled": compiled, "failed": failed,
                      "seconds": round(time.time() - t0, 1)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
