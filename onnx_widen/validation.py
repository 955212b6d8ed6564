"""Run the small and the wide model on the same inputs with onnxruntime and compare outputs."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import contrib_shapes
from .apply import read_mapping
from .errors import UsageError, WidenError
from .graph import Graph
from .mapping import post_convention, unwiden, widen_array

ATOL = 1e-5  # float32 rounding on O(1) outputs, after a dozen layers
RTOL = 1e-4  # relative to the largest magnitude of the reference output
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
       onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_}


@dataclass
class OutputCheck:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    ok: bool
    mapped: bool
    # float16/bfloat16 models: relative error of the small and of the wide model against float32.
    ref_small_rel: float | None = None
    ref_wide_rel: float | None = None


@dataclass
class ValidationResult:
    outputs: list = field(default_factory=list)
    input_shapes: list = field(default_factory=list)
    provider: str = "cpu"
    atol: float = ATOL
    rtol: float = RTOL
    reference: str | None = None  # how a float16/bfloat16 model was judged (precision.py)
    small_outputs: list = field(default_factory=list, repr=False)  # output names of the small model

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def to_json(self):
        out = {"ok": self.ok, "provider": self.provider, "atol": self.atol, "rtol": self.rtol, "input_shapes": self.input_shapes,
               "outputs": {o.name: {"max_abs": o.max_abs, "max_rel": o.max_rel, "ok": o.ok, "shape": list(o.shape), "unwidened": o.mapped,
                                    **({"ref_small_rel": o.ref_small_rel, "ref_wide_rel": o.ref_wide_rel} if o.ref_wide_rel is not None else {})}
                           for o in self.outputs}}
        if self.reference:
            out["reference"] = self.reference
        return out


def _table_rows(graph: Graph, name: str):
    """Rows of the embedding table an id input indexes (its vocabulary), if it feeds one."""
    for c in graph.consumers.get(name, []):
        if c.op_type == "Gather" and c.input[1] == name and graph.is_const(c.input[0]):
            return int(graph.const_shape(c.input[0])[0])
        if c.op_type in ("Cast", "Identity", "Unsqueeze", "Reshape"):
            r = _table_rows(graph, c.output[0])
            if r is not None:
                return r
    return None


def make_inputs(model: onnx.ModelProto, shapes: dict | None = None, seed: int = 0, dims: dict | None = None):
    """Token ids inside the vocabulary, masks of ones, positions 0..S-1, normal floats."""
    from .shapes import concrete_input_shapes

    graph = Graph(model)
    rng = np.random.default_rng(seed)
    concrete = concrete_input_shapes(graph, dims, shapes)
    feeds = {}
    for inp in graph.inputs:
        shape = concrete[inp.name]
        dtype = _NP.get(inp.type.tensor_type.elem_type)
        if dtype is None:
            raise UsageError(f"input {inp.name!r}: unsupported element type {inp.type.tensor_type.elem_type}")
        lname = inp.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_ or "mask" in lname:
            feeds[inp.name] = np.ones(shape, dtype=dtype)
        elif "position" in lname:
            feeds[inp.name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        else:
            rows = _table_rows(graph, inp.name)
            feeds[inp.name] = rng.integers(0, rows if rows else 2, size=shape).astype(dtype)
    return feeds


def session(model, provider: str = "cpu"):
    """An onnxruntime session on a ModelProto or a model file (a file keeps its external data
    where it is: onnxruntime maps aligned data instead of copying it)."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise UsageError(f"provider {provider!r} is not available in this onnxruntime build")
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    # Pre-packed weights are a second copy of every MatMul weight: a few tokens do not need them.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    try:
        src = model if isinstance(model, str) else model.SerializeToString()
        return ort.InferenceSession(src, opts, providers=[PROVIDERS[provider]])
    except Exception as e:
        raise WidenError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from None


def _session_mapping(sess):
    """The wide model's io mapping, from the metadata onnxruntime read with it."""
    from .apply import MAPPING_KEY, parse_mapping

    text = sess.get_modelmeta().custom_metadata_map.get(MAPPING_KEY)
    return None if text is None else parse_mapping(text)


def _shape_sets(model, shapes):
    """The export shape, plus a second one with other dynamic sizes, so a model that only works
    at one sequence length is caught."""
    graph = Graph(model)
    dynamic = any(not d.HasField("dim_value") for i in graph.inputs for d in i.type.tensor_type.shape.dim)
    if shapes:
        return [({}, shapes)]
    sets = [({"batch": 2, "sequence": 7}, None)]
    if dynamic:
        sets.append(({"batch": 1, "sequence": 13}, None))
    return [(contrib_shapes.runnable_dims(graph, dims), fixed) for dims, fixed in sets]


def validate(small, wide, factor: int | None = None, shapes: dict | None = None, atol: float = ATOL, rtol: float = RTOL,
             provider: str = "cpu", seed: int = 0, small_path: str | None = None) -> ValidationResult:
    """SMALL and WIDE are ModelProtos or paths; a path is handed to onnxruntime as it is (external
    data stays on disk). `small_path`: where onnxruntime reads a SMALL ModelProto whose external
    data was not loaded. The small model runs first and is released before the wide one loads.
    float16/bfloat16 models are judged against a float32 reference (precision.py)."""
    from . import precision
    from .model_io import load_model, read_model

    if isinstance(small, str):
        small_path = small
        small = read_model(small, "lazy")[0]
    wide = os.fspath(wide) if isinstance(wide, os.PathLike) else wide
    narrow = precision.narrow_dtype(small)
    result = ValidationResult(provider=provider, atol=atol, rtol=rtol)
    try:
        runs = _run_small(small_path or small, small, shapes, seed, provider, result)
    except WidenError:
        if narrow is None:
            raise
        # onnxruntime has no kernels for this type here: compare what the widening computed, upcast.
        small, wide = precision.upcast(small), precision.upcast(load_model(wide) if isinstance(wide, str) else wide)
        result.reference = f"float32 upcasts of both models ({narrow} does not run on {provider})"
        result.rtol = rtol = max(rtol, precision.NARROW_RTOL[narrow])
        narrow = None
        runs = _run_small(small, small, shapes, seed, provider, result)
    refs = None
    if narrow:
        s_ref = session(precision.upcast(small), provider)
        refs = [s_ref.run(None, precision.as_inputs_of(run[0], s_ref)) for run in runs]
        del s_ref
        result.reference = (f"float32 upcast of the small model; the wide model's error may be {precision.REFERENCE_MARGIN:g}x "
                            f"the small model's, plus one {narrow} step of the output")
    s_wide = session(wide, provider)
    mapping = ((_session_mapping(s_wide) if isinstance(wide, str) else read_mapping(wide)) or {}).get("tensors")
    wide_inputs = {i.name for i in s_wide.get_inputs()}
    worst: dict[str, OutputCheck] = {}
    for r, (feeds, ref, dims, fixed) in enumerate(runs):
        wide_feeds = {}
        for n, v in feeds.items():
            if n not in wide_inputs:
                raise WidenError(f"wide model has no input {n!r}")
            entry = (mapping or {}).get(n)
            wide_feeds[n] = widen_array(v, entry) if entry else v
        if wide_inputs - set(feeds):  # inputs of inserted blocks (--depth: their KV cache) get any value
            wide_model = onnx.load(wide, load_external_data=False) if isinstance(wide, str) else wide
            extra = make_inputs(wide_model, fixed, seed + r, dims)
            wide_feeds.update({n: extra[n] for n in wide_inputs - set(feeds)})
        try:
            got = dict(zip([o.name for o in s_wide.get_outputs()], s_wide.run(None, precision.as_inputs_of(wide_feeds, s_wide))))
        except Exception as e:
            raise WidenError(f"onnxruntime failed while validating: {str(e).splitlines()[0]}") from None
        for i, (name, a) in enumerate(zip(result.small_outputs, ref)):
            if name not in got:
                raise WidenError(f"wide model has no output {name!r}")
            b = got[name]
            entry = mapping.get(name) if mapping is not None else (post_convention(a.shape, b.shape, factor) if factor else None)
            if entry is None and a.shape != b.shape:
                raise WidenError(f"output {name!r}: shape {b.shape} of the wide model cannot be mapped to {a.shape}"
                                 + ("" if factor else " (no mapping metadata: pass --factor)"))
            small_b = unwiden(b, entry) if entry else b
            if small_b.shape != a.shape:
                raise WidenError(f"output {name!r}: un-widened shape {small_b.shape} differs from {a.shape}")
            max_abs, scale, bad = _difference(a, small_b)
            ok = (not bad) and max_abs <= atol + rtol * scale
            ref_small = ref_wide = None
            if refs is not None:
                truth = refs[r][i]
                e_small, _, _ = _difference(truth, a)
                e_wide, t_scale, bad = _difference(truth, small_b)
                step = max(rtol, precision.OUTPUT_STEP[narrow])
                ok = (not bad) and e_wide <= precision.REFERENCE_MARGIN * e_small + atol + step * t_scale
                ref_small, ref_wide = _rel(e_small, t_scale), _rel(e_wide, t_scale)
            check = OutputCheck(name, tuple(a.shape), max_abs, _rel(max_abs, scale), ok, entry is not None, ref_small, ref_wide)
            prev = worst.get(name)
            if prev is None or max_abs > prev.max_abs or not ok:
                check.ok = ok and (prev.ok if prev else True)
                worst[name] = check
    result.outputs = list(worst.values())
    return result


def _run_small(src, small, shapes, seed, provider, result) -> list:
    """(feeds, outputs, dims, fixed shapes) of the small model for every input shape set."""
    s_small = session(src, provider)
    result.input_shapes = []
    runs = []
    for k, (dims, fixed) in enumerate(_shape_sets(small, shapes)):
        feeds = make_inputs(small, fixed, seed + k, dims)
        result.input_shapes.append({n: list(v.shape) for n, v in feeds.items()})
        try:
            runs.append((feeds, s_small.run(None, feeds), dims, fixed))
        except Exception as e:
            raise WidenError(f"onnxruntime failed while validating: {str(e).splitlines()[0]}") from None
    # Names, not onnxruntime's NodeArgs: those keep their session (and its weights) alive.
    result.small_outputs = [o.name for o in s_small.get_outputs()]
    return runs


def _rel(err: float, scale: float) -> float:
    return err / scale if scale > 0 else err


def _difference(ref: np.ndarray, got: np.ndarray) -> tuple:
    """(max |ref - got|, max |finite ref|, whether got has a non-finite value ref does not)."""
    a64 = np.asarray(ref, dtype=np.float64)
    b64 = np.asarray(got, dtype=np.float64)
    # Equal infinities (masked logits) agree; a NaN proves nothing, so it never validates.
    same_nonfinite = np.isinf(a64) & (a64 == b64)
    with np.errstate(invalid="ignore"):
        err = np.where(same_nonfinite, 0.0, np.abs(a64 - b64))
    max_abs = float(err.max()) if err.size else 0.0
    finite = a64[np.isfinite(a64)]
    scale = float(np.abs(finite).max()) if finite.size else 0.0
    bad = bool((~np.isfinite(b64) & ~same_nonfinite).any())
    return max_abs, scale, bad
