"""Apply a plan: rewrite constants use by use (un-sharing a constant whose uses now need
different values), epsilons, declared input/output shapes, and record the io mapping."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import WidenError
from .model_io import data_bytes, is_external, tensor_array
from .plan import Plan
from .rules import contiguous

MAPPING_KEY = "onnx_widen.mapping"


@dataclass
class PendingTensor:
    """One initializer of the wide model, described before it is computed: the writer lays the
    file out from names, dims and types, then asks for the values one tensor at a time."""

    name: str
    dims: tuple
    data_type: int
    source: str  # the small model's constant it comes from
    values: Callable[..., np.ndarray] | None = None  # values(out=None); None: `proto` is written as it is
    proto: onnx.TensorProto | None = None
    origin: onnx.TensorProto | None = None  # the small tensor it is computed from (read-ahead hints)

    @property
    def nbytes(self) -> int:
        if self.values is None and (n := data_bytes(self.proto)) is not None:
            return n  # as stored (packed sub-byte types included)
        return math.prod(self.dims) * onnx.helper.tensor_dtype_to_np_dtype(self.data_type).itemsize

    def array(self, buffer: np.ndarray | None = None) -> np.ndarray:
        """The values; computed into `buffer` (raw bytes, at least nbytes) where the rule can."""
        out = None
        if buffer is not None and self.values is not None and buffer.nbytes >= self.nbytes:
            out = buffer[:self.nbytes].view(onnx.helper.tensor_dtype_to_np_dtype(self.data_type)).reshape(self.dims)
        arr = tensor_array(self.proto) if self.values is None else self.values(out)
        if tuple(arr.shape) != tuple(self.dims):
            raise WidenError(f"internal error: tensor {self.name!r} came out {list(arr.shape)}, planned {list(self.dims)}")
        return arr

    def tensor(self) -> onnx.TensorProto:
        """The whole TensorProto, values included."""
        if self.values is None and not is_external(self.proto):
            return self.proto
        return numpy_helper.from_array(contiguous(self.array()), self.name)


def apply(plan: Plan) -> onnx.ModelProto:
    """The wide model in memory (the Python API); files are written tensor by tensor (writer.py)."""
    model, pending = rewrite(plan)
    model.graph.initializer.extend(p.tensor() for p in pending)
    return model


def rewrite(plan: Plan, on_read=None) -> tuple[onnx.ModelProto, list]:
    """The wide model without its initializers, and those initializers as PendingTensors (in the
    small model's order, un-shared uses right after their original). on_read(tensor, values) is
    called with every small weight as it is read (the writer reads each once)."""
    an = plan.an
    g = an.graph
    src = g.model
    model = _without_initializers(src)
    graph = model.graph
    # The analysis' node objects belong to the source model; find their twins in the copy by position.
    copy_nodes = list(graph.node)
    node_copy = {id(n): copy_nodes[g.pos[id(n)]] for n in g.nodes}

    uses = defaultdict(list)  # const name -> [(node, idx)]
    for n in g.nodes:
        for i, name in enumerate(n.input):
            if name and g.is_const(name):
                uses[name].append((n, i))

    pending = []
    const_nodes_to_replace = {}
    for name in [t.name for t in src.graph.initializer] + [n.output[0] for n in g.nodes if n.op_type == "Constant"]:
        groups: dict = {}
        for n, i in uses.get(name, []):
            e = plan.edits.get((id(n), i))
            key = e[3].key if e is not None else None
            groups.setdefault(key, (e[3] if e is not None else None, []))[1].append((n, i))
        if not groups:
            groups = {None: (None, [])}
        keep_key = None if None in groups else next(iter(groups))
        for gi, (key, (recipe, members)) in enumerate(groups.items()):
            new_name = name if key == keep_key else f"{name}__w{gi}"
            if new_name != name:
                for n, i in members:
                    node_copy[id(n)].input[i] = new_name
            if name in g.inits:
                pending.append(_pending(g, name, new_name, recipe, on_read))
            elif recipe is not None:
                value = recipe.compute(g.const(name))  # Constant nodes: small, computed now
                if new_name == name:
                    const_nodes_to_replace[name] = value
                else:
                    pending.append(PendingTensor(new_name, tuple(np.shape(value)), _onnx_type(np.asarray(value).dtype), name,
                                                 values=lambda out=None, v=value: np.asarray(v)))
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] in const_nodes_to_replace:
            v = const_nodes_to_replace[n.output[0]]
            del n.attribute[:]
            n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.asarray(v))))
    for node, attr_name, value in plan.attr_edits:
        c = node_copy[id(node)]
        for a in c.attribute:
            if a.name == attr_name:
                a.CopyFrom(helper.make_attribute(attr_name, value))  # float, int or ints, as planned
    _rewrite_signature(plan, graph)
    graph.ClearField("value_info")
    options = plan.opts.to_json()
    depth = {"depth": plan.depth} if plan.depth else {}
    _set_meta(model, MAPPING_KEY, json.dumps({"version": 1, **options, "options": options, "approximate": plan.approximate,
                                              "tensors": plan.io, **depth}))
    return model, pending


def _onnx_type(dtype) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _pending(g, name: str, new_name: str, recipe, on_read=None) -> PendingTensor:
    t = g.inits[name]

    def read():
        values = g.const(name)
        if on_read is not None:
            on_read(t, values)
        return values

    if recipe is None:
        return PendingTensor(new_name, tuple(t.dims), t.data_type, name, proto=t, origin=t)
    if recipe.value is not None:
        value = np.asarray(recipe.value)
        return PendingTensor(new_name, tuple(value.shape), _onnx_type(value.dtype), name, values=lambda out=None: value)
    return PendingTensor(new_name, recipe.wide_dims(t.dims), t.data_type, name, values=lambda out=None: recipe.compute(read(), out), origin=t)


def _without_initializers(model):
    m = onnx.ModelProto()
    inits = model.graph.initializer
    saved = list(inits)
    model.graph.ClearField("initializer")
    try:
        m.CopyFrom(model)
    finally:
        model.graph.initializer.extend(saved)
    return m


def _rewrite_signature(plan: Plan, graph):
    for vi in list(graph.input) + list(graph.output):
        if vi.name not in plan.an.axes:
            continue
        for a, d in zip(plan.an.ax(vi.name), vi.type.tensor_type.shape.dim):
            if a is not None and d.HasField("dim_value"):
                d.dim_value = plan.layout(a).wide


def _set_meta(model, key, value):
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def read_mapping(model: onnx.ModelProto):
    for p in model.metadata_props:
        if p.key == MAPPING_KEY:
            return parse_mapping(p.value)
    return None


def parse_mapping(text: str) -> dict:
    """The io mapping stored as the metadata entry MAPPING_KEY (from a ModelProto or onnxruntime)."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("tensors", {}), dict):
            raise ValueError("not a mapping")
        return data
    except ValueError as e:
        raise WidenError(f"metadata {MAPPING_KEY!r} of the wide model is not valid ({e})") from None
