"""Widen a folder of exports of one model (Optimum-style encoder / decoder / decoder-with-past,
config.json beside them) consistently: every .onnx file by the same rules, the config's widths
times K, everything else copied. The folder appears at OUT only when every file validated."""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile

from .errors import UsageError, WidenError

# config.json keys that carry a width (Hugging Face names across families): the hidden factor
# multiplies the first group, the FFN factor the second.
WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "head_dim", "d_kv", "head_size", "dim", "embedding_size")
FFN_KEYS = ("intermediate_size", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim", "hidden_dim")
# Block counts: --depth adds its blocks to every stack (T5: encoder and decoder).
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers")


HEAD_KEYS = ("num_attention_heads", "num_heads", "n_head")
KV_HEAD_KEYS = ("num_key_value_heads",)
# onnxruntime-genai's genai_config.json says head_size.
HEAD_SIZE_KEYS = ("head_dim", "d_kv", "head_size")

# The JSON configs of a folder that describe the model's sizes, and where in each they are: a
# Hugging Face config.json at its top level, onnxruntime-genai's genai_config.json (the model
# builder's output folder) under model.decoder.
CONFIGS = {"config.json": (), "genai_config.json": ("model", "decoder")}


def widen_config(config: dict, factor: int | None = None, ffn_factor: int | None = None, heads: str = "keep",
                 kv_heads: str = "tile", hidden: int | None = None, ffn_size: int | None = None,
                 num_heads: int | None = None, depth: int = 0) -> dict:
    """The config of the widened model: the same growth as the plan (plan.Options), read as ratios
    of the config's own sizes; a target size is written as given."""
    from fractions import Fraction

    out = dict(config)
    for key in DEPTH_KEYS:
        if depth and isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = out[key] + depth
    factor = factor if factor is not None else (1 if any(v is not None for v in (hidden, ffn_size, num_heads)) else 2)

    def first(keys):
        return next((out[k] for k in keys if isinstance(out.get(k), int) and out[k] > 0), None)

    if "n_inner" in out and out["n_inner"] is None and isinstance(out.get("n_embd"), int):
        out["n_inner"] = 4 * out["n_embd"]  # GPT-2 style: None means 4 x n_embd, which need not hold once widened
    base = first(WIDTH_KEYS[:3] + ("dim",))
    r_hidden = Fraction(hidden, base) if hidden is not None and base else Fraction(factor)
    n_ffn = first(FFN_KEYS)
    r_ffn = Fraction(ffn_size, n_ffn) if ffn_size is not None and n_ffn else Fraction(factor if ffn_factor is None else ffn_factor)
    n_heads = first(HEAD_KEYS)
    grow = num_heads is not None or heads == "grow"
    r_heads = Fraction(num_heads, n_heads) if num_heads is not None and n_heads else Fraction(factor if grow else 1)

    def scale(keys, r):
        for key in keys:
            if isinstance(out.get(key), int) and (out[key] * r).denominator == 1:
                out[key] = int(out[key] * r)

    scale([k for k in WIDTH_KEYS if not (grow and k in HEAD_SIZE_KEYS)], r_hidden)
    scale(FFN_KEYS, r_ffn)
    scale(HEAD_KEYS + (KV_HEAD_KEYS if kv_heads == "tile" else ()), r_heads)
    return out


def _widen_at(cfg: dict, path: tuple, factor, kw) -> dict:
    """`cfg` with the sizes found under `path` (a chain of keys) widened; unchanged without them."""
    box = {"": copy.deepcopy(cfg)}
    keys = ("",) + path
    parent = box
    for key in keys[:-1]:
        parent = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(parent, dict) or not isinstance(parent.get(keys[-1]), dict):
        return cfg
    added = kw.get("depth") or len(kw.get("depth_at") or ())
    parent[keys[-1]] = widen_config(parent[keys[-1]], factor, kw.get("ffn_factor"), kw.get("heads", "keep"), kw.get("kv_heads", "tile"),
                                    kw.get("hidden"), kw.get("ffn_size"), kw.get("num_heads"), added)
    return box[""]


def widen_folder(source: str, out: str, factor: int, **kw) -> dict:
    from .workflow import validation_failed, widen_file

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
            if validation_failed(s):
                raise WidenError(f"{name}: validation failed ({s.get('validation_failure')}); nothing written")
            summaries[name] = s
        for name in os.listdir(source):
            src = os.path.join(source, name)
            if name in models or not os.path.isfile(src) or name.endswith(".onnx_data") or name.endswith(".data"):
                continue
            if name in CONFIGS:
                with open(src) as f:
                    cfg = json.load(f)
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(_widen_at(cfg, CONFIGS[name], factor, kw), f, indent=2 if name == "config.json" else 4)
            else:
                shutil.copy2(src, os.path.join(tmp, name))
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"input": source, "output": out, "factor": factor, "files": summaries}
