"""Hand-written forward/backward pairs in NumPy, NCHW, one file per family (see each module).

Every op is ``forward(...) -> (out, cache)`` and ``backward(dout, cache) -> grads``: pure
functions, the cache returned rather than stored, dtype following the input (float32 for
training, float64 for gradient checks).
"""
from .activation import dropout_backward, dropout_forward, dropout_mask, sigmoid, silu_backward, silu_forward
from .conv import conv2d_backward, conv2d_forward, conv_output_size
from .linear import linear_backward, linear_forward
from .norm import group_norm_backward, group_norm_forward, group_norm_silu_backward, group_norm_silu_forward
