"""LayerNorm, as the LayerNormalization op and as its decomposition.

The op: mean and variance of R(x) equal those of x, so gamma and beta repeat and epsilon stays;
if the input arrives at scale a, epsilon takes a**2 (the orthogonal scheme's eps/k). The
decomposed chain (ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul gamma, Add beta)
needs no rule of its own: the elementwise patterns give eps the scale of the variance and gamma
the free output scale. It is recognised here only so that `inspect` can name it.
"""
from onnx_widen.analysis import AttrUse, Match
from onnx_widen.graph import attr
from onnx_widen.match import OpPattern, broadcast_axes, const_source, width_param_axes
from onnx_widen.recognize import chain_from
from onnx_widen.scales import Term


# Keeping a norm's input at the residual scale keeps its epsilon canonical: weigh it heavily.
NORM_INPUT_WEIGHT = 1e3


def norm_op(an, node, params=("gamma", "beta"), kind="layernorm"):
    x, out = node.input[0], node.output[0]
    rank = len(an.shape(x))
    axis = attr(node, "axis", -1) % rank
    xa = an.ax(x)
    stat = record_norm(an, node, xa[axis:], "centred" if kind == "layernorm" else "rms")
    an.set(out, xa)
    for idx, role in enumerate(params, start=1):
        if len(node.input) > idx and node.input[idx]:
            name = node.input[idx]
            axes = width_param_axes(an, name, xa)
            src = const_source(an, name)
            if axes is None:
                continue
            if src is None or src[1] is not None:
                an.fail(node, f"{role} must be a constant")
            an.param(src[0], node, axes, {out: 1.0}, role=role, terms=gain_terms(stat) if role == "gamma" else ())
    if any(o for o in node.output[1:]):
        an.fail(node, "mean / inverse-std outputs are not supported")
    an.attrs.append(AttrUse(node, "epsilon", {x: 2.0}, stat))
    an.scale.prefer(out, an.name(node))
    an.scale.prefer(x, an.name(node), weight=NORM_INPUT_WEIGHT, tier=1)
    an.matches.append(Match(kind, [an.name(node)], {"epsilon": attr(node, "epsilon", 1e-5), "dim": an.shape(x)[-1]}))


def record_norm(an, node, axes, kind):
    """Statistics over widened axes change by rho = sum(copies)/wide (1 for an even repeat; d/D
    with zero or mean units): epsilon takes rho, gamma sqrt(rho). Returns epsilon's terms."""
    stat = []
    for a in axes:
        if a is not None:
            an.norms.append((a, node, kind))
            stat.append(Term("stat", a))
    return tuple(stat)


def gain_terms(stat):
    return tuple(Term(t.kind, t.value, 0.5) for t in stat)


def layer_norm(an, node):
    norm_op(an, node)


def skip_norm(an, node):
    """onnxruntime's SkipLayerNormalization / SkipSimplifiedLayerNormalization:
    s = input + skip (+ bias), out = norm(s) * gamma (+ beta); output 3, if present, is s."""
    x, skip, out = node.input[0], node.input[1], node.output[0]
    xa = broadcast_axes(an, node, [x, skip])
    where = an.name(node)
    for name in (x, skip):
        if an.tracked(name):
            an.scale.equal(x, name, where)
    roles = ("gamma", "beta", "bias") if node.op_type == "SkipLayerNormalization" else ("gamma", "bias")
    stat = record_norm(an, node, xa[-1:], "centred" if roles[1] == "beta" else "rms")
    for idx, role in enumerate(roles, start=2):
        if len(node.input) > idx and node.input[idx]:
            axes = width_param_axes(an, node.input[idx], xa)
            src = const_source(an, node.input[idx])
            if axes is None or src is None or src[1] is not None:
                an.fail(node, f"{role} must be a constant along the normalised axis")
            an.param(src[0], node, axes, {out: 1.0} if role != "bias" else {x: 1.0}, role=role,
                     terms=gain_terms(stat) if role == "gamma" else ())
    if any(len(node.output) > i and node.output[i] and an.graph.consumers.get(node.output[i]) for i in (1, 2)):
        an.fail(node, "mean / inverse-std outputs are not supported")
    an.set(out, xa)
    if len(node.output) > 3 and node.output[3]:
        an.set(node.output[3], xa)
        an.scale.equal(node.output[3], x, where)
    an.attrs.append(AttrUse(node, "epsilon", {x: 2.0}, stat))
    an.scale.prefer(out, where)
    an.scale.prefer(x, where, weight=NORM_INPUT_WEIGHT, tier=1)
    an.matches.append(Match("layernorm (skip, fused)" if roles[1] == "beta" else "rmsnorm (skip, fused)", [where],
                            {"epsilon": attr(node, "epsilon", 1e-5), "dim": an.shape(x)[-1]}))


PATTERNS = [
    OpPattern("layernorm", ("LayerNormalization",), layer_norm),
    OpPattern("skip layernorm", ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"), skip_norm, domain="com.microsoft"),
]

def hold_input(an, nodes, kind="centred"):
    """A decomposed norm's input, like the op's, is held at the residual scale (canonical eps).
    Its epsilon and gamma follow the elementwise rules (ReduceMean's statistic ratio included);
    the norm is recorded so that the plan lays its axis out for its kind."""
    x = nodes[-1].input[0]
    an.scale.prefer(x, an.name(nodes[0]), weight=NORM_INPUT_WEIGHT, tier=1)
    if an.tracked(x):
        record_norm(an, nodes[0], an.ax(x)[-1:], kind)


def hold_rms_input(an, nodes):
    hold_input(an, nodes, "rms")


# ReduceMean -> Sub -> Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(gamma) -> Add(beta), read backwards from Div.
RECOGNIZERS = [
    chain_from("layernorm (decomposed)", "Div", [("Sqrt", 1), ("Add", None), ("ReduceMean", None), ("Pow", 0), ("Sub", 0)],
               on_match=hold_input),
]
