"""Loading and saving models safely: clear errors for bad files, atomic writes.

Everything that can go wrong while reading a file (unparsable protobuf, a graph the ONNX checker
rejects, a cycle, an initializer whose bytes do not match its dims, external data that is missing
or points outside the model's folder) becomes a one-line `WidenError` naming the file and the
tensor or node. Writes go to an anonymous file in OUT's folder that only gets a name once it is
complete, so an interrupted run leaves the old OUT (if any) as it was and no temporary file.
"""
from __future__ import annotations

import errno
import math
import os
import time
import uuid
from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .errors import UsageError, WidenError

TMP_PREFIX = ".onnx-widen-"
TMP_SUFFIX = ".tmp"
PROTOBUF_LIMIT = 2**31 - 1  # bytes: one serialized ModelProto (protobuf's hard limit)
_CHUNK = 1 << 20
# Test-only: seconds to sleep after each chunk written, and a file to create when the write starts,
# so that a test can interrupt a write in the middle (tests/test_bad_inputs.py).
_SLOW_WRITE_ENV = "ONNX_WIDEN_TEST_SLOW_WRITE"
_WRITE_MARKER_ENV = "ONNX_WIDEN_TEST_WRITE_MARKER"

# ---- tensor data sizes ---------------------------------------------------------------------------
_ITEM_BYTES = {
    TensorProto.FLOAT: 4, TensorProto.UINT8: 1, TensorProto.INT8: 1, TensorProto.UINT16: 2, TensorProto.INT16: 2,
    TensorProto.INT32: 4, TensorProto.INT64: 8, TensorProto.BOOL: 1, TensorProto.FLOAT16: 2, TensorProto.DOUBLE: 8,
    TensorProto.UINT32: 4, TensorProto.UINT64: 8, TensorProto.COMPLEX64: 8, TensorProto.COMPLEX128: 16,
    TensorProto.BFLOAT16: 2,
}
for _name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0"):
    if hasattr(TensorProto, _name):
        _ITEM_BYTES[getattr(TensorProto, _name)] = 1
_PACKED = {}  # elements per byte for sub-byte types
for _name, _per in (("UINT4", 2), ("INT4", 2), ("FLOAT4E2M1", 2), ("UINT2", 4), ("INT2", 4)):
    if hasattr(TensorProto, _name):
        _PACKED[getattr(TensorProto, _name)] = _per
# Which typed field holds the values when raw_data is not used, and how many entries per element.
_FIELD = {TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2), TensorProto.DOUBLE: ("double_data", 1),
          TensorProto.COMPLEX128: ("double_data", 2), TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
          TensorProto.UINT64: ("uint64_data", 1), TensorProto.STRING: ("string_data", 1)}
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


def _dtype_name(dt: int) -> str:
    try:
        return TensorProto.DataType.Name(dt)
    except ValueError:
        return f"type {dt}"


def data_bytes(t: TensorProto) -> int | None:
    """Bytes the tensor's values take in raw form (None for strings and unknown types)."""
    n = math.prod(t.dims)
    if t.data_type in _ITEM_BYTES:
        return n * _ITEM_BYTES[t.data_type]
    if t.data_type in _PACKED:
        return -(-n // _PACKED[t.data_type])
    return None


def check_tensor(t: TensorProto, where: str = ""):
    """The tensor's data matches its dims and type; raise a WidenError naming it otherwise."""
    label = f"{where}tensor {t.name!r}"
    if any(d < 0 for d in t.dims):
        raise WidenError(f"{label}: negative dimension in dims {list(t.dims)}")
    if t.data_type == TensorProto.UNDEFINED or t.data_type not in TensorProto.DataType.values():
        raise WidenError(f"{label}: undefined or unknown data type {t.data_type}")
    if t.data_location == TensorProto.EXTERNAL:
        return  # checked once loaded; an unloaded reference has no bytes here
    n = math.prod(t.dims)
    if t.raw_data:
        need = data_bytes(t)
        if need is None:
            raise WidenError(f"{label}: {_dtype_name(t.data_type)} cannot be stored as raw bytes")
        have = len(t.raw_data)
        if have != need:
            what = "shorter" if have < need else "longer"
            raise WidenError(f"{label}: data is {what} than its dims: {have} bytes, but dims {list(t.dims)} of "
                             f"{_dtype_name(t.data_type)} need {need}")
        return
    field, per = _FIELD.get(t.data_type, ("int32_data", 1))
    if t.data_type in _PACKED:
        need = -(-n // _PACKED[t.data_type])
    else:
        need = n * per
    have = len(getattr(t, field))
    if have != need:
        if have == 0 and need > 0:
            raise WidenError(f"{label}: has no data but dims {list(t.dims)} ({n} values)")
        what = "shorter" if have < need else "longer"
        raise WidenError(f"{label}: data is {what} than its dims: {have} values in {field}, but dims {list(t.dims)} need {need}")


def _graph_tensors(graph, prefix=""):
    """(tensor, where, name) for the initializers and Constant-node tensors of a graph and its
    subgraphs; `name` is the tensor's name, else the Constant node's output."""
    for t in graph.initializer:
        yield t, f"{prefix}initializer ", t.name
    for n in graph.node:
        label = n.name or n.op_type
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t, f"{prefix}node {label!r} attribute {a.name!r}: ", a.t.name or (n.output[0] if n.output else label)
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    yield t, f"{prefix}node {label!r} attribute {a.name!r}: ", t.name or label
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(a.g, f"{prefix}subgraph of {label!r}: ")
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graph_tensors(g, f"{prefix}subgraph of {label!r}: ")


def check_tensors(model: onnx.ModelProto):
    for t, where, _ in _graph_tensors(model.graph):
        check_tensor(t, where)


def count_nonfinite(model: onnx.ModelProto, external: bool = True) -> dict:
    """NaN/+-Inf values per floating-point initializer or Constant tensor (only those with any).
    A one-element +-Inf constant is a deliberate fill value (attention masks) and is not counted.
    external=False skips external data (the streaming writer counts it as it reads it: `nonfinite`)."""
    out = {}
    for t, _, name in _graph_tensors(model.graph):
        size = math.prod(t.dims)
        if t.data_type not in FLOAT_TYPES or size == 0:
            continue
        if is_external(t):
            if external and os.path.isabs(_external_entries(t).get("location", "")):  # resolved by read_model(..., "lazy")
                n = nonfinite(tensor_array(t))
                if n:
                    out[name] = out.get(name, 0) + n
            continue
        if t.data_type == TensorProto.BFLOAT16:
            bits = np.frombuffer(t.raw_data, dtype=np.uint16) if t.raw_data else np.asarray(t.int32_data, dtype=np.uint16)
            nan = int(np.count_nonzero(((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0)))
            inf = int(np.count_nonzero((bits & 0x7FFF) == 0x7F80))
        else:
            if t.raw_data:
                arr = np.frombuffer(t.raw_data, dtype={TensorProto.FLOAT: "<f4", TensorProto.FLOAT16: "<f2", TensorProto.DOUBLE: "<f8"}[t.data_type])
            elif t.data_type == TensorProto.FLOAT16:
                arr = np.asarray(t.int32_data, dtype=np.uint16).view(np.float16)
            else:
                arr = np.asarray(t.float_data if t.data_type == TensorProto.FLOAT else t.double_data)
            nan = int(np.count_nonzero(np.isnan(arr)))
            inf = int(np.count_nonzero(np.isinf(arr)))
        if size == 1 and not nan:
            continue
        if nan or inf:
            out[name] = out.get(name, 0) + nan + inf
    return out


def nonfinite(arr: np.ndarray) -> int:
    """NaN/+-Inf values in a float array, read in chunks (it may be memory-mapped); a lone +-Inf
    is a fill value, not counted."""
    flat = arr.reshape(-1)
    step = 1 << 24
    nan = inf = 0
    for i in range(0, flat.size, step):
        c = np.asarray(flat[i:i + step], dtype=np.float32)
        if c.size and np.isfinite(c.min()) and np.isfinite(c.max()):
            continue  # min and max see any NaN or inf: two reductions, no temporary
        nan += int(np.count_nonzero(np.isnan(c)))
        inf += int(np.count_nonzero(np.isinf(c)))
    return 0 if flat.size == 1 and not nan else nan + inf


# ---- graph structure -----------------------------------------------------------------------------
def _node_label(n) -> str:
    return f"{n.name or n.op_type + '->' + (n.output[0] if n.output else '?')!r} ({n.op_type})"


def sort_nodes(model: onnx.ModelProto, path: str = ""):
    """Put the top-level nodes in topological order, in place and stably (an already sorted graph is
    left untouched). The ONNX checker requires the order, onnxruntime does not: exporters' graphs
    are sorted, hand-edited ones sometimes are not. A cycle or an input nobody produces is an error."""
    g = model.graph
    known = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer} | {i.name for i in g.input} | {""}
    nodes = list(g.node)
    seen = set(known)
    in_order = True
    for n in nodes:
        if any(i not in seen for i in n.input):
            in_order = False
            break
        seen.update(n.output)
    if in_order:
        return
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
        return  # subgraphs read outer names implicitly: leave the order to the checker
    produced_by = {}
    for idx, n in enumerate(nodes):
        for o in n.output:
            if o:
                produced_by.setdefault(o, idx)
    missing = defaultdict(set)
    waiting = defaultdict(list)
    for idx, n in enumerate(nodes):
        for i in n.input:
            if i not in known:
                if i not in produced_by:
                    raise WidenError(f"{path}: node {_node_label(n)}: input {i!r} is not produced by any node, initializer or graph input")
                if i not in missing[idx]:
                    missing[idx].add(i)
                    waiting[i].append(idx)
    import heapq

    ready = [idx for idx in range(len(nodes)) if not missing[idx]]
    heapq.heapify(ready)
    order, done = [], set()
    while ready:
        idx = heapq.heappop(ready)
        order.append(idx)
        for o in nodes[idx].output:
            if not o or o in done:
                continue
            done.add(o)
            for w in waiting.pop(o, []):
                missing[w].discard(o)
                if not missing[w]:
                    heapq.heappush(ready, w)
    if len(order) < len(nodes):
        # Walk back from a stuck node through producers that are stuck too until one repeats.
        idx = min(i for i in range(len(nodes)) if missing[i])
        path_idx = []
        while idx not in path_idx:
            path_idx.append(idx)
            idx = produced_by[sorted(missing[idx])[0]]
        cycle = path_idx[path_idx.index(idx):] + [idx]
        raise WidenError(f"{path}: graph has a cycle: " + " <- ".join(_node_label(nodes[i]) for i in cycle[:7])
                         + (" <- ..." if len(cycle) > 7 else "") + " (each node needs the next one's output)")
    sorted_nodes = [nodes[i] for i in order]
    g.ClearField("node")
    g.node.extend(sorted_nodes)


# Ops onnxruntime registers in the ONNX domain itself and its optimizers write there
# (SimplifiedLayerNormalization; LayerNormalization below opset 17); the checker knows neither.
ORT_ONNX_DOMAIN_OPS = ("SimplifiedLayerNormalization", "LayerNormalization")


def _ort_onnx_domain_ops(shell: onnx.ModelProto):
    """Check those as the contrib ops they are: moved to onnxruntime's domain in the shell only."""
    opset = next((o.version for o in shell.opset_import if o.domain in ("", "ai.onnx")), 0)
    moved = False
    for n in shell.graph.node:
        if n.domain in ("", "ai.onnx") and n.op_type in ORT_ONNX_DOMAIN_OPS:
            try:
                onnx.defs.get_schema(n.op_type, opset, "")
            except onnx.defs.SchemaError:
                n.domain, moved = "com.microsoft", True
    if moved and not any(o.domain == "com.microsoft" for o in shell.opset_import):
        shell.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def check_structure(model: onnx.ModelProto, path: str = ""):
    """Run the ONNX checker on the model's structure (nodes, types, attributes, SSA form, opsets)
    without copying the weights: initializers become declared inputs of a shell model."""
    if not model.HasField("graph"):
        raise WidenError(f"{path}: not an ONNX model (no graph)")
    if model.ir_version <= 0:
        raise WidenError(f"{path}: not an ONNX model (no IR version)")
    shell = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        if model.HasField(field):
            setattr(shell, field, getattr(model, field))
    shell.opset_import.extend(model.opset_import)
    shell.functions.extend(model.functions)
    g = model.graph
    sg = shell.graph
    sg.name = g.name or "graph"
    sg.node.extend(g.node)
    _ort_onnx_domain_ops(shell)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    declared = {i.name for i in g.input}
    for t in g.initializer:
        if t.name not in declared:
            declared.add(t.name)
            sg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for s in g.sparse_initializer:
        if s.values.name not in declared:
            declared.add(s.values.name)
            sg.input.append(onnx.helper.make_tensor_value_info(s.values.name, s.values.data_type, list(s.dims)))
    try:
        onnx.checker.check_model(shell)
    except Exception as e:  # onnx.checker.ValidationError and friends
        msg = " ".join(str(e).split()) or type(e).__name__
        if len(msg) > 300:
            msg = msg[:297] + "..."
        raise WidenError(f"{path}: invalid ONNX model: {msg}") from None
    if not g.output:
        raise WidenError(f"{path}: invalid ONNX model: the graph has no outputs")


# ---- loading -------------------------------------------------------------------------------------
def read_model(path, load_external=True):
    """Load and check a model file. Returns (model, external data files it reads: real paths).

    load_external: True reads external data into the model; "lazy" checks it and points every
    external tensor at its file's real path, to be read (memory-mapped) by `tensor_array` one
    tensor at a time, so a model larger than memory can be widened; False leaves it alone."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, expected an .onnx file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if size == 0 or not data:
        raise WidenError(f"{path}: empty file, not an ONNX model")
    if size > PROTOBUF_LIMIT:
        raise WidenError(f"{path}: {size / 2**30:.1f} GiB in one file is over protobuf's 2 GiB limit; "
                         "save the weights as external data")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # google.protobuf.message.DecodeError, RuntimeError from upb...
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WidenError(f"{path}: not a readable ONNX model (protobuf parse failed: {why})") from None
    del data
    if not model.HasField("graph") or (not model.graph.node and not model.graph.input):
        raise WidenError(f"{path}: not an ONNX model (no graph)")
    sort_nodes(model, path)
    check_structure(model, path)
    files = []
    if load_external:
        files = _load_external(model, os.path.dirname(os.path.abspath(path)), path, lazy=load_external == "lazy")
    for t, where, _ in _graph_tensors(model.graph):
        if load_external is True or t.data_location != TensorProto.EXTERNAL:
            try:
                check_tensor(t, where)
            except WidenError as e:
                raise WidenError(f"{path}: {e}") from None
    return model, files


def load_model(path, load_external=True) -> onnx.ModelProto:
    return read_model(path, load_external)[0]


def external_data_files(model: onnx.ModelProto, base: str) -> list:
    """Real paths of the external data files a (not yet loaded) model refers to."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    out = []
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            try:
                loc = ExternalDataInfo(t).location
            except Exception:
                continue
            if loc:
                out.append(os.path.realpath(os.path.join(base, loc)))
    return sorted(set(out))


def _load_external(model, base, path="", lazy=False):
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    real_base = os.path.realpath(base)
    files = set()
    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        try:
            info = ExternalDataInfo(t)
            offset = int(info.offset or 0)
            length = None if info.length is None else int(info.length)
        except Exception as e:
            raise WidenError(f"{path}: tensor {t.name!r}: malformed external data entry ({type(e).__name__}: {e})") from None
        loc = info.location
        if not loc:
            raise WidenError(f"{path}: tensor {t.name!r}: external data has no location")
        full = os.path.realpath(os.path.join(base, loc))
        if os.path.isabs(loc) or not full.startswith(real_base + os.sep):
            raise WidenError(f"{path}: tensor {t.name!r}: external data location {loc!r} points outside the model's folder")
        if not os.path.isfile(full):
            raise WidenError(f"{path}: tensor {t.name!r}: external data file {loc!r} is missing")
        fsize = os.path.getsize(full)
        need = data_bytes(t)
        if length is None:
            length = need
        if offset < 0 or (length is not None and length < 0):
            raise WidenError(f"{path}: tensor {t.name!r}: negative external data offset or length")
        if length is not None and offset + length > fsize:
            raise WidenError(f"{path}: tensor {t.name!r}: external data file {loc!r} is too short ({fsize} bytes; "
                             f"the tensor needs bytes {offset}..{offset + length})")
        files.add(full)
        if lazy:
            if (length if length is not None else fsize - offset) < _MAP_MIN_BYTES:
                _load_inline(t, full, offset, length)  # shape constants and scalars: read now
            else:
                _set_external_location(t, full)
    if not files or lazy:
        return sorted(files)
    try:
        onnx.load_external_data_for_model(model, base)
    except Exception as e:
        raise WidenError(f"{path}: external data could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return sorted(files)


def _load_inline(t: TensorProto, path: str, offset: int, length: int | None):
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read() if length is None else f.read(length)
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    t.raw_data = data


def _set_external_location(t: TensorProto, location: str):
    for entry in t.external_data:
        if entry.key == "location":
            entry.value = location


def _external_entries(t: TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


def external_range(t: TensorProto) -> tuple:
    """(file, offset, length) of an external tensor."""
    e = _external_entries(t)
    return e.get("location", ""), int(e.get("offset") or 0), int(e.get("length") or 0) or data_bytes(t) or 0


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


# Below this many bytes an external tensor is read into memory rather than memory-mapped.
_MAP_MIN_BYTES = 1 << 16


def tensor_array(t: TensorProto) -> np.ndarray:
    """The tensor's values. An external tensor (already checked, its location made absolute by
    read_model(..., "lazy")) is memory-mapped read-only: its pages are read when used and
    dropped with the array, so widening never holds the whole input in memory."""
    if not is_external(t):
        return numpy_helper.to_array(t)
    location, offset, _ = external_range(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    shape = tuple(t.dims)
    count = math.prod(shape)
    if count * np.dtype(dtype).itemsize < _MAP_MIN_BYTES:
        with open(location, "rb") as f:
            f.seek(offset)
            return np.fromfile(f, dtype=dtype, count=count).reshape(shape)
    return np.memmap(location, dtype=dtype, mode="r", offset=offset, shape=shape)


# ---- saving --------------------------------------------------------------------------------------
def serialize(model: onnx.ModelProto) -> bytes:
    try:
        return model.SerializeToString()
    except ValueError as e:  # "exceeds maximum protobuf size of 2GB"
        raise WidenError(f"the model cannot be saved as one ONNX file: {str(e).splitlines()[0]}") from None


def save_model_atomic(model: onnx.ModelProto, path: str):
    """Write to an anonymous file beside `path`, then give it the name: a reader never sees a
    partial model, and an interrupted write leaves neither a half OUT nor a temporary file."""
    write_bytes_atomic(serialize(model), path)


def write_bytes_atomic(data: bytes, path: str):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{path}: output folder does not exist")
    _remove_stale_temps(folder)
    try:
        f = TempFile(folder)
    except OSError as e:
        raise WidenError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        _write_all(f.fd, data)
        f.commit(path)
    except OSError as e:
        f.discard()
        raise WidenError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        f.discard()
        raise


class TempFile:
    """A file in `folder` that gets its name only on commit: anonymous (O_TMPFILE) where the OS
    lets it be named later, so a killed run leaves nothing behind; else a named temporary, removed
    on discard. `path` reads it back before the commit (onnxruntime validates it there)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.fd = None
        self.tmp = None  # the name, when it has one
        if _anonymous_files_work(folder) and os.path.isdir("/proc/self/fd"):
            try:
                self.fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o666)
            except (AttributeError, OSError):
                self.fd = None  # no O_TMPFILE (not Linux, or the file system lacks it)
        if self.fd is None:
            self.tmp = _tmp_name(folder)
            self.fd = os.open(self.tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o666)

    @property
    def path(self) -> str:
        return self.tmp or f"/proc/self/fd/{self.fd}"

    def commit(self, dest: str):
        """fsync, give the file its final name (atomically replacing what was there), close."""
        try:
            os.fsync(self.fd)
            if self.tmp is None:
                tmp = _tmp_name(self.folder)
                _give_name(self.fd, tmp)
                self.tmp = tmp
            os.replace(self.tmp, dest)
            self.tmp = None
        finally:
            self._close()
        _fsync_dir(self.folder)

    def discard(self):
        self._close()
        if self.tmp is not None and os.path.lexists(self.tmp):
            os.unlink(self.tmp)
        self.tmp = None

    def _close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_ANONYMOUS: dict = {}


def _give_name(fd, name):
    """Link an O_TMPFILE file into the folder: linkat(AT_EMPTY_PATH) where allowed (root), else
    through /proc/self/fd."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.linkat(fd, b"", -100, os.fsencode(name), 0x1000) == 0:  # AT_FDCWD, AT_EMPTY_PATH
            return
    except (OSError, AttributeError):
        pass
    os.link(f"/proc/self/fd/{fd}", name)


def _anonymous_files_work(folder) -> bool:
    """Can an O_TMPFILE file be given a name here (it needs /proc)? Probed once per device with an
    empty file, so that a model is never written twice."""
    try:
        dev = os.stat(folder).st_dev
    except OSError:
        return False
    if dev not in _ANONYMOUS:
        ok = False
        try:
            fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                probe = _tmp_name(folder)
                _give_name(fd, probe)
                os.unlink(probe)
                ok = True
            finally:
                os.close(fd)
        except (AttributeError, OSError):
            ok = False
        _ANONYMOUS[dev] = ok
    return _ANONYMOUS[dev]


def _tmp_name(folder):
    return os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def _write_all(fd, data):
    delay = float(os.environ.get(_SLOW_WRITE_ENV) or 0)
    view = memoryview(data)
    marker = os.environ.get(_WRITE_MARKER_ENV)
    if marker:
        with open(marker, "w"):
            pass
    step = _CHUNK if not delay else max(1, min(_CHUNK, len(view) // 8 or 1))
    pos = 0
    while pos < len(view):
        n = os.write(fd, view[pos:pos + step])
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        pos += n
        if delay:
            time.sleep(delay)


def _fsync_dir(folder):
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _remove_stale_temps(folder):
    """Named temporaries of earlier runs that were killed (the fallback path, and the hidden folder
    an external-data output is built in): remove those whose process is gone and that have not
    been touched for a minute."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX) and n.endswith(TMP_SUFFIX)]
    except OSError:
        return
    for n in names:
        pid = n[len(TMP_PREFIX):].split("-", 1)[0]
        full = os.path.join(folder, n)
        try:
            if not pid.isdigit() or int(pid) == os.getpid() or time.time() - os.path.getmtime(full) < 60:
                continue
            try:
                os.kill(int(pid), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            if os.path.isdir(full) and not os.path.islink(full):
                import shutil

                shutil.rmtree(full, ignore_errors=True)
            else:
                os.unlink(full)
        except OSError:
            continue


def temp_files(folder) -> list:
    """Leftover temporary files of this tool in `folder` (for tests and checks)."""
    try:
        return sorted(n for n in os.listdir(folder) if n.startswith(TMP_PREFIX))
    except OSError:
        return []
