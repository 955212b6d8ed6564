"""Attention core: scores = (q * s_q) @ (k^T * s_k) [* s | / s] [+ mask] -> Softmax -> @ v.

The product of two tracked tensors sums over the head size, so its scale gains the copies of
that axis; the softmax pins the scores back to scale 1, and the least-squares split puts
k**-0.25 on each of q and k (WIDENING.md, Attention). A scalar on the score path that equals
head_size**p (p in +-1/2, +-1/4) is the softmax scale: it takes the wide head size's value.
Scales computed at run time from Shape(q) need nothing here: the wide graph computes them.
"""
from onnx_widen import dims as D
from onnx_widen.analysis import Match
from onnx_widen.graph import attr
from onnx_widen.match import OpPattern, width_scalar
from onnx_widen.scales import Term

# Ops that carry q or k between the projection and the score product without changing values' meaning.
_LAYOUT = ("Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze")
_EXPONENTS = {"Mul": (-0.5, -0.25), "Div": (0.5, 0.25)}


def _both_tracked(an, node):
    return an.tracked(node.input[0]) and an.tracked(node.input[1])


def operand_axes(an, node, i):
    """Axes of a product's operand as the product reads them: FusedMatMul may transpose the last two."""
    axes = an.ax(node.input[i])
    if node.op_type in ("FusedMatMul", "FusedGemm", "Gemm"):
        if attr(node, ("transBatchA", "transBatchB")[i], 0):
            an.fail(node, "batch transposes (transBatchA / transBatchB) are not supported")
        if len(axes) >= 2 and attr(node, ("transA", "transB")[i], 0):
            axes = axes[:-2] + (axes[-1], axes[-2])
    return axes


def alpha_ratio(node):
    """FusedMatMul computes alpha * A @ B; the plan may give alpha its canonical wide value."""
    return [Term("attr_ratio", (node, "alpha"))] if node.op_type == "FusedMatMul" else []


def product(an, node):
    a, b, out = node.input[0], node.input[1], node.output[0]
    if len(an.ax(a)) < 2 or len(an.ax(b)) < 2:
        an.fail(node, "matrix product of rank < 2 tracked tensors")
    ra, rb = operand_axes(an, node, 0), operand_axes(an, node, 1)
    contracted = an.unify(ra[-1], rb[-2], node)
    batch = broadcast_axes_for(an, node, ra[:-2], rb[:-2])
    for s in batch:
        if s is not None:
            D.tag_all(s, "heads")
    an.set(out, tuple(batch) + (ra[-2], rb[-1]))
    if contracted is not None:
        D.tag_all(contracted, "head_dim")
        if any("rotary" in leaf.tags for leaf in D.leaves(contracted)):
            # Partial rotary: the pass-through units spread like the rotary ones, so that every
            # unit of the head appears once and q.k needs one factor (sqrt k) for the whole head.
            D.tag_all(contracted, "spread")
    elif rb[-1] is not None:
        D.tag_all(rb[-1], "head_dim")  # probs @ v: v's head size
    terms = ([Term("copies", contracted)] if contracted is not None else []) + alpha_ratio(node)
    an.scale.relation({out: 1.0, a: -1.0, b: -1.0}, an.name(node), *terms)
    if contracted is not None:
        _find_scale_constants(an, node, contracted)


def broadcast_axes_for(an, node, xa, xb):
    n = max(len(xa), len(xb))
    xa = (None,) * (n - len(xa)) + tuple(xa)
    xb = (None,) * (n - len(xb)) + tuple(xb)
    return [an.unify(p, q, node) for p, q in zip(xa, xb)]


def _find_scale_constants(an, node, head_sym):
    """Record scalar Mul/Div constants on the q side, the k side and after the product."""
    dh = head_sym.find().size
    found = []
    for side in (node.input[0], node.input[1]):
        found += _walk_back(an, side, dh, quarter=True)
    after = _single_consumer(an, node.output[0])
    if after is not None and after.op_type in _EXPONENTS:
        found += _scalar_of(an, after, dh, (_EXPONENTS[after.op_type][0],))
    forms = []
    for n, idx, p in found:
        an.scale_consts.append({"node": n, "index": idx, "exponent": p, "sym": head_sym, "role": "softmax scale"})
        forms.append(f"{n.op_type}(head_size**{p:+g})")
    p = folded_alpha(node, dh, (-0.5, -0.25))
    if p is not None:
        an.scale_consts.append({"node": node, "attr": "alpha", "exponent": p, "sym": head_sym, "role": "softmax scale"})
        forms.append(f"alpha=head_size**{p:+g}")
    heads = [s.find().size for s in an.ax(node.output[0])[:-2] if s is not None]
    an.matches.append(Match("attention", [an.name(node)], {
        "head_size": dh, "heads": heads[-1] if heads else None,
        "scale": " and ".join(forms) if forms else "none or computed at run time",
    }))


def _walk_back(an, name, dh, quarter):
    out = []
    while True:
        p = an.graph.producer.get(name)
        if p is None:
            return out
        if p.op_type in _EXPONENTS:
            out += _scalar_of(an, p, dh, (_EXPONENTS[p.op_type][1],) if quarter else (_EXPONENTS[p.op_type][0],))
            name = p.input[0] if an.tracked(p.input[0]) else p.input[1]
        elif p.op_type in _LAYOUT:
            name = p.input[0]
        else:
            return out


def folded_alpha(node, n, exponents):
    """The exponent p with FusedMatMul's alpha == n**p, onnxruntime having folded a scale Mul/Div
    into the product (MatMulScaleFusion), else None."""
    import math

    if node.op_type != "FusedMatMul":
        return None
    alpha = attr(node, "alpha", 1.0)
    return next((p for p in exponents if math.isclose(alpha, n ** p, rel_tol=1e-4)), None)


def _scalar_of(an, node, dh, exponents):
    hit = width_scalar(an, node, dh, exponents)
    return [(node, *hit)] if hit else []


def _single_consumer(an, name):
    cs = an.graph.consumers.get(name, [])
    return cs[0] if len(cs) == 1 else None


def softmax(an, node):
    x, out = node.input[0], node.output[0]
    axis = attr(node, "axis", -1) % len(an.shape(x))
    if an.ax(x)[axis] is not None:
        an.fail(node, "softmax over a widened axis changes its result")
    an.set(out, an.ax(x))
    an.scale.fix(x, an.name(node))
    an.scale.fix(out, an.name(node))


PATTERNS = [
    OpPattern("attention product", ("MatMul",), product, when=_both_tracked),
    OpPattern("attention product", ("FusedMatMul",), product, when=_both_tracked, domain="com.microsoft"),
    OpPattern("softmax", ("Softmax", "LogSoftmax"), softmax),
]
