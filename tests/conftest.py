import json
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
MANIFEST = json.loads((SAMPLES / "manifest.json").read_text())
NAMES = [e["name"] for e in MANIFEST]


def entry(name):
    return next(e for e in MANIFEST if e["name"] == name)


def load_sample(name):
    return onnx.load(str(SAMPLES / entry(name)["path"]))


def load_wide_skeleton(name, k):
    return onnx.load(str(SAMPLES / entry(name)["wide"][str(k)]), load_external_data=False)


def run(model, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(s.get_outputs(), s.run(None, feeds))}


def unwiden_by_repeat(arr, axes, scale):
    """Independent of the package: average each run of `copies` consecutive entries, then unscale."""
    out = arr.astype(np.float64)
    for axis, copies in axes.items():
        shape = out.shape
        out = out.reshape(shape[:axis] + (shape[axis] // copies, copies) + shape[axis + 1:]).mean(axis=axis + 1)
    return out / scale


def max_rel_error(small, wide, mapping):
    """Largest |small - unwiden(wide)| over the largest |small|, across outputs."""
    worst = 0.0
    for name, ref in small.items():
        got = wide[name]
        m = mapping.get(name)
        if m is not None:
            axes = {int(a): lay["repeat"] for a, lay in m["axes"].items()}
            got = unwiden_by_repeat(got, axes, m["scale"])
        assert got.shape == ref.shape, name
        err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
        worst = max(worst, float(err))
    return worst


@pytest.fixture
def tmp_model_dir(tmp_path):
    return tmp_path
