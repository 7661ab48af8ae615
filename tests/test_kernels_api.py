"""The GPU backend mirrors the reference's API: every op that ``ddpm_ref.kernels`` and the reference
both define takes the same parameters (names, kinds, defaults) and, for the softmax, means the same
thing, so that model code written against ``B.<family>.<op>`` runs on either backend.

Annotations are not compared (the kernels take CuPy arrays where the reference takes NumPy ones).
Names only one side defines are allowed: the kernels keep their older versions (``*_v1``...) and
fused extras, and the reference has ops no GPU model calls (``avg_pool2d``, the MLP's sinusoidal
features), each listed here so that a new one is a decision, not an accident.
"""
import importlib
import inspect

import numpy as np
import pytest

from kernel_setup import kb  # noqa: E402,F401  (GPU or simulator; skips without numba-cuda)

from ddpm_ref.kernels import attention as kattention  # noqa: E402
from ddpm_ref.ops import attention as rattention  # noqa: E402

FAMILIES = ("conv", "norm", "attention", "activation", "resample", "linear", "embedding", "loss")
# Public reference names without a GPU twin, and why none is needed.
REFERENCE_ONLY = {
    "activation": {"sigmoid", "dropout_mask"},            # helpers; the kernels fuse them into their ops
    "resample": {"avg_pool2d_forward", "avg_pool2d_backward"},   # the U-Net downsamples by a conv
    "embedding": {"sinusoidal_forward", "sinusoidal_backward", "timestep_frequencies"},  # MLP (CPU only)
    "optim": {"LR_SCHEDULES", "check_state", "ema_decay", "scheduled_lr", "warmup_lr"},  # shared host code
}


def _pairs():
    for fam in FAMILIES:
        yield fam, importlib.import_module(f"ddpm_ref.ops.{fam}"), importlib.import_module(f"ddpm_ref.kernels.{fam}")
    yield "optim", importlib.import_module("ddpm_ref.optim"), importlib.import_module("ddpm_ref.kernels.optim")


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("family", FAMILIES + ("optim",))
def test_gpu_ops_take_the_reference_parameters(family):
    fam, ref, gpu = next(p for p in _pairs() if p[0] == family)
    shared = sorted(set(ref.__all__) & set(gpu.__all__))
    assert shared, f"{fam}: no op in common"
    for name in shared:
        r, g = getattr(ref, name), getattr(gpu, name)
        if inspect.isclass(r):
            r, g = r.__init__, g.__init__
        assert _params(g) == _params(r), f"{fam}.{name}: GPU {inspect.signature(g)} vs reference {inspect.signature(r)}"
    missing = set(ref.__all__) - set(gpu.__all__) - REFERENCE_ONLY.get(fam, set())
    assert not missing, f"{fam}: reference ops without a GPU twin: {sorted(missing)}"


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_is_the_references(axis):
    # A new array along any axis, the input untouched (the kernel itself works in place on rows).
    s = np.random.default_rng(axis + 5).normal(scale=3.0, size=(2, 3, 5)).astype(np.float32)
    d = kb.to_device(s)
    p = kattention.softmax(d, axis=axis)
    np.testing.assert_array_equal(kb.to_host(d), s)
    assert p.flags.c_contiguous and p.shape == s.shape
    # float32 exp and a sum of <= 5 terms against float64: ~1e-7 relative; 1e-6 leaves room for exp's ulp
    np.testing.assert_allclose(kb.to_host(p), rattention.softmax(s.astype(np.float64), axis=axis), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        kattention.softmax(d, axis=3)
