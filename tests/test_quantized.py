"""Quantized graphs from onnxruntime.quantization are refused in one line that names the
quantization nodes (a few, and how many) and what to do instead; `inspect` lists every one of
them; nothing is written."""
import json
import re

import onnx
import pytest

from onnx_widen import WidenError, inspect, widen
from onnx_widen.validation import make_inputs

from conftest import SAMPLES, load_sample
from test_cli import cli

quantization = pytest.importorskip("onnxruntime.quantization")

SOURCE = "bert_ts17"
ADVICE = "quantized weights: widen the float model, then quantize it again"
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "QLinearAdd",
             "QLinearMul", "QLinearSoftmax", "QGemm", "MatMulNBits"}


class Calibration(quantization.CalibrationDataReader):
    def __init__(self):
        self.batches = iter([make_inputs(load_sample(SOURCE), seed=s) for s in range(2)])

    def get_next(self):
        return next(self.batches, None)


def quantize(kind, out):
    src = str(SAMPLES / "bert" / f"{SOURCE}.onnx")
    if kind == "dynamic":
        quantization.quantize_dynamic(src, out, weight_type=quantization.QuantType.QInt8)
    elif kind in ("qdq", "qoperator"):
        fmt = quantization.QuantFormat.QDQ if kind == "qdq" else quantization.QuantFormat.QOperator
        quantization.quantize_static(src, out, Calibration(), quant_format=fmt)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=True)
        q.process()
        q.model.save_model_to_file(out)
    return onnx.load(out)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind,ops", [
    ("dynamic", {"MatMulInteger", "DynamicQuantizeLinear"}),
    ("qdq", {"QuantizeLinear", "DequantizeLinear"}),
    ("qoperator", {"QLinearMatMul", "QLinearAdd", "QuantizeLinear"}),
    ("nbits", {"MatMulNBits"}),
])
def test_quantized_graph_is_refused_naming_its_nodes(tmp_path, kind, ops):
    src = tmp_path / f"{kind}.onnx"
    model = quantize(kind, str(src))
    quantized = [n for n in model.graph.node if n.op_type in QUANT_OPS]
    assert ops <= {n.op_type for n in quantized}
    with pytest.raises(WidenError) as e:
        widen(model, factor=2)
    msg = str(e.value)
    m = re.match(r"(\d+) nodes \((.*)\): (.*)$", msg)
    assert m and ADVICE in m.group(3), msg
    assert int(m.group(1)) == len(quantized)
    assert re.findall(r"'[^']+' \((\w+)\)", m.group(2))[0] in QUANT_OPS

    if kind != "qoperator":  # qoperator: contrib ops without shape rules, refused before analysis
        listed = [n for n, why in inspect(model).uncovered if ADVICE in why]
        assert sorted(n.name for n in listed) == sorted(n.name for n in quantized)


@pytest.mark.filterwarnings("ignore")
def test_cli_refuses_quantized_graph_and_inspect_lists_it(tmp_path):
    src = tmp_path / "qdq.onnx"
    quantized = [n.name for n in quantize("qdq", str(src)).graph.node if n.op_type in QUANT_OPS]
    out = tmp_path / "wide.onnx"
    code, _, err = cli("widen", str(src), "-o", str(out), "--factor", "2")
    assert code == 1 and ADVICE in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob("wide*"))
    code, stdout, _ = cli("inspect", str(src), "--json")
    listed = [u["node"] for u in json.loads(stdout)["uncovered"] if ADVICE in u["why"]]
    assert code == 1 and sorted(listed) == sorted(quantized)
