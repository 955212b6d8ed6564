"""The closing-note table: for every sample and K, the max relative error against the small
model (onnxruntime CPU, two input shapes for dynamic exports), widen time, canonical structure.

    python benchmarks/samples_table.py
"""
import json
import os
import time

import onnx

from onnx_widen import validate, widen
from onnx_widen.structure import differences

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sample_models")


def main():
    print("| sample | K | residual | max rel err | widen s | canonical |")
    print("|---|---|---|---|---|---|")
    for e in json.load(open(os.path.join(ROOT, "manifest.json"))):
        small = onnx.load(os.path.join(ROOT, e["path"]))
        for k in (2, 3, 4):
            for residual in ("repeat", "orthogonal"):
                t = time.perf_counter()
                wide = widen(small, factor=k, residual=residual)
                dt = time.perf_counter() - t
                err = max(o.max_rel for o in validate(small, wide).outputs)
                skel = e["wide"].get(str(k))
                canon = "-" if skel is None else ("yes" if not differences(wide, onnx.load(os.path.join(ROOT, skel), load_external_data=False)) else "no")
                print(f"| {e['name']} | {k} | {residual} | {err:.2e} | {dt:.2f} | {canon} |")


if __name__ == "__main__":
    main()
