"""Output shapes of onnxruntime's contrib ops (and a few standard ops older onnx releases do not
infer), which onnx's shape inference leaves unknown. One rule per op: given the node and the
shapes/dtypes known so far, the (output index, shape, dtype) it can tell."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graph import attr


def _like_input(*outputs):
    """Outputs shaped and typed like the first input (norms, activations, the residual sum)."""
    def rule(node, shapes, dtypes):
        x = node.input[0]
        return [(i, shapes[x], dtypes.get(x, TensorProto.FLOAT)) for i in outputs] if x in shapes else []
    return rule


def _embed_layer_norm(node, shapes, dtypes):
    """EmbedLayerNormalization: [B, S] ids -> [B, S, H] (output 0 and the embedding sum, output 2);
    output 1, the mask index, is one int32 per sequence."""
    ids, table = node.input[0], node.input[2]
    if ids not in shapes or table not in shapes:
        return []
    out = tuple(shapes[ids]) + (shapes[table][-1],)
    dt = dtypes.get(table, TensorProto.FLOAT)
    return [(0, out, dt), (1, (shapes[ids][0],), TensorProto.INT32), (2, out, dt)]


def _fused_matmul(node, shapes, dtypes):
    """FusedMatMul: alpha * op(A) @ op(B) with op a transpose of the last two axes. The batch
    transposes (transBatchA/B) are left unknown: no pattern accepts them."""
    a, b = node.input[0], node.input[1]
    if a not in shapes or b not in shapes or attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0):
        return []
    sa, sb = list(shapes[a]), list(shapes[b])
    if len(sa) < 2 or len(sb) < 2:
        return []
    if attr(node, "transA", 0):
        sa[-2], sa[-1] = sa[-1], sa[-2]
    if attr(node, "transB", 0):
        sb[-2], sb[-1] = sb[-1], sb[-2]
    batch = np.broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))
    return [(0, tuple(batch) + (sa[-2], sb[-1]), dtypes.get(a, TensorProto.FLOAT))]


def _fused_gemm(node, shapes, dtypes):
    """FusedGemm: activation(alpha * op(A) @ op(B) + beta * C), A and B matrices."""
    a, b = node.input[0], node.input[1]
    if a not in shapes or b not in shapes:
        return []
    m = shapes[a][1] if attr(node, "transA", 0) else shapes[a][0]
    n = shapes[b][0] if attr(node, "transB", 0) else shapes[b][1]
    return [(0, (m, n), dtypes.get(a, TensorProto.FLOAT))]


def _matmul_of(ia, ib):
    """A matrix product of inputs ia and ib (quantized products keep scales and zero points between)."""
    def rule(node, shapes, dtypes):
        a, b = node.input[ia], node.input[ib]
        if a not in shapes or b not in shapes or len(shapes[a]) < 1 or len(shapes[b]) != 2:
            return []
        return [(0, tuple(shapes[a][:-1]) + (shapes[b][-1],), TensorProto.FLOAT)]
    return rule


def _matmul_nbits(node, shapes, dtypes):
    """MatMulNBits: [.., K] @ a packed [N, K] weight -> [.., N] (N is an attribute)."""
    a = node.input[0]
    if a not in shapes or attr(node, "N") is None:
        return []
    return [(0, tuple(shapes[a][:-1]) + (int(attr(node, "N")),), dtypes.get(a, TensorProto.FLOAT))]


def _qlinear_binary(node, shapes, dtypes):
    """QLinearAdd / QLinearMul: A at input 0, B at input 3, broadcast; quantized like A."""
    a, b = node.input[0], node.input[3]
    if a not in shapes or b not in shapes:
        return []
    return [(0, tuple(np.broadcast_shapes(shapes[a], shapes[b])), dtypes.get(a, TensorProto.UINT8))]


def _bias_split_gelu(node, shapes, dtypes):
    """BiasSplitGelu: the last axis is split in halves, the first gated by GELU of the second."""
    x = node.input[0]
    if x not in shapes:
        return []
    return [(0, tuple(shapes[x][:-1]) + (shapes[x][-1] // 2,), dtypes.get(x, TensorProto.FLOAT))]


RULES = {
    **{op: _like_input(0) for op in ("SimplifiedLayerNormalization", "FastGelu", "BiasGelu", "Gelu", "QuickGelu", "BiasAdd",
                                     "RotaryEmbedding", "LayerNormalization", "RMSNormalization")},
    # Skip*Normalization's 4th output is the residual sum, shaped like the input too.
    **{op: _like_input(0, 3) for op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")},
    "EmbedLayerNormalization": _embed_layer_norm,
    "FusedMatMul": _fused_matmul,
    "FusedGemm": _fused_gemm,
    "BiasSplitGelu": _bias_split_gelu,
    # Quantized ops: shaped only so that `inspect` can list them; widening refuses them.
    **{op: _like_input(0) for op in ("QLinearSoftmax", "QLinearSigmoid", "QLinearLeakyRelu")},
    "QLinearAdd": _qlinear_binary,
    "QLinearMul": _qlinear_binary,
    "MatMulNBits": _matmul_nbits,
    "DynamicQuantizeMatMul": _matmul_of(0, 1),
    "MatMulIntegerToFloat": _matmul_of(0, 1),
}


def infer_outputs(graph, shapes, dtypes, extra) -> bool:
    """Add to `extra` the outputs the rules can shape that nothing has shaped yet; True if any."""
    grew = False
    for n in graph.nodes:
        rule = RULES.get(n.op_type)
        if rule is None:
            continue
        for i, shape, dt in rule(n, shapes, dtypes):
            o = n.output[i] if len(n.output) > i else ""
            if o and o not in shapes and o not in extra:
                extra[o] = (tuple(int(d) for d in shape), dt)
                grew = True
    return grew
