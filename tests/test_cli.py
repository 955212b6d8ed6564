"""The command line: the three commands, the report, and clean one-line failures."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnx_widen.cli import main

from conftest import ROOT, SAMPLES

BERT = str(SAMPLES / "bert" / "bert_ts17.onnx")


def cli(*args):
    """Run the real entry point in a subprocess: exit code, stdout, stderr."""
    p = subprocess.run([sys.executable, "-m", "onnx_widen", *args], capture_output=True, text=True, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


def test_widen_writes_valid_model_and_report(tmp_path):
    out, rep = tmp_path / "bert_x2.onnx", tmp_path / "r.json"
    code, stdout, err = cli("widen", BERT, "-o", str(out), "--factor", "2", "--report", str(rep))
    assert code == 0, err
    assert out.exists()
    report = json.loads(rep.read_text())
    assert report["validation"]["ok"] is True
    assert report["params_after"] > 3.5 * report["params_before"]
    assert report["matched"]["attention"] == 2 and report["matched"]["layernorm"] == 6
    for o in report["validation"]["outputs"].values():
        assert o["max_rel"] < 1e-5
    assert "validation" in stdout and "prediction_logits" in stdout


def test_validate_command_reads_metadata_and_factor(tmp_path):
    out = tmp_path / "w.onnx"
    assert main(["widen", BERT, "-o", str(out), "-k", "3", "-q"]) == 0
    code, stdout, err = cli("validate", BERT, str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["ok"] is True
    # Without metadata, --factor assumes the post's convention (repeat / sqrt K).
    m = onnx.load(str(out))
    del m.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    assert cli("validate", BERT, str(bare))[0] == 1
    assert cli("validate", BERT, str(bare), "--factor", "3")[0] == 0


def test_validate_fails_on_wrong_model(tmp_path):
    out = tmp_path / "w.onnx"
    assert main(["widen", BERT, "-o", str(out), "-k", "2", "-q"]) == 0
    m = onnx.load(str(out))
    for t in m.graph.initializer:
        if t.name.endswith("intermediate.dense.bias") or "intermediate" in t.name:
            arr = onnx.numpy_helper.to_array(t).copy()
            arr += 0.5
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
            break
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    code, _, err = cli("validate", BERT, str(bad))
    assert code == 1 and "differ" in err and len(err.strip().splitlines()) == 1


def test_shape_override(tmp_path):
    out = tmp_path / "w.onnx"
    assert main(["widen", BERT, "-o", str(out), "-k", "2", "-q", "--no-validate"]) == 0
    code, stdout, err = cli("validate", BERT, str(out), "--shape", "input_ids=1x16", "--shape", "attention_mask=1x16",
                            "--shape", "token_type_ids=1x16", "--json")
    assert code == 0, err
    assert json.loads(stdout)["input_shapes"][0]["input_ids"] == [1, 16]


def test_inspect_table_and_json():
    code, stdout, _ = cli("inspect", BERT)
    assert code == 0 and "attention" in stdout and "every node on a width path is covered" in stdout
    code, stdout, _ = cli("inspect", BERT, "--json")
    data = json.loads(stdout)
    kinds = [m["kind"] for m in data["matches"]]
    assert kinds.count("attention") == 2 and kinds.count("embedding") == 3 and kinds.count("gelu (erf)") == 3
    att = [m for m in data["matches"] if m["kind"] == "attention"][0]
    assert att["heads"] == 4 and att["head_size"] == 16
    assert data["uncovered"] == []
    roles = {tuple(s["roles"]) for s in data["shape_constants"]}
    assert ("-", "-", "heads(4)", "width(16)") in roles


def _bad(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


@pytest.mark.parametrize("case", ["empty", "random", "truncated", "missing"])
def test_bad_input_files(tmp_path, case):
    src = {
        "empty": lambda: _bad(tmp_path, "e.onnx", b""),
        "random": lambda: _bad(tmp_path, "r.onnx", np.random.default_rng(0).bytes(4000)),
        "truncated": lambda: _bad(tmp_path, "t.onnx", open(BERT, "rb").read()[:100000]),
        "missing": lambda: str(tmp_path / "nope.onnx"),
    }[case]()
    out = tmp_path / "out.onnx"
    code, _, err = cli("widen", src, "-o", str(out))
    assert code in (1, 2)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and err.startswith("onnx-widen: error:")
    assert not out.exists()


@pytest.mark.parametrize("factor", ["0", "1", "-2", "1.5", "two"])
def test_bad_factor_is_usage_error(tmp_path, factor):
    out = tmp_path / "o.onnx"
    code, _, err = cli("widen", BERT, "-o", str(out), "--factor", factor)
    assert code == 2 and "factor" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_output_over_input_is_refused(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(open(BERT, "rb").read())
    before = src.read_bytes()
    code, _, err = cli("widen", str(src), "-o", str(src))
    assert code == 2 and "input" in err
    assert src.read_bytes() == before


def test_output_folder_missing(tmp_path):
    code, _, err = cli("widen", BERT, "-o", str(tmp_path / "no" / "such" / "o.onnx"))
    assert code == 2 and "does not exist" in err


def test_existing_output_kept_when_widening_fails(tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous")
    code, _, _ = cli("widen", _bad(tmp_path, "r.onnx", b"\x08\x07garbage"), "-o", str(out))
    assert code == 1 and out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".onnx-widen")] == []


def test_api_matches_cli(tmp_path):
    import onnx_widen

    m = onnx_widen.widen(BERT, factor=2)
    res = onnx_widen.validate(BERT, m)
    assert res.ok and {o.name for o in res.outputs} == {"prediction_logits", "seq_relationship_logits", "last_hidden_state"}
    an = onnx_widen.inspect(BERT)
    assert not an.uncovered and sum(m.kind == "linear" for m in an.matches) == 2 * 6 + 4  # q k v o up down per layer; pooler, NSP, MLM dense, tied decoder


def test_uncovered_op_is_a_model_error_naming_the_node(tmp_path):
    from minigraph import build

    src = tmp_path / "cumsum.onnx"
    onnx.save(build(uncovered=True), str(src))
    out = tmp_path / "o.onnx"
    code, _, err = cli("widen", str(src), "-o", str(out))
    assert code == 1 and "n_cumsum" in err and "CumSum" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, stdout, _ = cli("inspect", str(src))
    assert code == 1 and "n_cumsum" in stdout


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "missing.bin"])
def test_external_data_outside_folder_or_missing(tmp_path, location):
    from onnx.external_data_helper import set_external_data

    m = onnx.load(BERT)
    t = m.graph.initializer[0]
    set_external_data(t, location=location)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    src = sub / "m.onnx"
    onnx.save(m, str(src))
    out = sub / "o.onnx"
    code, _, err = cli("widen", str(src), "-o", str(out))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert ("outside the model's folder" in err) if location != "missing.bin" else ("missing" in err)
    assert not out.exists()


def test_inspect_names_decomposed_layernorm():
    code, stdout, _ = cli("inspect", str(SAMPLES / "bert" / "bert_ts14.onnx"), "--json")
    kinds = [m["kind"] for m in json.loads(stdout)["matches"]]
    assert code == 0 and kinds.count("layernorm (decomposed)") == 6 and "rmsnorm (decomposed)" not in kinds


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "plan.json"
    code, stdout, _ = cli("widen", str(SAMPLES / "llama" / "llama_dyn18.onnx"), "-o", str(out), "--dry-run", "--report", str(rep))
    assert code == 0 and not out.exists() and "nothing written" in stdout
    rows = json.loads(rep.read_text())["plan"]
    emb = [r for r in rows if r["role"] == "embedding table"]
    assert emb and emb[0]["small"] == [160, 64] and emb[0]["wide"] == [160, 128]
    assert any(r["role"] == "rotary frequencies" and r["wide"] == [16] for r in rows)


def test_widened_model_records_provenance(tmp_path):
    import hashlib

    import onnx_widen

    out = tmp_path / "w.onnx"
    assert main(["widen", BERT, "-o", str(out), "-k", "2", "-q"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["onnx_widen.version"] == onnx_widen.__version__
    assert meta["onnx_widen.source_sha256"] == hashlib.sha256(open(BERT, "rb").read()).hexdigest()
    val = json.loads(meta["onnx_widen.validation"])
    assert val["ok"] is True and set(val["max_rel"]) == {"prediction_logits", "seq_relationship_logits", "last_hidden_state"}
    assert json.loads(meta["onnx_widen.mapping"])["options"]["factor"] == 2
    code, stdout, _ = cli("inspect", str(out), "--json")
    assert json.loads(stdout)["provenance"]["onnx_widen.source_sha256"] == meta["onnx_widen.source_sha256"]
