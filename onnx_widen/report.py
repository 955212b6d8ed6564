"""What `widen` and `inspect` tell a person (rich tables) and a pipeline (JSON)."""
from __future__ import annotations

from collections import Counter

import numpy as np

from .graph import Graph


def count_params(model) -> int:
    g = Graph(model) if not isinstance(model, Graph) else model
    return int(sum(np.prod(t.dims) for t in g.inits.values() if t.data_type in (1, 10, 11, 16)))


def match_summary(an) -> dict:
    return dict(Counter(m.kind for m in an.matches))


def inspect_json(an) -> dict:
    g = an.graph
    syms = {}
    for name, axes in an.axes.items():
        for a in axes:
            if a is not None:
                r = a.find()
                syms.setdefault(r.id, r)
    shape_consts = []
    for su in an.shape_uses:
        shape_consts.append({"node": an.name(su.node), "op": su.node.op_type, "operand": su.node.input[su.index],
                             "value": None if an.value(su.node.input[su.index]) is None else np.asarray(an.value(su.node.input[su.index])).tolist(),
                             "roles": [_role(a) for a in an.ax(su.node.output[0])]})
    provenance = {p.key: p.value for p in g.model.metadata_props if p.key.startswith("onnx_widen.") and p.key != "onnx_widen.mapping"}
    return {
        "provenance": provenance,
        "opset": g.opset,
        "nodes": len(g.nodes),
        "nodes_on_width_paths": len(an.claims),
        "matches": [{"kind": m.kind, "nodes": m.nodes, **{k: v for k, v in m.info.items()}} for m in an.matches],
        "counts": match_summary(an),
        "shape_constants": shape_consts,
        "claims": dict(an.claims),
        "uncovered": [{"node": an.name(n), "op": n.op_type, "why": why} for n, why in an.uncovered],
    }


def _role(sym):
    if sym is None:
        return "-"
    r = sym.find()
    if r.factors:
        return "x".join(_role(f) for f in r.factors)
    for tag in ("heads", "terminal", "fixed"):
        if tag in r.tags:
            return f"{tag}({r.size})"
    if "embed" in r.tags:
        return f"hidden({r.size})"
    return f"width({r.size})"


def plan_rows(plan) -> list[dict]:
    """Every rewritten constant: its role, small and wide shape, and the factor on it (--dry-run)."""
    rows, seen = [], set()
    g = plan.an.graph
    for node, idx, name, recipe in plan.edits.values():
        if name in seen:
            continue
        seen.add(name)
        small = list(g.const_shape(name))
        if recipe.param is not None:
            wide = [l.wide if l is not None else n for l, n in zip(recipe.layouts, small)]
            rows.append({"constant": name, "role": recipe.param.role, "small": small, "wide": wide,
                         "factor": round(recipe.factor, 6), "node": plan.an.name(recipe.param.node)})
        else:
            rows.append({"constant": name, "role": "shape/scale value", "small": small, "wide": list(np.shape(recipe.value)),
                         "value": np.asarray(recipe.value).reshape(-1)[:8].tolist(), "node": plan.an.name(node)})
    return rows
