"""--depth: new pre-norm blocks that add exactly 0 to the residual stream (copies of their
neighbour with zero output projections), alone and with widening; the exporter's own structure for
the deeper config; refusals (post-norm); --noise / --allow-approximate; the command line and folders."""
import dataclasses
import json
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_widen import UsageError, WidenError, validate, widen
from onnx_widen.apply import read_mapping
from onnx_widen.blocks import find_stacks
from onnx_widen.depth import deepen, positions
from onnx_widen.graph import Graph
from onnx_widen.structure import differences
from onnx_widen.workflow import widen_file

from conftest import ROOT, SAMPLES, load_sample

PRE_NORM = ["gpt2", "llama", "qwen2", "gptj", "neox", "t5", "t5v11", "llama_past"]


def _max_rel(small, wide):
    res = validate(small, wide)
    assert res.ok, res.to_json()
    return max(o.max_rel for o in res.outputs)


def _blocks(model):
    return [len(s.blocks) for s in find_stacks(Graph(model))]


CASES = [(e, k, d) for e in ("ts17", "dyn18") for k, d in ((1, 2), (2, 1))] + [("ts17", 1, 1), ("ts17", 2, 2)]


@pytest.mark.parametrize("exporter,k,d", CASES)
@pytest.mark.parametrize("family", PRE_NORM)
def test_deeper_model_computes_the_same_function(family, exporter, k, d):
    small = load_sample(f"{family}_{exporter}")
    wide = widen(small, factor=k, depth=d)
    onnx.checker.check_model(wide)
    stacks = _blocks(small)
    assert _blocks(wide) == [n + d for n in stacks]  # T5: the encoder and the decoder stack each
    err = _max_rel(small, wide)
    # Alone, a new block adds an exact 0 to the stream: not one output bit moves.
    assert err == 0.0 if k == 1 else err < 2e-5


def test_kv_cache_of_new_blocks_is_named_like_the_exporters():
    small = load_sample("llama_past_ts17")
    wide = widen(small, factor=2, depth=2)
    names = lambda vs: [v.name for v in vs]  # noqa: E731
    new_in = [n for n in names(wide.graph.input) if n not in names(small.graph.input)]
    new_out = [n for n in names(wide.graph.output) if n not in names(small.graph.output)]
    assert sorted(new_in) == [f"past_key_values.{i}.{kv}" for i in (2, 3) for kv in ("key", "value")]
    assert sorted(new_out) == [f"present.{i}.{kv}" for i in (2, 3) for kv in ("key", "value")]
    # The new cache tensors carry the wide head size like the old ones, and are mapped the same way.
    mapping = read_mapping(wide)["tensors"]
    for new, old in (("past_key_values.2.key", "past_key_values.0.key"), ("present.3.value", "present.0.value")):
        assert mapping[new]["axes"] == mapping[old]["axes"]
        assert mapping[new]["scale"] == pytest.approx(mapping[old]["scale"])


def test_new_blocks_are_copies_with_new_names_and_zero_projections():
    small = load_sample("llama_ts17")
    deep, info = deepen(small, 1)
    assert info["after_block"] == [[1]]
    before = {t.name: numpy_helper.to_array(t) for t in small.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in deep.graph.initializer}
    assert set(before) <= set(after)
    new = {n: v for n, v in after.items() if n not in before}
    zero = [n for n, v in new.items() if not v.any()]
    copied = [n for n, v in new.items() if v.any()]
    assert len(zero) == 2  # o_proj and down_proj
    assert copied and all(any(v.shape == b.shape and np.array_equal(v, b) for b in before.values()) for v in
                          (new[n] for n in copied))
    stacks = find_stacks(Graph(deep))
    assert sorted(stacks[0].blocks[1].projections) == sorted(zero)  # the new block is the second one
    node_names = Counter(n.name for n in deep.graph.node if n.name)
    assert max(node_names.values()) == 1


def test_positions():
    assert positions(2, 1) == [1]
    assert positions(2, 2) == [1, 2]
    assert positions(12, 3) == [2, 6, 10]
    assert positions(4, 2, at=(3, 1)) == [1, 3]
    with pytest.raises(UsageError, match="positions are 1..2"):
        positions(2, 1, at=(3,))


def test_depth_at_places_the_blocks():
    small = load_sample("gpt2_ts17")
    wide = widen(small, factor=2, depth_at=[2, 2])
    assert read_mapping(wide)["depth"]["after_block"] == [[2, 2]]
    assert read_mapping(wide)["options"]["depth"] == 2
    assert _blocks(wide) == [4]
    assert _max_rel(small, wide) < 2e-5


@pytest.mark.parametrize("name", ["bert_ts17", "bert_ts14", "roberta_dyn18", "distilbert_ts17", "electra_ts17", "xlmr_dyn18"])
def test_post_norm_is_refused_with_its_reason(name):
    with pytest.raises(WidenError, match="post-norm blocks .* a norm after the residual add"):
        widen(load_sample(name), factor=2, depth=1)


def test_bad_depth_requests_are_usage_errors():
    small = load_sample("gpt2_ts17")
    with pytest.raises(UsageError, match="2 --depth-at positions"):
        widen(small, factor=2, depth=1, depth_at=[1, 2])
    with pytest.raises(UsageError, match="depth must be an integer"):
        widen(small, factor=2, depth=-1)
    with pytest.raises(UsageError, match="nothing to widen"):
        widen(small, factor=1, depth=0)


def _new_projection_values(model, stack=0, block=1):
    g = Graph(model)
    return [g.const(w) for w in find_stacks(g)[stack].blocks[block].projections]


def test_noise_without_allow_approximate_keeps_projections_exactly_zero():
    small = load_sample("llama_dyn18")
    deep_only = widen(small, factor=1, depth=1, noise=0.1, seed=3)
    assert all(not v.any() for v in _new_projection_values(deep_only))
    assert _max_rel(small, deep_only) == 0.0
    # With widening, --noise still breaks the widening's symmetry exactly.
    assert _max_rel(small, widen(small, factor=2, depth=1, noise=0.1, seed=3)) < 2e-5


def test_allow_approximate_puts_noise_on_the_projections_and_reports_the_error(tmp_path):
    src = str(SAMPLES / "llama" / "llama_ts17.onnx")
    out = tmp_path / "deep.onnx"
    summary = widen_file(src, str(out), 2, depth=1, noise=0.05, seed=1, allow_approximate=True)
    assert summary["validation"]["ok"]  # the widening of the deeper model is still exact
    err = summary["depth"]["error"]["logits"]["max_rel"]
    assert summary["depth"]["approximate"] and 0 < err < 0.5
    deep = onnx.load(str(out))
    weights = [v for v in _new_projection_values(deep) if v.ndim == 2]
    assert weights and all(v.any() for v in weights)
    # What the report says is what the file does.
    assert _max_rel_unchecked(src, deep) == pytest.approx(err, rel=1e-3)


def _max_rel_unchecked(small, wide):
    return max(o.max_rel for o in validate(small, wide).outputs)


def _cli(*args):
    p = subprocess.run([sys.executable, "-m", "onnx_widen", *args], capture_output=True, text=True, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


def test_cli_widen_with_depth(tmp_path):
    out = tmp_path / "g.onnx"
    code, stdout, err = _cli("widen", str(SAMPLES / "gpt2" / "gpt2_ts17.onnx"), "-o", str(out), "--factor", "2", "--depth", "1")
    assert code == 0, err
    assert "depth: 2 -> 3 blocks" in stdout.replace("\n", " ")
    wide = onnx.load(str(out))
    assert _blocks(wide) == [3]
    assert validate(str(SAMPLES / "gpt2" / "gpt2_ts17.onnx"), wide).ok


def test_cli_depth_only_and_refusals(tmp_path):
    out = tmp_path / "l.onnx"
    assert _cli("widen", str(SAMPLES / "llama" / "llama_dyn18.onnx"), "-o", str(out), "--factor", "1", "--depth-at", "2", "-q")[0] == 0
    assert _blocks(onnx.load(str(out))) == [3]
    bad = tmp_path / "b.onnx"
    code, stdout, err = _cli("widen", str(SAMPLES / "bert" / "bert_ts17.onnx"), "-o", str(bad), "--factor", "2", "--depth", "1")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "post-norm" in err and "Traceback" not in err
    assert not bad.exists()
    code, _, err = _cli("widen", str(SAMPLES / "gpt2" / "gpt2_ts17.onnx"), "-o", str(bad), "--depth-at", "1,x")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not bad.exists()


def test_folder_config_counts_the_new_blocks(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    shutil.copy(SAMPLES / "llama_past" / "llama_past_ts17.onnx", src / "decoder_with_past_model.onnx")
    shutil.copy(SAMPLES / "llama" / "llama_ts17.onnx", src / "decoder_model.onnx")
    (src / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}))
    out = tmp_path / "deep"
    from onnx_widen.cli import main

    assert main(["widen", str(src), "-o", str(out), "-k", "2", "--depth", "1", "-q"]) == 0
    assert json.loads((out / "config.json").read_text()) == {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3}
    past = onnx.load(str(out / "decoder_with_past_model.onnx"))
    assert "past_key_values.2.key" in [i.name for i in past.graph.input]
    assert "present.2.value" in [o.name for o in past.graph.output]


# ---- the exporter's own structure for the deeper config -------------------------------------------
# Export the sample's declaration at L and at L + D layers with the installed torch/transformers
# (the committed samples may come from another version), deepen the L-layer export by D, and
# compare with the L + D export: op multiset, initializer shapes, constants, attributes, inputs and
# outputs must be the same.
CANONICAL = [("gpt2_ts17", 1), ("llama_dyn18", 2), ("gptj_ts17", 1), ("neox_ts17", 1), ("t5_ts17", 1), ("llama_past_ts17", 1)]


def _export(tmp_path, name, layers, monkeypatch):
    sys.path.insert(0, str(SAMPLES))
    try:
        import make_samples as ms
    finally:
        sys.path.remove(str(SAMPLES))
    monkeypatch.setattr(ms, "LAYERS", layers)
    arch, (_, attn, exporter, opset) = next((a, v) for a in ms.ARCHS for v in a.variants if v[0] == name)
    if arch.kv_cache:  # one past / present pair per layer, as the exporter names them
        past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        plain = [n for n in arch.inputs if not n.startswith("past_key_values.")]
        arch = dataclasses.replace(arch, inputs=plain + past, outputs=["logits"] + present,
                                   input_axes={**{n: arch.input_axes[n] for n in plain},
                                               **{n: arch.input_axes["past_key_values.0.key"] for n in past}},
                                   output_axes={"logits": arch.output_axes["logits"],
                                                **{n: arch.output_axes["present.0.key"] for n in present}})
    cfg, _, wrapper = ms.build_model(arch, attn, 1)
    return ms.export(arch, cfg, wrapper, exporter, opset, str(tmp_path / f"{name}_{layers}.onnx"), [])


@pytest.mark.parametrize("name,d", CANONICAL)
def test_deeper_model_has_the_exporters_structure(tmp_path, monkeypatch, name, d):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    small = _export(tmp_path, name, 2, monkeypatch)
    native = _export(tmp_path, name, 2 + d, monkeypatch)
    deep, _ = deepen(small, d)
    assert differences(deep, native) == {}
    assert differences(small, native) != {}  # the comparison sees a missing block
