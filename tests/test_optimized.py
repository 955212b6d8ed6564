"""Graphs from deployment pipelines: onnxruntime's transformer optimizer fuses norms and GELU
into com.microsoft ops (SkipLayerNormalization, BiasGelu, FastGelu). Attention and embedding
fusions are off here: those contrib ops are not supported yet and are refused as uncovered."""
import os
import tempfile

import numpy as np
import onnx
import pytest

from onnx_widen import WidenError, validate, widen
from onnx_widen.validation import make_inputs

from conftest import SAMPLES, run

ort_opt = pytest.importorskip("onnxruntime.transformers.optimizer")


def _optimize(model_or_path, model_type, hidden, attention=False):
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(model_type)
    opts.enable_attention = attention
    opts.enable_embed_layer_norm = False
    src = model_or_path
    if isinstance(model_or_path, onnx.ModelProto):
        fd, src = tempfile.mkstemp(suffix=".onnx")
        os.close(fd)
        onnx.save(model_or_path, src)
    m = ort_opt.optimize_model(src, model_type=model_type, num_heads=4, hidden_size=hidden, optimization_options=opts, opt_level=0)
    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    m.save_model_to_file(path)  # adds the com.microsoft opset import, as a user's file has it
    return onnx.load(path)


@pytest.mark.parametrize("name,model_type,fused", [
    ("bert/bert_ts17.onnx", "bert", {"SkipLayerNormalization", "BiasGelu"}),
    ("gpt2/gpt2_ts17.onnx", "gpt2", {"SkipLayerNormalization", "FastGelu"}),
])
def test_optimized_graphs_widen_and_commute_with_optimization(name, model_type, fused):
    small = onnx.load(str(SAMPLES / name))
    opt_small = _optimize(small, model_type, 64)
    ops = {n.op_type for n in opt_small.graph.node if n.domain == "com.microsoft"}
    assert fused <= ops, ops
    for k in (2, 3):
        wide_opt = widen(opt_small, factor=k)  # optimize, then widen
        assert validate(opt_small, wide_opt).ok
        opt_wide = _optimize(widen(small, factor=k), model_type, 64 * k)  # widen, then optimize
        feeds = make_inputs(small, seed=2)
        a, b = run(wide_opt, feeds), run(opt_wide, feeds)
        for out in a:
            assert np.abs(a[out] - b[out]).max() <= 1e-5 * max(1.0, np.abs(a[out]).max()), out


def test_fused_attention_is_refused_by_name():
    opt = _optimize(str(SAMPLES / "bert/bert_eager_ts17.onnx"), "bert", 64, attention=True)
    if not any(n.op_type == "Attention" for n in opt.graph.node):
        pytest.skip("the optimizer did not fuse attention")
    with pytest.raises(WidenError, match=r"Attention"):
        widen(opt, factor=2)
