"""The widening rules, one function per line of WIDENING.md, so a reader can check them there.

Everything the plan rewrites goes through these few formulas; the patterns only say which
tensor plays which role and how scales relate (see scales.py).
"""
from __future__ import annotations

import math
import os

import numpy as np

from fractions import Fraction

from .dims import MEAN, ZERO, Layout
from .errors import WidenError

# "Two ways to carry the residual stream": plain repeat R(x) (default, canonical) or R(x)/sqrt(k).
RESIDUAL_SCHEMES = ("repeat", "orthogonal")


def residual_log_scale(scheme: str, k: int) -> float:
    """log of the residual stream's scale: 1 (plain repeat) or 1/sqrt(k) (orthogonal, the post)."""
    return 0.0 if scheme == "repeat" else -0.5 * math.log(k)


def output_log_scale(k: int) -> float:
    """Hidden-state outputs leave as R(h)/sqrt(k) (WIDENING.md, Outputs)."""
    return -0.5 * math.log(k)


# A LayerNorm's own parameters are zero on mean units, like a reader's rows (their copies are 1):
# the norm's new outputs are then exactly zero.
NORM_PARAMS = ("gamma", "beta")
CENTRED_NORM_OPS = ("LayerNormalization", "SkipLayerNormalization")


def widen_tensor(arr: np.ndarray, layouts: list, read_axes, factor: float, out: np.ndarray | None = None) -> np.ndarray:
    """Linear layer rule W~[i, j] = c / (a * k_in) * W[i // k_in, j // k_out], in general form:
    copy every axis by its layout, divide each axis that is summed against a widened input by
    the copies of its unit, and multiply by the scale factor c / a (or c for biases, gains, tables).
    Units placed as zeros (src = ZERO) stay zero. Mean units (src = MEAN, LEMON's average
    expansion) take the mean of the small units on an axis that is written (a table's width, a
    writer's output, a bias) and zero on an axis that is read.

    The arithmetic is done on the small tensor, then copied: a copy does not change a value, so
    this is the same float result with k**2 times less arithmetic, and the wide tensor is made
    in one pass where every axis is a plain repeat (into `out` if given and it fits)."""
    # float32/float64 stay as they are (copies are exact, one rounding per factor); narrower floats
    # (float16, bfloat16) are computed in float32 and cast back once by `cast_back`.
    small = arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float32)
    for axis in read_axes:
        lay = layouts[axis]
        if lay is None or lay.identity:
            continue
        copies = lay.copies
        used = copies[copies > 0]
        if used.size and used.min() == used.max():
            factor = factor / float(used[0])  # folded into one multiply below
        else:
            shape = [1] * small.ndim
            shape[axis] = len(copies)
            small = small / np.where(copies > 0, copies, 1).reshape(shape).astype(small.dtype)
    if factor != 1.0:
        small = small * small.dtype.type(factor)
    mean_axes = {a for a, lay in enumerate(layouts) if lay is not None and lay.has_mean_units and a not in read_axes}
    return expand(contiguous(small), layouts, mean_axes, out)


def expand(small: np.ndarray, layouts: list, mean_axes=(), out: np.ndarray | None = None) -> np.ndarray:
    """Copy every axis of `small` by its layout (zeros where src = ZERO, and where src = MEAN
    unless the axis is in mean_axes: there the mean of the small units)."""
    repeats = [_plain_repeat(lay, n) for lay, n in zip(layouts, small.shape)]
    if all(r is not None for r in repeats):
        # [n0, r0, n1, r1, ...] <- small[:, None, :, None, ...]: one write per output element.
        shape = tuple(n * r for n, r in zip(small.shape, repeats))
        if out is None or out.shape != shape or out.dtype != small.dtype:
            out = np.empty(shape, dtype=small.dtype)
        split = out.reshape([d for n, r in zip(small.shape, repeats) for d in (n, r)])
        _parallel_copy(split, small.reshape([d for n in small.shape for d in (n, 1)]))
        return out
    out = small
    for axis, lay in enumerate(layouts):
        if lay is None or lay.identity:
            continue
        src = lay.src
        before = out
        out = np.take(out, np.where(src < 0, 0, src), axis=axis)
        if (src < 0).any():
            np.moveaxis(out, axis, 0)[src < 0] = 0
            if axis in mean_axes:
                # Average expansion: what writes the axis writes the mean of its small outputs there.
                mean = np.moveaxis(before.mean(axis=axis, keepdims=True, dtype=np.float64), axis, 0)[0]
                np.moveaxis(out, axis, 0)[src == MEAN] = mean.astype(out.dtype)
    return out


PARALLEL_MIN_BYTES = 1 << 26  # below this a copy is done in one piece


def _parallel_copy(dst: np.ndarray, src: np.ndarray):
    """dst[...] = src (src broadcast), in row blocks on every core: numpy's copy loop releases the
    GIL, and one core fills memory at a fraction of what the disk takes."""
    workers = min(8, os.cpu_count() or 1)
    rows = dst.shape[0] if dst.ndim else 0
    if workers < 2 or dst.nbytes < PARALLEL_MIN_BYTES or rows < 2 * workers:
        dst[...] = src
        return
    from concurrent.futures import ThreadPoolExecutor

    bounds = np.linspace(0, rows, workers + 1).astype(int)
    src_rows = src.shape[0] if src.ndim == dst.ndim else 1

    def part(i):
        a, b = bounds[i], bounds[i + 1]
        dst[a:b] = src[a:b] if src_rows == rows else src

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(part, range(workers)))


def contiguous(a: np.ndarray) -> np.ndarray:
    """C order, keeping the rank (np.ascontiguousarray turns a scalar into shape [1])."""
    return a if a.flags.c_contiguous else a.copy(order="C")


def _plain_repeat(lay, n: int):
    """r when the layout copies every unit r times in place ([x1, x1, x2, x2]); else None."""
    if lay is None or lay.identity:
        return 1
    if lay.wide % n or (lay.src < 0).any():
        return None
    r = lay.wide // n
    return r if np.array_equal(lay.src, np.repeat(np.arange(n), r)) else None


def cast_back(wide: np.ndarray, dtype, name: str = "") -> np.ndarray:
    """float16 / bfloat16 weights were widened in float32: cast back once. A value that grew
    past the narrow type's range would become inf: refuse rather than write it."""
    dtype = np.dtype(dtype)
    if wide.dtype == dtype:
        return wide
    if dtype.kind == "f" or dtype.name == "bfloat16":
        limit = float(ml_finfo(dtype).max)
        finite = np.isfinite(wide)
        over = np.abs(np.where(finite, wide, 0)) > limit
        if over.any():
            from .errors import WidenError

            raise WidenError(f"tensor {name!r}: widened values reach {float(np.abs(wide[finite]).max()):.4g}, past the "
                             f"{dtype.name} range (max {limit:.4g}); widen a float32 copy of the model instead")
    return wide.astype(dtype)


def ml_finfo(dtype):
    try:
        return np.finfo(dtype)
    except ValueError:  # bfloat16 and other ml_dtypes types
        import ml_dtypes

        return ml_dtypes.finfo(dtype)


def norm_statistic_log(lay: Layout) -> float:
    """LayerNorm / RMSNorm over an axis whose units copy the small ones evenly (c copies), with
    zero units (RMSNorm) or mean units (LayerNorm: they sit at the mean, so their centred value
    is zero) besides: the variance (mean square) is the small one times rho = sum(copies)/wide.
    Exact with eps * rho and gamma * sqrt(rho) (WIDENING.md, Non-integer factors: d/D); rho = 1
    for a plain repeat."""
    return math.log(lay.statistic_ratio())


def canonical_scale_constant(head_size_wide: int, exponent: float) -> float:
    """Softmax scale constants take the wide head size's value: 1/sqrt(k*dh), or (k*dh)**-0.25 per side."""
    return float(head_size_wide) ** exponent


# How onnxruntime's MatMulScaleFusion may have built an alpha equal to n**p from the exporter's
# float32 constants: the power itself, q * c and k * c with c = n**(p/2) each, or 1 / n**-p (a Div).
FOLDINGS = (
    lambda n, p: np.float32(float(n) ** p),
    lambda n, p: np.float32(float(n) ** (p / 2)) * np.float32(float(n) ** (p / 2)),
    lambda n, p: np.float32(1.0) / np.float32(float(n) ** -p),
)


def canonical_folded_scale(small: float, head_size_small: int, head_size_wide: int, exponent: float) -> float:
    """A softmax scale folded into FusedMatMul's alpha, as float32: the ways of folding that
    reproduce the small alpha bit for bit, if they agree on the wide head, give the wide alpha
    (what the optimizer makes of the wide export); otherwise the float32 power (one rounding off
    at most: a small head size whose foldings coincide cannot tell them apart)."""
    wide = {float(f(head_size_wide, exponent)) for f in FOLDINGS if f(head_size_small, exponent) == np.float32(small)}
    return wide.pop() if len(wide) == 1 else float(FOLDINGS[0](head_size_wide, exponent))


def epsilon(eps: float, input_log_scale: float) -> float:
    """A norm whose input arrives at scale a keeps its function with eps * a**2 (eps/k, orthogonal)."""
    return eps * math.exp(2.0 * input_log_scale)


# RoPE (WIDENING.md): "spread" puts old pair j at new pair k*j, the wide config's own frequencies
# (canonical and exact); "remap" repeats the frequencies (exact, non-standard frequencies).
ROPE_PLACEMENTS = ("spread", "remap")


# How each kind of width dimension grows (WIDENING.md, Attention / Growing heads / RoPE).
# heads="keep": head counts stay and every head gets k times the units (the post);
# heads="grow": head size stays and there are k times the heads, each new head a copy, kv heads
# tiled with their groups (kv_heads="tile") or kept with the query copies interleaved ("keep").
HEAD_MODES = ("keep", "grow")
KV_HEAD_MODES = ("tile", "keep")


def kept_whole(tags: set, heads: str = "keep") -> bool:
    """Dimensions that keep their size whatever they are made of."""
    always = {"fixed", "terminal"}
    if heads == "keep":
        return bool(tags & (always | {"heads", "copies"}))
    return bool(tags & (always | {"head_dim"}))


def layout_for(tags: set, size: int, k: int, rope: str = "spread", heads: str = "keep", kv_heads: str = "tile") -> Layout:
    """The layout of one undivided width dimension under the chosen growth."""
    if kept_whole(tags, heads):
        return Layout.repeat(size, 1)
    if heads == "grow":
        if "copies" in tags:
            return Layout.repeat(size, k if kv_heads == "keep" else 1)
        if "kv_heads" in tags and kv_heads == "keep":
            return Layout.repeat(size, 1)
        return Layout.repeat(size, k)
    if tags & {"rotary", "spread"} and rope == "spread":
        return Layout.spread(size, k)
    return Layout.repeat(size, k)


# ---- non-integer growth (WIDENING.md, Non-integer factors; Growing heads) -----------------------
def grown(size: int, ratio: Fraction, what: str) -> int:
    """The wide size of a dimension that grows by `ratio`; it must come out whole."""
    wide = size * ratio
    if wide.denominator != 1:
        raise WidenError(f"{what} of size {size} cannot grow by {ratio}: {float(wide):g} is not a whole number")
    return int(wide)


def head_count_layout(tags: set, size: int, ratio: Fraction, kv_heads: str) -> Layout:
    """Head-count growth by any ratio: each new head a copy of an old one (softmax scale and head
    size kept). Under GQA the query heads are kv heads x copies: "tile" grows the kv heads (each
    new kv head brings its whole group of query heads, so the grouping stays consistent), "keep"
    grows the query copies of every kv head."""
    if "copies" in tags:
        r = ratio if kv_heads == "keep" else Fraction(1)
        why = "query heads per kv head (--kv-heads keep): the new head count must be a multiple of the kv head count"
    elif "kv_heads" in tags:
        r = Fraction(1) if kv_heads == "keep" else ratio
        why = "kv heads (--kv-heads tile grows them with their groups of query heads); try --kv-heads keep"
    else:
        r, why = ratio, "heads"
    if (size * r).denominator != 1:
        raise WidenError(f"head count: {size} {why}; growing by {r} gives {float(size * r):g}, not a whole number")
    return Layout.stretch(size, int(size * r))


def ffn_layout(size: int, ratio: Fraction) -> Layout:
    """FFN units grow by any count: copies spread evenly, the down projection divides each copied
    unit's outgoing weights among its copies (widen_tensor's read-axis rule)."""
    return Layout.stretch(size, grown(size, ratio, "FFN inner dimension"))


def head_size_layout(size: int, ratio: Fraction) -> Layout:
    """A head size that grows by a non-integer ratio: uneven copies would change q.k, zero units do
    not (the softmax scale takes the wide head size's value; q and k absorb the change)."""
    return Layout.pad(size, grown(size, ratio, "head size"))


# How the residual stream (and every other dimension a norm reads) grows by a non-integer ratio,
# by the norms that normalise it: RMSNorm zero-pads, pre-norm LayerNorm averages (LEMON); a
# dimension no norm reads takes uneven copies, read back with the linear rule.
NORM_KINDS = ("rms", "centred")


def hidden_layout(size: int, wide: int, norms: set, approximate: bool = False, seed: int = 0) -> Layout:
    if approximate and "centred" in norms:
        return Layout.choice(size, wide, seed)
    if not norms:
        return Layout.stretch(size, wide)
    if norms == {"rms"}:
        return Layout.pad(size, wide, ZERO)
    if norms == {"centred"}:
        return Layout.pad(size, wide, MEAN)
    raise WidenError(f"a dimension of size {size} is normalised both by LayerNorm and by RMSNorm: "
                     "no single non-integer layout keeps both exact")


# Ops that may act on a dimension with zero or mean units, and the fills they keep: f(0) = 0 keeps
# zeros; only a linear f keeps means (f(mean x) = mean f(x)).
PADDING_UNSAFE = ("Erf", "Tanh", "Sigmoid", "Exp", "Log", "Softplus", "Softsign", "Gelu", "FastGelu", "Elu", "Selu",
                  "Celu", "Mish", "HardSigmoid", "HardSwish", "Sin", "Cos", "Swish", "QuickGelu", "Relu", "LeakyRelu",
                  "Abs")
_KEEPS_ZERO = {"Erf", "Tanh", "Softsign", "Gelu", "FastGelu", "Elu", "Selu", "Celu", "Mish", "Sin", "Swish", "QuickGelu",
               "Relu", "LeakyRelu", "Abs", "HardSwish"}


def keeps_fill(op: str, fill: str) -> bool:
    return fill == "zero" and op in _KEEPS_ZERO


# How far stored frequencies may be from a geometric series, by bytes per value: float32 and
# float64 exports hold them to 1e-4; float16 (2**-11) and bfloat16 (2**-8) round each one.
FREQUENCY_RTOL = {8: 1e-4, 4: 1e-4, 2: 1e-2}
# How far a stored sin/cos table may be from the recomputed one, by bytes per value: float16
# rounds values near 1 by up to 2**-12, bfloat16 by 2**-9 (plus the fitted frequencies' error).
TABLE_ATOL = {8: 1e-4, 4: 1e-4, 2: 4e-3}


def rotary_frequencies(small: np.ndarray, lay: Layout, axis: int) -> np.ndarray:
    """inv_freq of the wide head: base**(-2m/(k*dh)) = f0 * r**(m/k) for old ratio r = f1/f0.
    Old pair j lands on m = k*j with its exact old value; the new pairs get the wide config's
    frequencies. Frequencies that are not a geometric series (scaled RoPE) have no canonical
    wide value here: the caller must use the repeat placement."""
    f = np.moveaxis(small.astype(np.float64), axis, -1)
    n = f.shape[-1]
    m = np.arange(lay.wide)
    if n >= 2:
        r = f[..., 1:2] / f[..., 0:1]
        narrow = np.dtype(small.dtype).itemsize < 4
        if narrow and (f > 0).all():
            # Rounded to float16/bfloat16: the ratio of two rounded values is off by up to 1e-3, and
            # r**m multiplies that error by m; the slope of log f over all pairs is not.
            slope = np.polyfit(np.arange(n), np.log(f.reshape(-1, n)).T, 1)[0]
            r = np.exp(slope).reshape(f.shape[:-1] + (1,))
        expect = f[..., 0:1] * r ** np.arange(n)
        if not np.allclose(expect, f, rtol=FREQUENCY_RTOL[np.dtype(small.dtype).itemsize], atol=0):
            return None
        wide = f[..., 0:1] * r ** (m * (n / lay.wide))
    else:
        wide = np.repeat(f, lay.wide, axis=-1)
    valid = lay.src >= 0
    wide[..., valid] = f[..., lay.src[valid]]
    return np.moveaxis(wide, -1, axis).astype(small.dtype)


def rotary_cache(small: np.ndarray, lay: Layout, axis: int) -> np.ndarray:
    """A [.., positions, sin(f) | cos(f)] cache for the wide head: frequencies read back from the
    cache (row 1), widened like inv_freq, sines and cosines recomputed for every position; units
    copied from the small cache keep their exact values."""
    if axis != small.ndim - 1:
        return None
    table = small.astype(np.float64)
    n = table.shape[-1] // 2
    positions = table.shape[-2]
    rows = table.reshape(-1, positions, 2 * n)
    p = np.arange(positions)[:, None]
    # The angle p * f, unwrapped over the positions; its slope through 0 is f, to far better than
    # the angle at one row (a float16 sine holds that to 5e-4 only).
    theta = np.unwrap(np.arctan2(rows[0, :, :n], rows[0, :, n:]), axis=0)
    f = (p * theta).sum(axis=0) / float((p * p).sum())
    tol = TABLE_ATOL[np.dtype(small.dtype).itemsize]
    if not (np.allclose(np.sin(p * f), rows[0, :, :n], atol=tol) and np.allclose(np.cos(p * f), rows[0, :, n:], atol=tol)):
        return None
    half = Layout(lay.src[: len(lay.src) // 2], n)
    fw = rotary_frequencies(f.astype(np.float64), half, 0)
    if fw is None:
        return None
    wide = np.concatenate([np.sin(p * fw), np.cos(p * fw)], axis=-1)
    valid = lay.src >= 0
    wide = np.broadcast_to(wide, rows.shape[:1] + wide.shape).copy()
    wide[..., valid] = rows[..., lay.src[valid]]
    return wide.reshape(small.shape[:-1] + (lay.wide,)).astype(small.dtype)


def rotary_angles(small: np.ndarray, lay: Layout, axis: int) -> np.ndarray:
    """positions x [f | f] folded into a constant: the same positions times the wide frequencies."""
    if axis != small.ndim - 1:
        return None
    rows = small.reshape(-1, small.shape[-1]).astype(np.float64)
    n = rows.shape[1] // 2
    t = rows[:, 0]
    r = int(np.argmax(np.abs(t)))
    f = rows[r, :n] / t[r]
    half = Layout(lay.src[: len(lay.src) // 2], n)
    fw = rotary_frequencies(f, half, 0)
    if fw is None:
        return None
    wide = np.outer(t, np.concatenate([fw, fw]))
    valid = lay.src >= 0
    wide[:, valid] = rows[:, lay.src[valid]]
    return wide.reshape(small.shape[:-1] + (lay.wide,)).astype(small.dtype)


def _table_frequency(col: np.ndarray, trig) -> tuple[float, bool]:
    """The frequency f of one column trig(p * f), p = 0, 1, ..: read at row 1, then refined row
    by row on the branch nearest the prediction, wherever the inverse is well conditioned (the
    error of f shrinks as 1/p). Second value: whether any row was well conditioned."""
    inverse, other = (np.arccos, np.sin) if trig is np.cos else (np.arcsin, np.cos)
    f = abs(float(inverse(np.clip(col[1], -1.0, 1.0))))
    good = False
    for q in range(2, len(col)):
        a = float(inverse(np.clip(col[q], -1.0, 1.0)))
        pred = q * f
        candidates = (a, -a) if trig is np.cos else (a, np.pi - a)
        theta = min((c + 2 * np.pi * round((pred - c) / (2 * np.pi)) for c in candidates), key=lambda t: abs(t - pred))
        if abs(other(theta)) > 0.5:
            f, good = theta / q, True
    return f, good


def _trig_table(trig):
    """A [positions, pairs] cos or sin cache (onnxruntime's RotaryEmbedding / GroupQueryAttention
    inputs). Copies need no frequencies; otherwise the frequencies f_j = f_0 r**j are fitted to
    the columns that determine them well (float32 rounding hides a small f in cos), checked
    against the whole table, widened like inv_freq, and the table recomputed for every position;
    units copied from the small cache keep their exact values."""
    def rebuild(small: np.ndarray, lay: Layout, axis: int) -> np.ndarray:
        if axis != small.ndim - 1 or small.ndim != 2 or small.shape[0] < 3:
            return None
        if (lay.src >= 0).all():
            return np.take(small, lay.src, axis=1)
        table = small.astype(np.float64)
        n = table.shape[1]
        fits = [_table_frequency(table[:, j], trig) for j in range(n)]
        cols = [j for j, (f, good) in enumerate(fits) if good and f > 0] or [j for j in range(min(n, 2)) if fits[j][0] > 0]
        if not cols:
            return None
        if len(cols) > 1:
            slope, intercept = np.polyfit(cols, np.log([fits[j][0] for j in cols]), 1)
            f = np.exp(intercept + slope * np.arange(n))
        else:
            f = np.full(n, fits[cols[0]][0])
        p = np.arange(table.shape[0])[:, None]
        if not np.allclose(trig(p * f), table, atol=TABLE_ATOL[np.dtype(small.dtype).itemsize]):
            return None
        wide = trig(p * rotary_frequencies(f, lay, 0))
        valid = lay.src >= 0
        wide[:, valid] = table[:, lay.src[valid]]
        return wide.astype(small.dtype)
    return rebuild


# How each kind of rotary table is rebuilt at the wide config's frequencies.
ROTARY_TABLES = {"rotary frequencies": rotary_frequencies, "rotary cache": rotary_cache, "rotary angles": rotary_angles,
                 "rotary cos cache": _trig_table(np.cos), "rotary sin cache": _trig_table(np.sin)}


def symmetry_breaking_noise(wide: np.ndarray, small: np.ndarray, layouts: list, read_axes, std: float, seed: int) -> np.ndarray:
    """WIDENING.md, Symmetry breaking: the copies of a unit carry equal activations, so a weight
    that reads them may take noise e_1..e_c with sum e_i = 0 per original row: the function is
    unchanged, the copies' gradients differ. The noise is `std` times the tensor's own spread."""
    import zlib

    rng = np.random.default_rng([seed, zlib.crc32(small.tobytes()[:4096])])
    scale = std * float(np.std(small.astype(np.float64))) / max(1, int(np.prod([layouts[a].copies.max() for a in read_axes if layouts[a] is not None])))
    out = wide.astype(np.float64)
    for axis in read_axes:
        lay = layouts[axis]
        if lay is None or lay.copies.max() <= 1:
            continue
        e = rng.standard_normal(out.shape) * scale
        src = lay.src
        moved = np.moveaxis(e, axis, 0)
        for unit in np.flatnonzero(lay.copies > 1):
            rows = np.flatnonzero(src == unit)
            moved[rows] -= moved[rows].mean(axis=0, keepdims=True)  # zero sum over the copies
        zero = src < 0
        moved[zero] = 0.0
        moved[np.isin(src, np.flatnonzero(lay.copies <= 1))] = 0.0
        out = out + np.moveaxis(moved, 0, axis)
    return out
