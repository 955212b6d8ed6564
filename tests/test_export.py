"""Real exports of configs the samples do not cover (other sizes, opset 15, a sequence length
equal to the head size, ELECTRA with embedding size != hidden size). Skipped without torch."""
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnx_widen import widen  # noqa: E402
from onnx_widen.apply import read_mapping  # noqa: E402
from onnx_widen.validation import make_inputs  # noqa: E402

from conftest import max_rel_error, run  # noqa: E402


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _export(model, path, dynamo, opset, batch=2, seq=16, vocab=100):
    import onnx

    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    kw = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=opset, dynamo=dynamo)
    if not dynamo:
        kw["dynamic_axes"] = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, mask), str(path), **kw)
    return onnx.load(str(path))


CASES = {
    # head size 16 == sequence length 16, 3 heads: a value-based rewriter breaks the sequence axis.
    "bert_h48_seq_eq_dh": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
        max_position_embeddings=200, num_labels=5, attn_implementation="eager")),
    # Gemma: embeddings times sqrt(hidden) (takes the wide value), (1 + weight) RMSNorm, tied head.
    "gemma_normaliser": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=96, max_position_embeddings=200, use_cache=False)),
    # GPT-NeoX: per-head interleaved fused QKV, partial rotary (rotary_pct 0.5), parallel residual.
    "neox_partial_rotary": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        rotary_pct=0.5, max_position_embeddings=200, use_cache=False)),
    # LLaMA without a position_ids input: positions are static, so the RoPE tables fold into constants.
    "llama_folded_rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=200, use_cache=False)),
    "electra_embed_ne_hidden": lambda: transformers.ElectraForTokenClassification(transformers.ElectraConfig(
        vocab_size=100, embedding_size=32, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=200, num_labels=3)),
}


@pytest.mark.parametrize("dynamo,opset", [(False, 15), (True, 18)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_unseen_export_widens_exactly(tmp_path, case, dynamo, opset):
    torch.manual_seed(0)
    small = _export(_perturb(CASES[case]()), tmp_path / "m.onnx", dynamo, opset)
    for k in (2, 3):
        wide = widen(small, factor=k)
        feeds = make_inputs(small, seed=k)
        err = max_rel_error(run(small, feeds), run(wide, feeds), read_mapping(wide)["tensors"])
        assert err < 2e-5, f"{case} k={k}: {err:.3g}"


@pytest.mark.parametrize("dynamo,opset", [(False, 17), (True, 18)])
def test_gemma_normaliser_takes_the_wide_value(tmp_path, dynamo, opset):
    import onnx

    torch.manual_seed(0)
    small = _export(_perturb(CASES["gemma_normaliser"]()), tmp_path / "g.onnx", dynamo, opset)
    wide = widen(small, factor=2)
    consts = [float(onnx.numpy_helper.to_array(t)) for t in wide.graph.initializer if not t.dims and t.data_type == 1]
    consts += [float(onnx.numpy_helper.to_array(n.attribute[0].t)) for n in wide.graph.node if n.op_type == "Constant"
               and n.attribute[0].type == 4 and not n.attribute[0].t.dims and n.attribute[0].t.data_type == 1]
    assert any(abs(c - 128 ** 0.5) < 1e-3 for c in consts) and not any(abs(c - 8.0) < 1e-6 for c in consts)


def test_optimum_style_encoder_decoder_folder_chains(tmp_path):
    """Separate encoder and decoder files widened as a folder: the wide encoder's output fed
    straight into the wide decoder (as a runtime pipeline does) gives the small pipeline's logits."""
    import json

    import onnx

    from onnx_widen.cli import main

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1,
                                relative_attention_num_buckets=8, use_cache=False)
    model = _perturb(transformers.T5ForConditionalGeneration(cfg))

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class Decoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask):
            out = self.m.decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden_states,
                                 encoder_attention_mask=encoder_attention_mask).last_hidden_state
            return self.m.lm_head(out * (self.m.model_dim ** -0.5))

    src = tmp_path / "t5"
    src.mkdir()
    ids, mask, dec = torch.randint(0, 100, (2, 6)), torch.ones(2, 6, dtype=torch.long), torch.randint(0, 100, (2, 4))
    dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
           "decoder_input_ids": {0: "batch", 1: "decoder_sequence"}, "encoder_hidden_states": {0: "batch", 1: "sequence"},
           "encoder_attention_mask": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
           "logits": {0: "batch", 1: "decoder_sequence"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder(model).eval(), (ids, mask), str(src / "encoder_model.onnx"), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], dynamic_axes=dyn, opset_version=17, dynamo=False)
        hidden = Encoder(model).eval()(ids, mask).detach()
        torch.onnx.export(Decoder(model).eval(), (dec, hidden, mask), str(src / "decoder_model.onnx"),
                          input_names=["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"],
                          output_names=["logits"], dynamic_axes=dyn, opset_version=17, dynamo=False)
    (src / "config.json").write_text(json.dumps({"d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4}))
    out = tmp_path / "t5_x2"
    assert main(["widen", str(src), "-o", str(out), "-k", "2", "-q"]) == 0
    assert json.loads((out / "config.json").read_text()) == {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_heads": 4}
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    def pipeline(folder):
        h = run(onnx.load(str(folder / "encoder_model.onnx")), feeds)["last_hidden_state"]
        return run(onnx.load(str(folder / "decoder_model.onnx")),
                   {"decoder_input_ids": dec.numpy(), "encoder_hidden_states": h, "encoder_attention_mask": mask.numpy()})["logits"]

    small, wide = pipeline(src), pipeline(out)
    assert np.abs(small - wide).max() / np.abs(small).max() < 2e-5
