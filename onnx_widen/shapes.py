"""Concrete shapes of every tensor, and the values of the small integer/scalar tensors that
graphs compute from shapes (Shape -> Gather -> Concat -> Reshape, the runtime softmax scale...).

The same evaluator runs in two worlds: the small model's shapes, and the wide model's shapes
with rewritten constants. Comparing the two is how shape constants are checked by role.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import helper, shape_inference, TensorProto

from . import contrib_shapes
from .errors import WidenError
from .graph import Graph, SMALL_CONST, attr

DEFAULT_DIMS = {"batch": 2, "sequence": 7, "past": 5}
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


class ShapeInfo:
    def __init__(self, shapes, dtypes, values, input_shapes):
        self.shapes: dict[str, tuple] = shapes
        self.dtypes: dict[str, int] = dtypes
        self.values: dict[str, np.ndarray] = values
        self.input_shapes: dict[str, tuple] = input_shapes

    def rank(self, name):
        s = self.shapes.get(name)
        return None if s is None else len(s)


def concrete_input_shapes(graph: Graph, dims: dict | None = None, overrides: dict | None = None) -> dict[str, tuple]:
    """Give every dynamic input dimension a value: batch-like first axes 2, others 7 (or `dims[name]`).
    A symbol guessed that way which a contrib op pins (a KV cache's head size) takes the op's value."""
    dims = {**DEFAULT_DIMS, **(dims or {})}
    guessed: dict[str, list] = {}
    out = _guess_input_shapes(graph, dims, overrides or {}, guessed)
    if guessed and any(n.op_type in contrib_shapes.ATTENTION_OPS for n in graph.nodes):
        try:
            known = _propagate(graph, out)[0]  # what a wrong guess leaves unknown is not needed here
        except WidenError:
            return out  # the caller's own inference says what is wrong
        pinned = {}
        for name, want in contrib_shapes.required_inputs(graph, known).items():
            for ax, size in enumerate(want):
                sym = next((p for p, where in guessed.items() if (name, ax) in where), None)
                if size is not None and sym is not None and out[name][ax] != size:
                    pinned[sym] = int(size)
        if pinned:
            out = _guess_input_shapes(graph, {**dims, **pinned}, overrides or {}, {})
    return out


def _guess_input_shapes(graph, dims, overrides, guessed) -> dict[str, tuple]:
    """One value per dynamic dimension; `guessed` collects, per symbol given the default
    sequence length without being named in `dims`, the (input, axis) places it sizes."""
    has_past = any("past" in i.name.lower() for i in graph.inputs)
    out = {}
    for inp in graph.inputs:
        if inp.name in overrides:
            out[inp.name] = tuple(int(x) for x in overrides[inp.name])
            continue
        shape = []
        nd = len(inp.type.tensor_type.shape.dim)
        for ax, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif d.dim_param in dims:
                shape.append(dims[d.dim_param])
            elif ax == 0:
                shape.append(dims["batch"])
            elif "past" in d.dim_param.lower() or ("past" in inp.name.lower() and nd == 4 and ax == 2):
                shape.append(dims["past"])
            elif has_past and "mask" in inp.name.lower() and ax == nd - 1:
                # With a KV cache the mask covers past and new tokens.
                shape.append(dims["past"] + dims["sequence"])
            else:
                shape.append(dims["sequence"])
                if d.dim_param:
                    guessed.setdefault(d.dim_param, []).append((inp.name, ax))
        out[inp.name] = tuple(shape)
    return out


MAX_ELEMENTS = 1 << 31  # no tensor of a model we can widen in memory is larger


def _check_constant_ranges(graph: Graph):
    """A Range with constant bounds is sized before anything materialises it (onnx's shape
    inference would allocate it)."""
    for n in graph.nodes:
        if n.op_type != "Range":
            continue
        vals = [graph.small_const(i) for i in n.input[:3]]
        if any(v is None for v in vals):
            continue
        start, limit, delta = (float(np.asarray(v).reshape(())) for v in vals)
        if delta == 0 or (limit - start) / delta > MAX_ELEMENTS:
            raise WidenError(f"node {graph.node_name(n)!r} (Range): {start:g}..{limit:g} step {delta:g} is not a usable size")


def infer(graph: Graph, input_shapes: dict[str, tuple]) -> ShapeInfo:
    """Concrete shapes of all tensors for the given input shapes, and small-world shape values."""
    _check_constant_ranges(graph)
    shapes, dtypes, values = _propagate(graph, input_shapes)
    missing = [o for n in graph.nodes for o in n.output if o and o not in shapes]
    if missing:
        n = graph.producer[missing[0]]
        raise WidenError(f"node {graph.node_name(n)!r} ({n.op_type}): shape of {missing[0]!r} could not be inferred")
    return ShapeInfo(shapes, dtypes, values, dict(input_shapes))


def _propagate(graph: Graph, input_shapes: dict[str, tuple]):
    """(shapes, dtypes, values) of every tensor that inference reaches."""
    values: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, int] = {}
    extra: dict[str, tuple] = {}  # outputs of ops onnx cannot infer (contrib ops), by their own rule
    for _ in range(12):
        shapes, dtypes = _onnx_infer(graph, input_shapes, values, extra)
        grew = contrib_shapes.infer_outputs(graph, shapes, dtypes, extra, values)
        new_values = evaluate(graph, shapes, {})
        if set(new_values) <= set(values) and not grew:
            break
        values = new_values
    return shapes, dtypes, values


def _onnx_infer(graph: Graph, input_shapes, values, extra=None):
    g = graph.model.graph
    inputs, inits = [], []
    for inp in graph.inputs:
        inputs.append(helper.make_tensor_value_info(inp.name, inp.type.tensor_type.elem_type, list(input_shapes[inp.name])))
    for t in g.initializer:
        if int(np.prod(t.dims)) <= SMALL_CONST:
            inits.append(t)
        else:
            # Shape inference needs the shape of a big weight, not its bytes.
            inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    nodes = []
    folded = set()
    for n in graph.nodes:
        if n.output and all(o in values for o in n.output if o) and n.op_type != "Constant":
            for o in n.output:
                if o:
                    inits.append(onnx.numpy_helper.from_array(np.asarray(values[o]), o))
                    folded.add(o)
            continue
        nodes.append(n)
    value_info = [helper.make_tensor_value_info(name, dt, list(shape)) for name, (shape, dt) in (extra or {}).items()]
    proxy = helper.make_model(
        helper.make_graph(nodes, "proxy", inputs, [], initializer=inits, value_info=value_info),
        opset_imports=list(graph.model.opset_import),
        ir_version=graph.model.ir_version,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            inferred = shape_inference.infer_shapes(proxy, data_prop=True)
        except Exception as e:  # onnx raises several types; all mean the graph is inconsistent
            raise WidenError(f"shape inference failed: {str(e).splitlines()[0]}") from None
    shapes, dtypes = {}, {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + value_info:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
        dtypes[vi.name] = tt.elem_type
    for t in inits:
        shapes[t.name] = tuple(t.dims)
        dtypes[t.name] = t.data_type
    for name in graph.inits:
        shapes.setdefault(name, tuple(graph.inits[name].dims))
        dtypes.setdefault(name, graph.inits[name].data_type)
    return shapes, dtypes


def evaluate(graph: Graph, shapes: dict[str, tuple], overrides: dict[str, np.ndarray], use_overrides: dict | None = None) -> dict[str, np.ndarray]:
    """Values of every tensor computable from shapes and small constants alone.

    `use_overrides[(id(node), input_index)]` replaces what one node reads (an edit of a shared constant).
    """
    use_overrides = use_overrides or {}
    vals: dict[str, np.ndarray] = {}
    for name in graph.inits:
        if name in overrides:
            vals[name] = overrides[name]
        elif graph.const_size(name) <= SMALL_CONST:
            vals[name] = graph.const(name)
    for n in graph.nodes:
        if n.op_type in _NONDETERMINISTIC or n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type == "Constant":
            o = n.output[0]
            if o in overrides:
                vals[o] = overrides[o]
            elif graph.const_size(o) <= SMALL_CONST:
                vals[o] = graph.const(o)
            continue
        if n.op_type in ("Shape", "Size"):
            s = shapes.get(n.input[0])
            if s is None:
                continue
            if n.op_type == "Size":
                vals[n.output[0]] = np.array(int(np.prod(s)), dtype=np.int64)
            else:
                start, end = attr(n, "start", 0), attr(n, "end", None)
                vals[n.output[0]] = np.array(s[start:end] if end is not None else s[start:], dtype=np.int64)
            continue
        args = [use_overrides.get((id(n), k), vals.get(i)) if i else None for k, i in enumerate(n.input)]
        if any(i and a is None for i, a in zip(n.input, args)):
            continue
        if _too_big(n, args):
            continue  # a shape value never has that many elements; do not materialise it
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outs = _run_node(n, args)
        except Exception:
            continue
        for o, v in zip(n.output, outs):
            if o and v is not None and np.asarray(v).size <= SMALL_CONST:
                vals[o] = np.asarray(v)
    return vals


def _too_big(node, args) -> bool:
    """Ops whose output size follows from their constant inputs, checked before they run."""
    try:
        if node.op_type == "Range":
            start, limit, delta = (float(np.asarray(a).reshape(())) for a in args[:3])
            return delta == 0 or (limit - start) / delta > SMALL_CONST
        if node.op_type == "ConstantOfShape":
            return float(np.prod(np.asarray(args[0], dtype=np.float64))) > SMALL_CONST
        if node.op_type == "Expand":
            shape = np.broadcast_shapes(np.shape(args[0]), tuple(int(x) for x in np.asarray(args[1]).reshape(-1)))
            return float(np.prod(shape, dtype=np.float64)) > SMALL_CONST
        if node.op_type == "Tile":
            return float(np.size(args[0])) * float(np.prod(np.asarray(args[1], dtype=np.float64))) > SMALL_CONST
    except Exception:
        return True
    return False


def _run_node(node, args):
    fast = _FAST.get(node.op_type)
    if fast is not None:
        out = fast(node, *args)
        if out is not NotImplemented:
            return [out]
    from onnx.reference import ReferenceEvaluator

    inputs = [f"i{k}" if a is not None else "" for k, a in enumerate(args)]
    n2 = helper.make_node(node.op_type, inputs, [f"o{k}" for k in range(len(node.output))], domain=node.domain)
    n2.attribute.extend(node.attribute)
    feeds = {f"i{k}": a for k, a in enumerate(args) if a is not None}
    in_vi = [helper.make_tensor_value_info(f"i{k}", helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for k, a in enumerate(args) if a is not None]
    out_vi = [helper.make_empty_tensor_value_info(f"o{k}") for k in range(len(node.output))]
    m = helper.make_model(helper.make_graph([n2], "n", in_vi, out_vi), opset_imports=[helper.make_opsetid("", 18)])
    return ReferenceEvaluator(m).run(None, feeds)



def _unsqueeze(node, x, axes=None):
    axes = attr(node, "axes") if axes is None else axes.tolist()
    out = np.asarray(x)
    rank = out.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        out = np.expand_dims(out, a)
    return out


def _squeeze(node, x, axes=None):
    axes = attr(node, "axes") if axes is None else axes.tolist()
    return np.squeeze(x, axis=tuple(axes)) if axes else np.squeeze(x)


def _gather(node, x, idx):
    return np.take(x, idx, axis=attr(node, "axis", 0))


def _concat(node, *xs):
    return np.concatenate([np.atleast_1d(x) if np.ndim(x) == 0 else x for x in xs], axis=attr(node, "axis", 0))


def _binary(f):
    def run(node, a, b):
        dt = np.result_type(a, b)
        if node.op_type == "Div" and np.issubdtype(dt, np.integer):
            return np.trunc(np.divide(a, b)).astype(dt)  # ONNX integer Div truncates
        return np.asarray(f(a, b)).astype(dt)
    return run


_CAST = {TensorProto.FLOAT: np.float32, TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.DOUBLE: np.float64,
         TensorProto.FLOAT16: np.float16, TensorProto.BOOL: np.bool_}


def _cast(node, x):
    to = _CAST.get(attr(node, "to"))
    return NotImplemented if to is None else np.asarray(x).astype(to)


_FAST = {
    "Identity": lambda n, x: x,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Gather": _gather,
    "Concat": _concat,
    "Cast": _cast,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(np.divide),
    "Sqrt": lambda n, x: np.sqrt(x),
    "Reciprocal": lambda n, x: np.reciprocal(x),
    "Neg": lambda n, x: np.negative(x),
    "Equal": lambda n, a, b: np.equal(a, b),
}
