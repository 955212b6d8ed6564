"""Embedding tables: Gather(table[V, d], ids). The table's second axis is where width is born."""
from onnx import TensorProto

from onnx_widen.analysis import Match
from onnx_widen.graph import attr
from onnx_widen.match import OpPattern, is_int, width_scalar


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
    an.matches.append(Match("embedding", [an.name(node)], {"table": table, "vocab": vocab, "dim": dim, "ids": ids}))


PATTERNS = [OpPattern("embedding", ("Gather",), lookup, when=_is_lookup, seed=True)]


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
