"""Mutation fuzzing of `widen`: take the sample models, break them (or not) at random, widen each
mutant and classify the outcome. Used by tests/test_fuzz.py (bounded) and benchmarks/fuzz.py.

Every mutant must end in one of two ways:
- refused: a `WidenError` (the CLI's one line, exit 1 or 2), nothing at OUT, no temporary file;
- valid: OUT written, and an independent validation (other random inputs) says it computes the
  mutant's function.
Anything else is a bug: a traceback (any other exception), an invalid output written, a hang
(per-mutant time limit) or a crash of the worker process.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's onnx_widen, also in spawned workers
SAMPLES = ROOT / "sample_models"
OUTCOMES = ("refused", "valid", "traceback", "invalid_written", "hang", "out_of_memory", "crash")
WORKER_MEMORY = 4 << 30  # address-space limit per worker: a mutant that asks for more fails here, not the machine


class Skip(Exception):
    """This mutation does not apply to this model (no candidate): draw another."""


# ---- mutations ----------------------------------------------------------------------------------
def _pick(rng, seq):
    seq = list(seq)
    if not seq:
        raise Skip
    return seq[int(rng.integers(len(seq)))]


def _consumers(g, name):
    return [(n, i) for n in g.node for i, x in enumerate(n.input) if x == name]


def m_drop_node(m, rng):
    g = m.graph
    n = _pick(rng, [n for n in g.node if n.op_type != "Constant" or rng.random() < 0.2])
    bypass = n.input[0] if n.input and rng.random() < 0.7 else None
    for o in n.output:
        for c, i in _consumers(g, o):
            if bypass is not None:
                c.input[i] = bypass
        for out in g.output:
            if out.name == o and bypass is not None:
                # keep the graph output's name by an Identity from the bypass
                g.node.append(helper.make_node("Identity", [bypass], [o], name=f"fuzz_id_{o}"))
    g.node.remove(n)
    return f"drop {n.op_type} {n.name!r}" + (" (bypassed)" if bypass else " (dangling)")


def m_swap_inputs(m, rng):
    n = _pick(rng, [n for n in m.graph.node if len([x for x in n.input if x]) >= 2])
    i, j = rng.choice(len(n.input), size=2, replace=False)
    n.input[int(i)], n.input[int(j)] = n.input[int(j)], n.input[int(i)]
    return f"swap inputs {i},{j} of {n.op_type} {n.name!r}"


def _int_consts(m):
    out = []
    for t in m.graph.initializer:
        if t.data_type == TensorProto.INT64 and int(np.prod(t.dims)) <= 16:
            out.append(("init", t, None))
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.INT64 and int(np.prod(a.t.dims)) <= 16:
                    out.append(("const", a.t, n))
    return out


def m_shape_constant(m, rng):
    kind, t, n = _pick(rng, _int_consts(m))
    arr = numpy_helper.to_array(t).copy()
    if arr.size == 0:
        raise Skip
    flat = arr.reshape(-1)
    e = int(rng.integers(flat.size))
    old = int(flat[e])
    new = _pick(rng, [old + 1, old - 1, old * 2, 0, -1, 1, 3, 10**9, -(10**9)])
    if new == old:
        new = old + 7
    new = int(np.clip(new, -(2**63), 2**63 - 1))
    flat[e] = new
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return f"int64 constant {t.name or (n.output[0] if n else '?')!r}[{e}]: {old} -> {new}"


_SAME_ARITY = {
    "binary": ["Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Max", "Min", "Equal", "Where"],
    "unary": ["Relu", "Tanh", "Sigmoid", "Erf", "Neg", "Identity", "Abs", "Sqrt", "Exp", "Softmax", "Gelu", "Reciprocal", "Cast", "Shape"],
    "shape": ["Reshape", "Expand", "Unsqueeze", "Squeeze", "Tile"],
}


def m_op_type(m, rng):
    n = _pick(rng, m.graph.node)
    group = next((ops for ops in _SAME_ARITY.values() if n.op_type in ops), None)
    if group is None or rng.random() < 0.25:
        group = sum(_SAME_ARITY.values(), [])
    new = _pick(rng, [o for o in group if o != n.op_type])
    old = n.op_type
    n.op_type = new
    return f"op type of {n.name!r}: {old} -> {new}"


def m_attribute(m, rng):
    n = _pick(rng, [n for n in m.graph.node if n.attribute])
    a = _pick(rng, n.attribute)
    T = onnx.AttributeProto
    if a.type == T.INT:
        old = a.i
        a.i = int(_pick(rng, [a.i + 1, a.i - 1, -a.i - 1, 0, 1, 99]))
        what = f"{old} -> {a.i}"
    elif a.type == T.INTS:
        vals = list(a.ints)
        if not vals:
            raise Skip
        choice = rng.integers(3)
        if choice == 0:
            rng.shuffle(vals)
        elif choice == 1:
            vals = vals[:-1]
        else:
            vals[int(rng.integers(len(vals)))] += 1
        del a.ints[:]
        a.ints.extend(int(v) for v in vals)
        what = f"ints -> {vals}"
    elif a.type == T.FLOAT:
        old = a.f
        a.f = float(_pick(rng, [a.f * 2, 0.0, -a.f, a.f + 1.0, 1e30]))
        what = f"{old:g} -> {a.f:g}"
    elif a.type == T.TENSOR:
        arr = numpy_helper.to_array(a.t).copy()
        if arr.size == 0:
            raise Skip
        flat = arr.reshape(-1)
        e = int(rng.integers(flat.size))
        flat[e] = flat[e] * 2 + 1 if arr.dtype != np.bool_ else not flat[e]
        a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
        what = f"tensor element {e} changed"
    elif a.type == T.STRING:
        a.s = b"bogus"
        what = "string -> 'bogus'"
    else:
        raise Skip
    return f"attribute {a.name} of {n.op_type} {n.name!r}: {what}"


def m_delete_initializer(m, rng):
    t = _pick(rng, m.graph.initializer)
    m.graph.initializer.remove(t)
    return f"delete initializer {t.name!r}"


def m_duplicate_output(m, rng):
    nodes = [n for n in m.graph.node if n.output]
    if len(nodes) < 2:
        raise Skip
    i, j = rng.choice(len(nodes), size=2, replace=False)
    a, b = nodes[int(i)], nodes[int(j)]
    old = a.output[0]
    a.output[0] = b.output[0]
    return f"output {old!r} of {a.op_type} renamed to {b.output[0]!r} (also produced by {b.op_type})"


def m_initializer_dims(m, rng):
    t = _pick(rng, [t for t in m.graph.initializer if len(t.dims) >= 1 and int(np.prod(t.dims)) > 1])
    dims = list(t.dims)
    choice = rng.integers(3)
    if choice == 0 and len(dims) >= 2:
        dims = dims[::-1]  # same bytes, transposed meaning
    elif choice == 1:
        dims = dims + [1]
    else:
        dims[int(rng.integers(len(dims)))] += 1  # data no longer matches
    del t.dims[:]
    t.dims.extend(dims)
    return f"dims of {t.name!r} -> {dims}"


def m_dtype(m, rng):
    t = _pick(rng, [t for t in m.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.INT64)])
    old = t.data_type
    t.data_type = int(_pick(rng, [TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT32, TensorProto.INT64, TensorProto.FLOAT]))
    return f"data type of {t.name!r}: {old} -> {t.data_type} (same bytes)"


def m_input_dims(m, rng):
    inits = {t.name for t in m.graph.initializer}
    vi = _pick(rng, [i for i in m.graph.input if i.name not in inits])
    dims = vi.type.tensor_type.shape.dim
    choice = rng.integers(3)
    if choice == 0 and len(dims):
        d = dims[int(rng.integers(len(dims)))]
        d.ClearField("dim_param")
        d.dim_value = int(_pick(rng, [1, 3, 5]))
        what = f"axis fixed to {d.dim_value}"
    elif choice == 1:
        dims.add().dim_value = 1
        what = "extra axis"
    else:
        vi.type.tensor_type.elem_type = int(_pick(rng, [TensorProto.FLOAT, TensorProto.INT32, TensorProto.BOOL]))
        what = f"element type -> {vi.type.tensor_type.elem_type}"
    return f"graph input {vi.name!r}: {what}"


def m_outputs(m, rng):
    g = m.graph
    if rng.random() < 0.5 and len(g.output) > 1:
        o = _pick(rng, g.output)
        g.output.remove(o)
        return f"remove graph output {o.name!r}"
    n = _pick(rng, [n for n in g.node if n.op_type != "Constant" and n.output])
    g.output.append(helper.make_empty_tensor_value_info(n.output[0]))
    return f"add graph output {n.output[0]!r} ({n.op_type})"


# structure-preserving: the mutant is still a sound model with the same structure
def m_perturb_weights(m, rng):
    t = _pick(rng, [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and int(np.prod(t.dims)) > 1])
    arr = numpy_helper.to_array(t)
    arr = (arr * rng.uniform(0.5, 2.0) + rng.standard_normal(arr.shape).astype(np.float32) * 0.05).astype(np.float32)
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return f"perturb weights of {t.name!r}"


def m_nonfinite_weight(m, rng):
    t = _pick(rng, [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and int(np.prod(t.dims)) > 1])
    arr = numpy_helper.to_array(t).copy()
    v = _pick(rng, [np.nan, np.inf, -np.inf])
    arr.reshape(-1)[int(rng.integers(arr.size))] = v
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return f"{v} in {t.name!r}"


def m_shuffle_nodes(m, rng):
    nodes = list(m.graph.node)
    order = rng.permutation(len(nodes))
    del m.graph.node[:]
    m.graph.node.extend(nodes[i] for i in order)
    return "shuffle node order"


def m_strip_names(m, rng):
    for n in m.graph.node:
        n.name = ""
    return "remove all node names"


def m_insert_identity(m, rng):
    g = m.graph
    n = _pick(rng, [n for n in g.node if n.input and n.input[0]])
    name = n.input[0]
    new = f"{name}__fuzz_identity"
    g.node.append(helper.make_node("Identity", [name], [new], name=f"fuzz_identity_{len(g.node)}"))
    n.input[0] = new
    return f"Identity inserted before {n.op_type} {n.name!r}"


def m_opset(m, rng):
    o = _pick(rng, [o for o in m.opset_import if o.domain in ("", "ai.onnx")])
    old = o.version
    o.version = int(_pick(rng, [v for v in (9, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21) if v != old]))
    return f"default opset {old} -> {o.version}"


def m_combo(m, rng):
    """Two breaking mutations on top of each other."""
    done = []
    for kind in rng.choice(BREAKING, size=2, replace=False):
        try:
            done.append(MUTATIONS[str(kind)](m, rng))
        except (Skip, OverflowError, ValueError, IndexError, TypeError):
            pass
    if not done:
        raise Skip
    return " + ".join(done)


MUTATIONS = {
    "drop_node": m_drop_node,
    "swap_inputs": m_swap_inputs,
    "shape_constant": m_shape_constant,
    "op_type": m_op_type,
    "attribute": m_attribute,
    "delete_initializer": m_delete_initializer,
    "duplicate_output": m_duplicate_output,
    "initializer_dims": m_initializer_dims,
    "dtype": m_dtype,
    "input_dims": m_input_dims,
    "graph_outputs": m_outputs,
    "perturb_weights": m_perturb_weights,
    "nonfinite_weight": m_nonfinite_weight,
    "shuffle_nodes": m_shuffle_nodes,
    "strip_names": m_strip_names,
    "insert_identity": m_insert_identity,
    "opset": m_opset,
    "combo": m_combo,
}
PRESERVING = {"perturb_weights", "shuffle_nodes", "strip_names", "insert_identity"}
BREAKING = sorted(set(MUTATIONS) - PRESERVING - {"combo"})


def samples() -> list:
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    return [(e["name"], str(SAMPLES / e["path"])) for e in manifest if (SAMPLES / e["path"]).is_file()]


def make_mutant(model: onnx.ModelProto, kind: str, rng) -> tuple:
    for _ in range(20):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        try:
            return m, MUTATIONS[kind](m, rng)
        except (Skip, OverflowError, ValueError, IndexError, TypeError):
            continue  # no candidate, or this draw does not make sense for the tensor: draw again
    raise Skip


# ---- running one mutant ---------------------------------------------------------------------------
_CACHE: dict = {}


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_one(task) -> dict:
    """task: (sample name, path, kind, seed tuple, factor, time limit s). Returns the outcome record."""
    from onnx_widen import validate
    from onnx_widen.errors import WidenError
    from onnx_widen.workflow import widen_file

    name, path, kind, seed, factor, limit = task
    if path not in _CACHE:
        _CACHE[path] = onnx.load(path)
    rng = np.random.default_rng(seed)
    rec = {"sample": name, "kind": kind, "seed": list(seed), "factor": factor}
    try:
        mutant, detail = make_mutant(_CACHE[path], kind, rng)
    except Skip:
        rec.update(outcome="skipped", detail="no candidate")
        return rec
    rec["detail"] = detail
    with tempfile.TemporaryDirectory(prefix="onnx-widen-fuzz-") as d:
        src, out = os.path.join(d, "mutant.onnx"), os.path.join(d, "out", "wide.onnx")
        os.mkdir(os.path.dirname(out))
        with open(src, "wb") as f:
            f.write(mutant.SerializeToString())
        old = signal.signal(signal.SIGALRM, _alarm) if limit else None
        if limit:
            signal.alarm(int(limit))
        t0 = time.perf_counter()
        try:
            try:
                summary = widen_file(src, out, factor)
                if summary["validation"] is not None and not summary["validation"]["ok"]:
                    raise WidenError(f"validation failed: {summary.get('validation_failure')}")  # what the CLI does
            except WidenError as e:
                msg = str(e)
                rec.update(outcome="refused", message=msg.splitlines()[0] if msg else type(e).__name__)
                if not msg.strip():
                    rec.update(outcome="traceback", message=f"{type(e).__name__} with an empty message")
                leftovers = os.listdir(os.path.dirname(out))
                if leftovers:
                    rec.update(outcome="invalid_written", message=f"refused but left {leftovers} in OUT's folder")
                return rec
            if not os.path.isfile(out) or os.listdir(os.path.dirname(out)) != ["wide.onnx"]:
                rec.update(outcome="invalid_written", message=f"OUT folder holds {os.listdir(os.path.dirname(out))}")
                return rec
            try:
                res = validate(src, out, seed=11)
                ok = res.ok
                why = "" if ok else "; ".join(f"{o.name}: max_rel {o.max_rel:.3g}" for o in res.outputs if not o.ok)
            except WidenError as e:
                ok, why = False, str(e).splitlines()[0]
            rec.update(outcome="valid" if ok else "invalid_written", message=why)
            return rec
        except _Timeout:
            rec.update(outcome="hang", message=f"no result after {limit} s")
            return rec
        except MemoryError:
            rec.update(outcome="out_of_memory", message=f"MemoryError (worker limited to {WORKER_MEMORY >> 30} GiB)")
            return rec
        except Exception as e:  # noqa: BLE001 - the point is to catch what should not escape
            tb = traceback.extract_tb(e.__traceback__)
            frames = [f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(str(ROOT)) else os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in tb[-3:]]
            own = [f for f in tb if "onnx_widen" in f.filename or "patterns" in f.filename]
            rec.update(outcome="traceback", message=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e).strip() else ''}"[:300],
                       where=frames, origin=(os.path.relpath(own[-1].filename, ROOT) if own else "?"))
            return rec
        finally:
            if limit:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
            rec["seconds"] = round(time.perf_counter() - t0, 3)


def _worker_init():
    import warnings

    warnings.filterwarnings("ignore")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(4)
    except Exception:
        pass
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = WORKER_MEMORY if hard == resource.RLIM_INFINITY else min(WORKER_MEMORY, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):
        pass
    try:  # onnxruntime's own log lines (kernel failures of broken mutants) are noise here
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        pass


def tasks(n_mutants: int, seed: int, kinds=None, sample_names=None, limit: float = 60) -> list:
    kinds = list(kinds or MUTATIONS)
    pool = [s for s in samples() if not sample_names or s[0] in sample_names]
    out = []
    for i in range(n_mutants):
        rng = np.random.default_rng([seed, i])
        kind = kinds[i % len(kinds)]  # kinds in rotation, samples at random
        name, path = pool[int(rng.integers(len(pool)))]
        factor = 2 if rng.random() < 0.7 else 3
        out.append((name, path, kind, (seed, i), factor, limit))
    return out


def run(n_mutants: int = 100, seed: int = 0, workers: int | None = None, kinds=None, sample_names=None, limit: float = 60,
        progress=None) -> list:
    """Run n mutants (kinds in rotation, samples in rotation) in `workers` processes."""
    import concurrent.futures as cf
    import multiprocessing as mp

    todo = tasks(n_mutants, seed, kinds, sample_names, limit)
    workers = workers or min(2, os.cpu_count() or 1)
    results = []
    if workers <= 1:
        _worker_init()
        for t in todo:
            results.append(run_one(t))
            if progress:
                progress(results[-1])
        return results
    ctx = mp.get_context("spawn")
    pending = list(todo)
    while pending:
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as ex:
            futs = {ex.submit(run_one, t): t for t in pending}
            pending = []
            broken = []
            for f in cf.as_completed(futs):
                try:
                    results.append(f.result())
                    if progress:
                        progress(results[-1])
                except cf.process.BrokenProcessPool:
                    broken.append(futs[f])
        if broken:
            # Isolate the mutant that kills its process: each suspect alone in a fresh process.
            for t in broken:
                with cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_worker_init) as ex:
                    try:
                        results.append(ex.submit(run_one, t).result())
                    except cf.process.BrokenProcessPool:
                        results.append({"sample": t[0], "kind": t[2], "seed": list(t[3]), "factor": t[4], "outcome": "crash",
                                        "message": "the worker process died (native crash or out of memory)"})
                    if progress:
                        progress(results[-1])
    return results


def summarize(results) -> dict:
    counts = Counter(r["outcome"] for r in results if r["outcome"] != "skipped")
    by_kind = defaultdict(Counter)
    for r in results:
        by_kind[r["kind"]][r["outcome"]] += 1
    return {"mutants": sum(counts.values()), **{o: counts.get(o, 0) for o in OUTCOMES}, "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())}}


def reproduce(sample_name: str, kind: str, seed, out_path: str) -> str:
    """Write the mutant of a record to `out_path` (for a bug report); returns its description."""
    path = dict(samples())[sample_name]
    mutant, detail = make_mutant(onnx.load(path), kind, np.random.default_rng(seed))
    onnx.save(mutant, out_path)
    return detail
