"""Graphs from deployment pipelines: onnxruntime's transformer optimizer fuses norms and GELU
into com.microsoft ops (SkipLayerNormalization, BiasGelu, FastGelu). Attention fusion is off here
(tests/test_fused_attention.py covers it); embedding fusion is not supported."""
import numpy as np
import onnx
import pytest

from onnx_widen import validate, widen
from onnx_widen.validation import make_inputs

from conftest import SAMPLES, ort_optimize, run

ort_opt = pytest.importorskip("onnxruntime.transformers.optimizer")


@pytest.mark.parametrize("name,model_type,fused", [
    ("bert/bert_ts17.onnx", "bert", {"SkipLayerNormalization", "BiasGelu"}),
    ("gpt2/gpt2_ts17.onnx", "gpt2", {"SkipLayerNormalization", "FastGelu"}),
])
def test_optimized_graphs_widen_and_commute_with_optimization(name, model_type, fused):
    small = onnx.load(str(SAMPLES / name))
    opt_small = ort_optimize(small, model_type, 64)
    ops = {n.op_type for n in opt_small.graph.node if n.domain == "com.microsoft"}
    assert fused <= ops, ops
    for k in (2, 3):
        wide_opt = widen(opt_small, factor=k)  # optimize, then widen
        assert validate(opt_small, wide_opt).ok
        opt_wide = ort_optimize(widen(small, factor=k), model_type, 64 * k)  # widen, then optimize
        feeds = make_inputs(small, seed=2)
        a, b = run(wide_opt, feeds), run(opt_wide, feeds)
        for out in a:
            assert np.abs(a[out] - b[out]).max() <= 1e-5 * max(1.0, np.abs(a[out]).max()), out
