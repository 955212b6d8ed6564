"""Widen a folder of exports of one model (Optimum-style encoder / decoder / decoder-with-past,
config.json beside them) consistently: every .onnx file by the same rules, the config's widths
times K, everything else copied. The folder appears at OUT only when every file validated."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from .errors import UsageError, WidenError

# config.json keys that carry a width the factor multiplies (Hugging Face names across families).
WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "intermediate_size", "d_ff", "n_inner", "head_dim", "d_kv",
              "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim", "dim", "hidden_dim", "embedding_size")


def widen_config(config: dict, factor: int) -> dict:
    out = dict(config)
    for key in WIDTH_KEYS:
        if isinstance(out.get(key), int):
            out[key] = out[key] * factor
    return out


def widen_folder(source: str, out: str, factor: int, **kw) -> dict:
    from .workflow import widen_file

    if not os.path.isdir(source):
        raise UsageError(f"{source}: not a folder")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"output folder {out} exists and is not empty")
    if os.path.realpath(source) == os.path.realpath(out):
        raise UsageError(f"output folder {out} is the input folder")
    models = sorted(f for f in os.listdir(source) if f.endswith(".onnx"))
    if not models:
        raise UsageError(f"{source}: no .onnx files")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"output folder's parent {parent} does not exist")
    tmp = tempfile.mkdtemp(prefix=".onnx-widen-", dir=parent)
    summaries = {}
    try:
        for name in models:
            s = widen_file(os.path.join(source, name), os.path.join(tmp, name), factor, **kw)
            if s.get("validation") is not None and not s["validation"]["ok"]:
                raise WidenError(f"{name}: validation failed ({s.get('validation_failure')}); nothing written")
            summaries[name] = s
        for name in os.listdir(source):
            src = os.path.join(source, name)
            if name in models or not os.path.isfile(src) or name.endswith(".onnx_data") or name.endswith(".data"):
                continue
            if name == "config.json":
                with open(src) as f:
                    cfg = json.load(f)
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(widen_config(cfg, factor), f, indent=2)
            else:
                shutil.copy2(src, os.path.join(tmp, name))
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"input": source, "output": out, "factor": factor, "files": summaries}
