"""Embedding tables: Gather(table[V, d], ids). The table's second axis is where width is born.

onnxruntime's EmbedLayerNormalization fuses the word, position and segment lookups, their sum
and the LayerNorm after it: the tables grow like a Gather's, gamma and beta like a LayerNorm's,
and the sum (output 2, or a tensor inside the op) is the norm's input, whose scale the tables
follow and epsilon's square follows."""
from onnx import TensorProto

from onnx_widen.analysis import Match
from onnx_widen.graph import attr
from onnx_widen.match import OpPattern, const_source, is_int, source_axes, width_scalar

from .layernorm import norm_params, norm_scales, record_norm


def _is_lookup(an, node):
    table, ids = node.input[0], node.input[1]
    return (
        an.graph.is_const(table)
        and an.info.dtypes.get(table) in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
        and len(an.shape(table)) == 2
        and attr(node, "axis", 0) == 0
        and is_int(an, ids)
        and not an.tracked(ids)
    )


def lookup(an, node):
    table, ids, out = node.input[0], node.input[1], node.output[0]
    vocab, dim = an.shape(table)
    sym = an.new_sym(dim, node, tags={"embed"})
    an.set(out, (None,) * len(an.shape(ids)) + (sym,))
    an.param(table, node, (None, sym), {out: 1.0}, role="embedding table")
    an.scale.prefer(out, an.name(node))
    an.matches.append(Match("embedding", [an.name(node)], {"table": table, "vocab": vocab, "dim": dim, "ids": ids, "lookup": out}))


# EmbedLayerNormalization inputs: ids, segment ids, word / position / segment tables, gamma, beta, mask, position ids.
_FUSED_TABLES = ((2, "embedding table"), (3, "position table"), (4, "segment table"))


def fused_lookup(an, node):
    ids, word, out = node.input[0], node.input[2], node.output[0]
    vocab, dim = an.shape(word)
    sym = an.new_sym(dim, node, tags={"embed"})
    axes = (None,) * len(an.shape(ids)) + (sym,)
    an.set(out, axes)
    total = node.output[2] if len(node.output) > 2 and node.output[2] else an.internal(node, "embedding sum", out)
    an.set(total, axes)
    for idx, role in _FUSED_TABLES:
        if len(node.input) <= idx or not node.input[idx]:
            continue
        src = const_source(an, node.input[idx])
        if src is None or len(an.shape(node.input[idx])) != 2:
            an.fail(node, f"{role} {node.input[idx]!r} must be a constant matrix")
        an.param(src[0], node, source_axes((None, sym), src[1]), {total: 1.0}, role=role)
    stat = record_norm(an, node, axes[-1:], "centred")
    norm_params(an, node, axes, ("gamma", "beta"), out, first=5, stat=stat)
    norm_scales(an, node, total, out, stat)
    an.matches.append(Match("embedding + layernorm (fused)", [an.name(node)], {
        "table": const_source(an, word)[0], "vocab": vocab, "dim": dim, "ids": ids, "lookup": total,
        "epsilon": attr(node, "epsilon", 1e-12)}))


PATTERNS = [
    OpPattern("embedding", ("Gather",), lookup, when=_is_lookup, seed=True),
    OpPattern("embedding + layernorm", ("EmbedLayerNormalization",), fused_lookup, seed=True, domain="com.microsoft"),
]


def lookup_of(an, table):
    """The tensor whose scale an embedding table follows (a lookup, or a fused embedding sum), if any."""
    for m in an.matches:
        if m.info.get("lookup") and m.info.get("table") == table:
            return m.info["lookup"]
    return None


def _normaliser(an):
    """Gemma-style `embeddings * sqrt(hidden)`: the constant takes the wide hidden size's value;
    the table and whatever reads the product compensate through the scale solution."""
    found = []
    for m in list(an.matches):
        if m.kind != "embedding":
            continue
        out = next(n.output[0] for n in an.graph.nodes if an.name(n) == m.nodes[0])
        sym = an.ax(out)[-1]
        for c in an.graph.consumers.get(out, []):
            if c.op_type in ("Mul", "Div"):
                hit = width_scalar(an, c, sym.find().size, (0.5,) if c.op_type == "Mul" else (-0.5,))
                if hit:
                    an.scale_consts.append({"node": c, "index": hit[0], "exponent": hit[1], "sym": sym, "role": "embedding normaliser"})
                    an.claims[an.name(c)] = "embedding normaliser"
                    found.append(Match("embedding normaliser", [an.name(c)], {"value": f"hidden**{hit[1]:+g}"}))
    return found


RECOGNIZERS = [_normaliser]
