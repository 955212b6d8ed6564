"""Mutation fuzzing of `onnx-widen widen` on the sample models (long runs; CI runs a bounded one
in tests/test_fuzz.py). Every mutant must be refused cleanly (WidenError) or written and valid.

    python benchmarks/fuzz.py --mutants 2000 --seed 7 [--workers 2] [--kinds drop_node,op_type]
                              [--samples bert_ts17,gpt2_dyn18] [--json out.json] [--save-bugs DIR]

Prints: mutants tried, refusals, valid outputs, tracebacks, invalid outputs written (and hangs,
crashes), a table per mutation kind, and every bug with how to reproduce it. Exit 1 on any bug.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import fuzzing  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--kinds", default="", help=f"comma-separated subset of: {', '.join(fuzzing.MUTATIONS)}")
    ap.add_argument("--samples", default="", help="comma-separated sample names (manifest.json); default all")
    ap.add_argument("--limit", type=float, default=120, help="seconds per mutant before it counts as a hang")
    ap.add_argument("--json", default="", help="write every record here")
    ap.add_argument("--save-bugs", default="", help="write the mutant of every bug into this folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per mutant")
    a = ap.parse_args(argv)
    kinds = [k for k in a.kinds.split(",") if k] or None
    for k in kinds or []:
        if k not in fuzzing.MUTATIONS:
            ap.error(f"unknown kind {k!r}")
    names = [s for s in a.samples.split(",") if s] or None
    done = [0]

    def progress(r):
        done[0] += 1
        if a.verbose:
            print(f"{done[0]:5d} {r['outcome']:16s} {r['sample']:18s} {r['kind']:18s} {r.get('detail', '')[:60]} | {r.get('message', '')[:80]}", flush=True)
        elif done[0] % 50 == 0:
            print(f"  {done[0]}/{a.mutants}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    results = fuzzing.run(a.mutants, seed=a.seed, workers=a.workers, kinds=kinds, sample_names=names, limit=a.limit, progress=progress)
    wall = time.perf_counter() - t
    s = fuzzing.summarize(results)
    print(f"mutants tried {s['mutants']}  refusals {s['refused']}  valid outputs {s['valid']}  tracebacks {s['traceback']}  "
          f"invalid outputs written {s['invalid_written']}  hangs {s['hang']}  out of memory {s['out_of_memory']}  "
          f"crashes {s['crash']}  ({wall:.0f} s, seed {a.seed})")
    print(f"{'kind':20s} " + " ".join(f"{o:>15s}" for o in fuzzing.OUTCOMES + ("skipped",)))
    for kind, c in s["by_kind"].items():
        print(f"{kind:20s} " + " ".join(f"{c.get(o, 0):15d}" for o in fuzzing.OUTCOMES + ("skipped",)))
    bugs = [r for r in results if r["outcome"] not in ("refused", "valid", "skipped")]
    for r in bugs:
        print(f"\n{r['outcome'].upper()}: {r['sample']} {r['kind']} seed={r['seed']} factor={r['factor']}: {r.get('detail')}")
        print(f"  {r.get('message')}")
        for w in r.get("where", []):
            print(f"    at {w}")
        if a.save_bugs:
            os.makedirs(a.save_bugs, exist_ok=True)
            path = os.path.join(a.save_bugs, f"{r['sample']}_{r['kind']}_{'_'.join(map(str, r['seed']))}.onnx")
            fuzzing.reproduce(r["sample"], r["kind"], r["seed"], path)
            print(f"  reproduce: onnx-widen --debug widen {path} -o /tmp/o.onnx --factor {r['factor']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": s, "records": results}, f, indent=1)
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
