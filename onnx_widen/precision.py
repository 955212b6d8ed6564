"""float16 / bfloat16 models: what "the same function" means when the model itself rounds.

The widened weights are computed in float32 and cast back once (rules.cast_back), so the wide
model is the small one up to one rounding of each rescaled weight, and its arithmetic rounds
differently (longer dot products). Comparing it with the small model at float32 tolerances
would fail for no fault of the widening; comparing at a loose fixed tolerance would hide
faults. So both are measured against a float32 reference, the small model with every narrow
tensor and type upcast: the wide model passes when its error against that reference is within
REFERENCE_MARGIN times the small model's own. Where onnxruntime cannot run the narrow model
(bfloat16 kernels are missing on CPU), both models are upcast and compared at NARROW_RTOL,
which bounds the one rounding of the rescaled weights.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

NARROW = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
REFERENCE_MARGIN = 4.0
# One rounding of an output in its own type: an output the small model happens to compute almost
# exactly (a KV cache after one projection) may still differ by one step once widened (W/3 is not
# exact in float16 where W/2 is). Relative to the output's largest value.
OUTPUT_STEP = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
# One rounding of a weight is 2**-11 (float16) or 2**-8 (bfloat16) relative; a dozen layers of it.
NARROW_RTOL = {"float16": 5e-3, "bfloat16": 3e-2}


def narrow_dtype(model: onnx.ModelProto) -> str | None:
    """'float16' or 'bfloat16' when the model's weights are mostly of that type, else None."""
    counts: dict = {}
    for t in model.graph.initializer:
        if t.data_type in NARROW:
            counts[NARROW[t.data_type]] = counts.get(NARROW[t.data_type], 0) + 1
    return max(counts, key=counts.get) if counts else None


def _upcast_tensor(t: TensorProto) -> TensorProto:
    from .model_io import tensor_array

    return numpy_helper.from_array(np.asarray(tensor_array(t), dtype=np.float32), t.name)


def upcast(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float32: narrow initializers, constants, declared types and
    Cast targets become float32."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type in NARROW:
            g.initializer[i].CopyFrom(_upcast_tensor(t))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type in NARROW:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in NARROW:
                a.t.CopyFrom(_upcast_tensor(a.t))
            elif a.name == "to" and n.op_type == "Cast" and a.i in NARROW:
                a.i = TensorProto.FLOAT
    return m


def as_inputs_of(feeds: dict, sess) -> dict:
    """Feeds converted to the float types a session declares (float16 data for a float32 graph)."""
    types = {i.name: i.type for i in sess.get_inputs()}
    out = {}
    for name, v in feeds.items():
        want = types.get(name, "")
        if want == "tensor(float)" and v.dtype != np.float32:
            v = v.astype(np.float32)
        elif want == "tensor(float16)" and v.dtype != np.float16:
            v = v.astype(np.float16)
        out[name] = v
    return out
