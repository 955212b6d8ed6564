"""Edge cases on hand-built graphs: every softmax-scale form, GELU forms, the sequence-length ==
head-size trap, a bias shared by q and v, and a node no pattern covers."""
import numpy as np
import onnx
import pytest

from onnx_widen import WidenError, widen
from onnx_widen.apply import read_mapping
from onnx_widen.validation import make_inputs

from conftest import max_rel_error, run
from minigraph import build


def _function_error(small, k, **kw):
    wide = widen(small, factor=k, **kw)
    feeds = make_inputs(small, seed=3)
    return max_rel_error(run(small, feeds), run(wide, feeds), read_mapping(wide)["tensors"]), wide


def _float_scalars(model):
    vals = {}
    for t in model.graph.initializer:
        a = onnx.numpy_helper.to_array(t)
        if a.size == 1 and a.dtype == np.float32:
            vals[t.name] = float(a.reshape(()))
    return vals


@pytest.mark.parametrize("scale", ["mul", "div", "split", "runtime"])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("k", [2, 3])
def test_scale_forms(scale, static, k, layers):
    err, wide = _function_error(build(scale=scale, static=static, layers=layers), k)
    assert err < 1e-5
    s = _float_scalars(wide)
    dh_wide = 8 * k
    if scale == "mul":
        assert s["inv_sqrt_dh"] == pytest.approx(dh_wide ** -0.5, rel=1e-6)
    elif scale == "div":
        assert s["sqrt_dh"] == pytest.approx(dh_wide ** 0.5, rel=1e-6)
    elif scale == "split":
        assert s["qk_scale"] == pytest.approx(dh_wide ** -0.25, rel=1e-6)
    else:
        assert s["one"] == 1.0  # computed from Shape(q) at run time: nothing to rewrite


@pytest.mark.parametrize("gelu", ["erf_div", "erf_mul", "tanh", "op"])
def test_gelu_forms(gelu):
    opset = 20 if gelu == "op" else 17
    err, _ = _function_error(build(gelu=gelu, opset=opset), 2)
    assert err < 1e-5


def test_sequence_length_equal_to_head_size_is_not_rewritten():
    """batch == heads == 2 and sequence == head size == 8: only the head-size entry may change."""
    small = build(batch=2, heads=2, seq=8, d=16, static=True)
    err, wide = _function_error(small, 2)
    assert err < 1e-5
    consts = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in wide.graph.initializer}
    assert consts["split_shape"] == [2, 8, 2, 16]
    assert consts["merge_shape"] == [2, 8, 32]
    assert consts["flat"] == [-1, 32]


def test_bias_shared_by_q_and_v_is_unshared():
    small = build(shared_bias=True)
    err, wide = _function_error(small, 2)
    assert err < 1e-5
    names = [t.name for t in wide.graph.initializer if t.name.startswith("shared_bias")]
    assert len(names) == 2  # q's copy carries k**-0.25, v's does not
    a, b = (onnx.numpy_helper.to_array(t) for t in wide.graph.initializer if t.name in names)
    assert np.allclose(a / b, 2 ** -0.25) or np.allclose(b / a, 2 ** -0.25)


def test_uncovered_op_names_the_node():
    with pytest.raises(WidenError, match=r"n_cumsum.*CumSum.*no pattern covers"):
        widen(build(uncovered=True), factor=2)


def test_classifier_axis_not_widened_and_hidden_output_mapped():
    wide = widen(build(), factor=2)
    m = read_mapping(wide)["tensors"]
    assert set(m) == {"hidden"}
    out = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in wide.graph.output}
    assert out == {"logits": [16, 3], "hidden": [2, 8, 32]}


@pytest.mark.parametrize("norm,opset", [("rms_op", 23), ("simplified", 17)])
def test_rmsnorm_ops(norm, opset):
    small = build(norm=norm, opset=opset, layers=2)
    for k in (2, 3):
        err, wide = _function_error(small, k)
        assert err < 1e-5
        eps = {a.f for n in wide.graph.node if n.op_type in ("RMSNormalization", "SimplifiedLayerNormalization") for a in n.attribute if a.name == "epsilon"}
        assert eps == {np.float32(1e-5)}
