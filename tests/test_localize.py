"""validate --localize and widen's failure message name the first tensor where a wide model stops
being the widened copy of the small one. Tested by breaking one rule on purpose."""
import onnx
import pytest

from onnx_widen import widen
from onnx_widen.localize import localize

from conftest import load_sample
from test_cli import cli


def _break_gamma(model, layer_hint):
    for t in model.graph.initializer:
        if layer_hint in t.name:
            a = onnx.numpy_helper.to_array(t).copy()
            a[: a.size // 2] *= 1.5
            t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
            return t.name
    raise AssertionError(layer_hint)


@pytest.mark.parametrize("name,hint,node_part", [
    ("bert_ts17", "layer.1.attention.output.LayerNorm.weight", "layer.1/attention/output/LayerNorm"),
    ("llama_ts17", "layers.1.post_attention_layernorm.weight", "layers.1/post_attention_layernorm"),
])
def test_localize_names_the_broken_node(name, hint, node_part):
    small = load_sample(name)
    wide = widen(small, factor=2)
    assert localize(small, wide) is None
    _break_gamma(wide, hint)
    first = localize(small, wide)
    assert first is not None and node_part in first["node"], first
    assert first["max_rel"] > 1e-3


def test_a_wrong_rule_is_caught_and_located(tmp_path, monkeypatch, capsys):
    """Break the FFN down-projection rule (drop the division by the copies) and widen: the run fails,
    writes nothing, and names the first FFN output."""
    import onnx_widen.rules as rules

    original = rules.widen_tensor

    def wrong(arr, layouts, read_axes, factor, out=None):
        if arr.ndim == 2 and arr.shape[0] > arr.shape[1]:  # [ffn, hidden]: the down projection
            return original(arr, layouts, (), factor, out)
        return original(arr, layouts, read_axes, factor, out)

    monkeypatch.setattr(rules, "widen_tensor", wrong)
    from onnx_widen.cli import main

    out = tmp_path / "o.onnx"
    code = main(["widen", "sample_models/bert/bert_ts17.onnx", "-o", str(out), "-k", "2", "-q"])
    assert code == 1 and not out.exists()
    err = capsys.readouterr().err
    assert "validation failed" in err and "first divergence" in err and "layer.0/output/dense" in err, err


def test_validate_localize_flag(tmp_path):
    small = "sample_models/bert/bert_ts17.onnx"
    wide = widen(small, factor=2)
    _break_gamma(wide, "layer.0.output.LayerNorm.weight")
    path = tmp_path / "w.onnx"
    onnx.save(wide, str(path))
    code, _, err = cli("validate", small, str(path), "--localize")
    assert code == 1 and "first divergence" in err and "layer.0/output/LayerNorm" in err and len(err.strip().splitlines()) == 1
