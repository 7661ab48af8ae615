"""Smoke test of the benchmark suite (benchmarks/): every row runs at toy size so that none rots.

What it checks: each row of ``python -m benchmarks`` (per-op forward/backward at every distinct conv
shape of the ``tiny`` U-Net, gn+silu, group_norm, attention, q_sample, DDPM/DDIM steps, AdamW, the
training step, DDPM/DDIM sampling, ours and the torch/diffusers peers) produces finite, positive
figures, that the derived figures (ratio, GFLOP/s, share of the GEMM peak, images/s) are the stated
functions of the measured ones, that the FLOP convention (2 x MACs) gives the hand-counted value, and
that the worker-subprocess path, ``--quick`` extrapolation and the profiler work.
What it is not: a performance test. No test here asserts a time.
"""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common, suite  # noqa: E402
from benchmarks.bench_ops import discover  # noqa: E402

# Relative tolerance for figures the suite derives from its own measurements by one or two float
# operations (ratio, GFLOP/s, images/s): only rounding separates them from the recomputation.
DERIVED_RTOL = 1e-9


def _args(*argv):
    return suite.parser().parse_args(list(argv))


def _finite_pos(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _check_side(side, repeats):
    assert _finite_pos(side["median_ms"]), side
    assert len(side["times_ms"]) == side["runs"] == repeats
    assert side["min_ms"] <= side["median_ms"] <= side["max_ms"]
    # times_ms are rounded to 1e-4 ms for the JSON file
    assert abs(side["median_ms"] - common.median(side["times_ms"])) <= 1e-4 + 1e-9 * side["median_ms"]


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    """Every row at the tiny preset, peers included, in this process (no 10-second torch imports per
    worker). Chains shortened to 3 DDPM / 2 DDIM steps; 2 timed runs (speed is not the point here)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("bench") / "out.json"
    lines = []
    args = _args("--preset", "tiny", "--inline", "--repeats", "2", "--warmup", "1", "--ddpm-steps", "3",
                 "--ddim-steps", "2", "--gemm-n", "64", "--json", str(path))
    result = suite.run(args, out=lines.append)
    return result, json.loads(path.read_text()), lines


def test_every_row_present_with_finite_positive_figures(inline_run):
    result, on_disk, lines = inline_run
    assert on_disk["rows"] == result["rows"]                 # the JSON file is the returned result
    disc = discover("tiny")
    rows = result["rows"]
    names = [(r["name"], r["phase"]) for r in rows]
    assert len(set(names)) == len(names)                     # no row measured twice
    convs = [r for r in rows if r["name"].startswith("conv ")]
    assert len(convs) == 2 * len(disc["conv"])               # every distinct conv shape, fwd and bwd
    for prefix in ("gn+silu", "attention", "q_sample", "ddpm step", "ddim step", "adamw", "train step",
                   "ddpm 3 steps", "ddim 2 steps"):
        assert any(r["name"].startswith(prefix) for r in rows), prefix
    for r in rows:
        _check_side(r["ours"], 2)
        _check_side(r["peer"], 2)
        assert _finite_pos(r["ratio"])
        assert abs(r["ratio"] - r["ours"]["median_ms"] / r["peer"]["median_ms"]) <= DERIVED_RTOL * r["ratio"]
    # the per-pass summary: sum over shapes of median x calls per forward, for conv fwd and bwd
    conv_fwd = next(a for a in result["summary"] if a["family"] == "conv" and a["phase"] == "fwd")
    want = sum(r["calls_per_forward"] * r["ours"]["median_ms"] for r in convs if r["phase"] == "fwd")
    assert conv_fwd["shapes"] == len(disc["conv"]) and abs(conv_fwd["ours_ms"] - want) <= DERIVED_RTOL * want
    assert _finite_pos(conv_fwd["ratio"])
    # one table line per row, plus the header and its rule
    table = [ln for ln in lines if not ln.startswith("#")]
    assert len(table) == len(rows) + 2


def test_flops_gflops_and_peak_fraction(inline_run):
    result, _, _ = inline_run
    peak = result["gemm_peak"]["gflops"]
    assert _finite_pos(peak)
    counted = [r for r in result["rows"] if r.get("flops")]
    assert any(r["name"].startswith("attention") for r in counted)
    for r in counted:
        for side in ("ours", "peer"):
            s = r[side]
            want = r["flops"] / (s["median_ms"] * 1e-3) / 1e9
            assert abs(s["gflops"] - want) <= DERIVED_RTOL * want
            assert abs(s["peak_fraction"] - s["gflops"] / peak) <= DERIVED_RTOL * s["peak_fraction"]
    # 2 x MACs, hand-counted: conv_in of tiny (3x3, 1 -> 8 channels, 8x8, batch 4) = 2*4*8*1*9*64
    conv_in = next(r for r in counted if r["name"] == "conv 3x3 1->8 @8x8" and r["phase"] == "fwd")
    assert conv_in["flops"] == 2 * 4 * 8 * 1 * 9 * 64
    bwd = next(r for r in counted if r["name"] == "conv 3x3 1->8 @8x8" and r["phase"] == "bwd")
    assert bwd["flops"] == 2 * conv_in["flops"]
    train = next(r for r in result["rows"] if r["name"].startswith("train step"))
    assert train["flops"] == 3 * 4 * result["models"]["tiny"]["forward_gflop_per_image"] * 1e9


def test_end_to_end_rows_memory_and_throughput(inline_run):
    result, _, _ = inline_run
    e2e = [r for r in result["rows"] if r["family"] == "e2e"]
    assert len(e2e) == 3
    for r in e2e:
        for side in ("ours", "peer"):
            s = r[side]
            if sys.platform.startswith("linux"):
                assert _finite_pos(s["peak_mib"]) and s["delta_mib"] >= 0
            if r["unit"] == "images/s":
                want = r["batch"] / (s["median_ms"] * 1e-3)
                assert abs(s["images_per_s"] - want) <= DERIVED_RTOL * want
                assert s["finite_samples"] is True and s["extrapolated"] is False
            else:
                assert math.isfinite(s["loss"]) and s["loss"] > 0
                # timed alternating with the peer in one process; the fresh-process run kept beside it
                assert s["timing"] == "alternating steps in one process" and _finite_pos(s["isolated_median_ms"])
            if "threads_used" in s:       # the peer's torch and our BLAS ran at --threads (1)
                assert s["threads_used"] == 1, (side, s["threads_used"])


def test_machine_info(inline_run):
    result, _, lines = inline_run
    m = result["machine"]
    assert m["threads"] == 1 and m["logical_cpus"] >= 1 and m["numpy"] and m["blas"]
    assert m["torch"] and m["diffusers"]
    assert any("GEMM peak" in ln for ln in lines) and any("BLAS environment" in ln for ln in lines)


def test_worker_subprocesses_and_quick(tmp_path):
    """The default path: fresh worker processes (ours only, so no torch import), --quick extrapolation,
    --rounds 2 (two workers per end-to-end row, runs pooled)."""
    lines = []
    args = _args("--preset", "tiny", "--rows", "conv", "train", "ddim", "--no-peers", "--repeats", "2",
                 "--warmup", "0", "--quick", "3", "--rounds", "2", "--gemm-n", "64", "--json", str(tmp_path / "w.json"))
    result = suite.run(args, out=lines.append)
    convs = [r for r in result["rows"] if r["family"] == "op"]
    assert len(convs) == 2 * len(discover("tiny")["conv"])
    for r in convs:                      # timing worker and memory worker merged row by row
        _check_side(r["ours"], 2)
        if sys.platform.startswith("linux"):
            assert r["ours"]["delta_mib"] >= 0 and _finite_pos(r["ours"]["peak_mib"])
    train, ddim = result["rows"][len(convs):]
    assert "peer" not in train and train["ratio"] is None
    if sys.platform.startswith("linux"):
        assert _finite_pos(train["ours"]["peak_mib"])
    assert train["ours"]["rounds"] == 2 and train["ours"]["runs"] == 4        # 2 rounds x 2 runs pooled
    assert train["rounds"] == ddim["rounds"] == 2                              # recorded on the rows that used them
    assert any("(train, ddim rows: 2 alternating rounds" in ln for ln in lines)
    assert ddim["ours"]["extrapolated"] is True and ddim["ours"]["measured_steps"] == 2 * 3
    assert "capped_at_chain_length" not in ddim["ours"]
    # extrapolation: chain time = median measured step x 50 steps
    step_ms = ddim["ours"]["step"]["median_ms"]
    assert abs(ddim["ours"]["median_ms"] - 50 * step_ms) <= DERIVED_RTOL * 50 * step_ms
    assert any("extrapolated" in ln for ln in lines)


def test_profile_shares_sum_to_one():
    lines = []
    res = suite.profile("tiny:2", threads=1, repeats=1, warmup=1, out=lines.append)
    assert _finite_pos(res["step_ms"])
    # every timed op is disjoint from the others (outermost calls only), the rest is glue: shares sum to 1
    assert abs(sum(r["share"] for r in res["ops"]) - 1.0) <= 1e-9
    assert all(r["ms"] >= 0 for r in res["ops"][:-1])
    ops = {r["op"]: r for r in res["ops"]}
    assert ops["AdamW.step"]["calls"] == 1
    assert any(k.startswith("conv2d_backward") for k in ops)


def test_bad_options_raise_valueerror_naming_them():
    with pytest.raises(ValueError, match="--repeats must be >= 1, got 0"):
        suite.check_args(_args("--repeats", "0"))
    with pytest.raises(ValueError, match="unknown row 'bogus'"):
        suite._rows_selected(["bogus"])
    with pytest.raises(ValueError, match="batch must be a positive integer, got '0'"):
        suite._preset_batches(["tiny:0"], suite.TRAIN_BATCH)
    with pytest.raises(ValueError, match="PRESET:BATCH"):
        suite.profile("tiny", 1, 1, 1)
    assert suite.main(["--threads", "0", "--json", ""]) == 2
    # --device gpu refuses, naming why, where there is no CUDA GPU (this machine, CI)
    try:
        from ddpm_ref.kernels import runtime
        has_gpu = runtime.backend() == "cuda"
    except Exception:
        has_gpu = False
    if not has_gpu:
        with pytest.raises(ValueError, match="--device gpu needs"):
            suite.run_gpu(_args("--device", "gpu", "--json", ""))


def test_common_helpers():
    assert common.median([3, 1, 2]) == 2 and common.median([4, 1, 3, 2]) == 2.5
    calls = []
    times = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]   # warm-up, then alternating order
    assert [len(v) for v in times.values()] == [3, 3]
    assert common.attention_flops((2, 5, 3), (2, 7, 3), (2, 7, 4)) == 2 * 2 * 5 * 7 * 3 + 2 * 2 * 5 * 7 * 4
    assert common.linear_flops((2, 5, 3), (4, 3)) == 2 * 10 * 3 * 4
    env = common.thread_env(3, base={})
    assert all(env[v] == "3" for v in common.THREAD_VARS)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        common.thread_env(0)
    if os.path.exists("/proc/self/status"):
        assert common.rss_kib("VmRSS") > 0


def test_conv_paths_sweep_times_every_applicable_path():
    """benchmarks/conv_paths.py at toy size: each applicable path gets finite positive times, the
    chosen path is among them, and forcing paths leaves the module's choice untouched."""
    from benchmarks import conv_paths
    from ddpm_ref.ops import conv as conv_mod

    rows = list(conv_paths.sweep([(4, 3, 4, 2, 1), (4, 3, 8, 2, 2)], runs=1))
    assert [shape for shape, _, _ in rows] == [(4, 3, 4, 2, 1), (4, 3, 8, 2, 2)]
    (_, auto1, t1), (_, auto2, t2) = rows
    assert set(t1) == {"shift", "im2col", "dense", "winograd"}   # stride 1: all four
    assert set(t2) == {"im2col", "dense"}               # stride 2: no shift or winograd path
    assert auto1 in t1 and auto2 in t2
    assert all(_finite_pos(f) and _finite_pos(b) for t in (t1, t2) for f, b in t.values())
    assert conv_mod._FORCED_PATH is None


def test_quick_sampling_alternates_ours_and_peer_in_one_process():
    """--quick sampling with peers: both sides' steps timed alternating in one process, the chain
    extrapolated from the median step, memory and an isolated run from a fresh worker per side."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    args = _args("--preset", "tiny", "--inline", "--rows", "ddpm", "ddim", "--repeats", "3", "--warmup", "1",
                 "--quick", "4", "--rounds", "2", "--gemm-n", "64")
    lines = []
    result = suite.run(args, out=lines.append)
    rows = result["rows"]
    # --rounds does nothing for these rows: the header does not claim it, the rows do not record it
    assert not any("alternating rounds" in ln for ln in lines)
    assert all("rounds" not in r for r in rows)
    assert any("--rounds 2 applies to none of the selected rows" in n for n in result["notes"])
    assert [r["name"] for r in rows] == ["ddpm 1000 steps (batch 2)", "ddim 50 steps (batch 2)"]
    for r in rows:
        for side in ("ours", "peer"):
            s = r[side]
            assert s["timing"] == "alternating steps in one process" and s["extrapolated"] is True
            assert s["measured_steps"] == 4 and len(s["step"]["times_ms"]) == 4
            want = s["step"]["median_ms"] * r["steps"]
            assert abs(s["median_ms"] - want) <= DERIVED_RTOL * want
            assert abs(s["images_per_s"] - 2 / (s["median_ms"] * 1e-3)) <= DERIVED_RTOL * s["images_per_s"]
            assert _finite_pos(s["isolated_median_ms"])
        assert abs(r["ratio"] - r["ours"]["median_ms"] / r["peer"]["median_ms"]) <= DERIVED_RTOL * r["ratio"]


def test_sample_step_cycles_through_the_chain_and_stays_finite():
    """Ours' single-step driver walks the respaced chain and wraps around to x_T's timestep."""
    from benchmarks.bench_e2e import build_sample_step

    step = build_sample_step({"preset": "tiny", "batch": 2, "side": "ours", "sampler": "ddpm", "steps": 3})
    for _ in range(7):                                     # two full chains and one more step
        step()
    state = step.state
    assert state["i"] == 7 % 3 and state["x"].shape == (2, 1, 8, 8) and np.all(np.isfinite(state["x"]))


def test_sampling_cpu_profile_and_ab():
    # benchmarks/sampling_cpu.py at toy size: the profile's op families add up to at most the pass,
    # and the A/B of the working tree's ops against HEAD's (a git checkout, as in CI) runs both sides.
    from benchmarks import sampling_cpu
    prof = sampling_cpu.main(["profile", "--preset", "tiny", "--batch", "2", "--repeats", "2"])
    assert prof["pass_ms"] > 0 and "conv.conv2d_forward" in prof["families_ms"]
    assert 0 < sum(prof["families_ms"].values()) <= prof["pass_ms"] * 1.05    # timer overheads: 5%
    assert all(calls > 0 and ms >= 0 for calls, ms in prof["shapes"].values())
    if not (REPO / ".git").exists():
        pytest.skip("the A/B mode reads the base ops from git: not a git checkout")
    res = sampling_cpu.main(["ab", "--preset", "tiny", "--batch", "2", "--repeats", "2", "--base", "HEAD"])
    assert len(res["cpu_s"]["base"]) == len(res["wall_s"]["new"]) == 2
    # the same model and input through HEAD's ops and the working tree's: equal up to float32 rounding
    # of a different summation order where the ops changed since HEAD (none in a clean checkout)
    assert res["max_abs_diff"] < 1e-4


def test_kernel_resources_loop_mix_finds_the_hottest_loop():
    # benchmarks/kernel_resources.py --loops parses nvdisasm's listing (the toolchain is not in CI; this
    # is its format): two loops, the second with more FFMAs and inside a third (the outer loop, which
    # has as many FFMAs: the inner one wins the tie); a forward branch is not a loop.
    from benchmarks.kernel_resources import loop_mix
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FFMA R2, R3, R4, R2 ;
        /*0020*/              @P0 BRA `(.L_x_0) ;
        /*0030*/              @P1 BRA `(.L_x_2) ;
.L_x_3:
        /*0038*/                   LDG.E R8, [R2.64] ;
.L_x_1:
        /*0040*/                   LDS.128 R4, [R8] ;
        /*0050*/                   LDS R9, [R8+0x210] ;
        /*0060*/                   FFMA R10, R4, R9, R10 ;
        /*0070*/                   FFMA R11, R5, R9, R11 ;
        /*0080*/                   FFMA R12, R6, R9, R12 ;
        /*0090*/                   IADD3 R8, R8, 0x4, RZ ;
        /*00a0*/              @P2 BRA `(.L_x_1) ;
        /*00a8*/              @P3 BRA `(.L_x_3) ;
.L_x_2:
        /*00b0*/                   FFMA R13, R6, R9, R12 ;
        /*00c0*/                   EXIT ;
"""
    mix = loop_mix(sass)
    assert mix == {"instructions": 7, "ffma": 3, "lds": 2, "lds128": 1, "ffma_share": 3 / 7, "outer": 9}
    assert loop_mix("        /*0000*/                   EXIT ;\n") is None


# ------------------------------------------------------------------ options, files and failures (cheap)

def test_batch_specs_with_non_decimal_digits_are_named_errors():
    # "²".isdigit() is True but int("²") fails: the spec is refused by name, not by a traceback
    with pytest.raises(ValueError, match="got '²' in 'small:²'"):
        suite._preset_batches(["small:²"], suite.TRAIN_BATCH)
    with pytest.raises(ValueError, match="got 'tiny:²'"):
        suite.profile("tiny:²", 1, 1, 1)


def test_abbreviated_options_are_refused(capsys):
    # --thr 2 would set 2 threads in the suite but not in __main__'s early (pre-NumPy) thread setup
    with pytest.raises(SystemExit) as exc:
        suite.main(["--thr", "2", "--json", ""])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--thr" in err and len(err.splitlines()) == 1


def test_device_gpu_refuses_profile_and_cpu_only_options(capsys):
    assert suite.main(["--device", "gpu", "--profile", "tiny:2", "--json", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --profile tiny:2") and "--device gpu" in err and len(err.splitlines()) == 1
    assert suite.main(["--device", "gpu", "--preset", "tiny", "--json", ""]) == 2
    assert "does not take --preset" in capsys.readouterr().err


def test_gpu_run_writes_its_own_json_files(tmp_path, monkeypatch, capsys):
    """--device gpu with the default --json writes bench_results/gpu.json and gpu_e2e.json, never the
    CPU suite's suite.json (the GPU scripts are replaced by stand-ins: no GPU here)."""
    try:
        from ddpm_ref.kernels import runtime
    except Exception as e:                                   # noqa: BLE001
        pytest.skip(f"ddpm_ref.kernels does not import: {e}")
    from benchmarks import bench_gpu_e2e, bench_kernels
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime, "backend", lambda: "cuda")
    calls = {}

    def stand_in(name, save):
        def main(argv):
            calls[name] = argv
            out = argv[argv.index("--out") + 1]
            save(out, {"stand_in": name})
            return {}
        return main

    monkeypatch.setattr(bench_kernels, "main", stand_in("kernels", lambda p, r: bench_kernels.save_result(p, r, 0.0)))
    monkeypatch.setattr(bench_gpu_e2e, "main", stand_in("e2e", bench_gpu_e2e.save_result))
    (tmp_path / "bench_results").mkdir()
    (tmp_path / "bench_results" / "suite.json").write_text('{"suite": "cpu"}')
    assert suite.main(["--device", "gpu"]) == 0
    assert calls["kernels"][-2:] == ["--out", os.path.join("bench_results", "gpu.json")]
    assert calls["e2e"][-2:] == ["--out", os.path.join("bench_results", "gpu_e2e.json")]
    files = sorted(os.listdir(tmp_path / "bench_results"))
    assert files == ["gpu.json", "gpu_e2e.json", "suite.json"]              # no temporary file left
    assert json.loads((tmp_path / "bench_results" / "suite.json").read_text()) == {"suite": "cpu"}
    assert json.loads((tmp_path / "bench_results" / "gpu.json").read_text())["stand_in"] == "kernels"
    # both scripts' save logic is atomic: a failed write leaves no temporary file and raises
    with pytest.raises(OSError):
        bench_kernels.save_result(str(tmp_path / "bench_results"), {"x": 1}, 0.0)
    with pytest.raises(OSError):
        bench_gpu_e2e.save_result(str(tmp_path / "bench_results"), {"x": 1})
    assert sorted(os.listdir(tmp_path / "bench_results")) == files
    assert sorted(os.listdir(tmp_path)) == ["bench_results"]


def test_write_json_is_atomic_and_cleans_up(tmp_path):
    path = tmp_path / "r.json"
    common.write_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    # a failure while writing (not serialisable) leaves the old file as it was, and no temporary file
    with pytest.raises(TypeError):
        common.write_json(str(path), {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    # a failing rename (the target is a folder) leaves no temporary file either
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        common.write_json(str(tmp_path / "d"), {"a": 1})
    assert sorted(os.listdir(tmp_path)) == ["d", "r.json"] and os.listdir(tmp_path / "d") == []
    # a missing folder is created
    common.write_json(str(tmp_path / "new" / "x.json"), {"b": 2})
    assert json.loads((tmp_path / "new" / "x.json").read_text()) == {"b": 2}


def test_json_path_is_checked_before_the_run(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for bad, why in ((str(tmp_path), "is a folder"), (str(tmp_path / "file" / "r.json"), "is not a folder")):
        assert suite.main(["--preset", "tiny", "--rows", "q_sample", "--json", bad]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith(f"error: --json {bad!r}") and why in err and len(err.splitlines()) == 1
        assert captured.out == ""                          # refused before anything was measured
    common.check_json_path(str(tmp_path / "a" / "b" / "r.json"))     # a folder that can be created: fine
    assert not (tmp_path / "a").exists()                  # (checking creates nothing)
    assert suite.main(["--profile", "tiny:1", "--json", str(tmp_path)]) == 2


def test_quick_steps_are_capped_at_the_chain_length():
    from benchmarks import bench_e2e
    assert bench_e2e.quick_steps(3, 2, 50) == (3, {})
    assert bench_e2e.quick_steps(1001, 5, 1000) == (1000, {"requested_steps": 1001, "capped_at_chain_length": True})
    # the worker's measurement itself (ours, tiny, a 2-step DDIM chain, --quick 5): 2 steps measured
    res = bench_e2e.sample({"preset": "tiny", "batch": 1, "side": "ours", "sampler": "ddim", "steps": 2,
                            "quick": 5, "repeats": 1, "warmup": 0})
    assert res["measured_steps"] == 2 and len(res["step"]["times_ms"]) == 2
    assert res["requested_steps"] == 5 and res["capped_at_chain_length"] is True


def test_rounds_rows_are_those_that_use_rounds():
    def rr(*argv):
        return suite.rounds_rows(["conv", "train", "ddpm", "ddim"], _args(*argv))
    assert rr() == ["ddpm", "ddim"]                         # train with peers alternates in one worker
    assert rr("--no-peers") == ["train", "ddpm", "ddim"]
    assert rr("--quick", "5") == []                         # --quick sampling with peers: one worker
    assert rr("--quick", "5", "--no-peers") == ["train", "ddpm", "ddim"]


def test_failed_worker_is_one_line_and_keeps_finished_rows(tmp_path, monkeypatch, capsys):
    """A worker failing mid-run: exit 1, one error line naming the row, and the rows finished before
    it written to the JSON file with an "incomplete" record (the failure is injected: no real worker)."""
    real = suite._measure

    def failing(spec, args):
        if spec["kind"] == "sample":
            raise common.WorkerError("worker sample failed (exit 2): error: injected", "the stderr tail")
        return real(spec, args)

    monkeypatch.setattr(suite, "_measure", failing)
    path = tmp_path / "out" / "suite.json"
    rc = suite.main(["--preset", "tiny", "--rows", "q_sample", "ddim", "--no-peers", "--inline", "--repeats", "1",
                     "--warmup", "0", "--gemm-n", "16", "--json", str(path)])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: tiny ddim 50 steps (batch 2), ours: ")
    assert "injected" in err and str(path) in err
    on_disk = json.loads(path.read_text())
    assert [r["name"] for r in on_disk["rows"]] == ["q_sample"]
    inc = on_disk["incomplete"]
    assert inc["failed"] == "tiny ddim 50 steps (batch 2), ours" and inc["rows_finished"] == 1
    assert "injected" in inc["error"] and inc["detail"] == "the stderr tail"
    assert os.listdir(path.parent) == ["suite.json"]
