"""Non-integer targets (WIDENING.md, Non-integer factors): an FFN size, a head count and a hidden
size that are not multiples of the small ones. FFN units and heads are copied unevenly (readers
divide), RMSNorm models zero-pad the residual stream, pre-norm LayerNorm models average-expand it
(LEMON), post-norm LayerNorm is refused unless an approximate result is asked for. Function on
real exports with onnxruntime; structure against native exports of the target configs (torch)."""
import json

import numpy as np
import onnx
import pytest

from onnx_widen import UsageError, WidenError, validate, widen
from onnx_widen.api import build_plan
from onnx_widen.apply import read_mapping
from onnx_widen.dims import MEAN, Layout
from onnx_widen.folder import widen_config
from onnx_widen.plan import Options
from onnx_widen.structure import differences

from conftest import SAMPLES, entry, load_sample, native_export, run
from conftest import widen_feeds
from onnx_widen.validation import make_inputs
from test_cli import cli

# Sample sizes: hidden 64, 4 heads x 16; FFN 256 (BERT, GPT-2, GPT-J), 128 (LLaMA, Qwen2, NeoX, T5);
# LLaMA / Qwen2: 2 kv heads.
EXACT = 2e-5


def _unwiden(arr, m):
    """Independent of the package: average each small unit's copies (any layout), drop units that
    copy none (zero or mean units), unscale."""
    out = arr.astype(np.float64)
    for axis, lay in m["axes"].items():
        axis = int(axis)
        src = np.repeat(np.arange(lay["small"]), lay["repeat"]) if "repeat" in lay else np.array(lay["src"])
        out = np.stack([np.take(out, np.flatnonzero(src == i), axis=axis).mean(axis=axis) for i in range(lay["small"])], axis=axis)
    return out / m["scale"]


def _err(small, wide, seed=0):
    mapping = read_mapping(wide)["tensors"]
    feeds = make_inputs(small, seed=seed)
    ref, got = run(small, feeds), run(wide, widen_feeds(feeds, mapping))
    worst = 0.0
    for name, r in ref.items():
        g = _unwiden(got[name], mapping[name]) if name in mapping else got[name]
        assert g.shape == r.shape, name
        worst = max(worst, float(np.abs(g - r).max() / np.abs(r).max()))
    return worst


def _grown_sizes(model):
    return sorted({tuple(t.dims) for t in model.graph.initializer})


# ---- layouts ------------------------------------------------------------------------------------
def test_stretch_is_the_repeat_for_integer_ratios_and_spreads_copies_otherwise():
    assert np.array_equal(Layout.stretch(4, 8).src, Layout.repeat(4, 2).src)
    lay = Layout.stretch(4, 6)
    assert lay.src.tolist() == [0, 0, 1, 2, 2, 3] and lay.copies.tolist() == [2, 1, 2, 1]
    assert Layout.pad(4, 6, MEAN).src.tolist() == [0, 1, 2, 3, MEAN, MEAN]
    assert Layout.pad(4, 6).statistic_ratio() == pytest.approx(4 / 6)


# ---- FFN size ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", [("bert_ts17", 320), ("bert_dyn18", 300), ("gpt2_ts17", 320), ("gpt2_dyn18", 257),
                                       ("llama_ts17", 200), ("llama_dyn18", 129), ("qwen2_ts17", 176), ("t5v11_ts17", 200),
                                       ("t5_dyn18", 200), ("neox_dyn18", 176), ("gptj_ts17", 320), ("llama_past_ts17", 200)])
def test_ffn_size(name, size):
    small = load_sample(name)
    wide = widen(small, ffn_size=size)
    assert _err(small, wide) < EXACT
    ffn = {d for t in wide.graph.initializer for d in t.dims} - {d for t in small.graph.initializer for d in t.dims}
    assert ffn == {size}


def test_ffn_size_beside_a_factor():
    small = load_sample("llama_ts17")
    wide = widen(small, factor=2, ffn_size=300)
    assert _err(small, wide) < EXACT
    assert (128, 300) in _grown_sizes(wide) and (300, 128) in _grown_sizes(wide)


# ---- head count ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kv", ["tile", "keep"])
@pytest.mark.parametrize("name", ["llama_ts17", "llama_dyn18", "qwen2_dyn18", "llama_past_ts17", "llama_past_dyn18",
                                  "llama_trap_dyn18"])
def test_head_count_under_gqa(name, kv):
    """4 query / 2 kv heads -> 6 query heads: kv heads 3 (tile: each new kv head brings its group)
    or 2 with 3 query heads each (keep)."""
    small = load_sample(name)
    wide = widen(small, num_heads=6, kv_heads=kv)
    assert _err(small, wide) < EXACT
    kv_out = 3 * 16 if kv == "tile" else 2 * 16
    assert (64, 96) in _grown_sizes(wide) and (64, kv_out) in _grown_sizes(wide)


@pytest.mark.parametrize("name", ["bert_ts17", "bert_dyn18", "gpt2_ts17", "gpt2_dyn18", "gptj_ts17", "gptj_dyn18",
                                  "neox_ts17", "neox_dyn18", "distilbert_ts17", "roberta_dyn18"])
@pytest.mark.parametrize("heads", [5, 6])
def test_head_count(name, heads):
    small = load_sample(name)
    wide = widen(small, num_heads=heads)
    assert _err(small, wide) < EXACT


def test_head_count_that_breaks_the_gqa_grouping_is_refused():
    with pytest.raises(WidenError, match="kv-heads keep"):
        widen(load_sample("llama_ts17"), num_heads=5)
    with pytest.raises(WidenError, match="multiple of the kv head count"):
        widen(load_sample("llama_ts17"), num_heads=5, kv_heads="keep")


# ---- hidden size: RMSNorm zero-pads ------------------------------------------------------------
@pytest.mark.parametrize("hidden,heads,kv", [(96, 6, "tile"), (80, 10, "tile"), (112, 6, "keep")])
@pytest.mark.parametrize("name", ["llama_ts17", "llama_dyn18", "qwen2_ts17", "qwen2_dyn18", "llama_past_ts17"])
def test_hidden_size_rmsnorm(name, hidden, heads, kv):
    small = load_sample(name)
    wide = widen(small, hidden=hidden, num_heads=heads, kv_heads=kv, ffn_size=200)
    assert _err(small, wide) < EXACT


@pytest.mark.parametrize("name", ["t5_ts17", "t5_dyn18", "t5v11_ts17", "t5v11_dyn18"])
def test_hidden_size_rmsnorm_without_rope_grows_the_head_size_by_zero_units(name):
    """T5 (no RoPE, no softmax scale): d_kv 16 -> 24, the new units of q/k/v zero."""
    small = load_sample(name)
    wide = widen(small, hidden=96)
    assert _err(small, wide) < EXACT
    assert (96, 4 * 24) in _grown_sizes(wide)


def test_rmsnorm_epsilon_and_gain_follow_d_over_D():
    """Zero units: the mean square over D is d/D of the small one, so eps * d/D (not the wide
    config's epsilon: said in the notes) and gamma * sqrt(d/D)."""
    small = load_sample("llama_dyn18")
    plan = build_plan(small, Options(hidden=96, num_heads=6))
    assert any(n.startswith("epsilon") and "scaled by 0.666667" in n for n in plan.notes)
    wide = widen(small, hidden=96, num_heads=6)
    g_small = next(onnx.numpy_helper.to_array(t) for t in small.graph.initializer if t.name == "model.model.norm.weight")
    g_wide = next(onnx.numpy_helper.to_array(t) for t in wide.graph.initializer if t.name == "model.model.norm.weight")
    np.testing.assert_allclose(g_wide[:64], g_small * np.sqrt(64 / 96), rtol=1e-6)
    assert not g_wide[64:].any()
    mapping = read_mapping(wide)["tensors"]
    assert mapping == {}  # logits only: nothing to un-widen


def test_rope_model_head_size_cannot_grow_by_a_non_integer_ratio():
    with pytest.raises(WidenError, match=r"RoPE.*--heads 6"):
        widen(load_sample("llama_ts17"), hidden=96)


# ---- hidden size: pre-norm LayerNorm average-expands (LEMON) ------------------------------------
@pytest.mark.parametrize("hidden,heads", [(96, 6), (80, None), (112, 7)])
@pytest.mark.parametrize("name", ["gpt2_ts17", "gpt2_dyn18", "gptj_ts17", "gptj_dyn18", "neox_ts17", "neox_dyn18"])
def test_hidden_size_pre_norm_layernorm(name, hidden, heads):
    if heads is None and entry(name)["rope"]:
        pytest.skip("RoPE: the head size cannot grow by 5/4 (refusal tested below)")
    small = load_sample(name)
    wide = widen(small, hidden=hidden, num_heads=heads)
    assert _err(small, wide) < EXACT
    assert validate(small, wide).ok


def test_average_expansion_writes_the_mean_and_reads_nothing_new():
    """GPT-2 last_hidden_state leaves ln_f: its new units are zero (gamma and beta zero there), the
    residual's new units hold the mean (the embedding table's new columns are the row means), and
    epsilon is eps * 64/96 (a note)."""
    small = load_sample("gpt2_ts17")
    plan = build_plan(small, Options(hidden=96, num_heads=6))
    assert any("epsilon" in n and "6.67e-06" in n for n in plan.notes)
    wide = widen(small, hidden=96, num_heads=6)
    m = read_mapping(wide)["tensors"]["last_hidden_state"]
    assert m["axes"]["2"]["src"] == list(range(64)) + [MEAN] * 32 and m["scale"] == pytest.approx(1.0)
    wte = {t.name: onnx.numpy_helper.to_array(t) for t in wide.graph.initializer}["model.transformer.wte.weight"]
    small_wte = {t.name: onnx.numpy_helper.to_array(t) for t in small.graph.initializer}["model.transformer.wte.weight"]
    np.testing.assert_allclose(wte[:, 64:], np.repeat(small_wte.mean(axis=1, keepdims=True), 32, axis=1), rtol=1e-5, atol=1e-7)
    out = run(wide, make_inputs(small))["last_hidden_state"]
    assert not out[..., 64:].any()


# ---- post-norm LayerNorm ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert_ts17", "bert_dyn18", "bert_ts14", "roberta_ts17", "distilbert_dyn18"])
def test_post_norm_layernorm_is_refused_with_the_reason(name):
    with pytest.raises(WidenError, match=r"post-norm LayerNorm.*--allow-approximate"):
        widen(load_sample(name), hidden=96, num_heads=6)


@pytest.mark.parametrize("name", ["bert_ts17", "bert_dyn18", "bert_ts14"])
def test_post_norm_approximate_is_marked_and_its_error_measured(name):
    small = load_sample(name)
    wide = widen(small, hidden=96, num_heads=6, allow_approximate=True)
    meta = read_mapping(wide)
    assert meta["approximate"] is True and meta["options"]["allow_approximate"] is True
    res = validate(small, wide)
    worst = max(o.max_rel for o in res.outputs)
    assert not res.ok and 1e-4 < worst < 0.5, worst  # approximate, but close: copies of units
    again = widen(small, hidden=96, num_heads=6, allow_approximate=True)
    assert again.SerializeToString() == wide.SerializeToString()  # the random choice is fixed


def test_approximate_does_not_change_an_exact_case():
    small = load_sample("gpt2_ts17")
    wide = widen(small, hidden=96, num_heads=6, allow_approximate=True)
    assert read_mapping(wide)["approximate"] is False and _err(small, wide) < EXACT


# ---- options, command line, folders -----------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [(dict(factor=2, hidden=96), "factor or a hidden size"),
                                      (dict(ffn_factor=2, ffn_size=300), "FFN factor or an FFN size"),
                                      (dict(hidden=0), "hidden size must be an integer"),
                                      (dict(hidden=96, residual="orthogonal"), "integer hidden factor")])
def test_bad_target_options(kw, match):
    with pytest.raises(UsageError, match=match):
        widen(load_sample("gpt2_ts17"), **kw)


def test_hidden_that_is_not_a_whole_multiple_of_a_dimension_is_refused():
    with pytest.raises(WidenError, match="not a whole number"):
        widen(load_sample("gpt2_ts17"), hidden=70)  # head size 16 * 70/64


def test_cli_targets(tmp_path):
    src = str(SAMPLES / "gpt2" / "gpt2_ts17.onnx")
    out, rep = tmp_path / "g.onnx", tmp_path / "r.json"
    code, stdout, err = cli("widen", src, "-o", str(out), "--hidden", "96", "--heads", "6", "--ffn-size", "384",
                            "--report", str(rep))
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["validation"]["ok"] and report["hidden"] == 96 and report["num_heads"] == 6
    assert any("epsilon" in n for n in report["notes"])
    assert cli("validate", src, str(out))[0] == 0


@pytest.mark.parametrize("args,code,words", [
    (["--hidden", "96", "--factor", "2"], 2, "mutually exclusive"),
    (["--ffn-size", "300", "--ffn-factor", "2"], 2, "mutually exclusive"),
    (["--heads", "many"], 2, "--heads"),
    (["--hidden", "1.5"], 2, "--hidden"),
])
def test_cli_usage_errors(tmp_path, capsys, args, code, words):
    from onnx_widen.cli import main

    out = tmp_path / "o.onnx"
    got = main(["widen", str(SAMPLES / "gpt2" / "gpt2_ts17.onnx"), "-o", str(out), *args])
    err = capsys.readouterr().err
    assert got == code and words in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_post_norm_refusal_and_approximate(tmp_path):
    bert = "sample_models/bert/bert_ts17.onnx"
    out = tmp_path / "b.onnx"
    code, _, err = cli("widen", bert, "-o", str(out), "--hidden", "96", "--heads", "6")
    assert code == 1 and "post-norm" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    code, stdout, err = cli("widen", bert, "-o", str(out), "--hidden", "96", "--heads", "6", "--allow-approximate")
    assert code == 0 and out.exists() and "approximate" in stdout, err
    code, stdout, err = cli("validate", bert, str(out))
    assert code == 0 and "approximate" in stdout, err


def test_cli_rope_refusal_is_a_model_problem(tmp_path):
    code, _, err = cli("widen", "sample_models/llama/llama_ts17.onnx", "-o", str(tmp_path / "x.onnx"), "--hidden", "96")
    assert code == 1 and "RoPE" in err and "--heads 6" in err and len(err.strip().splitlines()) == 1


def test_config_follows_target_sizes():
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    assert widen_config(cfg, hidden=96, num_heads=6, ffn_size=200) == {**cfg, "hidden_size": 96, "intermediate_size": 200,
                                                                       "num_attention_heads": 6, "num_key_value_heads": 3}
    assert widen_config(cfg, hidden=96, num_heads=6, kv_heads="keep")["num_key_value_heads"] == 2
    assert widen_config({"d_model": 64, "d_kv": 16, "d_ff": 128, "num_heads": 4}, hidden=96) == \
        {"d_model": 96, "d_kv": 24, "d_ff": 128, "num_heads": 4}
    gpt2 = {"n_embd": 64, "n_head": 4, "n_inner": None}  # None: 4 x n_embd
    assert widen_config(gpt2, hidden=96, num_heads=6) == {"n_embd": 96, "n_head": 6, "n_inner": 256}
    assert widen_config(gpt2, hidden=96, num_heads=6, ffn_size=384)["n_inner"] == 384


def test_localize_rebuilds_a_target_plan():
    from onnx_widen.localize import localize

    small = load_sample("gpt2_ts17")
    assert localize(small, widen(small, hidden=96, num_heads=6)) is None


# ---- canonical structure: a native export of the target config ------------------------------------
CANONICAL = [
    # FFN size and head count: exact and canonical at once.
    ("llama_ts17", dict(num_heads=6, ffn_size=200), dict(num_attention_heads=6, num_key_value_heads=3, intermediate_size=200), set()),
    ("llama_dyn18", dict(num_heads=6, kv_heads="keep"), dict(num_attention_heads=6), set()),
    # Hidden size: every shape and op canonical, the epsilons scaled by d/D (an attribute, or the
    # decomposed RMSNorm's constant).
    ("qwen2_dyn18", dict(hidden=96, num_heads=6, ffn_size=160),
     dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=160), {"float_scalars"}),
    ("gpt2_ts17", dict(hidden=96, num_heads=6), dict(n_embd=96, n_head=6, n_inner=256), {"attributes"}),
    ("gpt2_dyn18", dict(hidden=96, num_heads=6, ffn_size=384), dict(n_embd=96, n_head=6), {"attributes"}),
    ("neox_ts17", dict(hidden=96, num_heads=6), dict(hidden_size=96, num_attention_heads=6), {"attributes"}),
]


@pytest.mark.parametrize("name,opts,sizes,eps_diff", CANONICAL, ids=[c[0] + "-" + "-".join(map(str, c[1].values())) for c in CANONICAL])
def test_structure_equals_native_export_of_the_target(tmp_path, name, opts, sizes, eps_diff):
    native = native_export(name, tmp_path / "native.onnx", **sizes)
    wide = widen(load_sample(name), **opts)
    diff = differences(wide, native)
    assert set(diff) == eps_diff, diff


def test_folder_with_targets(tmp_path):
    import shutil

    from onnx_widen.cli import main

    src = tmp_path / "model"
    src.mkdir()
    shutil.copy(SAMPLES / "llama" / "llama_ts17.onnx", src / "decoder_model.onnx")
    (src / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                                 "num_key_value_heads": 2, "head_dim": 16, "model_type": "llama"}))
    out = tmp_path / "wide"
    assert main(["widen", str(src), "-o", str(out), "--hidden", "96", "--heads", "6", "--ffn-size", "200", "-q"]) == 0
    assert json.loads((out / "config.json").read_text()) == {"hidden_size": 96, "intermediate_size": 200, "num_attention_heads": 6,
                                                             "num_key_value_heads": 3, "head_dim": 16, "model_type": "llama"}
    wide = onnx.load(str(out / "decoder_model.onnx"))
    assert validate(str(src / "decoder_model.onnx"), wide).ok
    assert read_mapping(wide)["options"]["hidden"] == 96
