"""A model's structure, as the canonical test compares it with the exporter's own wide export:
op multiset, initializer shapes, integer constants, float scalar constants, node attributes and
the graph signature. Values of large tensors are not part of it (wide exports are skeletons)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

SMALL = 64  # elements: constants up to this size are compared by value


def _tensors(model):
    for t in model.graph.initializer:
        yield t
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t


def _bias_names(model):
    """One-element biases of a width-1 linear (a regression head) are trained values, not structure."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = set()
    for n in model.graph.node:
        if n.op_type == "Gemm" and len(n.input) > 2:
            out.add(n.input[2])
        if n.op_type == "Add":
            for a, b in ((0, 1), (1, 0)):
                p = producer.get(n.input[a])
                if p is not None and p.op_type in ("MatMul", "Gemm"):
                    out.add(n.input[b])
    return out


def signature(model: onnx.ModelProto) -> dict:
    ints, floats, shapes = Counter(), Counter(), Counter()
    biases = _bias_names(model)
    for t in _tensors(model):
        n = int(np.prod(t.dims)) if t.dims else 1
        if t.name and any(t.name == i.name for i in model.graph.initializer):
            shapes[(onnx.TensorProto.DataType.Name(t.data_type), tuple(t.dims))] += 1
        if n > SMALL:
            continue
        v = numpy_helper.to_array(t)
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            ints[(tuple(v.shape), tuple(v.reshape(-1).tolist()))] += 1
        elif t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16) and n == 1 and t.name not in biases:
            floats[float(np.float32(v.reshape(()))).hex()] += 1
    attrs = Counter()
    for n in model.graph.node:
        if n.op_type == "Constant":
            continue
        items = []
        for a in sorted(n.attribute, key=lambda a: a.name):
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, float):
                v = float(np.float32(v)).hex()
            elif isinstance(v, (list, tuple)):
                v = tuple(v)
            elif isinstance(v, onnx.TensorProto):
                v = (tuple(v.dims), numpy_helper.to_array(v).tobytes())
            items.append((a.name, v))
        attrs[(n.op_type, tuple(items))] += 1

    def io(vs):
        return tuple((v.name, v.type.tensor_type.elem_type,
                      tuple(d.dim_value if d.HasField("dim_value") else "?" for d in v.type.tensor_type.shape.dim)) for v in vs)

    init_names = {t.name for t in model.graph.initializer}
    return {
        "ops": Counter(n.op_type for n in model.graph.node),
        "initializer_shapes": shapes,
        "int_constants": ints,
        "float_scalars": floats,
        "attributes": attrs,
        "inputs": io([i for i in model.graph.input if i.name not in init_names]),
        "outputs": io(model.graph.output),
    }


def differences(a: onnx.ModelProto, b: onnx.ModelProto) -> dict:
    """Per aspect, what one model has that the other lacks (empty dict: same structure)."""
    sa, sb = signature(a), signature(b)
    out = {}
    for key in sa:
        x, y = sa[key], sb[key]
        if isinstance(x, Counter):
            if x != y:
                out[key] = {"only_first": dict((x - y).most_common(8)), "only_second": dict((y - x).most_common(8))}
        elif x != y:
            out[key] = {"first": x, "second": y}
    return out
