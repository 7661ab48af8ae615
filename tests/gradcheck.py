"""Shared gradient-check helper for the tests (import as ``from gradcheck import check_op``).

What it is: centred finite differences of a scalar ``L = sum(R * f(args))`` (R a fixed random
projection of the output, so every output element contributes with a different weight) compared
with the hand-written backward pass fed ``dy = R``. Run it in float64: with eps = 1e-6 the centred
difference has truncation error O(eps^2) ~ 1e-12 and rounding error ~ 1e-16 |L| / eps ~ 1e-10 |L|,
so a relative tolerance of 1e-6 leaves a wide margin while a wrong derivative (an O(1) error) fails.

What it is not: a copy of any maths under test; it only perturbs inputs and calls the op.

``tests/`` has no ``__init__.py``, so pytest puts this directory on sys.path (rootdir-relative
"prepend" import mode) and ``from gradcheck import ...`` works from any test module here.
"""
import numpy as np

__all__ = ["numerical_gradient", "check_gradient", "check_op"]


def _pick(n, max_elements, rng):
    """All flat indices when n <= max_elements, else a random subset of that size."""
    if max_elements is None or n <= max_elements:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_elements, replace=False))


def numerical_gradient(loss, x, idx, eps=1e-6):
    """Centred differences of the scalar ``loss()`` w.r.t. the flat elements ``idx`` of ``x``.

    ``x`` is perturbed in place and restored; ``loss`` must read it afresh on each call.
    """
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("numerical_gradient needs a contiguous array to perturb in place")
    out = np.empty(len(idx), dtype=np.float64)
    for k, e in enumerate(idx):
        old = flat[e]
        flat[e] = old + eps
        lp = float(loss())
        flat[e] = old - eps
        lm = float(loss())
        flat[e] = old
        out[k] = (lp - lm) / (2 * eps)
    return out


def check_gradient(loss, x, analytic, eps=1e-6, rtol=1e-6, max_elements=64, seed=0, name="x"):
    """Assert that ``analytic`` (shape of x) matches centred differences of ``loss()`` w.r.t. ``x``.

    The error is measured as ``max |numeric - analytic| / (1 + max |analytic|)`` over the checked
    elements (all, or ``max_elements`` random ones); returns that relative error.
    """
    if x.dtype != np.float64:
        raise ValueError(f"gradient checks run in float64, {name} has dtype {x.dtype}")
    analytic = np.asarray(analytic)
    if analytic.shape != x.shape:
        raise AssertionError(f"gradient for {name} has shape {analytic.shape}, expected {x.shape}")
    rng = np.random.default_rng(seed)
    idx = _pick(x.size, max_elements, rng)
    numeric = numerical_gradient(loss, x, idx, eps)
    ana = analytic.reshape(-1)[idx]
    err = float(np.max(np.abs(numeric - ana), initial=0.0) / (1.0 + np.max(np.abs(ana), initial=0.0)))
    if not err <= rtol:
        worst = int(np.argmax(np.abs(numeric - ana)))
        raise AssertionError(
            f"gradient mismatch for {name} {x.shape}: relative error {err:.3e} > {rtol:.1e}; "
            f"element {idx[worst]}: numeric {numeric[worst]!r}, analytic {ana[worst]!r}")
    return err


def check_op(forward, backward, args, wrt, eps=1e-6, rtol=1e-6, max_elements=48, seed=0):
    """Gradient-check an op pair.

    ``forward(*args) -> (y, cache)`` (y an array or a Python float) and ``backward(dy, cache)`` ->
    one gradient or a tuple of them; ``wrt[k]`` is the index into ``args`` of the k-th gradient
    returned (None to skip that one). The float args named by ``wrt`` are perturbed in place.
    Returns the worst relative error found (see ``check_gradient``).
    """
    args = list(args)
    y, cache = forward(*args)
    rng = np.random.default_rng(seed + 12345)
    proj = rng.standard_normal(np.shape(y))            # R, the random projection of the output
    if np.ndim(y) == 0:
        proj = float(proj)
    grads = backward(proj, cache)
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)
    if len(grads) != len(wrt):
        raise AssertionError(f"backward returned {len(grads)} gradients, wrt names {len(wrt)}")

    def loss():
        out, _ = forward(*args)
        return np.sum(proj * out)

    worst = 0.0
    for g, a in zip(grads, wrt):
        if a is None:
            continue
        worst = max(worst, check_gradient(loss, args[a], g, eps=eps, rtol=rtol,
                                          max_elements=max_elements, seed=seed + a, name=f"arg {a}"))
    return worst
