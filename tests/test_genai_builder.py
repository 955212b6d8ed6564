"""Graphs from onnxruntime-genai's model builder, the real producer of GroupQueryAttention with
rotary inside (cos/sin caches), RotaryEmbedding before GroupQueryAttention, and MatMulNBits.
Tiny perturbed Hugging Face checkpoints (random init, every parameter moved) are built offline;
the widened graphs must compute the small model's function and be, op for op and shape for
shape, what the builder makes from the wide config's checkpoint."""
import contextlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("onnxruntime_genai.models")

from onnx_widen import WidenError, validate, widen  # noqa: E402
from onnx_widen.folder import widen_folder  # noqa: E402
from onnx_widen.structure import differences  # noqa: E402

VOCAB = 160
MS = "com.microsoft"
# (family, hidden, heads, kv heads): the small model and the wide configs each widening must match.
SMALL = {"llama": ("llama", 64, 4, 2), "qwen2": ("qwen2", 64, 4, 2), "gemma": ("gemma", 64, 4, 2)}
WIDE = {
    ("llama", 2, "keep", "tile"): ("llama", 128, 4, 2),
    ("llama", 3, "keep", "tile"): ("llama", 192, 4, 2),
    ("llama", 2, "grow", "tile"): ("llama", 128, 8, 4),
    ("llama", 2, "grow", "keep"): ("llama", 128, 8, 2),
    ("qwen2", 2, "keep", "tile"): ("qwen2", 128, 4, 2),
    ("gemma", 2, "keep", "tile"): ("gemma", 128, 4, 2),
}
# Builder options -> graph: on the CPU in float32, GroupQueryAttention with rotary inside
# (do_rotary, cos/sin caches), packed q|k|v or, with fuse_qkv=false, three projections; the DML
# target in float16 keeps RotaryEmbedding ops before a GroupQueryAttention without rotary.
# (float16 on the CPU target is not a combination the builder supports: its MultiHeadAttention
# graph's causal mask only holds without a cache.)
BUILDS = {"fp32": ("fp32", "cpu", {}), "unpacked": ("fp32", "cpu", {"fuse_qkv": "false"}), "fp16": ("fp16", "dml", {})}


def _checkpoint(path, family, hidden, heads, kv, seed=0):
    torch.manual_seed(seed)
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM)}[family]
    cfg = config_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=2,
                     num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, pad_token_id=2, head_dim=hidden // heads)
    model = model_cls(cfg)
    with torch.no_grad():  # no unit gammas, no zero biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    # The builder copies the tokenizer into its output: a word-level one over the vocabulary.
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(path)


def _build(src, out, precision, ep, cache, **extra):
    from onnxruntime_genai.models import builder

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    opts = [f"{k}={v}" for k, v in extra.items()] or None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        options = builder.parse_extra_options(None, str(src), str(out), precision, ep, str(cache), opts)
        builder.create_model(None, str(src), str(out), precision, ep, str(cache), **options)
    return str(out)


@pytest.fixture(scope="module")
def built(tmp_path_factory, monkeypatch_module):
    """{(config, build): output folder} for the small and wide checkpoints, plus int4."""
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("genai")
    cache = root / "cache"
    out = {}
    for cfg in set(SMALL.values()) | set(WIDE.values()):
        src = root / ("hf_%s_%d_%d_%d" % cfg)
        _checkpoint(src, *cfg)
        for name, (precision, ep, extra) in BUILDS.items():
            if name == "fp32" or cfg in (SMALL["llama"], WIDE["llama", 2, "keep", "tile"]):
                out[cfg, name] = _build(src, root / ("%s_%d_%d_%d" % cfg) / name, precision, ep, cache, **extra)
    out[SMALL["llama"], "int4"] = _build(root / ("hf_%s_%d_%d_%d" % SMALL["llama"]), root / "int4", "int4", "cpu", cache)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _model(folder):
    return os.path.join(folder, "model.onnx")


def _ops(model):
    return {n.op_type for n in model.graph.node if n.domain == MS}


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _node(model, op):
    return next(n for n in model.graph.node if n.op_type == op and n.domain == MS)


def _init(model, name):
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_builder_options_give_the_fused_ops(built):
    """What each builder option produces, so the tests below cannot pass on a different graph."""
    llama = SMALL["llama"]
    packed = onnx.load(_model(built[llama, "fp32"]))
    gqa = _node(packed, "GroupQueryAttention")
    assert _ops(packed) >= {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} and "RotaryEmbedding" not in _ops(packed)
    assert _attrs(gqa)["do_rotary"] == 1 and gqa.input[1] == "" and gqa.input[7:9] == ["cos_cache", "sin_cache"]
    assert {i.name for i in packed.graph.input} >= {"past_key_values.0.key", "attention_mask"}
    unpacked = _node(onnx.load(_model(built[llama, "unpacked"])), "GroupQueryAttention")
    assert unpacked.input[1] and unpacked.input[2] and _attrs(unpacked)["do_rotary"] == 1
    half = onnx.load(_model(built[llama, "fp16"]))
    assert _ops(half) >= {"RotaryEmbedding", "GroupQueryAttention"} and _attrs(_node(half, "GroupQueryAttention"))["do_rotary"] == 0
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert _init(half, "cos_cache").dtype == np.float16
    assert "MatMulNBits" in _ops(onnx.load(_model(built[llama, "int4"])))


CASES = [(family, build, k, heads, kv) for (family, k, heads, kv) in WIDE for build in BUILDS
         if build == "fp32" or (family, k, heads, kv) == ("llama", 2, "keep", "tile")]
CASES += [("llama", "fp16", 2, "grow", "tile"), ("llama", "fp16", 3, "keep", "tile")]


@pytest.mark.parametrize("family,build,k,heads,kv", CASES)
def test_builder_graph_widens_exactly_and_canonically(built, family, build, k, heads, kv):
    small_path = _model(built[SMALL[family], build])
    wide = widen(small_path, factor=k, heads=heads, kv_heads=kv)
    result = validate(small_path, wide)
    assert result.ok, result
    # The float32 graphs to float rounding; float16 within its own rounding of the float32 reference.
    assert max(o.max_rel for o in result.outputs) < (2e-5 if build != "fp16" else 2e-3)
    past = result.input_shapes[0]["past_key_values.0.key"]
    assert past[2] > 0 and past[3] == 16  # a non-empty cache, at the head size the op reads
    native_cfg = WIDE[family, k, heads, kv]
    if (native_cfg, build) in built:
        native = onnx.load(_model(built[native_cfg, build]))
        # Gemma's embedding scale: the builder writes sqrt(hidden) rounded to two decimals (11.31
        # for 128), the widening the exact wide value (sqrt(64) = 8 says nothing of the rounding).
        quirk = {"float_scalars": {"only_first": {float(np.float32(128 ** 0.5)).hex(): 1},
                                   "only_second": {float(np.float32(11.31)).hex(): 1}}} if family == "gemma" else {}
        assert differences(wide, native) == quirk
        # The caches are the wide config's own frequencies, not just its shapes (the builder
        # rounds position x frequency in float32: 1e-6 at 64 positions).
        for name in ("cos_cache", "sin_cache"):
            np.testing.assert_allclose(_init(wide, name).astype(np.float64), _init(native, name).astype(np.float64),
                                       atol=1e-5 if build != "fp16" else 1e-3)
    g = _attrs(_node(wide, "GroupQueryAttention"))
    _, hidden, n_heads, n_kv = native_cfg
    assert (g["num_heads"], g["kv_num_heads"], g["scale"]) == (n_heads, n_kv, pytest.approx((hidden // n_heads) ** -0.5))


def test_int4_builder_graph_is_refused_by_name(built):
    with pytest.raises(WidenError, match=r"MatMulNBits.*widen the float model, then quantize"):
        widen(_model(built[SMALL["llama"], "int4"]), factor=2)


def test_builder_folder_widens_with_its_genai_config(built, tmp_path):
    small = built[SMALL["llama"], "fp32"]
    out = tmp_path / "wide"
    summary = widen_folder(small, str(out), 2)
    assert summary["files"]["model.onnx"]["validation"]["ok"]
    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    native = built[WIDE["llama", 2, "keep", "tile"], "fp32"]
    got, want = (json.loads((Path(p) / "genai_config.json").read_text()) for p in (out, native))
    assert got == want and got["model"]["decoder"]["head_size"] == 32
    grown = widen_folder(small, str(tmp_path / "grown"), 2, heads="grow")
    dec = json.loads((tmp_path / "grown" / "genai_config.json").read_text())["model"]["decoder"]
    assert grown["files"]["model.onnx"]["validation"]["ok"]
    assert (dec["head_size"], dec["hidden_size"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["num_hidden_layers"]) == (16, 128, 8, 4, 2)


def test_genai_runtime_generates_the_same_tokens(built, tmp_path):
    """The runtime the builder targets runs the widened folder (shared past/present buffers,
    its own inputs): greedy decoding gives the small model's tokens and logits."""
    og = pytest.importorskip("onnxruntime_genai")
    small = built[SMALL["llama"], "fp32"]
    wide = str(tmp_path / "wide")
    widen_folder(small, wide, 2)

    def generate(folder):
        model = og.Model(folder)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=14, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([[5, 17, 33, 101, 7, 150]], dtype=np.int32))
        logits = []
        while not gen.is_done():
            logits.append(np.array(gen.get_output("logits")))
            gen.generate_next_token()
        return list(gen.get_sequence(0)), logits

    (a, la), (b, lb) = generate(small), generate(wide)
    assert a == b and len(a) == 14
    assert max(float(np.abs(x - y).max() / np.abs(x).max()) for x, y in zip(la, lb)) < 2e-5
