"""Linear layers: MatMul(x, W) [+ bias, matched as an Add] and Gemm(x, W, C), the weight
possibly behind a Transpose, Identity or Cast; onnxruntime's FusedMatMul (alpha * x @ op(W)) and
FusedGemm (a Gemm with its activation). A weight that is also an embedding table is a tied output
head: its output axis is the vocabulary, and WIDENING.md's tied-head factor applies.
"""
from onnx_widen.analysis import Match
from onnx_widen.graph import attr
from onnx_widen.match import OpPattern, const_source, source_axes, source_read_axes, width_param_axes, width_scalar
from onnx_widen.scales import Term

from .activation import activate
from .attention import alpha_ratio, folded_alpha
from .embedding import lookup_of

GEMMS = ("Gemm", "FusedGemm", "FusedMatMul")  # ops with transA / transB attributes


def _weight(an, node):
    if len(node.input) < 2 or not an.tracked(node.input[0]) or an.tracked(node.input[1]):
        return None
    src = const_source(an, node.input[1])
    if src is None or len(an.shape(node.input[1])) != 2:
        return None
    if node.op_type in GEMMS and (attr(node, "transA", 0) or attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0)):
        return None
    return src


def _tied_lookup(an, table, view_name=None):
    """The tensor whose scale an embedding table reading the same constant follows, if any.
    TorchScript exports a tied head as its own transposed copy of the table: a weight equal to a
    table's transpose is tied too."""
    direct = lookup_of(an, table)
    if direct is not None or view_name is None:
        return direct
    import numpy as np

    view = None
    for m in an.matches:
        t = m.info.get("table")
        if not m.info.get("lookup") or t == table:
            continue
        if an.graph.const_shape(t)[::-1] != an.shape(view_name):
            continue
        if view is None:
            src, perm = const_source(an, view_name)
            view = an.graph.const(src) if perm is None else np.transpose(an.graph.const(src), perm)
        if np.array_equal(view, an.graph.const(t).T):
            return m.info["lookup"]
    return None


def linear(an, node, out=None):
    """`out`: the product's tensor when it is not the node's output (FusedGemm's pre-activation)."""
    x, w, out = node.input[0], node.input[1], out or node.output[0]
    src, perm = _weight(an, node)
    trans_b = node.op_type in GEMMS and attr(node, "transB", 0)
    view = an.shape(w)
    d_in, d_out = (view[1], view[0]) if trans_b else view
    in_sym = an.ax(x)[-1]
    tied = _tied_lookup(an, src) if (perm is not None or trans_b) else _tied_lookup(an, src, w)
    where = an.name(node)
    if tied is not None:
        out_sym = None  # the table's first axis: vocabulary, never widened
    else:
        out_sym = an.new_sym(d_out, node, tags={"linear_out"})
        an.born.append((out_sym, node.output[0]))
    an.set(out, an.ax(x)[:-1] + (out_sym,))
    an.linears.append((in_sym, out_sym))
    view_axes, read = ((out_sym, in_sym), {1}) if trans_b else ((in_sym, out_sym), {0})
    alpha = alpha_ratio(node)
    # out = alpha x W: a rewritten alpha (see below) is compensated in the weight.
    an.param(src, node, source_axes(view_axes, perm), {out: 1.0, x: -1.0},
             read_axes=source_read_axes(read if in_sym is not None else set(), perm), role="weight",
             const=Term("attr_ratio", (node, "alpha"), -1.0) if alpha else 0.0)
    if node.op_type in ("Gemm", "FusedGemm") and len(node.input) > 2 and node.input[2]:
        bias_axes = width_param_axes(an, node.input[2], an.ax(out))
        if bias_axes is not None:
            an.param(node.input[2], node, bias_axes, {out: 1.0}, role="bias")
    if tied is not None:
        # Same tensor as the table: exp(s_out - s_x) / (alpha ratio * copies) == exp(s_lookup)  (WIDENING.md, tied head)
        an.scale.relation({out: 1.0, x: -1.0, tied: -1.0}, where, Term("copies", in_sym), *alpha)
        _folded_rescale(an, node, in_sym)
    else:
        an.scale.prefer(out, where)
    an.matches.append(Match("linear", [where], {"weight": src, "in": d_in, "out": d_out, "op": node.op_type, "tied": tied is not None}))


def _folded_rescale(an, node, in_sym):
    """T5's `hidden * d_model**-0.5` before a tied head, folded by onnxruntime into FusedMatMul's
    alpha: it takes the wide d_model's value, as the unfolded Mul does (_tied_head_rescale)."""
    p = in_sym is not None and folded_alpha(node, in_sym.find().size, (-0.5,))
    if p:
        an.scale_consts.append({"node": node, "attr": "alpha", "exponent": p, "sym": in_sym, "role": "tied head rescale"})
        an.matches.append(Match("tied head rescale", [an.name(node)], {"value": f"alpha=d_model**{p:+g}"}))


def fused_gemm(an, node):
    """FusedGemm: activation(Gemm(x, W, C)); the Gemm's result exists only inside the op."""
    pre = an.internal(node, "pre-activation", node.output[0])
    linear(an, node, pre)
    activate(an, node, attr(node, "activation", b"").decode(), pre, node.output[0])


def _is_input_projection(an, node):
    """A linear layer reading a float graph input directly: a hidden state handed over from another
    file (an encoder's output in a separately exported decoder)."""
    from onnx import TensorProto

    x = node.input[0]
    if an.tracked(x) or x not in {i.name for i in an.graph.inputs}:
        return False
    if an.info.dtypes.get(x) not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE):
        return False
    src = const_source(an, node.input[1]) if len(node.input) > 1 and not an.tracked(node.input[1]) else None
    return src is not None and len(an.shape(node.input[1])) == 2


def input_projection(an, node):
    x = node.input[0]
    an.set(x, (None,) * (len(an.shape(x)) - 1) + (an.new_sym(an.shape(x)[-1], node, tags={"embed"}),))
    linear(an, node)


PATTERNS = [
    OpPattern("linear", ("MatMul", "Gemm"), linear, when=lambda an, n: _weight(an, n) is not None),
    OpPattern("linear", ("FusedMatMul",), linear, when=lambda an, n: _weight(an, n) is not None, domain="com.microsoft"),
    OpPattern("linear + activation", ("FusedGemm",), fused_gemm, when=lambda an, n: _weight(an, n) is not None, domain="com.microsoft"),
    OpPattern("linear", ("MatMul", "Gemm"), input_projection, when=_is_input_projection, seed=True),
]


_THROUGH = ("Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze")


def _tied_head_rescale(an):
    """T5's `hidden * d_model**-0.5` before a tied output head takes the wide d_model's value."""
    found = []
    for m in an.matches:
        if m.kind != "linear" or not m.info.get("tied"):
            continue
        node = next(n for n in an.graph.nodes if an.name(n) == m.nodes[0])
        name = node.input[0]
        while True:
            p = an.graph.producer.get(name)
            if p is None:
                break
            if p.op_type in ("Mul", "Div"):
                sym = an.ax(p.output[0])[-1]
                hit = sym is not None and width_scalar(an, p, sym.find().size, (-0.5,) if p.op_type == "Mul" else (0.5,))
                if hit:
                    an.scale_consts.append({"node": p, "index": hit[0], "exponent": hit[1], "sym": sym, "role": "tied head rescale"})
                    an.claims[an.name(p)] = "tied head rescale"
                    found.append(Match("tied head rescale", [an.name(p)], {"value": f"d_model**{hit[1]:+g}"}))
                break
            if p.op_type not in _THROUGH:
                break
            name = p.input[0]
    return found


RECOGNIZERS = [_tied_head_rescale]
