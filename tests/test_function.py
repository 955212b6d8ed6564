"""Function: the widened model computes the small model's function to float rounding."""
import pytest

from onnx_widen import widen
from onnx_widen.apply import read_mapping
from onnx_widen.validation import make_inputs

from conftest import SUPPORTED as NAMES, load_sample, max_rel_error, run, widen_feeds

TOL = 2e-5  # float32 rounding across two layers; a wrong bias or gamma rule gives >1e-2


def _check(name, k, residual):
    small = load_sample(name)
    wide = widen(small, factor=k, residual=residual)
    mapping = read_mapping(wide)["tensors"]
    for seed, dims in ((0, None), (1, {"batch": 1, "sequence": 5})):
        feeds = make_inputs(small, seed=seed, dims=dims)
        err = max_rel_error(run(small, feeds), run(wide, widen_feeds(feeds, mapping)), mapping)
        assert err < TOL, f"{name} k={k} {residual}: max relative error {err:.3g}"


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("name", NAMES)
def test_function_preserved(name, k):
    _check(name, k, "repeat")


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ["bert_ts17", "bert_dyn18", "bert_ts14", "distilbert_ts17", "roberta_dyn18", "gpt2_ts17",
                                  "llama_dyn18", "llama_past_ts17", "qwen2_ts17", "t5_dyn18", "t5v11_ts17"])
def test_function_preserved_orthogonal(name, k):
    _check(name, k, "orthogonal")


def test_hidden_state_output_follows_post_convention():
    small = load_sample("bert_ts17")
    wide = widen(small, factor=2)
    m = read_mapping(wide)["tensors"]
    assert set(m) == {"last_hidden_state"}, "logits axes (vocabulary, labels) must not be widened"
    assert m["last_hidden_state"]["scale"] == pytest.approx(2 ** -0.5)
    assert m["last_hidden_state"]["axes"] == {"2": {"small": 64, "repeat": 2}}
