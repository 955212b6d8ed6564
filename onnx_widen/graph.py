"""Read-only index over an ONNX graph: producers, consumers and constant values by name."""
from __future__ import annotations

from collections import defaultdict
from functools import cached_property

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import WidenError
from .model_io import tensor_array

SMALL_CONST = 4096  # elements: constants up to this size are read eagerly (shapes, scalars, axes)


class Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        if g.node and any(a.type == onnx.AttributeProto.GRAPH for n in g.node for a in n.attribute):
            # Control flow (If/Loop/Scan) hides width paths inside subgraphs that we do not analyse.
            names = [n.name or n.op_type for n in g.node if any(a.type == onnx.AttributeProto.GRAPH for a in n.attribute)]
            raise WidenError(f"node {names[0]!r}: control-flow subgraphs are not supported")
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = [i for i in g.input if i.name not in self.inits]
        self.outputs = list(g.output)
        original = list(g.node)
        self.pos = {id(n): i for i, n in enumerate(original)}  # position in the file, for the rewritten copy
        self.nodes = _toposort(original, set(self.inits) | {i.name for i in self.inputs})
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.output_names = {o.name for o in self.outputs}
        self._const_cache: dict[str, np.ndarray] = {}

    @cached_property
    def opset(self) -> int:
        for o in self.model.opset_import:
            if o.domain in ("", "ai.onnx"):
                return o.version
        return 0

    def node_name(self, node: onnx.NodeProto) -> str:
        return node.name or f"{node.op_type}->{node.output[0]}"

    # ---- constants -------------------------------------------------------------------------
    def is_const(self, name: str) -> bool:
        if name in self.inits:
            return True
        p = self.producer.get(name)
        return p is not None and p.op_type == "Constant"

    def const_size(self, name: str) -> int:
        if name in self.inits:
            return int(np.prod(self.inits[name].dims))
        return int(self.const(name).size)

    def const_shape(self, name: str) -> tuple:
        if name in self.inits:
            return tuple(self.inits[name].dims)
        return tuple(self.const(name).shape)

    def const(self, name: str) -> np.ndarray:
        """The constant's value. Only small ones are kept: a weight is read again (or memory-mapped,
        for external data) at each use, so the input is never held twice."""
        if name in self._const_cache:
            return self._const_cache[name]
        arr = tensor_array(self.inits[name]) if name in self.inits else constant_node_value(self.producer[name])
        if arr.size <= SMALL_CONST:
            self._const_cache[name] = arr
        return arr

    def small_const(self, name: str):
        """Value of a constant with few elements, else None."""
        if name and self.is_const(name) and self.const_size(name) <= SMALL_CONST:
            return self.const(name)
        return None


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name == "value_float":
        return np.array(a.f, dtype=np.float32)
    if a.name == "value_floats":
        return np.array(list(a.floats), dtype=np.float32)
    if a.name == "value_int":
        return np.array(a.i, dtype=np.int64)
    if a.name == "value_ints":
        return np.array(list(a.ints), dtype=np.int64)
    raise WidenError(f"Constant node {node.name!r}: unsupported attribute {a.name!r}")


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _toposort(nodes, known):
    known = set(known) | {""}
    ready, out = [], []
    waiting = defaultdict(list)
    missing_count = {}
    for idx, n in enumerate(nodes):
        miss = {i for i in n.input if i not in known}
        if not miss:
            ready.append(idx)
        else:
            missing_count[idx] = miss
            for m in miss:
                waiting[m].append(idx)
    produced = set()
    while ready:
        idx = ready.pop(0)
        n = nodes[idx]
        out.append(n)
        for o in n.output:
            if o in produced or o in known:
                continue
            produced.add(o)
            for w in waiting.pop(o, []):
                missing_count[w].discard(o)
                if not missing_count[w]:
                    ready.append(w)
                    del missing_count[w]
    if missing_count:
        idx = min(missing_count)
        n = nodes[idx]
        raise WidenError(
            f"node {n.name or n.op_type!r}: input {sorted(missing_count[idx])[0]!r} is never produced (graph has a cycle or a dangling input)"
        )
    return out
