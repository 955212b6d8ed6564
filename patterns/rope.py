"""Rotary position embeddings (RoPE).

Frequencies: Mul(positions, inv_freq) feeding Cos/Sin (both exporters fold the transformers
`inv_freq @ position_ids` product into a broadcast Mul). inv_freq's axis is where the rotary
pair dimension is born; Concat(freqs, freqs) makes the rotate_half layout [pairs | pairs], and
rotate_half's Slice/Neg/Concat on q and k cut the head size the same way, so the q/k head
dimension becomes "rotary halves" by unification alone. The layout of that dimension is then
the spread placement (pair j -> pair k*j at the wide config's own frequencies, other pairs zero)
or, with --rope remap, the plain repeat (WIDENING.md, RoPE). Partial rotary works the same way:
only the sliced-off rotary part carries the rotary tag.

Interleaved pairs (GPT-J, RoFormer): x[..., 0::2] and x[..., 1::2] make the rotary part a product
[pairs, 2]; the sin|cos cache row gathered by position, repeat-interleaved, gives the same
product, so the pair axis is the cache's frequency axis and the "2" stays. The cache itself is
widened to the wide config's frequencies (spread) or repeated (remap).
"""
import numpy as np
from onnx import TensorProto

from onnx_widen import dims as D
from onnx_widen import rules
from onnx_widen.analysis import Match, ShapeUse
from onnx_widen.graph import attr
from onnx_widen.match import OpPattern, const_source, width_param_axes

_TO_TRIG = ("Concat", "Unsqueeze", "Transpose", "Cast", "Identity", "Reshape", "Mul")


def _reaches_trig(an, name, depth=4):
    if depth == 0:
        return False
    for c in an.graph.consumers.get(name, []):
        if c.op_type in ("Cos", "Sin"):
            return True
        if c.op_type in _TO_TRIG and any(_reaches_trig(an, o, depth - 1) for o in c.output):
            return True
    return False


def _freq_operand(an, node):
    for idx in (0, 1):
        name = node.input[idx]
        src = const_source(an, name)
        if src is None or an.tracked(name):
            continue
        if an.info.dtypes.get(name) not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            continue
        shape = an.shape(name)
        if shape and shape[-1] > 1 and sum(d > 1 for d in shape) == 1:
            return idx
    return None


def _is_frequencies(an, node):
    if an.tracked(node.input[0]) or an.tracked(node.input[1]):
        return False
    return _freq_operand(an, node) is not None and _reaches_trig(an, node.output[0])


def frequencies(an, node):
    idx = _freq_operand(an, node)
    freq, out = node.input[idx], node.output[0]
    n = an.shape(freq)[-1]
    sym = an.new_sym(n, node, tags={"rotary"})
    axes = [None] * len(an.shape(out))
    axes[-1] = sym
    an.set(out, axes)
    src, perm = const_source(an, freq)
    an.param(src, node, width_param_axes(an, freq, axes), {out: 1.0}, role="rotary frequencies")
    an.matches.append(Match("rotary frequencies", [an.name(node)], {"inv_freq": src, "pairs": n}))


PATTERNS = [OpPattern("rotary frequencies", ("Mul",), frequencies, when=_is_frequencies, seed=True)]


# ---- interleaved RoPE read from a sin|cos cache (GPT-J's embed_positions) -----------------------
_CACHE_PATH = ("Expand", "Tile", "Identity", "Cast", "Unsqueeze")


def _cache_source(an, name):
    """The constant a position lookup reads, through the batch Expand/Tile exporters add."""
    g = an.graph
    while not g.is_const(name):
        p = g.producer.get(name)
        if p is None or p.op_type not in _CACHE_PATH:
            return None
        name = p.input[0]
    return name


def _splits_in_halves(an, name, depth=3):
    for c in an.graph.consumers.get(name, []):
        if c.op_type == "Split" and len([o for o in c.output if o]) == 2 and attr(c, "axis", 0) % len(an.shape(name)) == len(an.shape(name)) - 1:
            return True
        if depth and c.op_type in ("Cast", "Identity") and _splits_in_halves(an, c.output[0], depth - 1):
            return True
    return False


def _looks_like_sincos(table):
    """Row 0 is [sin 0 | cos 0] = [0 | 1] and row 1 has sin^2 + cos^2 = 1: a sin|cos cache (to the
    rounding of its own type: a float16 table holds each value to 2**-11)."""
    rows = table.reshape(-1, table.shape[-1]).astype(np.float64)
    n = rows.shape[1] // 2
    if rows.shape[0] < 2 or rows.shape[1] % 2:
        return False
    tol = rules.TABLE_ATOL[np.dtype(table.dtype).itemsize]
    return (np.allclose(rows[0, :n], 0, atol=1e-6) and np.allclose(rows[0, n:], 1, atol=1e-6)
            and np.allclose(rows[1, :n] ** 2 + rows[1, n:] ** 2, 1, atol=tol))


def _is_cache_lookup(an, node):
    if an.tracked(node.input[0]) or an.tracked(node.input[1]):
        return False
    src = _cache_source(an, node.input[0])
    if src is None or an.info.dtypes.get(node.input[0]) not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
        return False
    return _splits_in_halves(an, node.output[0]) and _looks_like_sincos(an.graph.const(src))


def _direct_reader(an, name, src):
    """The node that reads the constant itself (the first Expand/Tile of the chain, or `name`'s reader)."""
    while True:
        p = an.graph.producer.get(name)
        if p is None or p.op_type == "Constant" or name == src:
            return None
        if p.input[0] == src:
            return p
        name = p.input[0]


def cache_lookup(an, node):
    src = _cache_source(an, node.input[0])
    out = node.output[0]
    n = an.shape(out)[-1] // 2
    pairs = an.new_sym(n, node, tags={"rotary"})
    both = D.concat([pairs, pairs], an.name(node))
    an.set(out, [None] * (len(an.shape(out)) - 1) + [both])
    an.scale.fix(out, an.name(node))  # sines and cosines: unit scale
    table_axes = (None,) * (len(an.graph.const_shape(src)) - 1) + (both,)
    reader = _direct_reader(an, node.input[0], src) or node
    name = node.input[0]
    while name != src:  # the batch Expand/Tile copies of the table widen with it
        an.set(name, [None] * (len(an.shape(name)) - 1) + [both])
        name = an.graph.producer[name].input[0]
    an.param(src, reader, table_axes, {out: 1.0}, role="rotary cache")
    if node.op_type == "GatherElements":
        _widen_index_shape(an, node.input[1], both)
    an.matches.append(Match("rotary cache", [an.name(node)], {"table": src, "pairs": n, "layout": "sin|cos"}))


def _widen_index_shape(an, idx, sym):
    """GatherElements wants indices shaped like its output: the Expand/Tile that gives the index
    tensor its last axis must give it the wide cache's width."""
    p = an.graph.producer.get(idx)
    while p is not None and p.op_type in ("Cast", "Identity"):
        p = an.graph.producer.get(p.input[0])
    if p is None or p.op_type not in ("Expand", "Tile"):
        an.fail(an.graph.producer.get(idx) or p, "GatherElements indices of a rotary cache come from an unknown op")
    small_n = sym.find().size

    def required(plan, p=p):
        v = np.array(np.atleast_1d(an.value(p.input[1])), dtype=np.int64).copy()
        wide_n = plan.layout(sym).wide
        if p.op_type == "Expand":
            if v[-1] == small_n:
                v[-1] = wide_n
        else:
            v[-1] = v[-1] * wide_n // small_n
        return v

    an.shape_uses.append(ShapeUse(p, 1, required))


PATTERNS.append(OpPattern("rotary cache", ("Gather", "GatherElements"), cache_lookup, when=_is_cache_lookup, seed=True))


# ---- angles folded into a constant: Cos/Sin(positions x inv_freq) with static positions ---------
def _angle_table(an, name):
    src = const_source(an, name)
    if src is None or src[1] is not None or an.info.dtypes.get(name) not in (TensorProto.FLOAT, TensorProto.DOUBLE):
        return None
    table = an.graph.const(src[0])
    if table.ndim < 2 or table.shape[-1] % 2 or table.shape[-1] < 2:
        return None
    rows = table.reshape(-1, table.shape[-1]).astype(np.float64)
    n = rows.shape[1] // 2
    if not np.allclose(rows[:, :n], rows[:, n:]):  # rotate_half: [freqs | freqs]
        return None
    t = rows[:, 0]  # f_0 = base**0 = 1, so column 0 is the position
    if np.abs(t).max() == 0 or not np.allclose(np.outer(t, rows[np.argmax(np.abs(t)), :n] / t[np.argmax(np.abs(t))]), rows[:, :n], atol=1e-4):
        return None
    return src[0]


def _is_angles(an, node):
    return not an.tracked(node.input[0]) and _angle_table(an, node.input[0]) is not None


def angles(an, node):
    src = _angle_table(an, node.input[0])
    n = an.shape(node.input[0])[-1] // 2
    pairs = an.new_sym(n, node, tags={"rotary"})
    both = D.concat([pairs, pairs], an.name(node))
    axes = [None] * (len(an.shape(node.input[0])) - 1) + [both]
    an.set(node.input[0], axes)
    for reader in an.graph.consumers.get(node.input[0], []):  # the Sin beside the Cos reads it too
        an.param(src, reader, axes, {node.output[0]: 0.0}, role="rotary angles")
    an.matches.append(Match("rotary angles", [an.name(node)], {"table": src, "pairs": n}))
    from . import activation

    activation.nonlinear(an, node)


PATTERNS.append(OpPattern("rotary angles", ("Cos", "Sin"), angles, when=_is_angles, seed=True))
