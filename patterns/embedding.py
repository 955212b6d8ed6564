"""Embedding tables: Gather(table[V, d], ids). The table's second axis is where width is born."""
from onnx import TensorProto

from onnx_widen.analysis import Match
from onnx_widen.graph import attr
from onnx_widen.match import OpPattern, is_int


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
