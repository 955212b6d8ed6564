"""The closing-note table: for every sample, K and option, the max relative error against the
small model (onnxruntime CPU, two input shapes for dynamic exports), widen time, and whether the
structure equals the native wide export.

    python benchmarks/samples_table.py [--k 2 3] [--only NAME ...]
"""
import argparse
import json
import os
import sys
import time

import onnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout, not an older install

from onnx_widen import validate, widen
from onnx_widen.structure import differences

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sample_models")
OPTIONS = {
    "default": {},
    "orthogonal": {"residual": "orthogonal"},
    "rope remap": {"rope": "remap"},
    "heads grow": {"heads": "grow"},
    "ffn x4": {"ffn_factor": 4},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, nargs="*", default=[2, 3])
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    print("| sample | K | option | max rel err | widen s | canonical |")
    print("|---|---|---|---|---|---|")
    for e in json.load(open(os.path.join(ROOT, "manifest.json"))):
        if a.only and e["name"] not in a.only and e["arch"] not in a.only:
            continue
        small = onnx.load(os.path.join(ROOT, e["path"]))
        for k in a.k:
            for label, kw in OPTIONS.items():
                if label == "rope remap" and not e.get("rope"):
                    continue
                try:
                    t = time.perf_counter()
                    wide = widen(small, factor=k, **kw)
                    dt = time.perf_counter() - t
                    err = max(o.max_rel for o in validate(small, wide).outputs)
                except Exception as ex:  # report, do not stop the table
                    print(f"| {e['name']} | {k} | {label} | refused: {str(ex)[:80]} | - | - |")
                    continue
                skel = e["wide"].get(str(k)) if label == "default" else None
                canon = "-" if skel is None else ("yes" if not differences(wide, onnx.load(os.path.join(ROOT, skel), load_external_data=False)) else "NO")
                print(f"| {e['name']} | {k} | {label} | {err:.1e} | {dt:.2f} | {canon} |")


if __name__ == "__main__":
    main()
