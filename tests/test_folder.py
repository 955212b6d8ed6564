"""A folder of exports of one model widens as a whole: every .onnx by the same rules, the
config's widths times K, other files copied, nothing at OUT unless everything validated."""
import json
import shutil

import onnx

from onnx_widen import validate
from onnx_widen.cli import main

from conftest import SAMPLES


def _folder(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    shutil.copy(SAMPLES / "bert" / "bert_ts17.onnx", src / "encoder_model.onnx")
    shutil.copy(SAMPLES / "bert" / "bert_eager_ts17.onnx", src / "encoder_eager.onnx")
    (src / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
                                                 "vocab_size": 160, "model_type": "bert"}))
    (src / "tokenizer.json").write_text("{}")
    return src


def test_folder_widens_every_model_and_the_config(tmp_path):
    src = _folder(tmp_path)
    out = tmp_path / "wide"
    assert main(["widen", str(src), "-o", str(out), "-k", "3", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "encoder_eager.onnx", "encoder_model.onnx", "tokenizer.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == {"hidden_size": 192, "intermediate_size": 768, "num_attention_heads": 4, "vocab_size": 160, "model_type": "bert"}
    for name in ("encoder_model.onnx", "encoder_eager.onnx"):
        assert validate(str(src / name), onnx.load(str(out / name))).ok


def test_folder_output_must_be_new_or_empty(tmp_path):
    src = _folder(tmp_path)
    out = tmp_path / "wide"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["widen", str(src), "-o", str(out), "-k", "2", "-q"]) == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_folder_failure_leaves_nothing(tmp_path):
    src = _folder(tmp_path)
    (src / "broken.onnx").write_bytes(b"not a model")
    out = tmp_path / "wide"
    assert main(["widen", str(src), "-o", str(out), "-k", "2", "-q"]) == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".onnx-widen")] == []
