"""Decoder and encoder-decoder families: RoPE placements, KV caches, GQA, tied heads with a
rescale, head-count growth. Function against the small model, structure against native exports."""
import numpy as np
import onnx
import pytest

from onnx_widen import validate, widen
from onnx_widen.apply import read_mapping
from onnx_widen.validation import make_inputs

from conftest import load_sample, load_wide_skeleton, max_rel_error, run, widen_feeds

ROPE = ["llama_ts17", "llama_dyn18", "qwen2_ts17", "qwen2_dyn18", "llama_past_ts17", "llama_past_dyn18", "neox_ts17", "neox_dyn18"]


def _err(small, wide, seed=0, dims=None):
    mapping = read_mapping(wide)["tensors"]
    feeds = make_inputs(small, seed=seed, dims=dims)
    return max_rel_error(run(small, feeds), run(wide, widen_feeds(feeds, mapping)), mapping)


def _inv_freq(model):
    for t in model.graph.initializer:
        if "inv_freq" in t.name:
            return onnx.numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant":
            v = onnx.numpy_helper.to_array(n.attribute[0].t)
            if v.dtype == np.float32 and v.ndim >= 1 and v.size >= 8 and v.reshape(-1)[0] == 1.0 and np.all(np.diff(v.reshape(-1)) <= 0):
                return v
    raise AssertionError("no inv_freq")


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ROPE)
def test_rope_remap_is_exact_but_not_the_wide_frequencies(name, k):
    small = load_sample(name)
    wide = widen(small, factor=k, rope="remap")
    assert _err(small, wide) < 2e-5
    native = _inv_freq(load_wide_skeleton(name, k))
    assert not np.allclose(_inv_freq(wide).reshape(-1), native.reshape(-1), rtol=1e-4)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ROPE)
def test_rope_spread_has_the_wide_configs_frequencies(name, k):
    wide = widen(load_sample(name), factor=k)
    np.testing.assert_allclose(_inv_freq(wide).reshape(-1), _inv_freq(load_wide_skeleton(name, k)).reshape(-1), rtol=2e-6)


@pytest.mark.parametrize("name", ["llama_past_ts17", "llama_past_dyn18"])
def test_kv_cache_is_widened_and_validated_with_a_non_empty_past(name):
    small = load_sample(name)
    wide = widen(small, factor=2)
    m = read_mapping(wide)["tensors"]
    key, value = m["past_key_values.0.key"], m["past_key_values.0.value"]
    assert set(key["axes"]) == {"3"} and set(value["axes"]) == {"3"}, "kv heads keep their count; only head size grows"
    assert key["scale"] == pytest.approx(2 ** 0.25)  # q and k carry k**0.25 each against 1/sqrt(k*dh)
    assert value["scale"] == pytest.approx(1.0)
    assert m["present.0.key"] == key
    feeds = make_inputs(small)
    past = feeds["past_key_values.0.key"]
    assert past.shape[2] > 0 and np.abs(past).max() > 0
    res = validate(small, wide)
    assert res.ok and {o.name for o in res.outputs} >= {"logits", "present.1.value"}


def test_gpt2_hidden_state_output_yields_to_the_tied_head():
    """Same norm feeds the tied LM head and last_hidden_state: epsilons stay canonical, the output's
    scale (1/K, not 1/sqrt(K)) is recorded in the mapping and validation uses it."""
    small = load_sample("gpt2_ts17")
    wide = widen(small, factor=2)
    assert read_mapping(wide)["tensors"]["last_hidden_state"]["scale"] == pytest.approx(0.5)
    assert validate(small, wide).ok


@pytest.mark.parametrize("name", ["t5_ts17", "t5_dyn18"])
def test_t5_rescale_before_tied_head_takes_the_wide_value(name):
    wide = widen(load_sample(name), factor=2)
    scalars = sorted({float(onnx.numpy_helper.to_array(t)) for t in wide.graph.initializer if not t.dims and t.data_type == 1}
                     | {float(onnx.numpy_helper.to_array(n.attribute[0].t)) for n in wide.graph.node
                        if n.op_type == "Constant" and n.attribute[0].type == 4 and not n.attribute[0].t.dims
                        and n.attribute[0].t.data_type == 1})
    assert any(abs(v - 128 ** -0.5) < 1e-7 for v in scalars) and not any(abs(v - 0.125) < 1e-9 for v in scalars)


@pytest.mark.parametrize("kv", ["tile", "keep"])
@pytest.mark.parametrize("name", ["llama_ts17", "llama_dyn18", "llama_past_ts17", "qwen2_dyn18", "gpt2_ts17", "bert_dyn18"])
def test_head_count_growth(name, kv):
    small = load_sample(name)
    wide = widen(small, factor=2, heads="grow", kv_heads=kv)
    assert _err(small, wide) < 2e-5
    m = read_mapping(wide)["tensors"]
    if "past_key_values.0.key" in m:
        axes = m["past_key_values.0.key"]["axes"]
        assert set(axes) == ({"1"} if kv == "tile" else set()) or kv == "keep"
        assert m["past_key_values.0.key"]["scale"] == pytest.approx(1.0)  # head size kept: no q/k factor


@pytest.mark.parametrize("name", ["t5_ts17", "t5v11_ts17"])
def test_t5_head_count_growth_grows_the_zero_cross_attention_bias(name):
    """T5's cross-attention has no relative bias: a zero [1, heads, q, k] ConstantOfShape (masked
    by Where) stands in for it. It is the same along the heads axis, so its shape grows with them."""
    small = load_sample(name)
    wide = widen(small, factor=2, heads="grow")
    assert _err(small, wide) < 2e-5
    heads = {tuple(onnx.numpy_helper.to_array(n.attribute[0].t).tolist()) for n in wide.graph.node if n.op_type == "Constant"
             and n.attribute[0].t.data_type == onnx.TensorProto.INT64 and list(n.attribute[0].t.dims) == [1]}
    assert (8,) in heads and (4,) not in heads  # the shape operand's head count, by role


@pytest.mark.parametrize("name", ["t5_dyn18", "t5v11_dyn18"])
def test_t5_head_growth_copies_the_folded_bias_of_each_head(name):
    """The dynamo export folds the position bias (and the zero cross-attention bias) into constants
    [1, heads, q, k], masked by Where: every new head copies its source head's bias."""
    small = load_sample(name)
    for opts in (dict(factor=2, heads="grow"), dict(num_heads=6)):
        wide = widen(small, **opts)
        assert _err(small, wide) < 2e-5
        biases = [t for t in wide.graph.initializer if len(t.dims) == 4 and t.dims[0] == 1 and t.dims[2] == t.dims[3] == 7]
        assert biases and all(t.dims[1] == (8 if "heads" in opts else 6) for t in biases)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ["gptj_ts17", "gptj_dyn18"])
def test_interleaved_rope_cache_takes_the_wide_frequencies(name, k):
    """GPT-J: rotary_dim 8 of head size 16, sin|cos cache gathered by position. The widened cache is
    the wide config's (rotary_dim 8K, base 10000), computed here from the formula, not the tool."""
    small = load_sample(name)
    wide = widen(small, factor=k)
    assert _err(small, wide) < 2e-5
    tables = [onnx.numpy_helper.to_array(t) for t in wide.graph.initializer if t.dims and t.dims[-1] == 8 * k and len(t.dims) >= 2]
    tables += [onnx.numpy_helper.to_array(n.attribute[0].t) for n in wide.graph.node if n.op_type == "Constant"
               and n.attribute[0].t.dims and n.attribute[0].t.dims[-1] == 8 * k and len(n.attribute[0].t.dims) >= 2]
    assert tables, "no widened sin|cos cache"
    rot = 8 * k
    f = 10000.0 ** (-np.arange(0, rot, 2) / rot)
    p = np.arange(tables[0].shape[-2])[:, None]
    expected = np.concatenate([np.sin(p * f), np.cos(p * f)], axis=-1)
    np.testing.assert_allclose(tables[0].reshape(-1, *expected.shape)[0], expected, atol=2e-6)
    remap = widen(small, factor=k, rope="remap")
    assert _err(small, remap) < 2e-5


@pytest.mark.parametrize("k", [2, 3])
def test_value_trap_sequence_equals_half_head_size(k):
    """llama_trap: static past 5 + sequence 3 = 8 = head_dim/2. The widened graph equals the native
    export; a rewrite of every integer 8 into 8K (by value, not role) does not."""
    small = load_sample("llama_trap_dyn18")
    native = load_wide_skeleton("llama_trap_dyn18", k)
    wide = widen(small, factor=k)
    assert _err(small, wide) < 2e-5
    from onnx_widen.structure import differences

    assert differences(wide, native) == {}
    naive = onnx.ModelProto()
    naive.CopyFrom(wide)
    for t in naive.graph.initializer:
        if t.data_type == onnx.TensorProto.INT64 and 0 < len(t.dims) <= 1:
            v = onnx.numpy_helper.to_array(t).copy()
            if (v == 8).any():
                v[v == 8] = 8 * k
                t.CopyFrom(onnx.numpy_helper.from_array(v, t.name))
    assert "int_constants" in differences(naive, native)
