"""Elementwise arithmetic and reductions on width paths.

Scale rules (log space, s = log of the tensor's scale):
  Add/Sub/Where/Max/Min  all tracked inputs and the output share s; a constant addend is a
                         bias: it takes the output's scale (b~ = c * R(b); eps takes var's scale)
  Mul by a width vector  gamma-like parameter: the output scale is free, gamma absorbs it
  Mul/Div by a scalar    s_out = s_in +- log(wide/small value of the scalar)
  Mul/Div of two tracked s_out = s_a +- s_b
  Pow p, Sqrt, Reciprocal s_out = p * s_in, s_in / 2, -s_in
  ReduceMean/Max/Min     over a repeated axis: unchanged; ReduceSum: + log(copies);
                         ReduceMean over zero units: + log(sum(copies)/wide)
"""
import numpy as np

from onnx_widen.analysis import ScalarUse
from onnx_widen.match import OpPattern, axes_arg, broadcast_axes, const_source, is_constlike, ratio, scalar_value, width_param_axes
from onnx_widen.scales import Term
from onnx_widen.graph import attr


def _tracked(an, node):
    return [n for n in node.input if n and an.tracked(n)]


def _param_or_scalar(an, node, idx, name, axes, log_factor, role):
    p_axes = width_param_axes(an, name, axes)
    if p_axes is not None:
        src = const_source(an, name)
        if src is None or src[1] is not None:
            an.fail(node, f"{role} {name!r} must be a plain constant")
        an.param(src[0], node, p_axes, log_factor, role=role)
        return True
    an.scalars.append(ScalarUse(name, node, log_factor, role))
    return False


def join(an, node):
    """Add, Sub, Where, Max, Min, onnxruntime's BiasAdd (x + bias + skip): every operand at the output's scale."""
    out = node.output[0]
    inputs = node.input[1:] if node.op_type == "Where" else node.input
    axes = broadcast_axes(an, node, inputs)
    an.set(out, axes)
    where = an.name(node)
    for i, name in enumerate(node.input):
        if not name or (node.op_type == "Where" and i == 0):
            continue
        if an.tracked(name):
            an.scale.equal(out, name, where)
        elif is_constlike(an, name):
            _param_or_scalar(an, node, i, name, axes, {out: 1.0}, "bias" if node.op_type in ("Add", "Sub", "BiasAdd") else "constant operand")
        else:
            an.scale.fix(out, where)  # an untracked activation (a mask) has scale 1


def mul(an, node):
    out = node.output[0]
    axes = broadcast_axes(an, node, node.input)
    an.set(out, axes)
    where = an.name(node)
    tracked = _tracked(an, node)
    if len(tracked) == 2:
        an.scale.relation({out: 1.0, node.input[0]: -1.0, node.input[1]: -1.0}, where)
        return
    x = tracked[0]
    idx = 1 if node.input[0] == x else 0
    other = node.input[idx]
    if is_constlike(an, other) or (an.value(other) is not None and np.size(an.value(other)) == 1):
        if is_constlike(an, other) and width_param_axes(an, other, axes) is not None:
            _param_or_scalar(an, node, idx, other, axes, {out: 1.0, x: -1.0}, "gain")
            an.scale.prefer(out, where)
        else:
            an.scale.equal(out, x, where, ratio(node, idx))
    else:
        an.scale.equal(out, x, where)


def div(an, node):
    a, b, out = node.input[0], node.input[1], node.output[0]
    axes = broadcast_axes(an, node, node.input)
    an.set(out, axes)
    where = an.name(node)
    if an.tracked(a) and an.tracked(b):
        an.scale.relation({out: 1.0, a: -1.0, b: 1.0}, where)
    elif an.tracked(a):
        if is_constlike(an, b) and width_param_axes(an, b, axes) is not None:
            an.fail(node, "division by a width-carrying constant")
        an.scale.equal(out, a, where, Term("ratio", (node, 1), -1.0))
    else:
        # c / x: the scale inverts, and the numerator's own change multiplies in.
        an.scale.relation({out: 1.0, b: 1.0}, where, ratio(node, 0))


def power(an, node):
    x, out = node.input[0], node.output[0]
    if an.tracked(node.input[1]):
        an.fail(node, "tracked exponent")
    p = scalar_value(an, node.input[1])
    if p is None:
        an.fail(node, "exponent must be a constant scalar")
    an.set(out, an.ax(x))
    an.scale.relation({out: 1.0, x: -p}, an.name(node))


def unary_power(p):
    def run(an, node):
        x, out = node.input[0], node.output[0]
        an.set(out, an.ax(x))
        an.scale.relation({out: 1.0, x: -p}, an.name(node))
    return run


def passthrough(an, node):
    x = node.input[0]
    an.set(node.output[0], an.ax(x))
    an.scale.equal(node.output[0], x, an.name(node))
    for extra in node.output[1:]:
        if extra and extra in an.info.shapes and an.graph.consumers.get(extra):
            an.fail(node, f"second output {extra!r} is not supported")


def reduce(an, node):
    x, out = node.input[0], node.output[0]
    rank = len(an.shape(x))
    axes = axes_arg(an, node)
    if axes is None:
        if attr(node, "noop_with_empty_axes", 0):
            return passthrough(an, node)
        axes = list(range(rank))
    axes = sorted(a % rank for a in axes)
    keep = attr(node, "keepdims", 1)
    xa = an.ax(x)
    out_axes = [None if i in axes else a for i, a in enumerate(xa)] if keep else [a for i, a in enumerate(xa) if i not in axes]
    an.set(out, out_axes)
    # A sum over c even copies is c times the sum; a mean over the wide axis is the small mean times
    # sum(copies)/wide (1 for a plain repeat, d/D with zero units).
    kind = {"ReduceSum": "copies", "ReduceMean": "mean"}.get(node.op_type)
    terms = [Term(kind, xa[i]) for i in axes if xa[i] is not None] if kind else []
    an.scale.equal(out, x, an.name(node), *terms)


def predicate(an, node):
    """Outputs are booleans whose truth does not depend on a positive scale: not tracked further."""


PATTERNS = [
    OpPattern("elementwise", ("Add", "Sub", "Where", "Max", "Min"), join),
    OpPattern("elementwise", ("BiasAdd",), join, domain="com.microsoft"),
    OpPattern("elementwise", ("Mul",), mul),
    OpPattern("elementwise", ("Div",), div),
    OpPattern("elementwise", ("Pow",), power),
    OpPattern("elementwise", ("Sqrt",), unary_power(0.5)),
    OpPattern("elementwise", ("Reciprocal",), unary_power(-1.0)),
    OpPattern("passthrough", ("Identity", "Cast", "Dropout", "CastLike"), passthrough),
    OpPattern("reduction", ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"), reduce),
    OpPattern("predicate", ("IsNaN", "IsInf", "Sign"), predicate),
]
