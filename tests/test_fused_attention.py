"""Fused attention (com.microsoft Attention, MultiHeadAttention, GroupQueryAttention,
RotaryEmbedding): graphs from onnxruntime's transformer optimizer where it fuses our samples,
hand-built graphs (perturbed weights, realistic shapes) for the ops it does not produce offline."""
import numpy as np
import onnx
import pytest

from onnx_widen import WidenError, validate, widen
from onnx_widen.validation import make_inputs

from conftest import SAMPLES, ort_optimize, run

pytest.importorskip("onnxruntime.transformers.optimizer")

BERT_EAGER = SAMPLES / "bert/bert_eager_ts17.onnx"
FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding")
# The optimizer's attention fusions: packed Attention, and MultiHeadAttention with and without the packed bias.
VARIANTS = {
    "Attention": {},
    "MultiHeadAttention": {"use_multi_head_attention": True},
    "MultiHeadAttention-nobias": {"use_multi_head_attention": True, "disable_multi_head_attention_bias": True},
}


def _fused(model, op):
    nodes = [n for n in model.graph.node if n.op_type == op and n.domain == "com.microsoft"]
    assert nodes, f"the optimizer produced no {op}"
    return nodes


def _optimized(variant, level=0, model=BERT_EAGER, hidden=64, heads=4):
    return ort_optimize(model, "bert", hidden, heads=heads, level=level, attention=True, **VARIANTS[variant])


def _structure(model):
    """What the fused ops look like: op, attributes, shapes of their constant inputs."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in FUSED:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            out.append((n.op_type, sorted(attrs.items()), [inits.get(i) for i in n.input]))
    return out


def _max_error(result):
    assert result.ok, result
    return max(o.max_abs for o in result.outputs)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("level", [0, 1, 99])
def test_optimizer_fused_attention_widens_exactly(variant, level):
    small = _optimized(variant, level)
    op = variant.split("-")[0]
    n_small = _fused(small, op)[0]
    for k, heads in ((2, "keep"), (3, "keep"), (2, "grow")):
        wide = widen(small, factor=k, heads=heads)
        assert _max_error(validate(small, wide)) < 1e-5
        n_wide = _fused(wide, op)[0]
        want = 4 * (k if heads == "grow" else 1)
        assert onnx.helper.get_attribute_value(next(a for a in n_wide.attribute if a.name == "num_heads")) == want
        assert not any(a.name == "scale" for a in n_wide.attribute)  # implicit 1/sqrt(wide head size), as exported


def _fill_skeleton(model, seed=0):
    """A native wide skeleton with values where its tensors were stripped (random weights, zero
    integer buffers): enough for the optimizer to fuse it and show the wide config's own fused
    structure. It is never run."""
    rng = np.random.default_rng(seed)
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    for t in tensors:
        if np.prod(t.dims) and not (t.raw_data or t.float_data or t.int64_data or t.int32_data):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            value = rng.standard_normal(tuple(t.dims)) if np.issubdtype(dtype, np.floating) else np.zeros(tuple(t.dims))
            t.CopyFrom(onnx.numpy_helper.from_array(value.astype(dtype), t.name))
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("k", [2, 3])
def test_optimize_then_widen_is_the_wide_export_optimized(variant, k):
    """Canonical: widening the fused graph gives the fused ops (heads, scale, packed weight shapes)
    of the natively exported wide config, and the same function as widening before optimizing."""
    small = _optimized(variant)
    wide_opt = widen(small, factor=k)
    skeleton = _fill_skeleton(onnx.load(str(SAMPLES / f"bert/bert_eager_ts17_wide{k}.skel.onnx"), load_external_data=False))
    native = _optimized(variant, model=skeleton, hidden=64 * k)
    assert _structure(wide_opt) == _structure(native)
    opt_wide = _optimized(variant, model=widen(onnx.load(str(BERT_EAGER)), factor=k), hidden=64 * k)
    assert _structure(opt_wide) == _structure(native)
    feeds = make_inputs(small, seed=3)
    a, b = run(wide_opt, feeds), run(opt_wide, feeds)
    for name in a:
        assert np.abs(a[name] - b[name]).max() <= 1e-5 * max(1.0, np.abs(a[name]).max()), name
