"""Write a wide model tensor by tensor, without ever holding it whole.

The layout of the file is known before any value is computed (names, dims and types come from
the plan), so the bytes go out in one sequential pass: the main thread computes the next tensor
while a writer thread puts the previous one on disk, and at most two wide tensors are alive at
once. Two forms:

- one .onnx file (a protobuf under 2 GiB): the graph field first, every initializer streamed
  into it as raw bytes, then the model's other fields (a protobuf message may list its fields in
  any order). Changing the metadata after validation only rewrites that short tail.
- external data: the tensors go to a data file beside OUT (offsets of big tensors aligned to
  64 KiB, so onnxruntime can memory-map them), small ones stay in the .onnx file, which is
  written last and rewritten when the metadata changes.

Nothing gets OUT's name before `commit()`: a single file is an anonymous file until then (a
killed run leaves nothing), the external-data pair lives in a hidden temporary folder beside OUT.
onnxruntime validates what was written, from `runtime_path`, before the commit.
"""
from __future__ import annotations

import os
import queue
import shutil
import threading

import numpy as np
import onnx
from onnx import TensorProto

from . import model_io
from .errors import UsageError, WidenError

INLINE_BYTES = 1024  # with external data, smaller tensors stay in the .onnx file (onnx's own default)
ALIGN = 1 << 16  # offsets of big external tensors: onnxruntime maps aligned data instead of copying it
ALIGN_MIN = 1 << 20
PIECE = 1 << 22  # bytes per write call: a stop request is honoured between pieces
IN_FLIGHT = 2  # wide tensors alive at once: one being written, one being computed
FLUSH_BEHIND_BYTES = 1 << 30  # outputs from this size on are written back as they go (_PageCache)


# ---- protobuf framing -----------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


GRAPH_FIELD = 7  # ModelProto.graph
INITIALIZER_FIELD = 5  # GraphProto.initializer
RAW_DATA_FIELD = 9  # TensorProto.raw_data


def _bare_tensor(p) -> TensorProto:
    t = TensorProto()
    t.name = p.name
    t.data_type = p.data_type
    t.dims.extend(p.dims)
    return t


def _raw(arr: np.ndarray) -> memoryview:
    arr = np.asarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    return memoryview(arr.reshape(-1).view(np.uint8))


def _streamed(p) -> bool:
    """Written from its values as raw bytes (else: the TensorProto as it is)."""
    return p.values is not None or model_io.is_external(p.proto)


# ---- the writer thread ----------------------------------------------------------------------------
class _Pipe:
    """Chunks go to the file in order from a writer thread, so disk writes overlap with the
    computation of the next tensor (numpy and os.write both release the GIL)."""

    def __init__(self, fd: int, target: str, progress=None, flush_behind: bool = False, buffer_bytes: int = 0):
        self.fd = fd
        self.target = target
        self.cache = _PageCache(fd) if flush_behind else None
        self.progress = progress
        self.slots = threading.Semaphore(IN_FLIGHT)
        # IN_FLIGHT reusable buffers of the largest tensor: a fresh allocation per tensor would be
        # mapped and zeroed by the kernel page by page every time (as slow as filling it).
        self.buffer_bytes = buffer_bytes
        self.free: list = []
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="onnx-widen-writer", daemon=True)
        self.thread.start()

    def reserve(self):
        """Wait for a slot; returns the slot's buffer (None when tensors are small)."""
        self.slots.acquire()
        self._check()
        if not self.buffer_bytes:
            return None
        return self.free.pop() if self.free else np.empty(self.buffer_bytes, dtype=np.uint8)

    def send(self, chunks: list, tensor_done: bool = False, buffer=None):
        self.jobs.put((chunks, tensor_done, buffer))

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            tensor_done, buffer = job[1], job[2]
            self._do(job)
            del job  # the tensor's memory goes before its slot does
            if buffer is not None:
                self.free.append(buffer)
            del buffer
            if tensor_done:
                self.slots.release()

    def _do(self, job):
        chunks, tensor_done, _ = job
        try:
            if self.error is None and not self.stop.is_set():
                n = 0
                for c in chunks:
                    self._write(c)
                    n += len(c)
                if self.cache is not None:
                    self.cache.written(n)
                if self.progress is not None:
                    self.progress(n, tensor_done)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e

    def _write(self, data):
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        for pos in range(0, len(view), PIECE):
            if self.stop.is_set():
                raise InterruptedError("stopped")
            model_io._write_all(self.fd, view[pos:pos + PIECE])

    def _check(self):
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError):
                raise WidenError(f"cannot write {self.target}: {e.strerror or e}") from None
            raise e

    def close(self, ok: bool = True):
        if not ok:
            self.stop.set()
        self.jobs.put(None)
        self.thread.join()
        if ok:
            self._check()


def _stream_tensors(pipe: _Pipe, pending, frame):
    """Compute each pending tensor and send `frame(p, raw)` chunks to the pipe. The next tensor's
    input is read ahead while this one is computed, and an input range nobody reads again is
    dropped from the page cache (a model larger than memory streams through it)."""
    for i, p in enumerate(pending):
        nxt = pending[i + 1] if i + 1 < len(pending) else None
        if nxt is not None:
            _advise_input(nxt, "WILLNEED")
        buffer = pipe.reserve()
        raw = _raw(p.array(buffer)) if _streamed(p) else None
        pipe.send(frame(p, raw), tensor_done=True, buffer=buffer)
        del raw, buffer
        if pipe.cache is not None and (nxt is None or nxt.origin is not p.origin):
            _advise_input(p, "DONTNEED")


POOL_MIN_BYTES = 1 << 22  # below this, tensors are allocated as they come


def _buffer_bytes(pending) -> int:
    """Size of the reusable buffers: the largest tensor computed into one (0: no pool)."""
    largest = max((p.nbytes for p in pending if p.values is not None), default=0)
    return largest if largest >= POOL_MIN_BYTES else 0


def _advise_input(p, advice: str):
    """posix_fadvise on the external data range a pending tensor reads, if any."""
    t = p.origin
    if t is None or not model_io.is_external(t) or not hasattr(os, "posix_fadvise"):
        return
    location, offset, length = model_io.external_range(t)
    try:
        fd = os.open(location, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, offset, length, getattr(os, f"POSIX_FADV_{advice}"))
    except OSError:
        pass
    finally:
        os.close(fd)


class _PageCache:
    """Write-behind for outputs bigger than memory: start writing each tensor back as soon as it
    is written, wait for the one before and drop it from the page cache, so dirty pages stay
    around two tensors instead of filling memory (and the final fsync has little left to do)."""

    WRITE, WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER

    def __init__(self, fd: int):
        self.fd = fd
        self.pos = os.lseek(fd, 0, os.SEEK_CUR)
        self.previous = None
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            self.sync_range = libc.sync_file_range
            self.sync_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        except (OSError, AttributeError):
            self.sync_range = None

    def written(self, n: int):
        start, self.pos = self.pos, self.pos + n
        if self.sync_range is None:
            return
        self.sync_range(self.fd, start, n, self.WRITE)
        if self.previous is not None:
            a, b = self.previous
            self.sync_range(self.fd, a, b, self.WAIT)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, a, b, os.POSIX_FADV_DONTNEED)
        self.previous = (start, n)


# ---- the two forms --------------------------------------------------------------------------------
class Written:
    """A wide model on disk under a temporary name: validate it from `runtime_path`, update its
    metadata, then `commit()` it to OUT (or `discard()` it)."""

    def __init__(self, out: str, skeleton: onnx.ModelProto, external: str | None):
        self.out = out
        self.folder = os.path.dirname(os.path.abspath(out))
        self.skeleton = skeleton
        self.external = external
        self.runtime_path = ""
        self.bytes_written = 0
        self._done = False

    def set_metadata(self, key: str, value: str):
        from .apply import _set_meta

        _set_meta(self.skeleton, key, value)
        self._write_tail()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._done:
            self.discard()
        return False


class SingleFile(Written):
    """One protobuf file, a model_io.TempFile (anonymous where the OS allows it) until committed."""

    def __init__(self, out, skeleton):
        super().__init__(out, skeleton, None)
        self.file = model_io.TempFile(self.folder)
        self.fd = self.file.fd
        self.runtime_path = self.file.path
        self.tail_at = 0

    def write(self, pending, progress=None):
        graph = onnx.GraphProto()
        graph.CopyFrom(self.skeleton.graph)
        graph.ClearField("initializer")
        head = graph.SerializeToString()
        headers = {id(p): _bare_tensor(p).SerializeToString() for p in pending if _streamed(p)}

        def entry_size(p):
            h = headers.get(id(p))
            if h is None:
                return len(_len_field(INITIALIZER_FIELD, p.proto.ByteSize())) + p.proto.ByteSize()
            return len(_entry_prefix(h, p.nbytes)) + p.nbytes

        graph_len = len(head) + sum(entry_size(p) for p in pending)
        total = len(_len_field(GRAPH_FIELD, graph_len)) + graph_len + len(self._tail())
        if total > model_io.PROTOBUF_LIMIT:
            raise WidenError(f"internal error: a {total} byte model cannot be one ONNX file")
        tick = progress(len(_len_field(GRAPH_FIELD, graph_len)) + graph_len, len(pending)) if progress else None
        pipe = _Pipe(self.fd, self.out, tick, flush_behind=graph_len >= FLUSH_BEHIND_BYTES, buffer_bytes=_buffer_bytes(pending))
        ok = False
        try:
            pipe.send([_len_field(GRAPH_FIELD, graph_len), head])

            def frame(p, raw):
                h = headers.get(id(p))
                if h is None:
                    body = p.proto.SerializeToString()
                    return [_len_field(INITIALIZER_FIELD, len(body)), body]
                return [_entry_prefix(h, len(raw)), raw]

            _stream_tensors(pipe, pending, frame)
            ok = True
        finally:
            pipe.close(ok)
        self.tail_at = len(_len_field(GRAPH_FIELD, graph_len)) + graph_len
        self.bytes_written = self.tail_at
        self._write_tail()
        return self

    def _tail(self) -> bytes:
        """Every field of the model but the graph."""
        rest = onnx.ModelProto()
        rest.CopyFrom(self.skeleton)
        rest.ClearField("graph")
        return rest.SerializeToString()

    def _write_tail(self):
        if not self.tail_at:
            return
        os.ftruncate(self.fd, self.tail_at)
        os.lseek(self.fd, self.tail_at, os.SEEK_SET)
        model_io._write_all(self.fd, self._tail())

    def commit(self):
        try:
            self.file.commit(self.out)
        except OSError as e:
            self.file.discard()
            raise WidenError(f"cannot write {self.out}: {e.strerror or e}") from None
        self._done = True

    def discard(self):
        self.file.discard()
        self._done = True


def _entry_prefix(header: bytes, nbytes: int) -> bytes:
    """Initializer field, the TensorProto's own fields, then the raw_data field's tag and length:
    the raw bytes follow."""
    raw_tag = _len_field(RAW_DATA_FIELD, nbytes)
    return _len_field(INITIALIZER_FIELD, len(header) + len(raw_tag) + nbytes) + header + raw_tag


class ExternalData(Written):
    """A .onnx file and its data file NAME, built in a hidden folder beside OUT and moved to OUT's
    folder on commit."""

    def __init__(self, out, skeleton, name):
        super().__init__(out, skeleton, name)
        self.tmpdir = model_io._tmp_name(self.folder)
        os.mkdir(self.tmpdir)
        self.runtime_path = os.path.join(self.tmpdir, os.path.basename(out))
        self.data_path = os.path.join(self.tmpdir, name)
        self.initializers = []  # headers pointing into the data file, and the small inline tensors

    def write(self, pending, progress=None):
        fd = os.open(self.data_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666)
        offset, pads, streamed = 0, {}, []
        for p in pending:
            n = p.nbytes
            if n < INLINE_BYTES or not _streamed(p) and p.proto.data_type == TensorProto.STRING:
                self.initializers.append(p.tensor())
                continue
            pads[id(p)] = pad = (-offset) % ALIGN if n >= ALIGN_MIN else 0
            t = _bare_tensor(p)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.external), ("offset", str(offset + pad)), ("length", str(n))):
                t.external_data.add(key=key, value=value)
            self.initializers.append(t)
            streamed.append(p)
            offset += pad + n

        def frame(p, raw):
            if len(raw) != p.nbytes:
                raise WidenError(f"internal error: tensor {p.name!r} has {len(raw)} bytes, planned {p.nbytes}")
            return [bytes(pads[id(p)]), raw] if pads[id(p)] else [raw]

        tick = progress(offset, len(streamed)) if progress else None
        pipe = _Pipe(fd, self.out, tick, flush_behind=offset >= FLUSH_BEHIND_BYTES, buffer_bytes=_buffer_bytes(streamed))
        ok = False
        try:
            _stream_tensors(pipe, streamed, frame)
            ok = True
        finally:
            pipe.close(ok)
            if ok:
                os.fsync(fd)
            os.close(fd)
        self.bytes_written = offset
        self._write_tail()
        return self

    def _write_tail(self):
        header = onnx.ModelProto()
        header.CopyFrom(self.skeleton)
        header.graph.initializer.extend(self.initializers)
        with open(self.runtime_path, "wb") as f:
            f.write(model_io.serialize(header))
            f.flush()
            os.fsync(f.fileno())

    def commit(self):
        try:
            os.replace(self.data_path, os.path.join(self.folder, self.external))
            os.replace(self.runtime_path, self.out)
            os.rmdir(self.tmpdir)
        except OSError as e:
            raise WidenError(f"cannot write {self.out}: {e.strerror or e}") from None
        model_io._fsync_dir(self.folder)
        self._done = True

    def discard(self):
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._done = True


# ---- choosing the form ----------------------------------------------------------------------------
def default_data_name(out: str) -> str:
    return os.path.basename(out) + ".data"


def check_data_name(name: str, out: str, input_files=()):
    """NAME is a plain file name beside OUT, neither OUT itself nor a file the input reads."""
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise UsageError(f"--external-data expects a file name (it is written beside OUT), got {name!r}")
    folder = os.path.dirname(os.path.abspath(out))
    full = os.path.join(folder, name)
    if os.path.realpath(full) == os.path.realpath(out):
        raise UsageError(f"external data file {name!r} is the output file; choose another name")
    if os.path.isdir(full):
        raise UsageError(f"external data file {full} is a directory")
    for f in input_files:
        if os.path.exists(full) and os.path.exists(f) and os.path.samefile(full, f):
            raise UsageError(f"external data file {name!r} is the input's data file; choose another name")


def estimate_size(skeleton: onnx.ModelProto, pending) -> int:
    """Bytes of the single-file form."""
    return skeleton.ByteSize() + sum(p.nbytes + 64 + len(p.name) + 10 * len(p.dims) for p in pending)


def write(skeleton: onnx.ModelProto, pending, out: str, external: str | None = None, progress=None) -> Written:
    """Write the model under a temporary name. `external`: the data file's name, or None for one
    file (a model that cannot be one file gets OUT's name + '.data'). `progress`: a factory
    progress(total_bytes, tensors) -> tick(bytes, tensor_done), called once the layout is known."""
    model_io._remove_stale_temps(os.path.dirname(os.path.abspath(out)))
    if external is None and estimate_size(skeleton, pending) > model_io.PROTOBUF_LIMIT - (1 << 20):
        external = default_data_name(out)
    w = ExternalData(out, skeleton, external) if external else SingleFile(out, skeleton)
    try:
        return w.write(pending, progress)
    except BaseException:
        w.discard()
        raise
