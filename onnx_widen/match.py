"""The small vocabulary patterns are written in: a declared pattern, and helpers that read
the graph the way every pattern needs (broadcast alignment, constant sources, scalars)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .graph import attr
from .scales import Term

# Ops a constant may pass through between its initializer and its use (folded by some exporters, not by others).
CONST_PASSTHROUGH = ("Transpose", "Identity", "Cast")


@dataclass(frozen=True)
class OpPattern:
    """`apply(an, node)` records what one node means for widening when `when(an, node)` holds.

    `seed` patterns may fire on nodes with no tracked input (they create width, e.g. embeddings).
    """

    name: str
    ops: tuple
    apply: Callable
    when: Callable = lambda an, node: True
    seed: bool = False
    domain: str = ""


class Registry:
    def __init__(self, patterns):
        self.by_op: dict[tuple, list] = {}
        for p in patterns:
            for op in p.ops:
                self.by_op.setdefault((p.domain, op), []).append(p)

    def handler_for(self, node, an, tracked: bool):
        domain = "" if node.domain == "ai.onnx" else node.domain
        for p in self.by_op.get((domain, node.op_type), []):
            if (tracked or p.seed) and p.when(an, node):
                def run(an, node, p=p):
                    an.claim(node, p.name)
                    p.apply(an, node)
                return run
        return None


def const_source(an, name):
    """(initializer-or-Constant name, perm) if `name` is a constant seen through Transpose/Identity/Cast."""
    perm = None
    g = an.graph
    while not g.is_const(name):
        p = g.producer.get(name)
        if p is None or p.op_type not in CONST_PASSTHROUGH:
            return None
        if p.op_type == "Transpose":
            rank = len(an.shape(p.input[0]))
            pp = attr(p, "perm", list(range(rank))[::-1])
            perm = list(pp) if perm is None else [pp[i] for i in perm]
        name = p.input[0]
    return name, perm


def source_axes(axes, perm):
    """Axes of the constant itself, given the axes of its transposed view."""
    if perm is None:
        return tuple(axes)
    out = [None] * len(axes)
    for view_axis, src_axis in enumerate(perm):
        out[src_axis] = axes[view_axis]
    return tuple(out)


def source_read_axes(read_axes, perm):
    return frozenset(perm[a] if perm is not None else a for a in read_axes)


def aligned(an, name, out_rank):
    """Output axis for each axis of an input under numpy broadcasting."""
    r = len(an.shape(name))
    return [out_rank - r + j for j in range(r)]


def broadcast_axes(an, node, inputs, skip_axis=None):
    """Unify the width axes of tracked inputs under broadcasting; returns the output axes.

    An untracked activation (neither tracked nor constant) spread along a width axis would be
    combined with widened data without being widened itself: the plan refuses that unless the
    axis keeps its size (a mask over heads), never guessed."""
    out = node.output[0]
    oshape = an.shape(out)
    axes = [None] * len(oshape)
    for name in inputs:
        if not name or not an.tracked(name):
            continue
        for j, oj in enumerate(aligned(an, name, len(oshape))):
            a = an.ax(name)[j]
            if a is not None and oj != skip_axis:
                axes[oj] = an.unify(axes[oj], a, node)
    for name in inputs:
        if not name or an.tracked(name) or const_source(an, name) is not None:
            continue
        if adopt_graph_input(an, node, name, axes):
            continue
        shape = an.shape(name)
        for j, oj in enumerate(aligned(an, name, len(oshape))):
            if axes[oj] is not None and shape[j] != 1 and oj != skip_axis:
                fills = constant_sources(an, name, j - len(shape), axes[oj])
                if fills:
                    grow_fills(an, fills, axes[oj])
                    continue
                # Fine for an axis that keeps its size (heads, batch); the plan checks which it is.
                an.identity_required.append((axes[oj], node, name))
    return axes


# Ops whose output is the same along an axis when every input is (or has size 1 there).
ELEMENTWISE = {"Where", "Add", "Sub", "Mul", "Div", "Max", "Min", "Cast", "Identity", "Neg", "Equal", "Less", "Greater",
               "And", "Or", "Not"}


def constant_sources(an, name, axis: int, sym, depth: int = 0):
    """[(node, constant or None, axis)] when `name` is made, by elementwise ops, from constants
    and data of size 1 along `axis` (counted from the end): ConstantOfShape fills (the same all
    along it) and constants that are the same along it, or, on a heads axis, constants per head
    (T5's relative position bias, folded by the dynamo export): a new head copies its source head
    whole, its bias too. Growing those sources along the axis widens `name` exactly; else None."""
    node = an.graph.producer.get(name)
    shape = an.shape(name)
    if node is None or depth > 12 or len(shape) < -axis:
        return None
    if node.op_type == "ConstantOfShape":
        return [(node, None, len(shape) + axis)]
    if node.op_type not in ELEMENTWISE:
        return None
    per_head = "heads" in sym.find().tags
    fills = []
    for i in node.input:
        if not i:
            continue
        s = an.shape(i)
        if len(s) < -axis or s[axis] == 1:
            continue
        if an.graph.is_const(i):
            if an.graph.const_size(i) > UNIFORM_CONST_MAX:
                return None
            v = np.asarray(an.graph.const(i))
            if not per_head and not np.array_equal(v, np.broadcast_to(np.take(v, [0], axis=axis), v.shape)):
                return None
            fills.append((node, i, len(s) + axis))
            continue
        sub = constant_sources(an, i, axis, sym, depth + 1)
        if sub is None:
            return None
        fills += sub
    return fills or None


UNIFORM_CONST_MAX = 1 << 22  # elements: a bias per head and position pair is far smaller


def grow_fills(an, fills, sym):
    """A ConstantOfShape's shape operand takes the wide size of `sym` on the fill's axis (entries
    rewritten by role through the shape subgraph, like a Reshape's); a constant takes the axis's
    layout (a parameter of factor 1: what it is added to keeps unit scale, like attention scores)."""
    from .analysis import ShapeUse

    grown = an.grown_fills
    for node, const, axis in fills:
        if const is not None:
            axes = [None] * len(an.shape(const))
            axes[axis] = sym
            an.param(const, node, axes, {}, role="uniform fill")
            continue
        if id(node) not in grown:
            grown[id(node)] = {}

            def required(plan, node=node, axes=grown[id(node)]):
                small = an.value(node.input[0])
                if small is None:
                    return None
                return np.array([plan.layout(axes[i]).wide if i in axes else v for i, v in enumerate(small)], dtype=np.int64)

            an.shape_uses.append(ShapeUse(node, 0, required))
        grown[id(node)][axis] = sym


def adopt_graph_input(an, node, name, out_axes):
    """A float graph input combined with widened data (a KV cache) carries width itself: it takes
    the widened axes it lines up with, and its mapping is recorded for callers. Single-input
    pass-throughs between the input and here (Identity, Cast, a one-input Concat) follow it."""
    from onnx import TensorProto

    if an.info.dtypes.get(name) not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE):
        return False
    shape = an.shape(name)
    axes = [out_axes[oj] if shape[j] != 1 else None for j, oj in enumerate(aligned(an, name, len(out_axes)))]
    if not any(a is not None for a in axes):
        return False
    chain = [name]
    while chain[-1] not in {i.name for i in an.graph.inputs}:
        p = an.graph.producer.get(chain[-1])
        if p is None or p.op_type not in ("Identity", "Cast", "Concat") or len([i for i in p.input if i]) != 1:
            return False
        chain.append(p.input[0])
    for t in chain:
        for c in an.graph.consumers.get(t, []):
            if c is node or (c.output and c.output[0] in chain):
                continue
            if c.op_type not in ("Shape", "Size") and an.graph.pos[id(c)] < an.graph.pos[id(node)]:
                an.fail(node, f"graph input {chain[-1]!r} carries width here but was used earlier as plain data by {an.name(c)!r}")
    for t in reversed(chain):
        an.set(t, axes)
    for a, b in zip(chain, chain[1:]):
        an.scale.equal(a, b, an.name(node))
    return True


def width_param_axes(an, name, out_axes):
    """Axes of a constant broadcast against `out_axes`, or None when it touches no width axis."""
    shape = an.shape(name)
    if len(shape) > len(out_axes):
        from .errors import WidenError

        raise WidenError(f"constant {name!r} has more axes ({len(shape)}) than the tensor it combines with ({len(out_axes)})")
    offs = aligned(an, name, len(out_axes))
    axes = tuple(out_axes[o] if shape[j] != 1 else None for j, o in enumerate(offs))
    return axes if any(a is not None for a in axes) else None


def is_int(an, name):
    from onnx import TensorProto

    return an.info.dtypes.get(name) in (TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL)


def scalar_value(an, name):
    v = an.value(name)
    if v is None or np.size(v) != 1:
        return None
    return float(np.asarray(v).reshape(()))


def ratio(node, index) -> Term:
    return Term("ratio", (node, index))


def axes_arg(an, node, input_index=1, attr_name="axes"):
    """Axes given as an attribute (old opsets) or as a constant input (newer ones)."""
    a = attr(node, attr_name)
    if a is not None:
        return list(a)
    if len(node.input) > input_index and node.input[input_index]:
        v = an.value(node.input[input_index])
        if v is None:
            an.fail(node, f"{attr_name} must be constant")
        return [int(x) for x in np.atleast_1d(v)]
    return None


def is_constlike(an, name):
    """A constant, possibly behind Identity/Transpose/Cast (TorchScript shares deduplicated weights through Identity)."""
    return bool(name) and not an.tracked(name) and const_source(an, name) is not None


def width_scalar(an, node, n: int, exponents, rel_tol=1e-4):
    """(input index, exponent) of a scalar constant operand equal to n**p (n a width's size), else None.

    Used only where a pattern already knows the constant's place in the graph (softmax scale,
    embedding normaliser, tied-head rescale): the value confirms the role, it never assigns it."""
    import math

    for idx in (1, 0) if node.op_type == "Mul" else (1,):
        name = node.input[idx]
        if an.tracked(name) or not is_constlike(an, name):
            continue
        v = scalar_value(an, name)
        if v is None or v <= 0:
            continue
        for p in exponents:
            if math.isclose(v, n ** p, rel_tol=rel_tol):
                return idx, p
    return None
