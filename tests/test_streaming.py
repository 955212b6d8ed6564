"""Big models: external data in and out, tensor-by-tensor writing with bounded memory, the progress
protocol, and the automatic switch to external data past protobuf's 2 GiB limit."""
import gc
import os
import signal
import subprocess
import sys
import time
import weakref

import numpy as np
import onnx
import pytest

from onnx_widen import model_io, validate, widen, writer
from onnx_widen.apply import PendingTensor
from onnx_widen.cli import main
from onnx_widen.workflow import widen_file

from conftest import ROOT, SAMPLES

BERT = str(SAMPLES / "bert" / "bert_ts17.onnx")
LLAMA = str(SAMPLES / "llama" / "llama_dyn18.onnx")


def _arrays(model):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _external_copy(src, folder, one_file=True):
    """The sample saved with external data (one file, or one file per tensor), as exporters do
    for models over 2 GiB."""
    os.makedirs(folder, exist_ok=True)
    m = onnx.load(src)
    path = os.path.join(folder, "model.onnx")
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=one_file,
              location="model.onnx.data" if one_file else None, size_threshold=256)
    return path


@pytest.mark.parametrize("one_file", [True, False], ids=["one-data-file", "file-per-tensor"])
@pytest.mark.parametrize("sample", [BERT, LLAMA], ids=["bert", "llama"])
def test_external_data_input_widens_like_the_embedded_model(tmp_path, sample, one_file):
    src = _external_copy(sample, str(tmp_path / "in"), one_file)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(src, load_external_data=False).graph.initializer)
    out = str(tmp_path / "wide.onnx")
    s = widen_file(src, out, 2)
    assert s["validation"]["ok"]
    assert _arrays(onnx.load(out)).keys() == _arrays(widen(sample, factor=2)).keys()
    got, want = _arrays(onnx.load(out)), _arrays(widen(sample, factor=2))
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_external_data_output_beside_out(tmp_path):
    src = _external_copy(LLAMA, str(tmp_path / "in"))
    out = tmp_path / "out" / "wide.onnx"
    out.parent.mkdir()
    assert main(["widen", src, "-o", str(out), "--external-data", "weights.bin", "-q"]) == 0
    assert sorted(os.listdir(out.parent)) == ["weights.bin", "wide.onnx"]
    header = onnx.load(str(out), load_external_data=False)
    ext = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and all({e.key: e.value for e in t.external_data}["location"] == "weights.bin" for t in ext)
    for t in ext:  # big tensors start on 64 KiB boundaries, so onnxruntime can map them
        info = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
        if info["length"] >= writer.ALIGN_MIN:
            assert info["offset"] % writer.ALIGN == 0
    assert all(model_io.data_bytes(t) < writer.INLINE_BYTES for t in header.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    assert os.path.getsize(out) < 200_000  # the weights are not in the .onnx file
    wide = onnx.load(str(out))
    want = _arrays(widen(LLAMA, factor=2))
    assert all(np.array_equal(_arrays(wide)[k], want[k]) for k in want)
    res = validate(LLAMA, str(out))
    assert res.ok
    meta = {p.key: p.value for p in header.metadata_props}
    assert '"ok": true' in meta["onnx_widen.validation"]


@pytest.mark.parametrize("name,why", [
    ("sub/w.bin", "file name"), ("..", "file name"), ("wide.onnx", "is the output file"), ("model.onnx.data", "input's data file"),
])
def test_bad_external_data_names_are_refused(tmp_path, capfd, name, why):
    src = _external_copy(BERT, str(tmp_path))
    before = sorted(os.listdir(tmp_path))
    assert main(["widen", src, "-o", str(tmp_path / "wide.onnx"), "--external-data", name]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0], err
    assert sorted(os.listdir(tmp_path)) == before


def test_output_over_the_protobuf_limit_goes_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 2 << 20)  # a 2 GiB model, scaled down
    out = tmp_path / "wide.onnx"
    s = widen_file(BERT, str(out), 2)
    assert s["validation"]["ok"] and s["external_data"] == "wide.onnx.data"
    assert any("2 GiB" in n for n in s["notes"])
    assert sorted(os.listdir(tmp_path)) == ["wide.onnx", "wide.onnx.data"]
    assert validate(BERT, str(out)).ok


def test_at_most_two_wide_tensors_are_alive(tmp_path, monkeypatch):
    """The writer computes a tensor while the previous one is written: never more than two."""
    alive, peak = [0], [0]
    original = PendingTensor.array

    def tracked(self, buffer=None):
        arr = original(self, buffer)
        if arr.nbytes > 4096:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(arr, lambda: alive.__setitem__(0, alive[0] - 1))
        return arr

    monkeypatch.setattr(PendingTensor, "array", tracked)
    monkeypatch.setattr(writer, "PIECE", 1 << 12)  # many small writes: the two threads interleave
    for ext in (None, "w.data"):
        alive[0] = peak[0] = 0
        widen_file(LLAMA, str(tmp_path / f"wide{ext}.onnx"), 2, validate=False, external_data=ext)
        gc.collect()
        assert 1 <= peak[0] <= writer.IN_FLIGHT, peak[0]


def test_progress_reports_every_byte_and_tensor(tmp_path):
    seen = {}

    def factory(total_bytes, total_tensors):
        seen.update(total=total_bytes, tensors=total_tensors, bytes=0, done=0)

        def tick(nbytes, tensor_done):
            seen["bytes"] += nbytes
            seen["done"] += bool(tensor_done)
        return tick

    widen_file(LLAMA, str(tmp_path / "w.onnx"), 2, validate=False, external_data="w.data", progress=factory)
    assert seen["done"] == seen["tensors"] > 0 and seen["bytes"] == seen["total"] == os.path.getsize(tmp_path / "w.data")


def test_killed_external_data_write_leaves_the_old_output(tmp_path):
    src = _external_copy(BERT, str(tmp_path / "in"))
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.onnx"
    out.write_bytes(b"previous model")
    marker = tmp_path / "started"
    env = dict(os.environ, **{model_io._SLOW_WRITE_ENV: "0.2", model_io._WRITE_MARKER_ENV: str(marker)})
    p = subprocess.Popen([sys.executable, "-m", "onnx_widen", "widen", src, "-o", str(out), "--external-data", "out.data", "-q"],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert p.poll() is None and time.time() < deadline
            time.sleep(0.02)
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=60)[1].decode()
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and "terminated" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"previous model" and sorted(os.listdir(work)) == ["out.onnx"]


def test_progress_bar_only_on_a_terminal_and_not_quiet(monkeypatch):
    from onnx_widen import cli

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    with cli._progress(True) as factory:
        assert factory is None  # piped output: no bar
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    with cli._progress(False) as factory:
        assert factory is None  # -q
    with cli._progress(True) as factory:
        assert factory(cli.PROGRESS_MIN_BYTES - 1, 3) is None  # a write of well under a second
        tick = factory(cli.PROGRESS_MIN_BYTES, 2)
        for _ in range(2):
            tick(cli.PROGRESS_MIN_BYTES // 2, True)


def test_non_finite_external_weights_are_counted_as_they_stream(tmp_path):
    """The writer reads every big external weight once and counts NaN/Inf as it goes (no pass of
    its own over the input); small external tensors are read in at load and counted there."""
    m = onnx.load(BERT)
    big = next(t for t in m.graph.initializer if model_io.data_bytes(t) >= 1 << 16)
    arr = onnx.numpy_helper.to_array(big).copy()
    arr.flat[[3, 77]] = [np.nan, np.inf]
    big.CopyFrom(onnx.numpy_helper.from_array(arr, big.name))
    embedded = str(tmp_path / "nan.onnx")
    onnx.save(m, embedded)
    src = _external_copy(embedded, str(tmp_path / "in"))
    for path, out in ((embedded, "a.onnx"), (src, "b.onnx")):
        s = widen_file(path, str(tmp_path / out), 2, validate=False)
        assert s["nonfinite"] == {"count": 2, "tensors": {big.name: 2}}
        assert s["notes"][0].startswith("2 non-finite weight values")


@pytest.mark.parametrize("ext", [None, "w.data"])
def test_reused_buffers_give_the_same_tensors(tmp_path, monkeypatch, ext):
    """Tensors computed into the writer's reusable buffers (forced on for a small model): the same
    bytes as computed alone, and never more buffers than tensors in flight."""
    made = []
    original = writer._Pipe.reserve

    def reserve(self):
        buf = original(self)
        if buf is not None and all(buf is not b for b in made):
            made.append(buf)
        return buf

    monkeypatch.setattr(writer, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(writer._Pipe, "reserve", reserve)
    out = tmp_path / "wide.onnx"
    assert widen_file(LLAMA, str(out), 2, external_data=ext)["validation"]["ok"]
    assert 1 <= len(made) <= writer.IN_FLIGHT
    got, want = _arrays(onnx.load(str(out))), _arrays(widen(LLAMA, factor=2))
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    """SIGKILL leaves the hidden folder an external-data output is built in; the next run in that
    folder removes it once its process is gone and it is a minute old."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{model_io.TMP_PREFIX}{dead.pid}-deadbeef{model_io.TMP_SUFFIX}"
    stale.mkdir()
    (stale / "wide.onnx.data").write_bytes(b"partial")
    old = time.time() - 120
    os.utime(stale, (old, old))
    widen_file(BERT, str(tmp_path / "wide.onnx"), 2, validate=False, external_data="wide.onnx.data")
    assert sorted(os.listdir(tmp_path)) == ["wide.onnx", "wide.onnx.data"]
