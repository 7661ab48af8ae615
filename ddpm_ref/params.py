"""Flat parameter buffers with named views.

A model's parameters live in one contiguous 1-D array; every tensor (``conv_in.weight``,
``down_blocks.0.resnets.0.norm1.weight``, ...) is a reshaped *view* into it. Gradients, AdamW moments
and the EMA share the same :class:`ParamLayout`, so the optimizer, checkpoints, device transfers and
an all-reduce each act on the whole model in one call (llm.c's ``params_memory`` / ``grads_memory``).

This module is mostly bookkeeping: it holds no maths from the paper. The one initialiser both
models share, :func:`fan_avg_uniform`, lives here and draws from :mod:`ddpm_ref.rng` (stream INIT);
which tensor gets which initialiser is decided by each model.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from . import rng

__all__ = ["ParamLayout", "fan_avg_uniform"]


class ParamLayout:
    """An ordered list of ``(name, shape)`` and the offsets of each tensor in a flat buffer.

    >>> layout = ParamLayout([("w", (2, 3)), ("b", (2,))])
    >>> layout.size, layout.offsets["b"]
    (8, 6)
    >>> flat = layout.zeros(np.float32)
    >>> layout.named(flat)["w"].shape
    (2, 3)
    """

    def __init__(self, entries: Iterable[Tuple[str, Sequence[int]]]):
        self.names: List[str] = []
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.offsets: Dict[str, int] = {}
        self._numel: Dict[str, int] = {}     # computed once: named() runs on every forward pass
        offset = 0
        for entry in entries:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise ValueError(f"layout entries must be (name, shape) pairs, got {entry!r}")
            name, shape = entry
            if not isinstance(name, str) or not name:
                raise ValueError(f"parameter names must be non-empty strings, got {name!r}")
            if name in self.shapes:
                raise ValueError(f"duplicate parameter name {name!r}")
            shape = _check_shape(name, shape)
            self.names.append(name)
            self.shapes[name] = shape
            self.offsets[name] = offset
            self._numel[name] = math.prod(shape)
            offset += self._numel[name]
        self.size: int = offset

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter((n, self.shapes[n]) for n in self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def __repr__(self) -> str:
        return f"ParamLayout({len(self.names)} tensors, {self.size} parameters)"

    def numel(self, name: str) -> int:
        """Number of elements of tensor ``name``."""
        return self._numel[name]

    def index(self, name: str) -> int:
        """Position of ``name`` in the layout (the tensor's number, used to address its init noise)."""
        return self.names.index(name)

    def check(self, flat: np.ndarray, what: str = "flat") -> np.ndarray:
        """Return ``flat`` after checking that it is a 1-D floating array of length ``size``."""
        if not isinstance(flat, np.ndarray) and not hasattr(flat, "__cuda_array_interface__"):
            raise ValueError(f"{what} must be a numpy (or, on the GPU backend, CuPy) array, "
                             f"got {type(flat).__name__}")
        if flat.ndim != 1 or flat.shape[0] != self.size:
            raise ValueError(f"{what} must have shape ({self.size},), got {flat.shape}")
        if flat.dtype.kind != "f":
            raise ValueError(f"{what} must be a floating array, got dtype {flat.dtype}")
        return flat

    def named(self, flat: np.ndarray) -> Dict[str, np.ndarray]:
        """Dict name -> view of ``flat`` with the tensor's shape (writes go through to ``flat``)."""
        self.check(flat)
        out = {}
        for name in self.names:
            o = self.offsets[name]
            out[name] = flat[o:o + self._numel[name]].reshape(self.shapes[name])
        return out

    def zeros(self, dtype=np.float32) -> np.ndarray:
        """A flat zero buffer of length ``size``."""
        return np.zeros(self.size, dtype=dtype)

    def flatten(self, tensors: Dict[str, np.ndarray], dtype=np.float32) -> np.ndarray:
        """Pack a dict name -> array (e.g. a converted state_dict) into a new flat buffer.

        The dict must hold exactly the layout's names with matching shapes.
        """
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in self.shapes]
        if missing or extra:
            raise ValueError(f"tensor names do not match the layout: missing {missing[:5]}, unexpected {extra[:5]}")
        flat = self.zeros(dtype)
        views = self.named(flat)
        for name in self.names:
            a = np.asarray(tensors[name])
            if a.shape != self.shapes[name]:
                raise ValueError(f"{name}: expected shape {self.shapes[name]}, got {a.shape}")
            views[name][...] = a
        return flat

    def to_list(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """The ``(name, shape)`` list (JSON-able with lists for shapes)."""
        return [(n, self.shapes[n]) for n in self.names]


def _check_shape(name: str, shape) -> Tuple[int, ...]:
    """``shape`` as a tuple of Python ints: it must be a tuple or list of non-negative integers (Python
    or NumPy, not bool; no silent int() of 2.7 or of the characters of "23")."""
    if not isinstance(shape, (tuple, list)):
        raise ValueError(f"parameter {name!r}: shape must be a tuple or list of integers, got {shape!r} "
                         f"({type(shape).__name__})")
    for s in shape:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"parameter {name!r}: shape {shape!r} holds {s!r} ({type(s).__name__}); "
                             "expected non-negative integers")
        if s < 0:
            raise ValueError(f"parameter {name!r} has a negative dimension: shape {shape!r}")
    return tuple(int(s) for s in shape)


def fan_avg_uniform(seed: int, tensor_index: int, shape, fan_in: int, fan_out: int) -> np.ndarray:
    """The paper's initialiser (TF ``variance_scaling(1, "fan_avg", "uniform")``) as float32.

    ``U(-limit, limit)`` with ``limit = sqrt(3 / ((fan_in + fan_out) / 2))``; the uniforms come from
    ``rng.uniform(seed, Stream.INIT, [tensor_index], 0, shape)``, so a tensor's values depend only on the
    seed and its position in the layout. Shared by the U-Net and the MLP.
    """
    limit = np.sqrt(3.0 / ((fan_in + fan_out) / 2.0))
    u = rng.uniform(seed, rng.Stream.INIT, [tensor_index], 0, shape)[0]     # (0, 1)
    return ((2.0 * u.astype(np.float64) - 1.0) * limit).astype(np.float32)
