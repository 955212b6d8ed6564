"""onnxruntime contrib ops from its own session optimizer: an InferenceSession at ORT_ENABLE_EXTENDED
or ENABLE_ALL writes (optimized_model_filepath) FusedMatMul (a scale or a transpose folded into a
product: alpha is the softmax scale, or T5's tied-head rescale), FusedGemm (a Gemm and its
activation) and QuickGelu (SiLU). Optimize-then-widen equals widen-then-optimize, and a folded
alpha takes the wide head size's value."""
import copy

import numpy as np
import pytest

from onnx_widen import rules, validate, widen
from onnx_widen.structure import differences
from onnx_widen.validation import make_inputs

import ortopt
from conftest import load_sample, run

SESSION = [
    ("bert_ts17", "extended", {"FusedMatMul", "FusedGemm", "BiasGelu"}),  # q and k quarter scales folded; pooler Gemm+Tanh
    ("bert_eager_dyn18", "all", {"FusedMatMul", "FusedGemm", "SkipLayerNormalization"}),  # Div by sqrt(dh) folded
    ("distilbert_ts17", "extended", {"FusedMatMul", "FusedGemm"}),  # pre-classifier Gemm+Relu
    ("gpt2_dyn18", "extended", {"FusedMatMul", "FastGelu"}),
    ("llama_ts17", "extended", {"FusedMatMul", "QuickGelu"}),  # k transpose folded too (transB), RoPE, GQA
    ("t5_ts17", "extended", {"FusedMatMul"}),  # tied head: d_model**-0.5 folded into alpha
    ("llama_past_dyn18", "all", {"FusedMatMul", "QuickGelu"}),  # KV cache
]


def alphas(model):
    return [next((a.f for a in n.attribute if a.name == "alpha"), 1.0) for n in model.graph.node if n.op_type == "FusedMatMul"]


def with_alphas(model, values):
    out = copy.deepcopy(model)
    for n, v in zip([n for n in out.graph.node if n.op_type == "FusedMatMul"], values):
        for a in n.attribute:
            if a.name == "alpha":
                a.f = v
    return out


@pytest.mark.parametrize("name,level,fused", SESSION)
def test_session_optimized_graph_widens_and_commutes(name, level, fused):
    small = load_sample(name)
    opt = ortopt.session_optimized(small, level)
    ops = {n.op_type for n in opt.graph.node if n.domain == "com.microsoft"}
    assert fused <= ops, ops
    for k in (2, 3):
        wide_opt = widen(opt, factor=k)
        result = validate(opt, wide_opt)
        assert result.ok, [(o.name, o.max_abs) for o in result.outputs]
        opt_wide = ortopt.session_optimized(widen(small, factor=k), level)
        # The folded scale is the wide config's: equal to the optimizer's own fold of the wide export,
        # to the one float32 rounding a head size of 16 cannot tell apart (see rules.canonical_folded_scale).
        a, b = alphas(wide_opt), alphas(opt_wide)
        assert len(a) == len(b) and np.allclose(a, b, rtol=2 ** -22, atol=0), (a, b)
        assert all(x != y for x, y in zip(alphas(opt), a))
        assert differences(wide_opt, with_alphas(opt_wide, a)) == {}
        feeds = make_inputs(wide_opt, seed=2)
        x, y = run(wide_opt, feeds), run(opt_wide, feeds)
        for out in x:
            assert np.abs(x[out] - y[out]).max() <= 1e-5 * max(1.0, np.abs(x[out]).max()), out


def test_folded_scale_is_rebuilt_the_way_it_was_folded():
    """dh = 64: q * c and k * c folded give c * c (c = 64**-0.25 in float32), one rounding below
    1/8: the wide alpha is the same fold of the wide head's c, not the power. At dh = 16 every
    fold gives 1/4 exactly: the power it is."""
    f32 = np.float32
    c64, c128 = f32(64 ** -0.25), f32(128 ** -0.25)
    assert f32(c64 * c64) != f32(0.125)
    assert rules.canonical_folded_scale(float(f32(c64 * c64)), 64, 128, -0.5) == float(f32(c128 * c128))
    assert rules.canonical_folded_scale(0.125, 64, 128, -0.5) == float(f32(128 ** -0.5))
    assert rules.canonical_folded_scale(0.25, 16, 32, -0.5) == float(f32(32 ** -0.5))


def geglu_block(d=8, ffn=12, vocab=20, labels=3, seed=0):
    """A UNet-style block as onnxruntime's diffusion fusions leave it (no offline tool makes one
    from our samples): ids -> table -> MatMul -> BiasSplitGelu -> QuickGelu(alpha) -> MatMul ->
    BiasAdd(., bias, skip) -> LayerNormalization -> head."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name, *shape, s=0.4):
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    inits = [w("E", vocab, d, s=1.0), w("W1", d, 2 * ffn), w("b1", 2 * ffn, s=0.2), w("W2", ffn, d), w("b2", d, s=0.2),
             numpy_helper.from_array((1 + 0.2 * rng.standard_normal(d)).astype(np.float32), "gamma"), w("beta", d, s=0.1),
             w("Wh", d, labels)]
    ms = "com.microsoft"
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "W1"], ["up"], name="up"),
        helper.make_node("BiasSplitGelu", ["up", "b1"], ["geglu"], name="geglu", domain=ms),
        helper.make_node("QuickGelu", ["geglu"], ["act"], name="quick", domain=ms, alpha=1.702),
        helper.make_node("MatMul", ["act", "W2"], ["down"], name="down"),
        helper.make_node("BiasAdd", ["down", "b2", "h"], ["res"], name="bias_add", domain=ms),
        helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["normed"], name="ln", axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["normed", "Wh"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(nodes, "geglu", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5, labels])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])


def decompose_cuda_only_ops(model):
    """BiasAdd and BiasSplitGelu have CUDA kernels only: to run on CPU, each becomes what its
    specification says (x + bias + skip; (x + bias) cut in halves, left * gelu(right))."""
    from onnx import TensorProto, helper

    out = copy.deepcopy(model)
    nodes = []
    for n in out.graph.node:
        if n.op_type == "BiasAdd":
            nodes += [helper.make_node("Add", [n.input[0], n.input[1]], [n.output[0] + "_b"]),
                      helper.make_node("Add", [n.output[0] + "_b", n.input[2]], [n.output[0]])]
        elif n.op_type == "BiasSplitGelu":
            y = n.output[0]
            nodes += [helper.make_node("Add", [n.input[0], n.input[1]], [y + "_b"]),
                      helper.make_node("Split", [y + "_b"], [y + "_l", y + "_r"], axis=-1, num_outputs=2),
                      helper.make_node("Div", [y + "_r", y + "_sqrt2"], [y + "_d"]),
                      helper.make_node("Erf", [y + "_d"], [y + "_e"]),
                      helper.make_node("Add", [y + "_e", y + "_one"], [y + "_e1"]),
                      helper.make_node("Mul", [y + "_r", y + "_e1"], [y + "_g2"]),
                      helper.make_node("Mul", [y + "_g2", y + "_half"], [y + "_g"]),
                      helper.make_node("Mul", [y + "_l", y + "_g"], [y])]
            for name, v in (("_sqrt2", np.sqrt(2.0)), ("_one", 1.0), ("_half", 0.5)):
                out.graph.initializer.append(helper.make_tensor(y + name, TensorProto.FLOAT, [], [v]))
        else:
            nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.opset_import[0].version = 18  # Split's num_outputs
    return out


@pytest.mark.parametrize("residual", ["repeat", "orthogonal"])
def test_bias_add_bias_split_gelu_quick_gelu(residual):
    small = geglu_block()
    for k in (2, 3):
        wide = widen(small, factor=k, residual=residual)
        assert {n.op_type for n in wide.graph.node} == {n.op_type for n in small.graph.node}
        shapes = {t.name: tuple(t.dims) for t in wide.graph.initializer}
        assert shapes["W1"] == (8 * k, 24 * k) and shapes["b1"] == (24 * k,) and shapes["W2"] == (12 * k, 8 * k)
        quick = next(n for n in wide.graph.node if n.op_type == "QuickGelu")
        assert np.isclose(quick.attribute[0].f, 1.702)
        result = validate(decompose_cuda_only_ops(small), decompose_cuda_only_ops(wide))
        assert result.ok, [(o.name, o.max_abs) for o in result.outputs]


def test_cli_reads_ops_onnxruntime_registers_in_the_onnx_domain(tmp_path):
    """onnxruntime writes SimplifiedLayerNormalization (and LayerNormalization below opset 17) in
    the ONNX domain, where the ONNX checker knows neither: the files still load, widen, validate."""
    import onnx

    from test_cli import cli

    cases = {"t5": ortopt.session_optimized(load_sample("t5_ts17")), "bert14": ortopt.optimize(load_sample("bert_ts14"), "bert", 64)}
    for name, model in cases.items():
        assert any(n.op_type.endswith("LayerNormalization") and n.domain == "" for n in model.graph.node)
        src, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}_x2.onnx"
        onnx.save(model, str(src))
        code, _, err = cli("widen", str(src), "-o", str(out), "--factor", "2")
        assert code == 0, err
        assert out.exists()
