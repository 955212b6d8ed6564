"""Apply a plan: rewrite constants use by use (un-sharing a constant whose uses now need
different values), epsilons, declared input/output shapes, and record the io mapping."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .plan import Plan

MAPPING_KEY = "onnx_widen.mapping"


def apply(plan: Plan, progress=None) -> onnx.ModelProto:
    an = plan.an
    g = an.graph
    src = g.model
    model = onnx.ModelProto()
    model.CopyFrom(_without_initializers(src))
    graph = model.graph
    # The analysis' node objects belong to the source model; find their twins in the copy by position.
    copy_nodes = list(graph.node)
    node_copy = {id(n): copy_nodes[g.pos[id(n)]] for n in g.nodes}

    uses = defaultdict(list)  # const name -> [(node, idx)]
    for n in g.nodes:
        for i, name in enumerate(n.input):
            if name and g.is_const(name):
                uses[name].append((n, i))

    new_inits = []
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
        original = None
        for gi, (key, (recipe, members)) in enumerate(groups.items()):
            if recipe is None:
                value = None
            else:
                if original is None:
                    original = g.const(name)
                value = recipe.compute(original)
            new_name = name if key == keep_key else f"{name}__w{gi}"
            if new_name != name:
                for n, i in members:
                    node_copy[id(n)].input[i] = new_name
            if name in g.inits:
                if value is None:
                    new_inits.append(g.inits[name])
                else:
                    new_inits.append(numpy_helper.from_array(np.asarray(value).copy(order="C"), new_name))
            elif value is not None:
                if new_name == name:
                    const_nodes_to_replace[name] = value
                else:
                    new_inits.append(numpy_helper.from_array(np.asarray(value).copy(order="C"), new_name))
            if progress:
                progress(name)
    graph.ClearField("initializer")
    graph.initializer.extend(new_inits)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] in const_nodes_to_replace:
            v = const_nodes_to_replace[n.output[0]]
            del n.attribute[:]
            n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.asarray(v))))
    for node, attr_name, value in plan.attr_edits:
        c = node_copy[id(node)]
        for a in c.attribute:
            if a.name == attr_name:
                a.f = float(value)
    _rewrite_signature(plan, graph)
    graph.ClearField("value_info")
    options = plan.opts.to_json()
    _set_meta(model, MAPPING_KEY, json.dumps({"version": 1, **options, "options": options, "approximate": plan.approximate,
                                              "tensors": plan.io}))
    return model


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
    from .errors import WidenError

    for p in model.metadata_props:
        if p.key == MAPPING_KEY:
            try:
                data = json.loads(p.value)
                if not isinstance(data, dict) or not isinstance(data.get("tensors", {}), dict):
                    raise ValueError("not a mapping")
                return data
            except ValueError as e:
                raise WidenError(f"metadata {MAPPING_KEY!r} of the wide model is not valid ({e})") from None
    return None
