"""Generate the corpus of bad inputs for `onnx-widen widen` and the outcome each must have.

    python tests/bad_inputs/make_bad_inputs.py [OUTDIR]     (default: this folder)

Every file is tiny (a one-layer hand-built encoder from tests/minigraph.py, tiny onnx.helper
graphs, or the first bytes of sample_models/bert/bert_ts17.onnx), deterministic, and the whole
corpus stays under 200 KB. `expected.json` lists the cases: the command line (IN, OUT, extra
arguments), the exit code, and the exact substring stderr's one line (or stdout, on success)
must contain. Paths in it are relative to the corpus folder; OUT "@input" means OUT = IN.
tests/test_bad_inputs.py copies the corpus to a temporary folder and runs every case.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests"))
BERT = os.path.join(ROOT, "sample_models", "bert", "bert_ts17.onnx")
CORPUS_FILES = ("expected.json", "make_bad_inputs.py", "README")


def tiny_transformer():
    """A one-layer encoder (hidden 16, 2 heads, dynamic batch/sequence) with a BERT-style pooler:
    Gather first token -> Gemm -> Tanh -> Gemm."""
    from minigraph import build

    m = build(d=16, heads=2, ffn=32, vocab=20, static=False, labels=2, seed=3)
    rng = np.random.default_rng(7)
    d = 16
    g = m.graph
    g.initializer.extend([
        numpy_helper.from_array(np.array(0, np.int64), "first_token"),
        numpy_helper.from_array((rng.standard_normal((d, d)) * 0.3).astype(np.float32), "pool.W"),
        numpy_helper.from_array((rng.standard_normal(d) * 0.1).astype(np.float32), "pool.b"),
        numpy_helper.from_array((rng.standard_normal((2, d)) * 0.3).astype(np.float32), "nsp.W"),
        numpy_helper.from_array(np.zeros(2, np.float32), "nsp.b"),
    ])
    g.node.extend([
        helper.make_node("Gather", ["hidden", "first_token"], ["first"], axis=1, name="pool_gather"),
        helper.make_node("Gemm", ["first", "pool.W", "pool.b"], ["pool_pre"], transB=1, name="pool_dense"),
        helper.make_node("Tanh", ["pool_pre"], ["pooled"], name="pool_tanh"),
        helper.make_node("Gemm", ["pooled", "nsp.W", "nsp.b"], ["nsp_logits"], transB=1, name="nsp"),
    ])
    g.output.append(helper.make_tensor_value_info("nsp_logits", TP.FLOAT, ["batch", 2]))
    onnx.checker.check_model(m)
    return m


def _init(m, name):
    return next(t for t in m.graph.initializer if t.name == name)


def _set(m, name, arr):
    _init(m, name).CopyFrom(numpy_helper.from_array(np.asarray(arr), name))


def _model(nodes, inputs, outputs, inits=()):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def cnn():
    """Conv -> Relu -> GlobalAveragePool -> Gemm: valid ONNX, but no embedding creates width."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("conv.W", (4, 3, 3, 3)), ("conv.b", (4,)), ("fc.W", (2, 4)), ("fc.b", (2,)))]
    nodes = [helper.make_node("Conv", ["x", "conv.W", "conv.b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.W", "fc.b"], ["y"], transB=1, name="fc")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 8, 8])], [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 2])], inits)
    onnx.checker.check_model(m)
    return m


def cycle():
    """a = x + b; b = Relu(a): each node needs the other's output."""
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add"), helper.make_node("Relu", ["a"], ["b"], name="relu")]
    return _model(nodes, [helper.make_tensor_value_info("x", TP.FLOAT, [2])], [helper.make_tensor_value_info("b", TP.FLOAT, [2])])


def with_external(m, names, location):
    """Move the named initializers to external data at `location` (offsets in order)."""
    from onnx.external_data_helper import set_external_data

    blob, offset = b"", 0
    for t in m.graph.initializer:
        if t.name in names:
            data = t.raw_data
            set_external_data(t, location=location, offset=offset, length=len(data))
            t.ClearField("raw_data")
            t.data_location = TP.EXTERNAL
            blob += data
            offset += len(data)
    return blob


def generate(out_dir: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    cases = []

    def save(rel, model_or_bytes):
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString()
        with open(path, "wb") as f:
            f.write(data)
        return rel

    def case(name, inp, exit, text, out="out.onnx", args=(), why="", **extra):
        cases.append({"case": name, "input": inp, "out": out, "args": list(args), "exit": exit,
                      ("stdout" if exit == 0 else "stderr"): text, "why": why, **extra})

    tiny = tiny_transformer()
    save("tiny.onnx", tiny)

    # ---- files that are not ONNX models ----
    case("empty", save("empty.onnx", b""), 1, "empty file, not an ONNX model", why="zero bytes")
    case("random_bytes", save("random_bytes.onnx", np.random.default_rng(0).bytes(4096)), 1,
         "not a readable ONNX model (protobuf parse failed", why="4 KB of random bytes")
    with open(BERT, "rb") as f:
        head = f.read(8192)
    case("truncated", save("truncated.onnx", head), 1, "not a readable ONNX model (protobuf parse failed",
         why="the first 8 KB of bert_ts17.onnx")

    # ---- valid protobuf, invalid or unwidenable graph ----
    case("not_a_transformer", save("cnn.onnx", cnn()), 1, "not a Transformer this tool can widen",
         why="Conv/Relu/GlobalAveragePool/Gemm: nothing creates a hidden width, refuse rather than copy")
    case("cycle", save("cycle.onnx", cycle()), 1, "graph has a cycle: 'add' (Add) <- 'relu' (Relu) <- 'add' (Add)")
    m = onnx.ModelProto()
    m.CopyFrom(tiny)
    t = _init(m, "up.W")
    t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    case("short_initializer", save("short_initializer.onnx", m), 1,
         "initializer tensor 'up.W': data is shorter than its dims: 1024 bytes, but dims [16, 32] of FLOAT need 2048")
    m = onnx.ModelProto()
    m.CopyFrom(tiny)
    m.graph.node[3].op_type = "NoSuchOp"
    case("unknown_op", save("unknown_op.onnx", m), 1, "invalid ONNX model: No Op registered for NoSuchOp")
    m = onnx.ModelProto()
    m.CopyFrom(tiny)
    m.graph.input[0].type.tensor_type.shape.dim[1].ClearField("dim_param")
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 0
    case("zero_dim_input", save("zero_dim_input.onnx", m), 1, "input 'input_ids': axis 1 has size 0 (zero-sized dimension)")
    m = onnx.ModelProto()
    m.CopyFrom(tiny)
    _set(m, "E", np.zeros((0, 16), np.float32))
    case("zero_dim_weight", save("zero_dim_weight.onnx", m), 1, "initializer 'E': zero-sized dimension in dims [0, 16]")

    # ---- non-finite weights ----
    m = onnx.ModelProto()
    m.CopyFrom(tiny)
    b = numpy_helper.to_array(_init(m, "pool.b")).copy()
    b[[2, 5]] = np.inf
    b[7] = -np.inf
    _set(m, "pool.b", b)  # tanh(+-inf) = +-1: the outputs stay finite, widening must work
    case("nonfinite_weights", save("nonfinite_weights.onnx", m), 0,
         "3 non-finite weight values (NaN/Inf) in 1 tensor: 'pool.b' (3)", report_key="nonfinite", report_count=3)
    m = onnx.ModelProto()
    m.CopyFrom(tiny)
    g = numpy_helper.to_array(_init(m, "ln0.g")).copy()
    g[3] = np.nan
    _set(m, "ln0.g", g)  # NaN reaches every output: nothing can be compared, refuse
    case("nan_reaches_outputs", save("nan_reaches_outputs.onnx", m), 1, "(the input has 1 non-finite weight values)")

    # ---- external data ----
    for name, loc, text in (("ext_escape", "../../etc/passwd", "external data location '../../etc/passwd' points outside the model's folder"),
                            ("ext_absolute", "/etc/passwd", "external data location '/etc/passwd' points outside the model's folder"),
                            ("ext_missing", "weights.bin", "external data file 'weights.bin' is missing")):
        m = onnx.ModelProto()
        m.CopyFrom(tiny)
        with_external(m, {"up.W"}, loc)
        case(name, save(f"{name}/model.onnx", m), 1, f"tensor 'up.W': {text}")
    m = onnx.ModelProto()
    m.CopyFrom(tiny)
    blob = with_external(m, {"up.W", "down.W"}, "weights.bin")
    save("ext_short/model.onnx", m)
    save("ext_short/weights.bin", blob[: len(blob) - 100])
    case("ext_short", "ext_short/model.onnx", 1, "tensor 'down.W': external data file 'weights.bin' is too short")
    m = onnx.ModelProto()
    m.CopyFrom(tiny)
    blob = with_external(m, {"up.W", "down.W"}, "weights.bin")
    save("ext_ok/model.onnx", m)
    save("ext_ok/weights.bin", blob)
    case("ext_ok", "ext_ok/model.onnx", 0, "validation", out="ext_ok/wide.onnx", why="external data inside the folder: widens")
    case("out_is_external_data", "ext_ok/model.onnx", 2, "is the input's external data file weights.bin", out="ext_ok/weights.bin")

    # ---- the request ----
    case("huge_factor", "tiny.onnx", 1, "factor 1000000 is too large: the widened model would be about", args=["--factor", "1000000"],
         why="refused from the planned sizes, before planning at that factor")
    case("out_is_input", "tiny.onnx", 2, "is the input file; choose another path", out="@input")
    case("out_folder_missing", "tiny.onnx", 2, "does not exist", out="no/such/folder/out.onnx")
    case("out_folder_readonly", "tiny.onnx", 2, "is not writable", out="readonly/out.onnx", readonly="readonly",
         why="skipped as root: root writes anyway, so os.access cannot refuse")
    case("out_is_folder", "tiny.onnx", 2, "is a directory", out="ext_ok")
    case("input_missing", "no_such_model.onnx", 2, "no_such_model.onnx: no such file")
    case("bad_factor", "tiny.onnx", 2, "--factor must be an integer >= 2, got 'x'", args=["--factor", "x"])
    case("report_is_input", "tiny.onnx", 2, "report", args=["--report", "@input"])

    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")
    return cases


def corpus_bytes(folder: str) -> int:
    total = 0
    for base, _, files in os.walk(folder):
        for n in files:
            if n not in CORPUS_FILES and not n.endswith(".py") and "__pycache__" not in base:
                total += os.path.getsize(os.path.join(base, n))
    return total


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else HERE
    cases = generate(target)
    print(f"{len(cases)} cases, {corpus_bytes(target) / 1000:.0f} KB of model files in {target}")
