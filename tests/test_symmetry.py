"""Exact symmetry breaking (--noise): outputs still validate, copies of a unit stop being twins,
and one step of gradient descent moves the copies apart, which pure copies never do."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_widen import validate, widen
from onnx_widen.apply import read_mapping
from onnx_widen.validation import make_inputs

from conftest import load_sample, max_rel_error, run, widen_feeds

D, F = 8, 16


def _mlp():
    """y = x + Linear(F, D)(GELU(Linear(D, F)(x))), x a hidden-state input (a residual block)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("W1", rng.standard_normal((D, F)) * 0.5), ("b1", rng.standard_normal(F) * 0.1),
        ("W2", rng.standard_normal((F, D)) * 0.5), ("b2", rng.standard_normal(D) * 0.1),
        ("sqrt2", np.array(np.sqrt(2))), ("one", np.array(1.0)), ("half", np.array(0.5))]]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "W1"], ["m1"]), n("Add", ["m1", "b1"], ["h"]), n("Div", ["h", "sqrt2"], ["t"]),
             n("Erf", ["t"], ["e"]), n("Add", ["e", "one"], ["e1"]), n("Mul", ["h", "e1"], ["he"]),
             n("Mul", ["he", "half"], ["g"]), n("MatMul", ["g", "W2"], ["m2"]), n("Add", ["m2", "b2"], ["f"]), n("Add", ["f", "x"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, D])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _weights(model):
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def _sgd_step(w, x, target, lr=0.1):
    """One step of gradient descent on 0.5 * |y - target|^2 for the widened block (numpy, by hand)."""
    from math import erf, pi, sqrt

    h = x @ w["W1"] + w["b1"]
    cdf = 0.5 * (1 + np.vectorize(erf)(h / sqrt(2)))
    g = h * cdf
    y = g @ w["W2"] + w["b2"] + x
    dy = y - target
    dg = dy @ w["W2"].T
    dh = dg * (cdf + h * np.exp(-h * h / 2) / sqrt(2 * pi))
    return {"W1": w["W1"] - lr * x.T @ dh, "W2": w["W2"] - lr * g.T @ dy}


def _copy_spread(w1, k):
    """Largest difference between the incoming weights of two copies of one FFN unit."""
    cols = w1.reshape(w1.shape[0], -1, k)
    return float(np.abs(cols - cols[:, :, :1]).max())


@pytest.mark.parametrize("k", [2, 3])
def test_noise_breaks_symmetry_exactly(k):
    small = _mlp()
    results = {}
    for noise in (0.0, 0.3):
        wide = widen(small, factor=k, noise=noise, seed=7)
        assert validate(small, wide).ok
        w = _weights(wide)
        # (b) copies: incoming weights equal, outgoing weights differ only with noise.
        rows = w["W2"].reshape(-1, k, w["W2"].shape[1])
        outgoing = float(np.abs(rows - rows[:, :1]).max())
        if noise == 0.0:
            assert _copy_spread(w["W1"], k) == 0.0
        m = read_mapping(wide)["tensors"]
        rng = np.random.default_rng(1)
        x = rng.standard_normal((4, D))
        xw = widen_feeds({"x": x.astype(np.float32)}, m)["x"].astype(np.float64)
        target = rng.standard_normal((4, D * k))
        step = _sgd_step(w, xw, target)
        # (c) the update each copy's incoming weights receive: identical for twins
        results[noise] = (outgoing, _copy_spread(step["W1"] - w["W1"], k))
    (out0, moved0), (out1, moved1) = results[0.0], results[0.3]
    assert out0 == 0.0 and moved0 < 1e-12, "pure copies stay twins after a step"
    assert out1 > 1e-3 and moved1 > 1e-4, "with noise the copies' gradients differ"


@pytest.mark.parametrize("name", ["bert_ts17", "llama_dyn18", "gpt2_ts17", "t5_ts17"])
def test_noise_keeps_the_function_on_real_exports(name):
    small = load_sample(name)
    wide = widen(small, factor=2, noise=0.2, seed=3)
    m = read_mapping(wide)["tensors"]
    feeds = make_inputs(small, seed=5)
    assert max_rel_error(run(small, feeds), run(wide, widen_feeds(feeds, m)), m) < 2e-5
    plain = {t.name: t for t in widen(small, factor=2).graph.initializer}
    changed = [t.name for t in wide.graph.initializer if t.name in plain and t.raw_data != plain[t.name].raw_data]
    assert changed, "noise must change some weights"
