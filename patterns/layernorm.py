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


def norm_params(an, node, xa, roles, out, first=1, x=None, stat=()):
    """Constant per-unit parameters at node.input[first:] (gamma, beta, a bias): gamma and beta
    absorb the output's scale (gamma also the statistic's change, `stat`), a bias added before
    the norm takes the input's (`x`)."""
    for idx, role in enumerate(roles, start=first):
        if len(node.input) <= idx or not node.input[idx]:
            continue
        name = node.input[idx]
        axes = width_param_axes(an, name, xa)
        if axes is None:
            continue
        src = const_source(an, name)
        if src is None or src[1] is not None:
            an.fail(node, f"{role} must be a constant")
        an.param(src[0], node, axes, {x: 1.0} if role == "bias" else {out: 1.0}, role=role,
                 terms=gain_terms(stat) if role == "gamma" else ())


def norm_scales(an, node, x, out, stat):
    """What every norm says about scales: epsilon follows the square of the input's scale and the
    statistic's change (`stat`, from record_norm), and the input is held at the residual scale
    (canonical eps)."""
    an.attrs.append(AttrUse(node, "epsilon", {x: 2.0}, stat))
    an.scale.prefer(out, an.name(node))
    an.scale.prefer(x, an.name(node), weight=NORM_INPUT_WEIGHT, tier=1)


def norm_op(an, node, params=("gamma", "beta"), kind="layernorm"):
    x, out = node.input[0], node.output[0]
    rank = len(an.shape(x))
    axis = attr(node, "axis", -1) % rank
    xa = an.ax(x)
    stat = record_norm(an, node, xa[axis:], "centred" if kind == "layernorm" else "rms")
    an.set(out, xa)
    norm_params(an, node, xa, params, out, stat=stat)
    if any(o for o in node.output[1:]):
        an.fail(node, "mean / inverse-std outputs are not supported")
    norm_scales(an, node, x, out, stat)
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
    norm_params(an, node, xa, roles, out, first=2, x=x, stat=stat)
    if any(len(node.output) > i and node.output[i] and an.graph.consumers.get(node.output[i]) for i in (1, 2)):
        an.fail(node, "mean / inverse-std outputs are not supported")
    an.set(out, xa)
    if len(node.output) > 3 and node.output[3]:
        an.set(node.output[3], xa)
        an.scale.equal(node.output[3], x, where)
    norm_scales(an, node, x, out, stat)
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
