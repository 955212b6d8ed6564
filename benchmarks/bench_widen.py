"""Widening is a streaming job: read the input, write K^2 times as much. That write is the floor.

For synthetic BERT-style and LLaMA-style models (benchmarks/synth.py: onnx.helper + numpy, weights
as external data), this measures, each in a fresh process:
- `onnx-widen widen` without validation: wall time and peak RSS (the OS's, from wait4);
- the floor: writing the same output bytes (tensor by tensor, the same sizes) with a plain
  numpy.ndarray.tofile loop, fsync'ed like the real write;
- `onnx-widen validate` of the result: wall time and peak RSS;
- a naive onnx.load + onnx.save of the output (skipped when the output is over half the RAM).
Prints one table (markdown) and writes JSON.

    python benchmarks/bench_widen.py --family llama --size 1b --factor 2
    python benchmarks/bench_widen.py --family bert --size 100m
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, HERE)


def child(args: list) -> tuple[float, float]:
    """Run a command with this checkout on the path; (wall seconds, peak RSS in MB of that process)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    t = time.perf_counter()
    p = subprocess.Popen(args, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed with exit code {p.returncode}")
    return wall, usage.ru_maxrss / 1024


def tensor_sizes(path: str) -> list:
    """Bytes of every initializer of a model, from its header (external data not read)."""
    m = onnx.load(path, load_external_data=False)
    return [math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in m.graph.initializer]


def raw_write(sizes: list, path: str, flush_behind: bool = False) -> float:
    """The floor: the same bytes, tensor by tensor, with ndarray.tofile, then fsync. With
    flush_behind, each tensor is written back as it goes, as onnx-widen's writer does
    (writer._PageCache): the floor for that way of writing."""
    from onnx_widen.writer import _PageCache

    buf = np.random.default_rng(0).integers(0, 255, size=max(sizes), dtype=np.uint8)
    t = time.perf_counter()
    with open(path, "wb") as f:
        cache = _PageCache(f.fileno()) if flush_behind else None
        for n in sizes:
            buf[:n].tofile(f)
            if cache is not None:
                f.flush()
                cache.written(n)
        f.flush()
        os.fsync(f.fileno())
    took = time.perf_counter() - t
    os.unlink(path)
    return took


def total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main():
    from synth import SHAPE_ARGS, add_shape_args, shape_of

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["bert", "llama"], default="bert")
    add_shape_args(ap, hidden=512, layers=4, ffn=2048, heads=8, vocab=8000)
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--no-validate", action="store_true", help="skip the validation run")
    ap.add_argument("--workdir", default=None, help="where the models go (default: a temporary folder)")
    ap.add_argument("--json", default="benchmarks/results.json")
    a = ap.parse_args()
    shape = shape_of(a, a.family)

    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        src, out = os.path.join(tmp, "small.onnx"), os.path.join(tmp, "wide.onnx")
        gen_s, _ = child([sys.executable, os.path.join(HERE, "synth.py"), a.family, "-o", src]
                         + [arg for name, v in zip(SHAPE_ARGS, shape) for arg in (f"--{name}", str(v))])
        small_sizes = tensor_sizes(src)
        params = sum(small_sizes) // 4
        os.sync()
        widen_s, widen_rss = child([sys.executable, "-m", "onnx_widen", "widen", src, "-o", out, "--factor", str(a.factor),
                                    "--no-validate", "--external-data", "wide.onnx.data", "-q"])
        sizes = tensor_sizes(out)
        out_bytes, largest = sum(sizes), max(sizes)
        os.sync()
        floor_s = raw_write(sizes, os.path.join(tmp, "raw.bin"))
        os.sync()
        floor_behind_s = raw_write(sizes, os.path.join(tmp, "raw.bin"), flush_behind=True)
        val_s = val_rss = None
        if not a.no_validate:
            val_s, val_rss = child([sys.executable, "-m", "onnx_widen", "validate", src, out])
        naive_s = None
        if out_bytes < total_ram() // 2:
            naive_s, _ = child([sys.executable, "-c", "import onnx, sys; m = onnx.load(sys.argv[1]); "
                                "onnx.save(m, sys.argv[2], save_as_external_data=True, location='naive.data')",
                                out, os.path.join(tmp, "naive.onnx")])
    mb = 2 ** 20
    res = {
        "family": a.family, "shape": dict(zip(SHAPE_ARGS, shape)), "factor": a.factor,
        "params_small": params, "input_MB": sum(small_sizes) / mb, "output_MB": out_bytes / mb, "largest_tensor_MB": largest / mb,
        "generate_s": gen_s, "widen_s": widen_s, "raw_write_s": floor_s, "ratio": widen_s / floor_s,
        "raw_write_flush_behind_s": floor_behind_s, "ratio_flush_behind": widen_s / floor_behind_s,
        "peak_rss_MB": widen_rss, "rss_target_MB": 2 * largest / mb + 500, "validate_s": val_s, "validate_peak_rss_MB": val_rss,
        "naive_load_save_s": naive_s,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {total_ram() / 2**30:.0f} GiB RAM",
    }
    fmt = lambda v, f="{:.1f}": "n/a" if v is None else f.format(v)  # noqa: E731
    print("| family | small params | K | output MB | largest tensor MB | widen s | raw write s (ratio) "
          "| raw write, flush-behind s (ratio) | peak RSS MB | RSS target MB | validate s | validate RSS MB | onnx load+save s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.family} | {params:,} | {a.factor} | {res['output_MB']:.0f} | {res['largest_tensor_MB']:.0f} | {widen_s:.1f} | "
          f"{floor_s:.1f} ({res['ratio']:.2f}) | {floor_behind_s:.1f} ({res['ratio_flush_behind']:.2f}) | {widen_rss:.0f} | "
          f"{res['rss_target_MB']:.0f} | {fmt(val_s)} | {fmt(val_rss, '{:.0f}')} | {fmt(naive_s)} |")
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
