"""float16 and bfloat16 models: widened in float32, cast back once, judged against a float32
reference (onnx_widen/precision.py)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_widen import WidenError, validate, widen
from onnx_widen import precision, rules
from onnx_widen.apply import read_mapping

from conftest import SAMPLES

float16 = pytest.importorskip("onnxruntime.transformers.float16")


def to_fp16(name):
    return float16.convert_float_to_float16(onnx.load(str(SAMPLES / name)), keep_io_types=True)


@pytest.mark.parametrize("name", ["bert/bert_ts17.onnx", "gpt2/gpt2_dyn18.onnx", "llama/llama_ts17.onnx", "qwen2/qwen2_dyn18.onnx",
                                  "gptj/gptj_ts17.onnx", "gptj/gptj_dyn18.onnx", "neox/neox_ts17.onnx", "t5/t5_ts17.onnx"])
def test_float16_exports_widen_and_stay_as_close_to_float32_as_the_small_model(name):
    small = to_fp16(name)
    assert precision.narrow_dtype(small) == "float16"
    wide = widen(small, factor=2)
    assert all(t.data_type != TensorProto.FLOAT for t in wide.graph.initializer if len(t.dims) >= 2)
    res = validate(small, wide)
    assert res.ok and "float32" in res.reference
    for o in res.outputs:
        # The small model's own float16 error is O(1e-4..1e-3); the wide model's is of that order too.
        assert 0 < o.ref_small_rel < 5e-3 and o.ref_wide_rel <= precision.REFERENCE_MARGIN * o.ref_small_rel + 1e-4, o


def test_float16_criterion_still_catches_a_wrong_weight():
    small = to_fp16("bert/bert_ts17.onnx")
    wide = widen(small, factor=2)
    gamma = next(t for t in wide.graph.initializer if t.data_type == TensorProto.FLOAT16 and len(t.dims) == 1 and "LayerNorm.weight" in t.name)
    gamma.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(gamma).astype(np.float32) * 1.02).astype(np.float16), gamma.name))
    assert not validate(small, wide).ok


def test_float16_weights_are_widened_in_float32_and_rounded_once():
    from onnx_widen.api import build_plan
    from onnx_widen.plan import Options

    small = to_fp16("bert/bert_ts17.onnx")
    plan = build_plan(small, Options(factor=2))
    wide = widen(small, factor=2)
    name = next(n.input[1] for n in small.graph.node if n.op_type == "MatMul" and "query" in n.name)
    recipe = next(e[3] for e in plan.edits.values() if e[2] == name)
    # q weights: c/(a*k), k**-0.25 / k, corrected for the wide softmax constant's own float16 rounding.
    assert recipe.factor == pytest.approx(2 ** -0.25, rel=1e-3)
    w_small = numpy_helper.to_array(next(t for t in small.graph.initializer if t.name == name)).astype(np.float32)
    w_wide = numpy_helper.to_array(next(t for t in wide.graph.initializer if t.name == name))
    repeated = np.repeat(np.repeat(w_small, 2, axis=0), 2, axis=1)
    once = (repeated * np.float32(recipe.factor / 2)).astype(np.float16)
    assert w_wide.dtype == np.float16 and np.array_equal(w_wide, once)
    twice = (repeated.astype(np.float16) * np.float16(recipe.factor / 2)).astype(np.float16)  # arithmetic in float16
    assert not np.array_equal(w_wide, twice)


def _bf16_weights_behind_casts(model):
    """Weights stored as bfloat16 and cast to float at run time (what onnxruntime runs on CPU)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    casts = []
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) >= 1:
            arr = numpy_helper.to_array(t)
            name = t.name
            t.CopyFrom(helper.make_tensor(name + "_bf16", TensorProto.BFLOAT16, arr.shape, arr.ravel().tolist()))
            casts.append(helper.make_node("Cast", [name + "_bf16"], [name], to=TensorProto.FLOAT, name=f"cast_{name}"))
    nodes = casts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def test_bfloat16_weights_behind_casts_widen_exactly():
    small = _bf16_weights_behind_casts(onnx.load(str(SAMPLES / "bert/bert_ts17.onnx")))
    assert precision.narrow_dtype(small) == "bfloat16"
    wide = widen(small, factor=2)
    assert {t.data_type for t in wide.graph.initializer if len(t.dims) >= 2} == {TensorProto.BFLOAT16}
    res = validate(small, wide)
    assert res.ok, res.to_json()
    assert all(o.ref_wide_rel is not None for o in res.outputs)


def test_bfloat16_graph_that_onnxruntime_cannot_run_is_compared_upcast():
    """A graph computing in bfloat16 end to end: onnxruntime's CPU kernels are missing, so both
    models are upcast to float32 and compared at the bfloat16 tolerance."""
    rng = np.random.default_rng(0)
    d, v = 16, 20

    def bf(name, *shape, s=0.3, mean=0.0):
        return helper.make_tensor(name, TensorProto.BFLOAT16, shape, (rng.standard_normal(shape) * s + mean).ravel().tolist())

    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["x"]),
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["h", "W1"], ["u"]),
        helper.make_node("Relu", ["u"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["f"]),
        helper.make_node("Add", ["f", "h"], ["y"]),
        helper.make_node("MatMul", ["y", "H"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.BFLOAT16, [2, 5, 3])],
                              [bf("E", v, d, s=1.0), bf("g", d, s=0.2, mean=1.0), bf("b", d, s=0.1), bf("W1", d, 32), bf("W2", 32, d), bf("H", d, 3)])
    small = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    small.ir_version = 8
    wide = widen(small, factor=2)
    assert read_mapping(wide)["factor"] == 2
    res = validate(small, wide)
    assert res.ok and "upcast" in res.reference and res.rtol == precision.NARROW_RTOL["bfloat16"], res.to_json()


def test_values_past_the_narrow_range_are_refused_by_name():
    with pytest.raises(WidenError, match=r"tensor 'w'.*past the float16 range"):
        rules.cast_back(np.array([1.0, 7.0e4], dtype=np.float32), np.float16, "w")
    assert rules.cast_back(np.array([np.inf, 1.0], dtype=np.float32), np.float16, "w")[0] == np.inf  # already infinite: kept
    import ml_dtypes

    out = rules.cast_back(np.array([1.0, 3.0e38], dtype=np.float32), ml_dtypes.bfloat16, "w")
    assert out.dtype == ml_dtypes.bfloat16


def test_rotary_frequencies_rounded_to_float16_are_still_recognised():
    from onnx_widen.dims import Layout

    dh = 16
    f32 = 10000.0 ** (-np.arange(0, dh, 2) / dh)
    small = f32.astype(np.float16)
    wide = rules.rotary_frequencies(small, Layout.spread(dh // 2, 2), 0)
    canonical = (10000.0 ** (-np.arange(0, 2 * dh, 2) / (2 * dh))).astype(np.float16)
    assert wide.dtype == np.float16 and np.array_equal(wide[::2], small)
    assert np.allclose(wide.astype(np.float64), canonical.astype(np.float64), rtol=2e-3)
