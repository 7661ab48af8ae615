#!/usr/bin/env bash
# One script for a machine with an NVIDIA GPU. In order of importance, each phase under its own time
# limit so that a slow one cannot starve the rest:
#   1. the convolution, GroupNorm and noise kernel tests at full size (the kernels with autotuned
#      variants, whose choice must never change a number);
#   2. the U-Net, training loop and sampler on the GPU backend against the reference (real GPU,
#      production tiles): tests/test_kernels_unet.py;
#   3. the end-to-end benchmark: a cifar training step at batch 128 and a sampling step against
#      diffusers' UNet2DModel in PyTorch eager FP32 (benchmarks/bench_gpu_e2e.py, with the per-op
#      breakdown, wall and device time);
#   4. the kernel benchmarks (noise kernels vs copy bandwidth, convolutions vs cuDNN, GroupNorm);
#   5. an Nsight Compute profile of the noise, convolution and GroupNorm kernels (where they stall;
#      benchmarks/profile_gpu.py), when ncu is installed;
#   6. the other GPU kernel tests at full size;
#   7. the command line on the GPU: `ddpm train --device gpu` on the digits, `ddpm sample --device gpu`.
# Results go to $OUT (default ./gpu_check_out): gpu_check.log (everything), tests.log, tests2.log,
# e2e.json, bench.json, ncu.txt, summary.json, gpu_samples.png. The phase limits add up to 14 minutes;
# expect about 7 on an H200 (much of it JIT compilation).
#
# Needs numpy, pytest, hypothesis, numba, numba-cuda, CuPy and, for the peers, torch with CUDA and
# diffusers. Machines without internet: put wheels in .whl/ (installed here into /tmp/site first).
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh
# A subset: ONLY=tests1,e2e,bench TESTS1=tests/test_kernels_noise.py BENCH_SECTIONS=noise (phase keys:
# tests1 unet e2e bench ncu tests2 cli).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
export NUMBA_ENABLE_CUDASIM=0 DDPM_KERNELS_FULL=1 NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0 PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
ONLY="${ONLY:-}"   # run only these phases (see Usage); empty: all
phase() {  # phase KEY SECONDS NAME COMMAND...: run with a time limit, log everything, report the status
  local key=$1 limit=$2 name=$3; shift 3
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$key,"* ]]; then
    return 0
  fi
  say "$name (limit ${limit}s)"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  say "$name: exit status $rc"
  echo "$name $rc" >> "$STATUS"
}
STATUS=$(mktemp)                 # phase exit statuses (not in $OUT: a device run returns only 8 files)
: > "$STATUS"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  say "installing the carried wheels into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >> "$LOG" 2>&1 || say "wheel install failed (see log)"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# ddpm_ref.kernels lives in kernels/ (setup.py's package_dir): mount it for this run.
if ! python3 -c "import ddpm_ref.kernels" 2>/dev/null; then
  ln -sfn ../kernels ddpm_ref/kernels
  trap 'rm -f ddpm_ref/kernels' EXIT
  say "linked kernels/ as ddpm_ref/kernels for this run"
fi

say "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 - <<'PY'
import json, platform
info = {"python": platform.python_version()}
for mod in ("numpy", "numba", "numba_cuda", "cupy", "torch", "diffusers", "hypothesis", "pytest"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:
        info[mod] = f"missing ({type(exc).__name__})"
try:
    from ddpm_ref.kernels import backend
    info["backend"] = backend()
except Exception as exc:
    info["backend"] = f"unavailable: {exc}"
print(json.dumps(info))
PY
} >> "$LOG" 2>&1

PYTEST="python3 -m pytest -p no:cacheprovider -rs --durations=10"   # pytest.ini adds -q
TESTS1="${TESTS1:-tests/test_kernels_conv.py tests/test_kernels_norm.py tests/test_kernels_noise.py}"
phase tests1 130 "kernel tests (full size): $TESTS1" bash -c "$PYTEST $TESTS1 > $OUT/tests.log 2>&1; rc=\$?; \
  tail -25 $OUT/tests.log; exit \$rc"
phase unet 120 "U-Net on the GPU backend (tests)" $PYTEST tests/test_kernels_unet.py
phase e2e 200 "end-to-end benchmark" python3 benchmarks/bench_gpu_e2e.py --preset cifar --batch 128 \
  --sample-batch 128 --warmup 1 --repeats 5 --breakdown --out "$OUT/e2e.json"
phase bench 120 "kernel benchmarks" python3 benchmarks/bench_kernels.py --quick \
  --sections ${BENCH_SECTIONS:-noise conv norm} --out "$OUT/bench.json"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  phase ncu 100 "Nsight Compute profile (noise, conv, GroupNorm kernels)" bash -c "'$NCU' --clock-control none \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    -k 'regex:philox_float_kernel_v2|q_sample_kernel_v2|conv2d_(fwd|dx|dw)_kernel_v3|group_norm_(fwd|bwd)_kernel' \
    python3 benchmarks/profile_gpu.py > $OUT/ncu.txt 2>&1; rc=\$?; grep -E '^ +(Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per Thread|Achieved Occupancy|Issued Warp Per Scheduler|No Eligible)' $OUT/ncu.txt | head -60; exit \$rc"
elif [ -z "$ONLY" ] || [[ ",$ONLY," == *",ncu,"* ]]; then
  say "no ncu on this machine: profile skipped"
fi
phase tests2 90 "kernel tests (full size): the others" bash -c "$PYTEST tests/test_kernels_optim.py \
  tests/test_kernels_loss_attention.py tests/test_kernels_sampling.py tests/test_kernels_elementwise.py \
  tests/test_kernels_train.py tests/test_kernels_runtime.py > $OUT/tests2.log 2>&1; rc=\$?; tail -25 $OUT/tests2.log; exit \$rc"
RUN=$(mktemp -d)
phase cli 60 "command line on the GPU" bash -c "python3 -m ddpm_ref train --device gpu --data digits --preset digits \
  --steps 150 --batch 128 --out $RUN/run --quiet && python3 -m ddpm_ref sample --device gpu --ckpt $RUN/run \
  -n 64 --sampler ddim --steps 20 --out $OUT/gpu_samples && rm -f $OUT/gpu_samples.npy"

python3 - "$OUT" "$STATUS" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
summary = {"phases": dict(line.rsplit(" ", 1) for line in open(sys.argv[2]).read().splitlines())}
path = os.path.join(out, "bench.json")
if os.path.exists(path):
    b = json.load(open(path))
    summary["gpu"] = b["machine"]["gpu"]
    copy = [r for r in b.get("noise", []) if r["name"].startswith("device-to-device")]
    if copy:
        summary["copy_GBps"] = round(copy[0]["GB/s"], 1)
        summary["noise_fraction_of_copy"] = {r["name"]: round(r["fraction_of_copy"], 3)
                                             for r in b["noise"] if "fraction_of_copy" in r}
    if "conv" in b:
        summary["conv_fwd_bwd_vs_cudnn"] = b["conv"]["summary"]
    if "norm_attention" in b:
        summary["norm_attention"] = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
                                     for r in b["norm_attention"]]
    summary["noise_autotuner"] = b.get("noise_autotuner")
path = os.path.join(out, "e2e.json")
if os.path.exists(path):
    e = json.load(open(path))
    summary["e2e"] = {k: {kk: v[kk] for kk in ("median_s", "step_s", "ratio_ours_over_peer", "pool_bytes",
                                               "max_allocated_bytes", "images_per_s_ddpm1000") if kk in v}
                      for k, v in e.items() if isinstance(v, dict) and not k.startswith("autotuner")}
    bd = e.get("train_ours", {}).get("breakdown_s")
    if bd:
        summary["e2e_breakdown_top"] = dict(list(bd.items())[:12])
    sbd = e.get("sample_ours", {}).get("breakdown_s")
    if sbd:
        summary["e2e_sample_breakdown_top"] = dict(list(sbd.items())[:10])
    summary["e2e_autotuner"] = e.get("autotuner")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
rm -f "$STATUS"
say "done: results in $OUT"
