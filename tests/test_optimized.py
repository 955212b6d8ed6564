"""Graphs from deployment pipelines: onnxruntime's transformer optimizer fuses norms, GELU and the
embedding layer into com.microsoft ops (SkipLayerNormalization, BiasGelu, FastGelu, Gelu,
EmbedLayerNormalization). Every encoder family and GPT-2, from both exporters, at optimization
levels 0 and 1 (99 where it fuses more): the widened optimized graph computes the optimized small
graph's function, and optimize-then-widen equals widen-then-optimize, in values and in structure.
Fused attention itself is covered in test_fused_attention.py."""
import numpy as np
import onnx
import pytest

from onnx_widen import validate, widen
from onnx_widen.structure import differences
from onnx_widen.validation import make_inputs

import ortopt
from conftest import SAMPLES, load_sample, run

pytest.importorskip("onnxruntime.transformers.optimizer")

ENCODERS = ("bert", "bert_eager", "roberta", "distilbert", "electra", "xlmr")
SWEEP = [(f"{fam}_{exporter}", "gpt2" if fam == "gpt2" else "bert", level)
         for fam in ENCODERS + ("gpt2",) for exporter in ("ts17", "dyn18") for level in (0, 1)]
# Level 99 folds the dynamo exports' position ids, and the embedding layer fuses.
SWEEP += [("roberta_dyn18", "bert", 99), ("xlmr_dyn18", "bert", 99)]
SWEEP += [("bert_ts14", "bert", level) for level in (0, 1)]  # opset 14: decomposed LayerNorm, fused here
EMBED_FUSED = {("distilbert_dyn18", 0), ("roberta_dyn18", 99), ("xlmr_dyn18", 99)}
if ortopt.ATTENTION:  # with fused attention the eager BERT's embedding layer fuses too (with the mask)
    EMBED_FUSED |= {("bert_eager_ts17", 0), ("bert_eager_ts17", 1)}


def contrib_ops(model):
    return {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}


def runner(small):
    """onnxruntime cannot reload some of its own level-1 outputs (ortopt.ort_loads): those are
    compared with its graph optimizations off."""
    return run if ortopt.ort_loads(small) else ortopt.run_unoptimized


def check_function(small, wide):
    if runner(small) is run:
        result = validate(small, wide)
        assert result.ok, [(o.name, o.max_abs) for o in result.outputs]
        return
    feeds = make_inputs(small, seed=1)
    a, b = ortopt.run_unoptimized(small, feeds), ortopt.run_unoptimized(wide, feeds)
    same = [o for o in a if a[o].shape == b[o].shape]
    assert same
    for o in same:
        assert np.abs(a[o] - b[o]).max() <= 1e-5 * max(1.0, np.abs(a[o]).max()), o


def check_commutes(small, opt_small, model_type, level, k):
    wide_opt = widen(opt_small, factor=k)  # optimize, then widen
    opt_wide = ortopt.optimize(widen(small, factor=k), model_type, 64 * k, level)  # widen, then optimize
    assert differences(wide_opt, opt_wide) == {}
    feeds = make_inputs(wide_opt, seed=2)  # the wide model's inputs (a KV cache is wide too)
    a, b = runner(opt_small)(wide_opt, feeds), runner(opt_small)(opt_wide, feeds)
    for out in a:
        assert np.abs(a[out] - b[out]).max() <= 1e-5 * max(1.0, np.abs(a[out]).max()), out


@pytest.mark.parametrize("name,model_type,level", SWEEP)
def test_optimizer_output_widens_and_commutes(name, model_type, level):
    small = load_sample(name)
    opt = ortopt.optimize(small, model_type, 64, level)
    ops = contrib_ops(opt)
    assert {"SkipLayerNormalization"} < ops, ops
    assert ("EmbedLayerNormalization" in ops) == ((name, level) in EMBED_FUSED), ops
    for k in (2, 3):
        check_function(opt, widen(opt, factor=k))
    check_commutes(small, opt, model_type, level, 2)


# Decoders and encoder-decoders: onnxruntime has no fusion for their attention (rotary, GQA) from
# these exports, but fuses their norms (SkipSimplifiedLayerNormalization for RMSNorm) and GELUs.
DECODERS = [(f"{fam}_{exporter}", model_type, fused)
            for fam, model_type, fused in (("llama", "gpt2", "SkipSimplifiedLayerNormalization"),
                                           ("qwen2", "gpt2", "SkipSimplifiedLayerNormalization"),
                                           ("llama_past", "gpt2", "SkipSimplifiedLayerNormalization"),
                                           ("gptj", "gpt2", "SkipLayerNormalization"), ("neox", "gpt_neox", "SkipLayerNormalization"),
                                           ("t5", "t5", "SkipSimplifiedLayerNormalization"),
                                           ("t5v11", "t5", "SkipSimplifiedLayerNormalization"))
            for exporter in ("ts17", "dyn18")]
DECODERS += [("llama_trap_dyn18", "gpt2", "SkipSimplifiedLayerNormalization")]


@pytest.mark.parametrize("name,model_type,fused", DECODERS)
def test_optimized_decoders_widen_and_commute(name, model_type, fused):
    small = load_sample(name)
    opt = ortopt.optimize(small, model_type, 64, 1)
    assert fused in contrib_ops(opt)
    check_function(opt, widen(opt, factor=2))
    check_commutes(small, opt, model_type, 1, 2)


@pytest.mark.parametrize("name,level", sorted(EMBED_FUSED))
def test_embed_layer_norm_orthogonal_scales_epsilon(name, level):
    """The fused embedding sum is the norm's input: under R(x)/sqrt(K) its epsilon becomes eps/K."""
    opt = ortopt.optimize(load_sample(name), "bert", 64, level)
    node = next(n for n in opt.graph.node if n.op_type == "EmbedLayerNormalization")
    eps = next(a.f for a in node.attribute if a.name == "epsilon")
    for k in (2, 3):
        wide = widen(opt, factor=k, residual="orthogonal")
        check_function(opt, wide)
        wnode = next(n for n in wide.graph.node if n.op_type == "EmbedLayerNormalization")
        assert np.isclose(next(a.f for a in wnode.attribute if a.name == "epsilon"), eps / k, rtol=1e-6)


@pytest.mark.parametrize("name,model_type,level", [("bert_ts17", "bert", 0), ("distilbert_dyn18", "bert", 0), ("gpt2_ts17", "gpt2", 0)])
def test_float16_optimized_graphs(name, model_type, level):
    """The optimizer's convert_float_to_float16(keep_io_types=True), run by onnxruntime on CPU:
    parameters stay float16, the function holds to float16 rounding, and converting the widened
    float32 graph gives the same structure."""
    small = load_sample(name)
    opt = ortopt.optimize(small, model_type, 64, level, fp16=True)
    for k in (2, 3):
        wide = widen(opt, factor=k)
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
        assert {t.data_type for t in wide.graph.initializer if t.data_type in floats} == {onnx.TensorProto.FLOAT16}
        result = validate(opt, wide, atol=1e-2, rtol=1e-2)
        assert result.ok, [(o.name, o.max_abs, o.max_rel) for o in result.outputs]
        assert differences(wide, ortopt.optimize(widen(small, factor=k), model_type, 64 * k, level, fp16=True)) == {}
