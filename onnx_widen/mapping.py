"""How a graph input or output of the wide model relates to the small model's: a layout per
widened axis and a scale (recorded in the wide model's metadata by `apply`)."""
from __future__ import annotations

import math

import numpy as np

from .dims import MEAN, Layout


def post_convention(small_shape, wide_shape, factor: int) -> dict | None:
    """Without metadata: every axis that grew by `factor` is a plain repeat, scale 1/sqrt(factor)."""
    axes = {}
    for i, (s, w) in enumerate(zip(small_shape, wide_shape)):
        if w == s * factor and s != w:
            axes[str(i)] = {"small": s, "repeat": factor}
        elif w != s:
            return None
    return {"axes": axes, "scale": 1.0 / math.sqrt(factor)} if axes else None


def unwiden(arr: np.ndarray, entry: dict) -> np.ndarray:
    """Average the copies of every unit (units that copy none are dropped), then divide by the scale."""
    out = np.asarray(arr, dtype=np.float64)
    for axis, lay_json in sorted(entry["axes"].items(), key=lambda kv: int(kv[0])):
        lay = Layout.from_json(lay_json)
        axis = int(axis)
        onehot = np.zeros((lay.wide, lay.small))
        valid = lay.src >= 0
        onehot[np.flatnonzero(valid), lay.src[valid]] = 1.0 / lay.copies[lay.src[valid]]
        out = np.moveaxis(np.tensordot(np.moveaxis(out, axis, -1), onehot, axes=([-1], [0])), -1, axis)
    return out / entry["scale"]


def widen_array(arr: np.ndarray, entry: dict) -> np.ndarray:
    """The wide model's value of an input given the small model's (a KV cache, say)."""
    out = np.asarray(arr)
    for axis, lay_json in entry["axes"].items():
        lay = Layout.from_json(lay_json)
        axis = int(axis)
        small = out
        out = np.take(out, np.where(lay.src < 0, 0, lay.src), axis=axis)
        if (lay.src < 0).any():
            shape = [1] * out.ndim
            shape[axis] = lay.wide
            out = out * (lay.src >= 0).reshape(shape)
            if lay.has_mean_units:  # average expansion: new units hold the mean of the small ones
                out = out + small.mean(axis=axis, keepdims=True) * (lay.src == MEAN).reshape(shape)
    return (out * entry["scale"]).astype(arr.dtype)
