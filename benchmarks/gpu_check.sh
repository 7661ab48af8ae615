#!/usr/bin/env bash
# One script for a machine with an NVIDIA GPU: the GPU kernel tests at full size with the simulator
# off, then the kernel benchmarks. Results (logs + JSON) go to $OUT (default ./gpu_check_out).
# Budget: under 5 minutes on an H100: tests <= 3 min (mostly JIT compilation), benchmarks <= 100 s.
#
# Needs (no internet on the GPU machine: carry the wheels): numpy, pytest, hypothesis, numba,
# numba-cuda (with cuda-bindings / NVRTC / nvJitLink for the driver's CUDA major version),
# cupy-cuda12x (works on CUDA 12 and 13 drivers), and optionally torch with CUDA for the cuDNN peer.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
export NUMBA_ENABLE_CUDASIM=0 DDPM_KERNELS_FULL=1 NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# ddpm_ref.kernels lives in kernels/ (setup.py's package_dir): install editable if it is not importable.
if ! python -c "import ddpm_ref.kernels" 2>/dev/null; then
  say "installing ddpm-ref (editable, no dependencies)"
  pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || say "pip install -e . failed (see log)"
fi
if ! python -c "import ddpm_ref.kernels" 2>/dev/null; then
  # Fallback without pip: mount kernels/ as ddpm_ref/kernels with a symlink for this run only
  # (`python -m pytest` puts the checkout first on sys.path, so the link must live in it).
  ln -sfn ../kernels ddpm_ref/kernels
  trap 'rm -f ddpm_ref/kernels' EXIT
  say "linked kernels/ as ddpm_ref/kernels for this run"
fi

say "environment"
{ nvidia-smi || true
  python - <<'PY'
import json, platform
info = {"python": platform.python_version()}
for mod in ("numpy", "numba", "numba_cuda", "cupy", "torch", "hypothesis", "pytest"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:
        info[mod] = f"missing ({type(exc).__name__})"
try:
    from ddpm_ref.kernels import backend
    info["backend"] = backend()
except Exception as exc:
    info["backend"] = f"unavailable: {exc}"
print(json.dumps(info, indent=1))
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$LOG"

# Per-test time limit when pytest-timeout is there, so one hung test cannot eat the whole budget.
PER_TEST_TIMEOUT=""
python -c "import pytest_timeout" 2>/dev/null && PER_TEST_TIMEOUT="--timeout=90"

say "kernel benchmarks"
timeout 100 python benchmarks/bench_kernels.py --quick --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" >> "$LOG"
BENCH_RC=${PIPESTATUS[0]}
say "benchmarks exit status $BENCH_RC"

say "kernel tests (full size, real GPU)"
timeout 180 python -m pytest tests/test_kernels_noise.py tests/test_kernels_optim.py tests/test_kernels_conv.py \
  tests/test_kernels_norm.py tests/test_kernels_loss_attention.py tests/test_kernels_sampling.py \
  tests/test_kernels_elementwise.py tests/test_kernels_train.py tests/test_kernels_runtime.py \
  -p no:cacheprovider -v -rs --durations=15 $PER_TEST_TIMEOUT \
  --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" >> "$LOG"
TEST_RC=${PIPESTATUS[0]}
say "tests exit status $TEST_RC"

python - "$OUT" "$TEST_RC" "$BENCH_RC" <<'PY'
import json, os, sys
out, test_rc, bench_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
summary = {"tests_exit": test_rc, "bench_exit": bench_rc}
path = os.path.join(out, "bench.json")
if os.path.exists(path):
    b = json.load(open(path))
    summary["gpu"] = b["machine"]["gpu"]
    copy = [r for r in b["noise"] if r["name"].startswith("device-to-device")][0]["GB/s"]
    summary["copy_GBps"] = round(copy, 1)
    summary["noise_fraction_of_copy"] = {r["name"]: round(r["fraction_of_copy"], 3)
                                         for r in b["noise"] if "fraction_of_copy" in r}
    summary["conv_fwd_bwd_vs_cudnn"] = b["conv"]["summary"]
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
say "done: results in $OUT"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
