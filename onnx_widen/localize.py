"""Where does a wide model stop being the widened copy of the small one? Re-plan the small model
with the options recorded in the wide model, expose every tracked intermediate tensor of both
graphs as an output, run both once, un-widen each wide tensor by its planned layout and scale,
and report the first one (in graph order) that differs: its node, op and the pattern that claimed it."""
from __future__ import annotations

import math

import numpy as np
import onnx

from . import plan as plan_mod
from .api import build_plan
from .apply import read_mapping
from .errors import WidenError
from .mapping import unwiden, widen_array
from .validation import ATOL, RTOL, make_inputs, session


def _with_outputs(model, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    return m


def localize(small: onnx.ModelProto, wide: onnx.ModelProto, atol: float = ATOL, rtol: float = RTOL, seed: int = 0):
    meta = read_mapping(wide)
    if meta is None:
        raise WidenError("the wide model has no onnx_widen.mapping metadata: cannot tell its intermediate layouts")
    opts = plan_mod.Options.from_json(meta)
    plan = build_plan(small, opts)
    an = plan.an
    wide_names = {o for n in wide.graph.node for o in n.output}
    order = [o for n in an.graph.nodes for o in n.output if o and o in an.axes and o in wide_names
             and an.info.dtypes.get(o) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)]
    feeds = make_inputs(small, seed=seed)
    mapping = meta.get("tensors", {})
    wide_feeds = {k: widen_array(v, mapping[k]) if k in mapping else v for k, v in feeds.items()}
    s_small = session(_with_outputs(small, order))
    s_wide = session(_with_outputs(wide, order))
    got_small = dict(zip([o.name for o in s_small.get_outputs()], s_small.run(None, feeds)))
    got_wide = dict(zip([o.name for o in s_wide.get_outputs()], s_wide.run(None, wide_feeds)))
    producer = an.graph.producer
    for name in order:
        entry = {"axes": {str(i): plan.layout(a).to_json() for i, a in enumerate(an.ax(name))
                          if a is not None and not plan.layout(a).identity},
                 "scale": math.exp(plan.scales.get(name, 0.0))}
        ref = got_small[name].astype(np.float64)
        w = got_wide[name]
        try:
            back = unwiden(w, entry) if entry["axes"] else w.astype(np.float64) / entry["scale"]
        except Exception:
            back = None
        node = producer[name]
        where = {"tensor": name, "node": an.name(node), "op": node.op_type, "pattern": an.claims.get(an.name(node), "-")}
        if back is None or back.shape != ref.shape:
            return {**where, "error": f"shape {tuple(w.shape)} does not un-widen to {tuple(ref.shape)}"}
        same_inf = np.isinf(ref) & (ref == back)  # masked scores: -inf on both sides agree
        diff = np.where(same_inf, 0.0, np.abs(back - ref))
        err = float(diff.max()) if ref.size else 0.0
        finite = ref[np.isfinite(ref)]
        scale = float(np.abs(finite).max()) if finite.size else 0.0
        if not np.isfinite(err) or err > atol + rtol * scale:
            return {**where, "max_abs": err, "max_rel": err / scale if scale else err}
    return None
