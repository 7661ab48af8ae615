"""Hand-written forward/backward pairs in NumPy, NCHW, one file per family (see each module).

Every op is ``forward(...) -> (out, cache)`` and ``backward(dout, cache) -> grads``: pure
functions, the cache returned rather than stored, dtype following the input (float32 for
training, float64 for gradient checks). Two exceptions: the loss's ``mse_backward(cache, dloss=1.0)``
(its upstream gradient is an optional scalar: the loss is where backpropagation starts), and
``timestep_embedding``, a fixed input feature with no gradient, returned as a bare float32 array.
"""
from .activation import dropout_backward, dropout_forward, dropout_mask, sigmoid, silu_backward, silu_forward
from .conv import conv2d_backward, conv2d_forward, conv_output_size
from .linear import linear_backward, linear_forward
from .norm import group_norm_backward, group_norm_forward, group_norm_silu_backward, group_norm_silu_forward
from .attention import attention_backward, attention_forward, softmax
from .embedding import (embedding_backward, embedding_forward, sinusoidal_backward, sinusoidal_forward,
                        timestep_embedding, timestep_frequencies)
from .loss import mse_backward, mse_forward
from .resample import (avg_pool2d_backward, avg_pool2d_forward, concat_backward, concat_forward,
                       upsample_nearest2x_backward, upsample_nearest2x_forward)

__all__ = [
    "conv2d_forward", "conv2d_backward", "conv_output_size",
    "linear_forward", "linear_backward",
    "group_norm_forward", "group_norm_backward", "group_norm_silu_forward", "group_norm_silu_backward",
    "sigmoid", "silu_forward", "silu_backward", "dropout_mask", "dropout_forward", "dropout_backward",
    "softmax", "attention_forward", "attention_backward",
    "upsample_nearest2x_forward", "upsample_nearest2x_backward", "avg_pool2d_forward",
    "avg_pool2d_backward", "concat_forward", "concat_backward",
    "timestep_frequencies", "timestep_embedding", "sinusoidal_forward", "sinusoidal_backward",
    "embedding_forward", "embedding_backward",
    "mse_forward", "mse_backward",
]
