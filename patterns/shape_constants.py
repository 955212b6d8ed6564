"""Layout ops and the integer constants that shape them.

Head split/merge Reshapes, Transposes, Squeeze/Unsqueeze, Expand: width axes move with the
data. A Reshape regroups axes; a width dimension split into several becomes a product
(heads x head_size), so each factor gets its own layout, and each entry of the shape operand
is checked by its role: an entry that carries width takes the wide size, every other entry
(batch, sequence, heads, -1, 0) keeps its value. Nothing is ever rewritten because it equals
some number. Slice/Split/Gather/Concat along a non-width axis pass width through; along a
width axis they need a pattern that knows the layout (fused QKV, RoPE) and are refused here.
"""
import numpy as np

from onnx_widen import dims as D
from onnx_widen.analysis import ShapeUse
from onnx_widen.graph import attr
from onnx_widen.match import OpPattern, axes_arg, broadcast_axes

# Integer operands read as shapes, sizes or indices. Unless a pattern states the wide value by
# role (ShapeUse), the plan checks that the wide graph computes the same value as the small one.
SHAPE_SLOTS = {
    "Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2), "Tile": (1,),
    "Slice": (1, 2, 3, 4), "Split": (1,), "Pad": (1,), "Gather": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
    "OneHot": (1,), "TopK": (1,), "Resize": (3,), "Trilu": (1,),
}


def transpose(an, node):
    x = node.input[0]
    xa = an.ax(x)
    perm = attr(node, "perm", list(range(len(xa)))[::-1])
    an.set(node.output[0], [xa[p] for p in perm])
    an.scale.equal(node.output[0], x, an.name(node))


def unsqueeze(an, node):
    x, out = node.input[0], node.output[0]
    axes = axes_arg(an, node)
    rank = len(an.shape(out))
    axes = {a % rank for a in axes}
    it = iter(an.ax(x))
    an.set(out, [None if i in axes else next(it) for i in range(rank)])
    an.scale.equal(out, x, an.name(node))


def squeeze(an, node):
    x, out = node.input[0], node.output[0]
    xs = an.shape(x)
    axes = axes_arg(an, node)
    axes = {a % len(xs) for a in axes} if axes is not None else {i for i, n in enumerate(xs) if n == 1}
    an.set(out, [a for i, a in enumerate(an.ax(x)) if i not in axes])
    an.scale.equal(out, x, an.name(node))


def _groups(ins, outs):
    """Pair consecutive runs of axes whose sizes multiply to the same number."""
    groups, i, j = [], 0, 0
    while i < len(ins) or j < len(outs):
        gi, gj = [], []
        pi = pj = 1
        if i < len(ins):
            gi.append(i); pi *= ins[i]; i += 1
        if j < len(outs):
            gj.append(j); pj *= outs[j]; j += 1
        while pi != pj:
            if pi < pj and i < len(ins):
                gi.append(i); pi *= ins[i]; i += 1
            elif pj < pi and j < len(outs):
                gj.append(j); pj *= outs[j]; j += 1
            else:
                return None
        # Trailing size-1 axes join the current group.
        while i < len(ins) and ins[i] == 1 and (j >= len(outs) or outs[j] != 1):
            gi.append(i); i += 1
        while j < len(outs) and outs[j] == 1 and (i >= len(ins) or ins[i] != 1):
            gj.append(j); j += 1
        groups.append((gi, gj))
    return groups


def regroup(an, node, x, out):
    """Map width axes of x onto the axes of out, which holds the same elements in order."""
    xs, os_ = an.shape(x), an.shape(out)
    xa = an.ax(x)
    groups = _groups(list(xs), list(os_))
    if groups is None:
        an.fail(node, f"cannot relate shapes {xs} and {os_}")
    out_axes = [None] * len(os_)
    where = an.name(node)
    for gi, gj in groups:
        syms = [xa[i] for i in gi if xa[i] is not None]
        if not syms:
            continue
        big_in = [i for i in gi if xs[i] != 1]
        big_out = [j for j in gj if os_[j] != 1]
        if big_in and all(xa[i] is None for i in big_in):
            # Width only on size-1 axes (a one-unit head's output merged with batch axes): it
            # may stay only if that unit is never copied.
            for s in syms:
                an.identity_required.append((s, node, x))
        elif len(big_in) == 1 and len(big_out) == 1:
            out_axes[big_out[0]] = xa[big_in[0]]
        elif len(big_in) == 1:
            for j, s in zip(big_out, D.split(xa[big_in[0]], [os_[j] for j in big_out], where)):
                # A batch-like axis merged in only to be split out again carries no width.
                out_axes[j] = None if "fixed" in s.find().tags and not s.find().factors else s
        elif len(big_out) == 1:
            out_axes[big_out[0]] = D.merge([xa[i] for i in big_in], [xs[i] for i in big_in], where)
        else:
            an.fail(node, f"regrouping {[xs[i] for i in big_in]} into {[os_[j] for j in big_out]} mixes width axes")
    return out_axes


def _one_d(an, node, idx):
    v = an.value(node.input[idx]) if len(node.input) > idx and node.input[idx] else None
    if v is not None and np.ndim(v) != 1:
        an.fail(node, f"shape operand {node.input[idx]!r} must be 1-D, has shape {list(np.shape(v))}")


def reshape(an, node):
    x, out = node.input[0], node.output[0]
    if node.op_type == "Reshape":
        _one_d(an, node, 1)
    an.set(out, regroup(an, node, x, out))
    an.scale.equal(out, x, an.name(node))
    if node.op_type == "Reshape":
        allowzero = attr(node, "allowzero", 0)

        def required(plan, node=node, out=out, allowzero=allowzero):
            small = an.value(node.input[1])
            if small is None:
                return None
            wide = plan.wide_shape(out)
            return np.array([v if v == -1 or (v == 0 and not allowzero) else wide[i] for i, v in enumerate(small)], dtype=np.int64)

        an.shape_uses.append(ShapeUse(node, 1, required))


def expand(an, node):
    x, out = node.input[0], node.output[0]
    _one_d(an, node, 1)
    axes = broadcast_axes(an, node, [x])
    xs, os_ = an.shape(x), an.shape(out)
    off = len(os_) - len(xs)
    for j in range(len(os_)):
        if axes[j] is None and j >= off and xs[j - off] == 1 and os_[j] > 1 and j > off and an.ax(x)[j - off - 1] is not None:
            # repeat_kv: [B, kv_heads, 1 -> n_rep, S, D]; the copies axis and the kv heads before it.
            axes[j] = an.new_sym(os_[j], node, tags={"copies"})
            axes[j - 1].find().tags.add("kv_heads")
    an.set(out, axes)
    an.scale.equal(out, x, an.name(node))

    def required(plan, node=node, out=out, x=x):
        small = an.value(node.input[1])
        if small is None:
            return None
        wide = plan.wide_shape(out)
        off = len(wide) - len(small)
        return np.array([wide[off + i] if an.ax(out)[off + i] is not None and v != 1 else v for i, v in enumerate(small)], dtype=np.int64)

    an.shape_uses.append(ShapeUse(node, 1, required))


def _along(an, node, data, axis):
    if an.ax(data)[axis % len(an.shape(data))] is not None:
        an.fail(node, f"{node.op_type} along a widened axis needs a layout-aware pattern")


def _wide_offsets(plan, sym):
    """Wide start of every small cut of a part-structured dimension: {small offset: wide offset}."""
    out, s_off, w_off = {0: 0}, 0, 0
    root = sym.find()
    for p in (root.parts or [root]):
        s_off += p.find().size
        w_off += plan.layout(p).wide
        out[s_off] = w_off
    return out


def _piece(an, node, sym, start, stop, where):
    """The dimension of sym[start:stop], cutting sym into parts at the bounds."""
    n = sym.find().size
    cuts = sorted({c for c in (start, stop) if 0 < c < n})
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [n])]
    pieces = D.split_parts(sym, sizes, where)
    bounds = [0] + list(np.cumsum(sizes))
    chosen = [pc for pc, a in zip(pieces, bounds) if start <= a < stop]
    return chosen[0] if len(chosen) == 1 else D.concat(chosen, where)


def slice_(an, node):
    x, out = node.input[0], node.output[0]
    xs = an.shape(x)
    rank = len(xs)
    vals = [an.value(node.input[i]) if len(node.input) > i and node.input[i] else None for i in range(1, 5)]
    starts, ends, axes, steps = vals
    if starts is None or ends is None:
        an.fail(node, "slice bounds must be known from shapes and constants")
    axes = list(range(len(np.atleast_1d(starts)))) if axes is None else [int(a) % rank for a in np.atleast_1d(axes)]
    steps = [1] * len(axes) if steps is None else [int(s) for s in np.atleast_1d(steps)]
    xa = list(an.ax(x))
    width_slices = []
    for i, a in enumerate(axes):
        start, stop, step = slice(int(np.atleast_1d(starts)[i]), int(np.atleast_1d(ends)[i]), steps[i]).indices(xs[a])
        if xa[a] is None or (start, stop, step) == (0, xs[a], 1):
            continue
        if step != 1:
            # x[..., s::step] of an axis read as [n/step, step]: the units of one position of
            # the stride (interleaved RoPE pairs). The stride axis itself never widens.
            if step < 0 or start >= step or xs[a] % step or stop < xs[a] - (xs[a] - 1 - start) % step:
                an.fail(node, f"strided slice {start}:{stop}:{step} of a widened axis is not a whole stride position")
            units, stride = D.split(xa[a], [xs[a] // step, step], an.name(node))
            stride.find().tags.add("fixed")
            xa[a] = units
            continue
        xa[a] = _piece(an, node, xa[a], start, stop, an.name(node))
        width_slices.append((i, a, start, stop))
    an.set(out, xa)
    an.scale.equal(out, x, an.name(node))
    for operand, pick in ((1, 2), (2, 3)):
        def required(plan, operand=operand, pick=pick, node=node, x=x):
            vals = np.array(np.atleast_1d(an.value(node.input[operand])), dtype=np.int64).copy()
            for i, a, start, stop in width_slices:
                sym = an.ax(x)[a]
                off = _wide_offsets(plan, sym)
                small_n, wide_n = an.shape(x)[a], plan.layout(sym).wide
                v = int(vals[i])
                if v > small_n:  # "to the end" (INT64_MAX): unchanged
                    continue
                if v == small_n:  # the exact end moves with the axis
                    vals[i] = wide_n
                    continue
                pos = v + small_n if v < 0 else v
                if pos not in off:
                    an.fail(node, f"slice bound {v} does not fall on a unit boundary")
                vals[i] = off[pos] - wide_n if v < 0 else off[pos]
            return vals.reshape(np.shape(an.value(node.input[operand])))
        an.shape_uses.append(ShapeUse(node, operand, required))


def split(an, node):
    x = node.input[0]
    xs = an.shape(x)
    axis = attr(node, "axis", 0) % len(xs)
    xa = an.ax(x)
    sizes = [an.shape(o)[axis] for o in node.output]
    outs_axes = []
    if xa[axis] is not None:
        pieces = D.split_parts(xa[axis], sizes, an.name(node))
        outs_axes = [xa[:axis] + (p,) + xa[axis + 1:] for p in pieces]
        if len(node.input) > 1 and node.input[1]:
            def required(plan, pieces=pieces):
                return np.array([plan.layout(p).wide for p in pieces], dtype=np.int64)
            an.shape_uses.append(ShapeUse(node, 1, required))
    else:
        outs_axes = [xa] * len(node.output)
    for o, axes in zip(node.output, outs_axes):
        if o:
            an.set(o, axes)
            an.scale.equal(o, x, an.name(node))


def gather(an, node):
    x, idx, out = node.input[0], node.input[1], node.output[0]
    axis = attr(node, "axis", 0) % len(an.shape(x))
    _along(an, node, x, axis)
    xa = an.ax(x)
    an.set(out, xa[:axis] + (None,) * len(an.shape(idx)) + xa[axis + 1:])
    an.scale.equal(out, x, an.name(node))


def concat(an, node):
    out = node.output[0]
    axis = attr(node, "axis", 0) % len(an.shape(out))
    inputs = [n for n in node.input if n]
    along = [an.ax(n)[axis] if an.tracked(n) else None for n in inputs]
    others = broadcast_axes(an, node, inputs, skip_axis=axis)
    if any(a is not None for a in along):
        if not all(an.tracked(n) for n in inputs):
            an.fail(node, "concatenating a widened axis with an untracked tensor")
        parts = [a if a is not None else an.new_sym(an.shape(n)[axis], node, tags={"fixed"}) for a, n in zip(along, inputs)]
        others[axis] = D.concat(parts, an.name(node))
    an.set(out, others)
    for name in inputs:
        if an.tracked(name):
            an.scale.equal(out, name, an.name(node))
        else:
            an.scale.fix(out, an.name(node))


def tile(an, node):
    """Tile copies along axes; a size-1 axis tiled beside a width axis is repeat_interleave."""
    x, out = node.input[0], node.output[0]
    reps = an.value(node.input[1])
    if reps is None:
        an.fail(node, "repeats must be known from shapes and constants")
    xa, xs = an.ax(x), an.shape(x)
    axes = list(xa)
    for j, r in enumerate(np.atleast_1d(reps)):
        if r == 1:
            continue
        if xa[j] is not None:
            an.fail(node, "tiling a widened axis")
        if xs[j] == 1 and j > 0 and xa[j - 1] is not None:
            axes[j] = an.new_sym(int(r), node, tags={"copies"})
    an.set(out, axes)
    an.scale.equal(out, x, an.name(node))


def shape_of(an, node):
    """Shape/Size of a tracked tensor: an integer result, checked where it is consumed."""


PATTERNS = [
    OpPattern("layout", ("Transpose",), transpose),
    OpPattern("layout", ("Unsqueeze",), unsqueeze),
    OpPattern("layout", ("Squeeze",), squeeze),
    OpPattern("head split/merge", ("Reshape", "Flatten"), reshape),
    OpPattern("broadcast", ("Expand",), expand),
    OpPattern("slice", ("Slice",), slice_),
    OpPattern("split", ("Split",), split),
    OpPattern("gather", ("Gather",), gather),
    OpPattern("concat", ("Concat",), concat),
    OpPattern("shape", ("Shape", "Size"), shape_of),
    OpPattern("tile", ("Tile",), tile),
]
