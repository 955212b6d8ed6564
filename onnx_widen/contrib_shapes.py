"""Output shapes of onnxruntime's contrib ops (and a few standard ops older onnx releases do not
infer), which onnx's shape inference leaves unknown. One rule per op: given the node, the
shapes/dtypes known so far and the constant values, the (output index, shape, dtype) it can tell.
Shapes follow the contrib op schemas (onnxruntime docs/ContribOperators.md)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graph import attr


def _like_input(*outputs):
    """Outputs shaped and typed like the first input (norms, activations, the residual sum)."""
    def rule(node, shapes, dtypes, values=None):
        x = node.input[0]
        return [(i, shapes[x], dtypes.get(x, TensorProto.FLOAT)) for i in outputs] if x in shapes else []
    return rule


def _embed_layer_norm(node, shapes, dtypes, values=None):
    """EmbedLayerNormalization: [B, S] ids -> [B, S, H] (output 0 and the embedding sum, output 2);
    output 1, the mask index, is one int32 per sequence."""
    ids, table = node.input[0], node.input[2]
    if ids not in shapes or table not in shapes:
        return []
    out = tuple(shapes[ids]) + (shapes[table][-1],)
    dt = dtypes.get(table, TensorProto.FLOAT)
    return [(0, out, dt), (1, (shapes[ids][0],), TensorProto.INT32), (2, out, dt)]


def _fused_matmul(node, shapes, dtypes, values=None):
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


def _fused_gemm(node, shapes, dtypes, values=None):
    """FusedGemm: activation(alpha * op(A) @ op(B) + beta * C), A and B matrices."""
    a, b = node.input[0], node.input[1]
    if a not in shapes or b not in shapes:
        return []
    m = shapes[a][1] if attr(node, "transA", 0) else shapes[a][0]
    n = shapes[b][0] if attr(node, "transB", 0) else shapes[b][1]
    return [(0, (m, n), dtypes.get(a, TensorProto.FLOAT))]


def _matmul_of(ia, ib):
    """A matrix product of inputs ia and ib (quantized products keep scales and zero points between)."""
    def rule(node, shapes, dtypes, values=None):
        a, b = node.input[ia], node.input[ib]
        if a not in shapes or b not in shapes or len(shapes[a]) < 1 or len(shapes[b]) != 2:
            return []
        return [(0, tuple(shapes[a][:-1]) + (shapes[b][-1],), TensorProto.FLOAT)]
    return rule


def _matmul_nbits(node, shapes, dtypes, values=None):
    """MatMulNBits: [.., K] @ a packed [N, K] weight -> [.., N] (N is an attribute)."""
    a = node.input[0]
    if a not in shapes or attr(node, "N") is None:
        return []
    return [(0, tuple(shapes[a][:-1]) + (int(attr(node, "N")),), dtypes.get(a, TensorProto.FLOAT))]


def _qlinear_binary(node, shapes, dtypes, values=None):
    """QLinearAdd / QLinearMul: A at input 0, B at input 3, broadcast; quantized like A."""
    a, b = node.input[0], node.input[3]
    if a not in shapes or b not in shapes:
        return []
    return [(0, tuple(np.broadcast_shapes(shapes[a], shapes[b])), dtypes.get(a, TensorProto.UINT8))]


def _bias_split_gelu(node, shapes, dtypes, values=None):
    """BiasSplitGelu: the last axis is split in halves, the first gated by GELU of the second."""
    x = node.input[0]
    if x not in shapes:
        return []
    return [(0, tuple(shapes[x][:-1]) + (shapes[x][-1] // 2,), dtypes.get(x, TensorProto.FLOAT))]


def _input(node, i):
    return node.input[i] if len(node.input) > i and node.input[i] else None


def attention(node, shape, value):
    """Attention: output (B, S, v_hidden); present (2, B, N, past + S, head_size)."""
    x, w = shape(_input(node, 0)), shape(_input(node, 1))
    if x is None or w is None:
        return None
    sizes = attr(node, "qkv_hidden_sizes") or [w[1] // 3] * 3
    heads = attr(node, "num_heads", 1)
    out = [tuple(x[:-1]) + (sizes[2],)]
    past_name = _input(node, 4)
    past = shape(past_name) if past_name else None
    if past_name and past is None:
        return None
    if attr(node, "past_present_share_buffer", 0) and past is not None:
        present = tuple(past)
    else:
        present = (2, x[0], heads, (past[3] if past else 0) + x[1], sizes[1] // heads)
    return out + [present]


def multi_head_attention(node, shape, value):
    """MultiHeadAttention with 3-D query/key/value: output (B, S, v_hidden);
    present key/value (B, N, past + L, head_size)."""
    q, k, v = (shape(_input(node, i)) if _input(node, i) else None for i in range(3))
    if q is None or k is None or v is None or len(q) != 3 or len(k) != 3 or len(v) != 3:
        return None
    heads = attr(node, "num_heads", 1)
    past = shape(_input(node, 6)) if _input(node, 6) else None
    total = (past[2] if past else 0) + k[1]
    return [(q[0], q[1], v[2]), (q[0], heads, total, k[2] // heads), (q[0], heads, total, v[2] // heads)]


def group_query_attention(node, shape, value):
    """GroupQueryAttention: output (B, S, N * head_size); present key/value
    (B, kv_N, max(past, total_sequence_length), head_size)."""
    q = shape(_input(node, 0))
    if q is None:
        return None
    heads, kv_heads = attr(node, "num_heads", 1), attr(node, "kv_num_heads", 1)
    packed = _input(node, 1) is None
    dh = q[-1] // (heads + 2 * kv_heads) if packed else q[-1] // heads
    past = shape(_input(node, 3)) if _input(node, 3) else None
    past_len = past[2] if past else 0
    total = value(_input(node, 6)) if _input(node, 6) else None
    total = int(np.asarray(total).reshape(-1)[0]) if total is not None else past_len + q[1]
    present = (q[0], kv_heads, max(past_len, total), dh)
    return [(q[0], q[1], heads * dh), present, present]


ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention")


def _past_heads(node, shape):
    """The (input index, shape) a KV cache input must have, None on the axes the op leaves free
    (batch, past length): its head count and head size follow from the query's width."""
    q = shape(_input(node, 0))
    if q is None:
        return []
    heads = attr(node, "num_heads", 1)
    if node.op_type == "GroupQueryAttention":
        kv = attr(node, "kv_num_heads", 1)
        dh = q[-1] // (heads + 2 * kv) if _input(node, 1) is None else q[-1] // heads
        return [(i, (None, kv, None, dh)) for i in (3, 4)]
    if node.op_type == "MultiHeadAttention":
        k, v = shape(_input(node, 1)), shape(_input(node, 2))
        if k is None or v is None or len(k) != 3 or len(v) != 3:
            return []
        return [(6, (None, heads, None, k[2] // heads)), (7, (None, heads, None, v[2] // heads))]
    w = shape(_input(node, 1))  # Attention: one stacked (2, B, N, past, head size) cache
    if w is None:
        return []
    sizes = attr(node, "qkv_hidden_sizes") or [w[1] // 3] * 3
    return [(4, (2, None, heads, None, sizes[1] // heads))]


def required_inputs(graph, shapes) -> dict[str, tuple]:
    """Shapes (None: any size) that contrib attention ops require of the graph inputs they read
    directly. A KV cache input may name its head size with a symbol of its own (onnxruntime-genai's
    `kv_cache_dim`) that nothing else in the graph sizes: the op is what fixes it."""
    inputs = {i.name for i in graph.inputs}
    out = {}
    for n in graph.nodes:
        if n.domain == "com.microsoft" and n.op_type in ATTENTION_OPS:
            for i, want in _past_heads(n, shapes.get):
                name = _input(n, i)
                if name in inputs:
                    out[name] = want
    return out


def runnable_dims(graph, dims: dict) -> dict:
    """Validation sizes onnxruntime runs: its GroupQueryAttention takes a prompt of several tokens
    on a non-empty cache only at batch 1, so a batch of several with a cache validates one
    decoding step (the other shape set keeps the longer prompt at batch 1)."""
    from .shapes import DEFAULT_DIMS

    d = {**DEFAULT_DIMS, **dims}
    cached = any(n.op_type == "GroupQueryAttention" and _input(n, 3) for n in graph.nodes)
    if cached and d["batch"] > 1 and d["sequence"] > 1 and d["past"] > 0:
        return {**dims, "sequence": 1}
    return dims


def _per_output(fn):
    """A rule written as one shape per output (None where absent or unknown), typed like input 0."""
    def rule(node, shapes, dtypes, values=None):
        out = fn(node, lambda name: shapes.get(name) if name else None, (values or {}).get) or []
        dt = dtypes.get(node.input[0], TensorProto.FLOAT)
        return [(i, shape, dt) for i, shape in enumerate(out) if shape is not None]
    return rule


RULES = {
    "Attention": _per_output(attention),
    "MultiHeadAttention": _per_output(multi_head_attention),
    "GroupQueryAttention": _per_output(group_query_attention),
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


def infer_outputs(graph, shapes, dtypes, extra, values=None) -> bool:
    """Add to `extra` the outputs the rules can shape that nothing has shaped yet; True if any."""
    grew = False
    for n in graph.nodes:
        rule = RULES.get(n.op_type)
        if rule is None:
            continue
        for i, shape, dt in rule(n, shapes, dtypes, values):
            o = n.output[i] if len(n.output) > i else ""
            if o and o not in shapes and o not in extra:
                extra[o] = (tuple(int(d) for d in shape), dt)
                grew = True
    return grew
