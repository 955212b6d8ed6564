"""Will the widened model fit? Estimate the output's size before any heavy work and compare it
with what the machine has: free disk at OUT's folder and available memory.

Widening streams (writer.py): the memory it needs is the small model, if it is held in memory
(external data is memory-mapped), plus two wide tensors (four for float16/bfloat16, widened in
float32), plus onnxruntime's copies of both models when validating a single-file output
(external data is memory-mapped by onnxruntime too). A model over protobuf's 2 GiB limit is
written with external data, so that limit is not a reason to refuse.

Three estimates of the output, cheapest first:
- `upper_bound(model, k)`: every floating-point weight grows by k on every axis, once per use
  (a constant whose uses need different values is un-shared). Needs no analysis.
- `from_plan(plan)`: exact initializer bytes of the plan's recipes (apply's grouping of uses).
- `extrapolate(plan2, k)`: from a plan built at k=2, each axis that doubled grows by k. Used when
  the upper bound does not fit, so a huge factor is refused without planning at that factor
  (the plan's layouts are O(k) in memory).
"""
from __future__ import annotations

import math
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass

import onnx

from .errors import WidenError
from .model_io import FLOAT_TYPES, PROTOBUF_LIMIT, data_bytes

PROCESS_OVERHEAD = 300 << 20  # Python, numpy, onnx, onnxruntime, the graph without its weights


def human(n: float) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000.0
    return f"{n:.3g} EB"


def _itemsize(t) -> int:
    b = data_bytes(t)
    n = math.prod(t.dims)
    return (b // n) if b is not None and n else 0


def _const_tensors(model: onnx.ModelProto) -> dict:
    """Constant nodes' `value` tensors by output name (some exporters put weights there)."""
    out = {}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[n.output[0]] = a.t
    return out


def _tensors(model: onnx.ModelProto) -> dict:
    """Every constant the plan may rewrite, by name: initializers and Constant `value` tensors."""
    out = _const_tensors(model)
    out.update({t.name: t for t in model.graph.initializer})
    return out


def _bytes(t) -> int:
    b = data_bytes(t)
    return b if b is not None else len(t.raw_data)


def _overhead(model: onnx.ModelProto) -> int:
    """Bytes of everything but constant data (nodes, signature, metadata): stays the same."""
    g = model.graph
    consts = _const_tensors(model)
    nodes = sum(n.ByteSize() for n in g.node) - sum(_bytes(t) for t in consts.values())
    return max(0, nodes) + sum(v.ByteSize() for v in list(g.input) + list(g.output)) + 4096 + 64 * len(g.initializer)


def _uses(model: onnx.ModelProto) -> dict:
    uses = defaultdict(int)
    for n in model.graph.node:
        for i in n.input:
            if i:
                uses[i] += 1
    return uses


def model_bytes(model: onnx.ModelProto) -> int:
    return sum(_bytes(t) for t in _tensors(model).values()) + _overhead(model)


def upper_bound(model: onnx.ModelProto, k: int) -> int:
    return _upper(model, k)[0]


def _upper(model: onnx.ModelProto, k: int) -> tuple:
    """(total bytes, largest tensor bytes) if every float weight grew by k on every axis."""
    uses = _uses(model)
    total, largest = _overhead(model), 0
    for name, t in _tensors(model).items():
        b = _bytes(t)
        if t.data_type in FLOAT_TYPES and len(t.dims) >= 1:
            b *= k ** len(t.dims)
            total += b * max(1, uses.get(name, 0))
        else:
            total += b
        largest = max(largest, b)
    return total, largest


def _groups(plan):
    """Per constant: the distinct recipes of its uses, as apply groups them (None: unchanged)."""
    g = plan.an.graph
    tensors = _tensors(g.model)
    by_name = defaultdict(dict)
    for n in g.nodes:
        for i, name in enumerate(n.input):
            if name and name in tensors:
                e = plan.edits.get((id(n), i))
                recipe = e[3] if e is not None else None
                by_name[name].setdefault(recipe.key if recipe is not None else None, recipe)
    return g, tensors, by_name


def _recipe_bytes(t, recipe, grow) -> int:
    if recipe is None:
        return _bytes(t)
    if recipe.value is not None:
        return int(recipe.value.nbytes)
    dims = [grow(lay, n) for lay, n in zip(recipe.layouts, t.dims)]
    return math.prod(dims) * _itemsize(t)


def _sizes(plan, grow) -> list:
    g, tensors, by_name = _groups(plan)
    return [_recipe_bytes(t, r, grow) for name, t in tensors.items() for r in (by_name.get(name) or {None: None}).values()]


def _total(plan, grow) -> int:
    return _overhead(plan.an.graph.model) + sum(_sizes(plan, grow))


def largest_from_plan(plan) -> int:
    return max(_sizes(plan, lambda lay, n: lay.wide if lay is not None else n), default=0)


def from_plan(plan) -> int:
    """Bytes of the output the plan describes (recipes' wide shapes; un-shared uses counted apart)."""
    return _total(plan, lambda lay, n: lay.wide if lay is not None else n)


def extrapolate(plan2, k: int) -> int:
    """Output bytes at factor k from a plan built at factor 2 (an axis that doubled grows by k)."""
    def grow(lay, n):
        if lay is None or n == 0 or lay.wide == n:
            return n
        return lay.wide * k // 2

    return _total(plan2, grow)


# ---- what the machine has -----------------------------------------------------------------------
def _read_int(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_ram() -> int | None:
    """Memory this process can still get: MemAvailable (else free pages), capped by a cgroup limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if len(line.split()) >= 2 and line.split()[1].isdigit()}
        avail = info.get("MemAvailable", info.get("MemFree"))
        if avail is not None:
            avail += info.get("SwapFree", 0)
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            room = max(0, limit - usage)
            avail = room if avail is None else min(avail, room)
            break
    return avail


def free_disk(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@dataclass
class Budget:
    output_bytes: int
    ram_needed: int
    ram_available: int | None
    disk_needed: int
    disk_available: int | None
    folder: str

    def problems(self) -> list:
        out = []
        if self.ram_available is not None and self.ram_needed > self.ram_available:
            out.append(f"memory needed ~{human(self.ram_needed)}, available {human(self.ram_available)}")
        if self.disk_available is not None and self.disk_needed > self.disk_available:
            out.append(f"disk needed {human(self.disk_needed)}, free {human(self.disk_available)} at {self.folder}")
        return out


def ram_needed(model: onnx.ModelProto, output_bytes: int, largest: int, validate: bool = True) -> int:
    """The small model if it is in memory, two wide tensors (widened in float32 for float16 and
    bfloat16), and onnxruntime's copies of both models when it validates a single file."""
    from .precision import narrow_dtype
    from .writer import IN_FLIGHT

    small = model_bytes(model)
    ram = PROCESS_OVERHEAD + IN_FLIGHT * largest * (2 if narrow_dtype(model) else 1)
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        ram += small  # external data is memory-mapped, read a tensor at a time
    if validate and output_bytes <= PROTOBUF_LIMIT:
        ram += small + output_bytes
    return int(ram)


def budget(model: onnx.ModelProto, output_bytes: int, largest: int, out_path: str, validate: bool = True) -> Budget:
    folder = os.path.dirname(os.path.abspath(out_path))
    ram = ram_needed(model, output_bytes, largest, validate)
    return Budget(int(output_bytes), ram, available_ram(), int(output_bytes), free_disk(folder), folder)


def check(model: onnx.ModelProto, output_bytes: int, largest: int, out_path: str, factor: int, validate: bool = True) -> Budget:
    b = budget(model, output_bytes, largest, out_path, validate)
    problems = b.problems()
    if problems:
        raise WidenError(f"factor {factor} is too large: the widened model would be about {human(output_bytes)}; "
                         + "; ".join(problems))
    return b


def preflight(model: onnx.ModelProto, opts, out_path: str, validate: bool = True):
    """Refuse a factor whose output cannot fit, before planning at that factor. Cheap when the
    upper bound fits (the common case); otherwise plans once at factor 2 and extrapolates.
    Returns that factor-2 plan when it is the plan asked for (factor 2), else None."""
    import dataclasses

    factor = opts.factor
    ub, largest = _upper(model, max(factor, opts.ffn))
    if not budget(model, ub, largest, out_path, validate).problems():
        return None
    from .api import build_plan

    probe = build_plan(model, dataclasses.replace(opts, factor=2))
    check(model, extrapolate(probe, factor), largest, out_path, factor, validate)
    return probe if factor == 2 else None
