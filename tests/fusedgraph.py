"""Hand-built decoders with onnxruntime's fused attention ops, the way onnxruntime-genai's model
builder writes them (no offline tool produces them from our samples): embeddings, RMSNorm,
q/k/v projections (separate or packed), rotary embedding (RotaryEmbedding ops or inside
GroupQueryAttention), GroupQueryAttention or MultiHeadAttention, output projection, residual
adds, a SiLU MLP and an LM head. Every parameter is perturbed; caches hold the real frequencies."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"


def build(d=64, heads=4, kv_heads=2, ffn=96, vocab=40, layers=2, attention="gqa", rotary="gqa", interleaved=False,
          rotary_dim=None, packed=False, past=False, qkv_bias=True, scale=None, max_pos=64, base=10000.0, seed=0):
    """attention: "gqa", "mha" (MultiHeadAttention: kv_heads == heads, rotary "op" or "none") or
    "attention" (packed Attention, rotary "none");
    rotary: "gqa" (do_rotary=1), "op" (RotaryEmbedding on q and k), "none"; rotary_dim: partial rotary;
    scale: None (the op's implicit 1/sqrt(head_size)), "head" (that value as an attribute) or a number."""
    rng = np.random.default_rng(seed)
    dh = d // heads
    rot = rotary_dim or dh
    inits, nodes = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def w(name, *shape, s=0.3):
        return const(name, (rng.standard_normal(shape) * s).astype(np.float32))

    def node(op, ins, outs, domain="", **kw):
        outs = [outs] if isinstance(outs, str) else outs
        nodes.append(helper.make_node(op, ins, outs, name=f"n_{outs[0]}", domain=domain, **kw))
        return outs[0]

    def rms(x, name):
        g = const(f"{name}.g", (1 + 0.2 * rng.standard_normal(d)).astype(np.float32))
        return node("SimplifiedLayerNormalization", [x, g], f"{name}_out", axis=-1, epsilon=1e-5)

    def linear(x, din, dout, name, bias=False):
        y = node("MatMul", [x, w(f"{name}.W", din, dout)], f"{name}_mm")
        return node("Add", [y, w(f"{name}.b", dout, s=0.2)], f"{name}_out") if bias else y

    if rotary != "none":
        inv_freq = base ** (-np.arange(0, rot, 2, dtype=np.float64) / rot)
        angles = np.arange(max_pos)[:, None] * inv_freq[None, :]
        cos, sin = const("cos_cache", np.cos(angles).astype(np.float32)), const("sin_cache", np.sin(angles).astype(np.float32))

    # Sequence bookkeeping as the model builder writes it: lengths from the mask, positions by CumSum.
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    mask_sum = node("ReduceSum", ["attention_mask", const("ax1", i64(1))], "mask_sum", keepdims=0)
    seqlens = node("Cast", [node("Sub", [mask_sum, const("one", i64(1))], "seqlens64")], "seqlens_k", to=TensorProto.INT32)
    total = node("Cast", [node("Gather", [node("Shape", ["attention_mask"], "mask_shape"), const("idx1", np.array(1, np.int64))],
                               "total64", axis=0)], "total_len", to=TensorProto.INT32)
    pos_all = node("Sub", [node("CumSum", ["attention_mask", const("ax1s", np.array(1, np.int64))], "mask_cumsum"), "one"], "pos_all")
    seq = node("Gather", [node("Shape", ["input_ids"], "ids_shape"), const("idx1v", i64(1))], "seq_len", axis=0)
    positions = node("Slice", [pos_all, node("Neg", [seq], "neg_seq"), const("end", i64(2 ** 62)), const("ax1v", i64(1))], "position_ids")

    x = node("Gather", [w("E", vocab, d, s=1.0), "input_ids"], "emb")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = []
    extra = {} if scale is None else {"scale": float(dh ** -0.5 if scale == "head" else scale)}
    mask32 = node("Cast", ["attention_mask"], "mask_index", to=TensorProto.INT32)

    def packed_attention(h, L):
        """The projection inside the op, GPT-2 style: causal, one past tensor [2, B, N, P, dh]."""
        past_in = f"past_{L}" if past else ""
        if past:
            inputs.append(helper.make_tensor_value_info(past_in, TensorProto.FLOAT, [2, "batch", heads, "past", dh]))
        outputs.append(helper.make_tensor_value_info(f"present_{L}", TensorProto.FLOAT, [2, "batch", heads, "total", dh]))
        return node("Attention", [h, w(f"qkv{L}.W", d, 3 * d), w(f"qkv{L}.b", 3 * d, s=0.2), mask32, past_in],
                    [f"attn{L}", f"present_{L}"], domain=MS, num_heads=heads, unidirectional=1, **extra)

    def projected_attention(h, L):
        if packed:
            q = linear(h, d, (heads + 2 * kv_heads) * dh, f"qkv{L}", qkv_bias)
            k = v = ""
        else:
            q = linear(h, d, heads * dh, f"q{L}", qkv_bias)
            k = linear(h, d, kv_heads * dh, f"k{L}", qkv_bias)
            v = linear(h, d, kv_heads * dh, f"v{L}", qkv_bias)
        if rotary == "op":
            kw = {"interleaved": int(interleaved)}
            if rotary_dim:
                kw.update(rotary_embedding_dim=rot)
            q = node("RotaryEmbedding", [q, positions, cos, sin], f"q_rot{L}", domain=MS, num_heads=heads, **kw)
            k = node("RotaryEmbedding", [k, positions, cos, sin], f"k_rot{L}", domain=MS, num_heads=kv_heads, **kw)
        pk, pv = (f"past_key_{L}", f"past_value_{L}") if past else ("", "")
        kvh = kv_heads if attention == "gqa" else heads
        if past:
            inputs.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", kvh, "past", dh]) for n in (pk, pv))
        present = [f"present_key_{L}", f"present_value_{L}"]
        outputs.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", kvh, "total", dh]) for n in present)
        if attention == "gqa":
            rot_in = [cos, sin] if rotary == "gqa" else ["", ""]
            return node("GroupQueryAttention", [q, k, v, pk, pv, seqlens, total] + rot_in, [f"attn{L}"] + present, domain=MS,
                        num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(rotary == "gqa"),
                        rotary_interleaved=int(interleaved), **extra)
        return node("MultiHeadAttention", [q, k, v, "", "", "", pk, pv], [f"attn{L}"] + present, domain=MS,
                    num_heads=heads, unidirectional=1, **extra)

    for L in range(layers):
        h = rms(x, f"ln{L}")
        a = packed_attention(h, L) if attention == "attention" else projected_attention(h, L)
        x = node("Add", [x, linear(a, heads * dh, d, f"o{L}", True)], f"res_a{L}")
        h = rms(x, f"ln_f{L}")
        u = linear(h, d, ffn, f"up{L}")
        act = node("Mul", [u, node("Sigmoid", [u], f"sig{L}")], f"silu{L}")
        x = node("Add", [x, linear(act, ffn, d, f"down{L}")], f"res_f{L}")
    logits = linear(rms(x, "ln_out"), d, vocab, "lm_head")
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", "sequence", vocab])] + outputs
    graph = helper.make_graph(nodes, "fused_decoder", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=9)
