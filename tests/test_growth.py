"""Growth beyond the post's single factor: a separate FFN factor (FFN-only widening included)
and head-count growth, on an encoder and decoders of both exporters."""
import pytest

from onnx_widen import UsageError, widen
from onnx_widen.folder import widen_config
from onnx_widen.report import count_params

from onnx_widen.structure import differences

from conftest import load_sample, native_export
from test_decoders import _err


@pytest.mark.parametrize("k,f", [(2, 4), (1, 4), (2, 1), (3, 2)])
@pytest.mark.parametrize("name", ["bert_ts17", "bert_dyn18", "llama_dyn18", "llama_past_ts17", "gpt2_ts17", "t5v11_ts17"])
def test_ffn_factor(name, k, f):
    small = load_sample(name)
    wide = widen(small, factor=k, ffn_factor=f)
    assert _err(small, wide) < 2e-5


def test_ffn_only_widening_grows_exactly_the_ffn():
    """BERT sample: 2 layers of 64 -> 256 -> 64 FFN with biases; K=1, F=4 adds 3x their parameters."""
    small = load_sample("bert_ts17")
    wide = widen(small, factor=1, ffn_factor=4)
    ffn = 2 * (64 * 256 + 256 + 256 * 64)
    assert count_params(wide) - count_params(small) == 3 * ffn


def test_factor_one_alone_is_refused():
    with pytest.raises(UsageError, match="nothing to widen"):
        widen(load_sample("bert_ts17"), factor=1)


def test_config_follows_the_options():
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    assert widen_config(cfg, 2, 3) == {**cfg, "hidden_size": 128, "intermediate_size": 384, "head_dim": 32}
    assert widen_config(cfg, 2, heads="grow") == {**cfg, "hidden_size": 128, "intermediate_size": 256,
                                                   "num_attention_heads": 8, "num_key_value_heads": 4}
    assert widen_config(cfg, 2, heads="grow", kv_heads="keep")["num_key_value_heads"] == 2


# --heads grow is canonical: the native export of the config with K times the heads (head size
# kept, hidden and FFN times K) has the same ops, shapes and constants.
HEADS_GROW = [
    ("bert_ts17", "tile", dict(hidden_size=128, num_attention_heads=8, intermediate_size=512)),
    ("bert_dyn18", "tile", dict(hidden_size=128, num_attention_heads=8, intermediate_size=512)),
    ("llama_ts17", "tile", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256, head_dim=16)),
    ("llama_dyn18", "keep", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, intermediate_size=256, head_dim=16)),
    ("t5_ts17", "tile", dict(d_model=128, num_heads=8, d_kv=16, d_ff=256)),
    ("t5v11_dyn18", "tile", dict(d_model=128, num_heads=8, d_kv=16, d_ff=256)),
]


@pytest.mark.parametrize("name,kv,sizes", HEADS_GROW, ids=[f"{c[0]}-{c[1]}" for c in HEADS_GROW])
def test_head_growth_equals_the_native_export_with_k_times_the_heads(tmp_path, name, kv, sizes):
    native = native_export(name, tmp_path / "native.onnx", **sizes)
    wide = widen(load_sample(name), factor=2, heads="grow", kv_heads=kv)
    assert differences(wide, native) == {}
