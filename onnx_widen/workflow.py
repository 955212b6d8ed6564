"""The whole `widen` job on files: check the request, widen, validate, then write atomically."""
from __future__ import annotations

import os
import time

from . import plan as plan_mod
from .api import build_plan
from .apply import apply
from .errors import UsageError
from .model_io import load_model, save_model_atomic
from .report import count_params, match_summary


def check_paths(source: str, out: str):
    if not os.path.exists(source):
        raise UsageError(f"{source}: no such file")
    if os.path.exists(out) and os.path.samefile(source, out) or os.path.realpath(source) == os.path.realpath(out):
        raise UsageError(f"output {out} is the input file; choose another path")
    if os.path.isdir(out):
        raise UsageError(f"output {out} is a directory")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder {folder} is not writable")


def widen_file(source: str, out: str, factor: int, residual: str = "repeat", validate: bool = True, provider: str = "cpu") -> dict:
    check_paths(source, out)
    opts = plan_mod.Options(factor=factor, residual=residual)
    opts.check()
    t0 = time.perf_counter()
    small = load_model(source)
    t1 = time.perf_counter()
    plan = build_plan(small, opts)
    t2 = time.perf_counter()
    wide = apply(plan)
    t3 = time.perf_counter()
    summary = {
        "input": source, "output": out, "factor": factor, "residual": residual,
        "matched": match_summary(plan.an), "params_before": count_params(small), "params_after": count_params(wide),
        "notes": plan.notes, "mapping": plan.io, "validation": None,
    }
    times = {"load": t1 - t0, "plan": t2 - t1, "rewrite": t3 - t2}
    if validate:
        from .validation import validate as run_validate

        res = run_validate(small, wide, provider=provider)
        summary["validation"] = res.to_json()
        times["validate"] = time.perf_counter() - t3
        if not res.ok:
            worst = max(res.outputs, key=lambda o: o.max_rel)
            summary["validation_failure"] = f"output {worst.name!r} max relative error {worst.max_rel:.3g}"
            summary["time_s"] = times
            return summary
    t4 = time.perf_counter()
    save_model_atomic(wide, out)
    times["write"] = time.perf_counter() - t4
    times["total"] = time.perf_counter() - t0
    summary["time_s"] = times
    return summary
