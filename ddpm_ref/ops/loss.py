"""Mean squared error with per-sample weights: DDPM's L_simple (Ho et al. 2020, eq. 14).

What it is: ``L = mean_n w_n * mean_{i} (pred[n, i] - target[n, i])^2``, the "simple" training
objective ``|| eps - eps_theta(x_t, t) ||^2`` averaged over the pixels of each sample (as the
reference implementations do) and then over the batch. The per-sample weights carry min-SNR
weighting or the importance weights of a non-uniform timestep sampler (diffusion.loss_weights);
None means all ones. What it is not: the variational-bound term of the hybrid loss (that lives in
diffusion.py).

    per_sample[n] = (1/D) sum_i (pred[n, i] - target[n, i])^2,     D = elements per sample
    L             = (1/N) sum_n w_n per_sample[n]
    dL/dpred[n,i] = dloss * w_n * 2 (pred[n, i] - target[n, i]) / (N D)
"""
import numpy as np

__all__ = ["mse_forward", "mse_backward"]


def mse_forward(pred, target, weights=None):
    """``pred, target (N, ...)``, ``weights (N,)`` or None -> ``(loss, cache)``.

    ``loss`` is a Python float (accumulated in float64); ``cache["per_sample"]`` holds the
    unweighted per-sample losses (N,) (float64), e.g. for the loss-aware timestep sampler.
    """
    for name, a in (("pred", pred), ("target", target)):
        if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"mse expects a floating-point array {name}, got "
                             f"{getattr(a, 'dtype', type(a).__name__)} with shape {np.shape(a)}")
    if pred.ndim < 1 or pred.shape[0] == 0:
        raise ValueError(f"mse expects pred of shape (N, ...) with N >= 1, got shape {pred.shape}")
    if target.shape != pred.shape:
        raise ValueError(f"mse: target has shape {target.shape}, expected {pred.shape} (the shape of pred)")
    N = pred.shape[0]
    if weights is not None:
        weights = np.asarray(weights)
        if weights.shape != (N,) or not np.issubdtype(weights.dtype, np.floating):
            raise ValueError(f"mse: weights must be a float array of shape ({N},), got "
                             f"{weights.dtype} with shape {weights.shape}")
    diff = pred - target.astype(pred.dtype, copy=False)            # (N, ...)
    d2 = diff.reshape(N, -1)                                       # (N, D)
    D = d2.shape[1]
    # Row dot products in float64: exact enough for any D, and cheap next to the model.
    per_sample = np.einsum("nd,nd->n", d2, d2, dtype=np.float64) / max(D, 1)   # (N,)
    w = np.ones(N) if weights is None else weights.astype(np.float64)
    loss = float(np.mean(w * per_sample))
    return loss, {"diff": diff, "weights": weights, "per_sample": per_sample, "D": D}


def mse_backward(cache, dloss=1.0):
    """``dpred = dloss * w_n * 2 (pred - target) / (N D)``, shape and dtype of pred."""
    diff = cache["diff"]
    N, D = diff.shape[0], cache["D"]
    w = np.ones(N) if cache["weights"] is None else cache["weights"].astype(np.float64)
    coef = (float(dloss) * 2.0 / (N * max(D, 1))) * w              # (N,) float64
    shape = (N,) + (1,) * (diff.ndim - 1)
    return diff * coef.astype(diff.dtype).reshape(shape)           # (N, ...)
