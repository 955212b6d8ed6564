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
        if lay.copies.min() == 0:
            raise ValueError("a small unit has no copy")
        # Sum each unit's copies (not a product with a 0/1 matrix: -inf * 0 would be NaN).
        valid = np.flatnonzero(lay.src >= 0)
        order = valid[np.argsort(lay.src[valid], kind="stable")]
        starts = np.concatenate([[0], np.cumsum(lay.copies)[:-1]])
        shape = [1] * out.ndim
        shape[axis] = lay.small
        out = np.add.reduceat(np.take(out, order, axis=axis), starts, axis=axis) / lay.copies.reshape(shape)
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
