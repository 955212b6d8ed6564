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
