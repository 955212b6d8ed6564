"""Loading and saving models safely: clear errors for bad files, atomic writes."""
from __future__ import annotations

import os
import tempfile

import onnx

from .errors import UsageError, WidenError


def load_model(path, load_external=True) -> onnx.ModelProto:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, expected an .onnx file")
    if os.path.getsize(path) == 0:
        raise WidenError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise WidenError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.node and not model.graph.input:
        raise WidenError(f"{path}: not an ONNX model (no graph)")
    if load_external:
        _load_external(model, os.path.dirname(os.path.abspath(path)))
    return model


def _load_external(model, base):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data, ExternalDataInfo

    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        info = ExternalDataInfo(t)
        loc = info.location
        full = os.path.realpath(os.path.join(base, loc))
        if os.path.isabs(loc) or not full.startswith(os.path.realpath(base) + os.sep):
            raise WidenError(f"tensor {t.name!r}: external data location {loc!r} points outside the model's folder")
        if not os.path.isfile(full):
            raise WidenError(f"tensor {t.name!r}: external data file {loc!r} is missing")
    try:
        onnx.load_external_data_for_model(model, base)
    except Exception as e:
        raise WidenError(f"external data could not be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def save_model_atomic(model: onnx.ModelProto, path: str):
    """Write to a temporary file beside `path`, then rename: a reader never sees a partial model."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{path}: output folder does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".onnx-widen-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
