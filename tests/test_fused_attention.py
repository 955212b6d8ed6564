"""Fused attention (com.microsoft Attention, MultiHeadAttention, GroupQueryAttention,
RotaryEmbedding): graphs from onnxruntime's transformer optimizer where it fuses our samples,
hand-built graphs (perturbed weights, realistic shapes) for the ops it does not produce offline."""
import numpy as np
import onnx
import pytest

from onnx_widen import WidenError, validate, widen
from onnx_widen.validation import make_inputs

import fusedgraph
import ortopt
from conftest import SAMPLES, run

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
    pytest.importorskip("onnxruntime.transformers.optimizer")  # the hand-built graphs below need only onnxruntime
    return ortopt.optimize(model, "bert", hidden, level=level, attention=True, embed=False, heads=heads, **VARIANTS[variant])


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


# ---- hand-built graphs: GroupQueryAttention, MultiHeadAttention, RotaryEmbedding ------------------
CASES = {
    "gqa, rotary inside": {},
    "gqa, rotary inside, interleaved": {"interleaved": True},
    "gqa, partial rotary inside": {"d": 128, "rotary_dim": 16},
    "gqa, packed qkv": {"packed": True},
    "gqa, explicit 1/sqrt(head_size)": {"scale": "head"},
    "gqa, custom scale, no rotary": {"rotary": "none", "scale": 0.5},
    "gqa, one kv head": {"d": 128, "heads": 8, "kv_heads": 1},
    "gqa + RotaryEmbedding ops": {"rotary": "op"},
    "RotaryEmbedding, partial, interleaved": {"rotary": "op", "rotary_dim": 8, "interleaved": True},
    "mha + RotaryEmbedding ops": {"attention": "mha", "kv_heads": 4, "rotary": "op"},
    "Attention, causal": {"attention": "attention", "rotary": "none"},
    "Attention, causal, explicit 1/sqrt(head_size)": {"attention": "attention", "rotary": "none", "scale": "head"},
}
OPTIONS = {
    "K=2": {"factor": 2}, "K=3": {"factor": 3}, "K=2 grow": {"factor": 2, "heads": "grow"},
    "K=2 grow, kv kept": {"factor": 2, "heads": "grow", "kv_heads": "keep"}, "K=2 remap": {"factor": 2, "rope": "remap"},
}


def _native(case, factor=2, heads="keep", kv_heads="tile", **_):
    """The same builder at the wide config: what a model builder writes for the wide model."""
    c = {"d": 64, "heads": 4, "kv_heads": 2, "ffn": 96, **CASES[case]}
    grow = factor if heads == "grow" else 1
    mha = c.get("attention") == "mha"  # no kv heads of its own: all heads grow
    c.update(d=c["d"] * factor, ffn=c["ffn"] * factor, heads=c["heads"] * grow,
             kv_heads=c["kv_heads"] * (grow if kv_heads == "tile" or mha else 1))
    if c.get("rotary_dim") and heads == "keep":
        c["rotary_dim"] *= factor
    return fusedgraph.build(**c)


def _attrs(n):
    return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_handbuilt_fused_attention_widens_exactly(case, option):
    small = fusedgraph.build(**CASES[case])
    wide = widen(small, **OPTIONS[option])
    assert _max_error(validate(small, wide)) < 1e-4  # logits of size ~10


@pytest.mark.parametrize("option", ["K=2", "K=3", "K=2 grow", "K=2 grow, kv kept"])
@pytest.mark.parametrize("case", list(CASES))
def test_handbuilt_fused_attention_is_the_wide_build(case, option):
    """Canonical: head counts, rotary dims, scale and every parameter's shape are the wide
    config's, and the rotary caches hold the wide config's frequencies."""
    opts = OPTIONS[option]
    wide, native = widen(fusedgraph.build(**CASES[case]), **opts), _native(case, **opts)
    got = {t.name: onnx.numpy_helper.to_array(t) for t in wide.graph.initializer}
    want = {t.name: onnx.numpy_helper.to_array(t) for t in native.graph.initializer}
    assert {n: v.shape for n, v in got.items()} == {n: v.shape for n, v in want.items()}
    for name in {"cos_cache", "sin_cache"} & set(want):
        np.testing.assert_allclose(got[name], want[name], atol=1e-6)
    for a, b in zip(wide.graph.node, native.graph.node):
        assert (a.op_type, _attrs(a).keys()) == (b.op_type, _attrs(b).keys())
        for key, value in _attrs(b).items():
            assert _attrs(a)[key] == pytest.approx(value, rel=1e-6), (a.name, key)


def _past_shapes(model, batch, seq, past):
    shapes = {"input_ids": (batch, seq), "attention_mask": (batch, past + seq)}
    for i in model.graph.input:
        if i.name.startswith("past_"):
            fixed = [d.dim_value for d in i.type.tensor_type.shape.dim]
            # past key/value (B, N, P, dh), or Attention's stacked (2, B, N, P, dh)
            shapes[i.name] = (batch, fixed[1], past, fixed[3]) if len(fixed) == 4 else (2, batch, fixed[2], past, fixed[4])
    return shapes


@pytest.mark.parametrize("option", ["K=2", "K=3", "K=2 grow", "K=2 grow, kv kept"])
@pytest.mark.parametrize("case", ["gqa, rotary inside", "gqa, packed qkv", "gqa + RotaryEmbedding ops", "mha + RotaryEmbedding ops",
                                  "Attention, causal"])
def test_kv_cache_of_fused_attention(case, option):
    """Past key/value inputs and present outputs carry the widened head axes; the validator feeds
    the widened past (decode steps and a chunk after a prompt)."""
    small = fusedgraph.build(past=True, **CASES[case])
    wide = widen(small, **OPTIONS[option])
    for batch, seq, past in ((1, 1, 5), (1, 4, 3), (2, 1, 6)):
        assert _max_error(validate(small, wide, shapes=_past_shapes(small, batch, seq, past))) < 1e-4


# ---- refusals: one line naming the node, its op and why ----------------------------------------
def _set_attr(model, op, name, value):
    for n in model.graph.node:
        if n.op_type == op:
            n.attribute.append(onnx.helper.make_attribute(name, value))
    return model


def _add_input(model, op, index, init_name, value):
    model.graph.initializer.append(onnx.numpy_helper.from_array(value, init_name))
    for n in model.graph.node:
        if n.op_type == op:
            n.input.extend([""] * (index - len(n.input)) + [init_name])
    return model


@pytest.mark.parametrize("model,pattern", [
    (lambda: _set_attr(_optimized("Attention"), "Attention", "do_rotary", 1),
     r"^node '[^']+' \(Attention\): rotary embedding inside Attention \(do_rotary=1\) is not supported$"),
    (lambda: _set_attr(_optimized("Attention"), "Attention", "qkv_hidden_sizes", [80, 48, 64]),
     r"^node '[^']+' \(Attention\): packed QKV layout \[80, 48, 64\] .* is not \[q \| k \| v\] by heads$"),
    (lambda: _add_input(fusedgraph.build(), "GroupQueryAttention", 14, "q_norm", np.ones(16, np.float32)),
     r"^node '[^']+' \(GroupQueryAttention\): per-head q/k norms .* are not supported$"),
])
def test_unsupported_fused_layouts_are_refused_by_name(model, pattern):
    with pytest.raises(WidenError, match=pattern):
        widen(model(), factor=2)
