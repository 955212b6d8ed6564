"""The whole `widen` job on files: check the request, widen, validate, then write atomically.

Every failure is a `WidenError` (one line, naming the file, tensor or node) and nothing is
written: paths are checked first, the output's size is checked against memory, disk and the
2 GiB single-file limit before planning at the requested factor, and OUT is written only once
the wide model has been validated.
"""
from __future__ import annotations

import math
import os
import time


from . import budget as budget_mod
from . import plan as plan_mod
from . import writer
from .api import build_plan
from .apply import rewrite
from .errors import UsageError, WidenError
from .model_io import FLOAT_TYPES, count_nonfinite, is_external, read_model, write_bytes_atomic
from .model_io import nonfinite as count_values
from .report import count_params, match_summary


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(out: str, what: str = "output"):
    """`out` can be written: not a folder, its folder exists and is writable."""
    if not out:
        raise UsageError(f"{what} path is empty")
    if os.path.isdir(out):
        raise UsageError(f"{what} {out} is a directory")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"{what} folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what} folder {folder} is not writable")


def check_paths(source: str, out: str, report: str | None = None):
    if not source or not os.path.exists(source):
        raise UsageError(f"{source}: no such file")
    if os.path.isdir(source):
        raise UsageError(f"{source}: is a directory, expected an .onnx file")
    if out and _same_file(source, out):
        raise UsageError(f"output {out} is the input file; choose another path")
    check_output_path(out)
    if report is not None:
        if _same_file(report, source):
            raise UsageError(f"report {report} is the input file; choose another path")
        if _same_file(report, out):
            raise UsageError(f"report {report} is the output file; choose another path")
        check_output_path(report, "report")


def check_not_external(out: str, files, what: str = "output"):
    for f in files:
        if _same_file(out, f):
            raise UsageError(f"{what} {out} is the input's external data file {os.path.basename(f)}; choose another path")


def check_degenerate(model):
    """Zero-sized graph inputs and empty floating-point weights: nothing to validate or widen."""
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        for ax, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value == 0:
                raise WidenError(f"input {inp.name!r}: axis {ax} has size 0 (zero-sized dimension); such a model cannot be validated")
    for t in model.graph.initializer:
        if t.data_type in FLOAT_TYPES and len(t.dims) >= 1 and 0 in t.dims:
            raise WidenError(f"initializer {t.name!r}: zero-sized dimension in dims {list(t.dims)}; an empty weight cannot be widened")


def widened_anything(plan) -> bool:
    for _, _, _, recipe in plan.edits.values():
        if recipe.param is not None and any(l is not None and not l.identity for l in recipe.layouts):
            return True
    return False


def check_widens(plan):
    """A graph where no weight grows (no embedding creates a hidden dimension: a CNN, an MLP on
    float features) is refused rather than written back unchanged as if it had been widened."""
    if widened_anything(plan) or plan.depth:
        return
    ops = sorted({n.op_type for n in plan.an.graph.nodes})
    has_embedding = any(m.kind == "embedding" for m in plan.an.matches)
    why = "the embedding found carries no width" if has_embedding else "no embedding table (Gather from a weight) creates a hidden dimension"
    raise WidenError(f"not a Transformer this tool can widen: {why}, so no weight would grow "
                     f"(ops: {', '.join(ops[:8])}{', ...' if len(ops) > 8 else ''})")


def nonfinite_note(counts: dict) -> str:
    total = sum(counts.values())
    worst = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    where = ", ".join(f"{name!r} ({n})" for name, n in worst) + (", ..." if len(counts) > 3 else "")
    return f"{total} non-finite weight values (NaN/Inf) in {len(counts)} tensor{'s' if len(counts) != 1 else ''}: {where}; copied as they are"


def widen_file(source: str, out: str, factor: int | None, residual: str = "repeat", validate: bool = True, provider: str = "cpu",
               rope: str = "spread", report: str | None = None, heads: str = "keep", kv_heads: str = "tile",
               ffn_factor: int | None = None, noise: float = 0.0, seed: int = 0, depth: int = 0, depth_at=None,
               external_data: str | None = None, progress=None, **targets) -> dict:
    """Widen SOURCE into OUT, streaming: tensors are computed and written one at a time (input
    external data memory-mapped, at most two wide tensors in memory), onnxruntime validates the
    written file under a temporary name, and only a valid model gets OUT's name.
    external_data: the data file's name beside OUT (None: one file while it fits in 2 GiB).
    progress: a factory progress(total_bytes, tensors) -> tick(bytes, tensor_done) (writer.write).
    targets: hidden, ffn_size, num_heads, allow_approximate (plan.Options)."""
    check_paths(source, out, report)
    opts = plan_mod.Options(factor=factor, residual=residual, rope=rope, heads=heads, kv_heads=kv_heads, ffn_factor=ffn_factor,
                            noise=noise, seed=seed, depth=depth, depth_at=tuple(depth_at) if depth_at else None, **targets)
    opts.check()
    factor = opts.factor
    t0 = time.perf_counter()
    # Inserting blocks copies the graph with its weights: that path reads external data in.
    small, files = read_model(source, True if opts.added_blocks else "lazy")
    check_not_external(out, files)
    if report is not None:
        check_not_external(report, files, "report")
    if external_data is not None:
        writer.check_data_name(external_data, out, files)
    check_degenerate(small)
    nonfinite = count_nonfinite(small, external=False)
    t1 = time.perf_counter()
    plan = budget_mod.preflight(small, opts, out, validate) or build_plan(small, opts)
    check_widens(plan)
    size = budget_mod.from_plan(plan)
    budget_mod.check(small, size, budget_mod.largest_from_plan(plan), out, factor, validate)

    def count_external(t, values):  # counted as the writer reads them, not in a pass of their own
        if is_external(t) and t.data_type in FLOAT_TYPES and (n := count_values(values)):
            nonfinite[t.name] = n

    skeleton, pending = rewrite(plan, count_external)
    notes = list(plan.notes)
    summary = {
        "input": source, "output": out, "factor": factor, "residual": residual, "rope": rope, "heads": heads, "kv_heads": kv_heads, "ffn_factor": opts.ffn, "noise": noise, "seed": seed,
        "matched": match_summary(plan.an), "params_before": count_params(small), "params_after": sum(math.prod(p.dims) for p in pending if p.data_type in FLOAT_TYPES),
        "notes": notes, "mapping": plan.io, "validation": None, "approximate": plan.approximate,
        **{k: v for k, v in opts.to_json().items() if k in targets and v is not None},
        "estimated_output_bytes": size, "depth": plan.depth,
    }
    t2 = time.perf_counter()
    record_provenance(skeleton, source, summary)
    with writer.write(skeleton, pending, out, external_data, progress) as written:
        t3 = time.perf_counter()
        times = {"load": t1 - t0, "plan": t2 - t1, "write": t3 - t2}
        summary["external_data"] = written.external
        if written.external and external_data is None:
            notes.append(f"the model is over protobuf's 2 GiB limit for one file: weights written to {written.external} beside it")
        summary["output_bytes"] = written.bytes_written
        summary["nonfinite"] = {"count": sum(nonfinite.values()), "tensors": nonfinite}  # external ones counted while writing
        if nonfinite:
            notes.insert(0, nonfinite_note(nonfinite))
        if validate:
            from .validation import validate as run_validate

            # An approximate deepening is measured against the small model; the widening is still checked exactly.
            reference, reference_path = small, source
            if plan.depth and plan.depth["approximate"]:
                reference, reference_path = plan.an.graph.model, None
                plan.depth["error"] = run_validate(small, reference, provider=provider, small_path=source).to_json()["outputs"]
            res = run_validate(reference, written.runtime_path, provider=provider, small_path=reference_path)
            summary["validation"] = res.to_json()
            times["validate"] = time.perf_counter() - t3
            if plan.approximate:  # asked for: the error is the result, reported rather than failed
                notes.append("approximate result, max relative error " + ", ".join(f"{o.name} {o.max_rel:.3g}" for o in res.outputs))
            elif not res.ok:
                worst = max(res.outputs, key=lambda o: (o.max_rel != o.max_rel, o.max_rel))
                failure = f"output {worst.name!r} max relative error {worst.max_rel:.3g}"
                if nonfinite:
                    failure += f" (the input has {sum(nonfinite.values())} non-finite weight values)"
                elif not files and written.bytes_written < LOCALIZE_MAX_BYTES:
                    failure += _first_divergence(small, written.runtime_path)
                summary["validation_failure"] = failure
                summary["time_s"] = times
                return summary
            written.set_metadata(*_validation_meta(summary))
        t4 = time.perf_counter()
        written.commit()
        times["commit"] = time.perf_counter() - t4
    times["total"] = time.perf_counter() - t0
    summary["time_s"] = times
    return summary


def validation_failed(summary: dict) -> bool:
    """Validated and not equal: a failure, unless an approximate result was asked for."""
    val = summary.get("validation")
    return val is not None and not val["ok"] and not summary.get("approximate")


# Locating the first diverging tensor runs both models with every intermediate as an output.
LOCALIZE_MAX_BYTES = 1 << 30


PROVENANCE_KEYS = ("onnx_widen.version", "onnx_widen.source", "onnx_widen.source_sha256", "onnx_widen.validation")


def record_provenance(wide, source: str, summary: dict):
    """For pipelines: which tool and version made the model, from which file (SHA-256), and how it
    validated (the options are in onnx_widen.mapping)."""
    import hashlib

    from . import __version__
    from .apply import _set_meta

    h = hashlib.sha256()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _set_meta(wide, "onnx_widen.version", __version__)
    _set_meta(wide, "onnx_widen.source", os.path.basename(source))
    _set_meta(wide, "onnx_widen.source_sha256", h.hexdigest())
    _set_meta(wide, *_validation_meta(summary))


def _validation_meta(summary: dict) -> tuple:
    import json

    val = summary.get("validation")
    return "onnx_widen.validation", json.dumps(
        {"ok": val["ok"], "provider": val["provider"], "max_rel": {k: v["max_rel"] for k, v in val["outputs"].items()}}
        if val else {"ok": None, "skipped": True})


def write_report(summary: dict, path: str):
    import json

    write_bytes_atomic(json.dumps(summary, indent=2, default=str).encode(), path)


def _first_divergence(small, wide) -> str:
    """Name where the widened graph stops being the widened copy of the small one."""
    from .localize import localize
    from .model_io import load_model

    try:
        first = localize(small, load_model(wide) if isinstance(wide, str) else wide)
    except WidenError:
        return ""
    if not first:
        return ""
    detail = first.get("error") or f"{first['max_rel']:.3g} relative error"
    return f"; first divergence at tensor {first['tensor']!r} from node {first['node']!r} ({first['op']}, pattern {first['pattern']}): {detail}"
