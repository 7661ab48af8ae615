"""Smoke test of benchmarks/bench_gpu_e2e.py at toy size, so that the script cannot rot: our side in
the CUDA simulator (the smallest U-Net with every block kind, small convolution tiles), the peer
(diffusers on PyTorch) on the CPU. It checks that each function runs and reports sane numbers; no
test asserts a time."""
import os
import sys

import numpy as np
import pytest

from kernel_setup import SIM, fast_simulator_barriers  # noqa: E402,F401  (GPU or simulator)
from ddpm_ref.kernels import conv as kconv  # noqa: E402
from ddpm_ref.models import unet  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_gpu_e2e as E  # noqa: E402

MINI = dict(in_channels=1, image_size=4, ch=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(2,),
            groups=2, dropout=0.1)


@pytest.fixture()
def mini_preset(monkeypatch):
    monkeypatch.setitem(unet.UNET_PRESETS, "mini", MINI)
    if SIM:
        monkeypatch.setattr(kconv, "FORCED_TILES",
                            kconv._tiled_kernels_v3("smoke3", 16, 16, 4, tx=4, ty=4, register=False))
    return "mini"


def test_ours(mini_preset):
    row, tr = E.ours_train(mini_preset, batch=1, warmup=0, repeats=1, breakdown=True)
    assert row["median_s"] > 0 and len(row["times_s"]) == 1 and row["params"] == tr.params.size
    bd = row["breakdown_s"]
    assert bd["(whole step, synchronised ops)"] > 0 and any(k.startswith("conv.conv2d_") for k in bd)
    assert tr.step == 3                                              # first step + 1 timed + the breakdown's
    assert np.all(np.isfinite(tr.model.backend.to_host(tr.params)))
    assert E.ours_sample(mini_preset, batch=1, warmup=0, repeats=1) > 0


def test_peer_on_cpu(mini_preset):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    row = E.peer_train(torch, mini_preset, batch=2, warmup=0, repeats=2, tf32=False, device="cpu")
    assert row["median_s"] > 0 and len(row["times_s"]) == 2 and row["max_allocated_bytes"] is None
    assert E.peer_sample(torch, mini_preset, batch=2, warmup=0, repeats=1, tf32=False, device="cpu") > 0
