"""Widening is a streaming job: read the input, write k^2 times as much. This compares the time
of `onnx-widen widen` (no validation) with the floor, writing the same output bytes with a plain
numpy tofile loop, and with a naive onnx load+save of the output. Prints a table, writes JSON.

    python benchmarks/bench_widen.py [--hidden 512 --ffn 2048 --layers 4 --vocab 8000 --factor 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def _child(code: str) -> tuple[float, float]:
    """Run `code` in a fresh Python; return (wall seconds, peak RSS in MB) as the OS reports them."""
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.path.join(HERE, "..")}  # this checkout, not an older install
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    wall = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kb / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results.json")
    a = ap.parse_args()
    from minigraph import build

    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "small.onnx"), os.path.join(tmp, "wide.onnx")
        model = build(d=a.hidden, heads=a.heads, ffn=a.ffn, vocab=a.vocab, layers=a.layers, static=False, labels=2)
        onnx.save(model, src)
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        del model
        widen_s, widen_rss = _child(
            f"from onnx_widen.workflow import widen_file; widen_file({src!r}, {out!r}, {a.factor}, validate=False)")
        wide = onnx.load(out)
        arrays = [onnx.numpy_helper.to_array(t) for t in wide.graph.initializer]
        out_bytes = sum(x.nbytes for x in arrays)
        largest = max(x.nbytes for x in arrays)
        raw = os.path.join(tmp, "raw.bin")
        t = time.perf_counter()
        with open(raw, "wb") as f:
            for x in arrays:
                x.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        raw_s = time.perf_counter() - t
        del arrays, wide
        naive_s, _ = _child(f"import onnx; onnx.save(onnx.load({out!r}), {raw!r})")
    res = {"params_small": params, "factor": a.factor, "output_MB": out_bytes / 2**20, "largest_tensor_MB": largest / 2**20,
           "widen_s": widen_s, "raw_write_s": raw_s, "ratio": widen_s / raw_s, "naive_load_save_s": naive_s,
           "peak_rss_MB": widen_rss, "machine": f"{os.cpu_count()} cores"}
    print("| small params | K | output MB | widen s | raw write s | ratio | onnx load+save s | peak RSS MB | largest tensor MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {params:,} | {a.factor} | {res['output_MB']:.0f} | {widen_s:.2f} | {raw_s:.2f} | {res['ratio']:.1f} | "
          f"{naive_s:.2f} | {widen_rss:.0f} | {res['largest_tensor_MB']:.0f} |")
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
