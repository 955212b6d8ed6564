"""Output shapes of onnxruntime's fused attention ops (com.microsoft), which onnx's shape
inference does not know. Each rule reads its inputs' shapes (and, for GQA, the constant total
length) and returns one shape per output, None where an output is absent or not yet known.
Shapes follow the contrib op schemas (onnxruntime docs/ContribOperators.md)."""
from __future__ import annotations

import numpy as np

from .graph import attr


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


RULES = {"Attention": attention, "MultiHeadAttention": multi_head_attention, "GroupQueryAttention": group_query_attention}
