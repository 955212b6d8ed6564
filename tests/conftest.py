import json
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
MANIFEST = json.loads((SAMPLES / "manifest.json").read_text())
NAMES = [e["name"] for e in MANIFEST]
SUPPORTED = NAMES  # every sample family widens (kept as a name for tests that list what they cover)


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


def widen_feeds(feeds, mapping):
    """Independent of the package: what the wide model reads for inputs that carry width (KV caches)."""
    out = {}
    for name, v in feeds.items():
        m = mapping.get(name)
        if m is None:
            out[name] = v
            continue
        w = v.astype(np.float64)
        for axis, lay in sorted(m["axes"].items()):
            axis = int(axis)
            if "repeat" in lay:
                w = np.repeat(w, lay["repeat"], axis=axis)
            else:
                src = np.array(lay["src"])
                w = np.take(w, np.maximum(src, 0), axis=axis)
                shape = [1] * w.ndim
                shape[axis] = len(src)
                w = w * (src >= 0).reshape(shape)
        out[name] = (w * m["scale"]).astype(v.dtype)
    return out


def max_rel_error(small, wide, mapping):
    """Largest |small - unwiden(wide)| over the largest |small|, across outputs."""
    worst = 0.0
    for name, ref in small.items():
        got = wide[name]
        m = mapping.get(name)
        if m is not None:
            got = got.astype(np.float64)
            for a, lay in m["axes"].items():
                if "src" in lay:  # spread units: keep the copies' positions, drop the zero units
                    src = np.array(lay["src"])
                    got = np.take(got, np.flatnonzero(src >= 0), axis=int(a))
            axes = {int(a): lay.get("repeat", 1) for a, lay in m["axes"].items()}
            got = unwiden_by_repeat(got, axes, m["scale"])
        assert got.shape == ref.shape, name
        err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
        worst = max(worst, float(err))
    return worst


@pytest.fixture
def tmp_model_dir(tmp_path):
    return tmp_path


def native_export(name, path, **sizes):
    """Export a sample's architecture with other config sizes (torch and transformers; skips
    without them), as sample_models/make_samples.py does: what the exporter itself produces for
    the wide config."""
    import sys

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(SAMPLES))
    import make_samples as ms

    e = entry(name)
    a = next(a for a in ms.ARCHS if a.arch == e["arch"])
    cfg = a.make_config(e["attn_implementation"], 1)
    for k, v in sizes.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = getattr(transformers, a.hf_class)(cfg)
    if a.post_build is not None:
        model = a.post_build(model)
    model.eval()
    ms.perturb_parameters(model, 7)  # distinct values: TorchScript shares equal parameters
    return ms.export(a, cfg, a.wrap(model, a.inputs).eval(), e["exporter"], e["opset"], str(path), [])
