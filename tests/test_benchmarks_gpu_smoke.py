"""Smoke test of benchmarks/bench_gpu_e2e.py at toy size, so that the script cannot rot: our side in
the CUDA simulator (the smallest U-Net with every block kind, small convolution tiles), the peer
(diffusers on PyTorch) on the CPU. It checks that each function runs and reports sane numbers; no
test asserts a time."""
import os
import sys

import numpy as np
import pytest

from kernel_setup import SIM, fast_simulator_barriers, small_conv_tiles  # noqa: E402,F401  (GPU or simulator)
from ddpm_ref.kernels import conv as kconv  # noqa: E402
from ddpm_ref.models import unet  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_gpu_e2e as E  # noqa: E402

MINI = dict(in_channels=1, image_size=4, ch=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(2,),
            groups=2, dropout=0.1)


@pytest.fixture()
def mini_preset(monkeypatch, small_conv_tiles):
    monkeypatch.setitem(unet.UNET_PRESETS, "mini", MINI)
    return "mini"


def test_ours(mini_preset):
    # Two training steps (the first, then one timed) and the sampling step with its per-op breakdown.
    # The training step's breakdown is the same function on a step with backward ops: that is
    # test_breakdown_counts_forward_and_backward_ops, on single ops (a simulated U-Net training step
    # costs about 30 s, and the breakdown runs the step twice).
    row, tr = E.ours_train(mini_preset, batch=1, warmup=0, repeats=1, breakdown=False)
    assert row["median_s"] > 0 and len(row["times_s"]) == 1 and row["params"] == tr.params.size
    assert "breakdown_s" not in row
    assert tr.step == 2                                   # the first step + 1 timed
    assert np.all(np.isfinite(tr.model.backend.to_host(tr.params)))
    details = {}
    assert E.ours_sample(mini_preset, batch=1, warmup=0, repeats=1, details=details) > 0
    sb = details["breakdown_s"]
    assert sb["(whole step, wall_s)"] > 0 and sb["(whole step, gpu_s)"] > 0
    assert sb["conv.conv2d_forward"]["calls"] > 0 and "conv.conv2d_backward" not in sb
    total = sb["(sum of ops)"]
    assert total["calls"] == sum(v["calls"] for k, v in sb.items() if isinstance(v, dict) and k != "(sum of ops)")


def test_breakdown_counts_forward_and_backward_ops(mini_preset):      # (its small conv tiles)
    # _breakdown on a step of three op calls (a conv forward and backward, a GroupNorm+SiLU forward):
    # every call counted once per op, both figures positive, the ops restored afterwards.
    from ddpm_ref.backend import get_backend
    B = get_backend("gpu")
    r = np.random.default_rng(0)
    x = B.asarray(r.normal(size=(1, 2, 3, 3)).astype(np.float32))
    w = B.asarray(r.normal(size=(2, 2, 3, 3)).astype(np.float32))
    g = B.asarray(np.ones(2, np.float32))
    originals = (B.conv.conv2d_forward, B.conv.conv2d_backward, B.norm.group_norm_silu_forward)

    def step():
        y, cache = B.conv.conv2d_forward(x, w, None, 1, 1)
        B.conv.conv2d_backward(y, cache)
        B.norm.group_norm_silu_forward(y, g, g, 2)

    sync = E._our_sync_and_pool()[0]
    bd = E._breakdown(B, step, sync)
    assert (B.conv.conv2d_forward, B.conv.conv2d_backward, B.norm.group_norm_silu_forward) == originals
    assert bd["(whole step, wall_s)"] > 0 and bd["(whole step, gpu_s)"] > 0
    for op in ("conv.conv2d_forward", "conv.conv2d_backward", "norm.group_norm_silu_forward"):
        assert bd[op]["calls"] == 1 and bd[op]["wall_s"] > 0 and bd[op]["gpu_s"] > 0
    assert bd["(sum of ops)"]["calls"] == 3
    assert bd["(sum of ops)"]["wall_s"] == pytest.approx(sum(bd[op]["wall_s"] for op in (
        "conv.conv2d_forward", "conv.conv2d_backward", "norm.group_norm_silu_forward")), abs=1e-4)


def test_peer_on_cpu(mini_preset):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    row = E.peer_train(torch, mini_preset, batch=2, warmup=0, repeats=2, tf32=False, device="cpu")
    assert row["median_s"] > 0 and len(row["times_s"]) == 2 and row["max_allocated_bytes"] is None
    assert E.peer_sample(torch, mini_preset, batch=2, warmup=0, repeats=1, tf32=False, device="cpu") > 0


def test_profile_script(monkeypatch):
    # benchmarks/profile_gpu.py (the launches gpu_check.sh runs under Nsight Compute) at toy size, with
    # version 3's 128 x 128 tiles replaced by tiny ones in the same three variants.
    import profile_gpu as P
    from ddpm_ref.kernels import runtime
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    if SIM:
        monkeypatch.setattr(kconv, "V3", kconv._tiled_variants_v3("prof3", 16, 16, 4, tx=4, ty=4, register=False))
    rows = P.main(["--noise-samples", "3", "--noise-size", "10", "--batch", "1", "--channels", "4", "--hw", "3",
                   "--groups", "2"])
    labels = [label for label, _ in rows]
    assert labels[:4] == ["normal grid 1x2", "q_sample grid 1x2", "normal grid 1x2, launch bounds (256, 6)",
                          "q_sample grid 1x2, launch bounds (256, 6)"] if SIM else labels[0].startswith("normal")
    assert [lab for lab in labels if lab.startswith("conv fwd")] == \
        ["conv fwd plain", "conv fwd plain blocked", "conv fwd unrolled blocked"]
    assert labels[-4:] == ["group_norm_silu fwd v1", "group_norm_silu bwd v1", "group_norm_silu fwd v2",
                           "group_norm_silu bwd v2"]
    assert all(t > 0 for _, t in rows)
    assert runtime.AUTOTUNE is True                       # the script switches autotuning off only while it runs
