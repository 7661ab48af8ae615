"""Argument checks shared by the op families: one clear ValueError naming the argument and its value."""
import numpy as np


def check_float(name, a):
    """``a`` is a NumPy array of a floating dtype (float32 for training, float64 for gradient checks)."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype.kind != "f":                  # np.issubdtype(a.dtype, np.floating), ~6x cheaper
        raise ValueError(f"{name} must be a floating-point array, got dtype {a.dtype} with shape {a.shape}")


def check_int(name, v, low=None):
    """``v`` is a Python or NumPy integer (not a bool, a float or a string: those are refused rather
    than truncated by ``int()``), at least ``low`` when given; returns it as an int."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    v = int(v)
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v
