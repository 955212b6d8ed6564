"""Hand-built one-layer encoders for edge cases no exporter emits on demand (scale forms, the
sequence-length-equals-head-size trap, a bias shared by two roles, an op no pattern covers)."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(d=16, heads=2, ffn=32, vocab=20, labels=3, batch=2, seq=8, static=True, scale="mul", gelu="erf_div",
          shared_bias=False, uncovered=False, seed=0, opset=17, layers=1, norm="layernorm"):
    rng = np.random.default_rng(seed)
    dh = d // heads
    inits, nodes, names = [], [], set()

    def const(name, arr):
        if name not in names:  # layers share their structural constants, as exporters do
            names.add(name)
            inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def w(name, *shape, s=0.3):
        return const(name, (rng.standard_normal(shape) * s).astype(np.float32))

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], name=f"n_{out}", **kw))
        return out

    def linear(x, din, dout, name, bias_name=None):
        y = node("MatMul", [x, w(f"{name}.W", din, dout)], f"{name}_mm")
        b = bias_name or w(f"{name}.b", dout, s=0.2)
        return node("Add", [y, b], f"{name}_out")

    def ln(x, name):
        g = const(f"{name}.g", (1 + 0.2 * rng.standard_normal(d)).astype(np.float32))
        if norm == "rms_op":  # opset 23
            return node("RMSNormalization", [x, g], f"{name}_out", axis=-1, epsilon=1e-5)
        if norm == "simplified":  # onnxruntime's fused RMSNorm
            return node("SimplifiedLayerNormalization", [x, g], f"{name}_out", axis=-1, epsilon=1e-5)
        b = w(f"{name}.b", d, s=0.1)
        return node("LayerNormalization", [x, g, b], f"{name}_out", axis=-1, epsilon=1e-5)

    emb = node("Gather", [w("E", vocab, d, s=1.0), "input_ids"], "emb")
    x = ln(emb, "ln0")
    if uncovered:
        x = node("CumSum", [x, const("cs_axis", np.array(2, dtype=np.int64))], "cumsum")
    def layer(x, L):
        bshared = w(f"shared_bias{L}", d, s=0.2) if shared_bias else None
        q = linear(x, d, d, f"q{L}", bshared)
        k = linear(x, d, d, f"k{L}")
        v = linear(x, d, d, f"v{L}", bshared)
        split = const("split_shape", np.array([batch, seq, heads, dh] if static else [0, 0, heads, dh], dtype=np.int64))
        qh = node("Transpose", [node("Reshape", [q, split], f"q_r{L}")], f"q_h{L}", perm=[0, 2, 1, 3])
        kt = node("Transpose", [node("Reshape", [k, split], f"k_r{L}")], f"k_t{L}", perm=[0, 2, 3, 1])
        vh = node("Transpose", [node("Reshape", [v, split], f"v_r{L}")], f"v_h{L}", perm=[0, 2, 1, 3])
        if scale == "split":
            c = const("qk_scale", np.array(dh ** -0.25, dtype=np.float32))
            qh, kt = node("Mul", [qh, c], f"q_s{L}"), node("Mul", [kt, c], f"k_s{L}")
        elif scale == "runtime":
            # scaled_dot_product_attention as TorchScript writes it: the scale computed from Shape(q).
            shp = node("Shape", [qh], f"q_shape{L}")
            last = node("Slice", [shp, const("m1", np.array([-1], np.int64)), const("big", np.array([2**62], np.int64))], f"q_last{L}")
            s = node("Div", [const("one", np.array(1.0, np.float32)), node("Sqrt", [node("Cast", [last], f"q_last_f{L}", to=TensorProto.FLOAT)], f"sq{L}")], f"inv{L}")
            rs = node("Sqrt", [s], f"rs{L}")
            qh, kt = node("Mul", [qh, rs], f"q_s{L}"), node("Mul", [kt, rs], f"k_s{L}")
        scores = node("MatMul", [qh, kt], f"scores{L}")
        if scale == "mul":
            scores = node("Mul", [scores, const("inv_sqrt_dh", np.array(1 / np.sqrt(dh), np.float32))], f"scores_s{L}")
        elif scale == "div":
            scores = node("Div", [scores, const("sqrt_dh", np.array(np.sqrt(dh), np.float32))], f"scores_s{L}")
        probs = node("Softmax", [scores], f"probs{L}", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, vh], f"ctx{L}")], f"ctx_t{L}", perm=[0, 2, 1, 3])
        merged = node("Reshape", [ctx, const("merge_shape", np.array([batch, seq, d] if static else [0, 0, -1], np.int64))], f"ctx_m{L}")
        h = ln(node("Add", [linear(merged, d, d, f"o{L}"), x], f"res1{L}"), f"ln1{L}")
        up = linear(h, d, ffn, f"up{L}")
        if gelu == "erf_div":
            e = node("Erf", [node("Div", [up, const("sqrt2", np.array(np.sqrt(2), np.float32))], f"g_div{L}")], f"g_erf{L}")
        elif gelu == "erf_mul":
            e = node("Erf", [node("Mul", [up, const("rsqrt2", np.array(1 / np.sqrt(2), np.float32))], f"g_div{L}")], f"g_erf{L}")
        if gelu in ("erf_div", "erf_mul"):
            act = node("Mul", [node("Mul", [up, node("Add", [e, const("one_g", np.array(1.0, np.float32))], f"g_add{L}")], f"g_m{L}"),
                               const("half", np.array(0.5, np.float32))], f"gelu{L}")
        elif gelu == "tanh":
            cube = node("Pow", [up, const("three", np.array(3.0, np.float32))], f"g_pow{L}")
            inner = node("Add", [up, node("Mul", [cube, const("c044", np.array(0.044715, np.float32))], f"g_c{L}")], f"g_in{L}")
            t = node("Tanh", [node("Mul", [inner, const("c079", np.array(np.sqrt(2 / np.pi), np.float32))], f"g_s{L}")], f"g_t{L}")
            act = node("Mul", [node("Mul", [up, const("half", np.array(0.5, np.float32))], f"g_h{L}"),
                               node("Add", [t, const("one_g", np.array(1.0, np.float32))], f"g_1{L}")], f"gelu{L}")
        else:
            act = node("Gelu", [up], f"gelu{L}")
        hidden = ln(node("Add", [linear(act, ffn, d, f"down{L}"), h], f"res2{L}"), f"ln2{L}")
        return hidden

    hidden = x
    for L in range(layers):
        hidden = layer(hidden, L if layers > 1 else "")
    node("Gemm", [node("Reshape", [hidden, const("flat", np.array([-1, d], np.int64))], "flat_h"),
                           w("cls.W", labels, d), w("cls.b", labels, s=0.2)], "logits", transB=1)
    nodes.append(helper.make_node("Identity", [hidden], ["hidden"], name="n_hidden_out"))
    dims = [batch, seq] if static else ["batch", "sequence"]
    graph = helper.make_graph(
        nodes, "mini",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch * seq if static else None, labels]),
         helper.make_tensor_value_info("hidden", TensorProto.FLOAT, dims + [d])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 23 else 11
    if norm != "simplified":
        onnx.checker.check_model(model)
    return model
