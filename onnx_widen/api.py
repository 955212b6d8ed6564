"""Python API: widen, inspect, validate (the CLI is a thin layer over these)."""
from __future__ import annotations

import onnx

from . import analysis, plan as plan_mod, shapes
from .apply import apply
from .errors import WidenError
from .graph import Graph
from .model_io import load_model


def analyse(model, dims=None):
    from .patterns import RECOGNIZERS, REGISTRY

    graph = Graph(model)
    try:
        info = shapes.infer(graph, shapes.concrete_input_shapes(graph, dims))
    except WidenError:
        _refuse_quantized(graph)
        raise
    an = analysis.run(graph, info, REGISTRY)
    for r in RECOGNIZERS:
        an.matches.extend(r(an))
    return an


def _refuse_quantized(graph):
    """A quantized graph whose contrib ops have no shape rule is refused as quantized, not for a shape."""
    from .patterns.quantized import PATTERNS, WHY

    refused = {(p.domain, op) for p in PATTERNS for op in p.ops}
    nodes = [(n, WHY) for n in graph.nodes if ("" if n.domain == "ai.onnx" else n.domain, n.op_type) in refused]
    if nodes:
        raise WidenError(analysis.refusal_line(nodes, graph.node_name))


def build_plan(model, options: plan_mod.Options):
    options.check()
    an = analyse(model)
    if an.uncovered:
        raise WidenError(an.refusal())
    return plan_mod.build(an, options)


def widen(model_or_path, factor: int = 2, residual: str = "repeat", rope: str = "spread", heads: str = "keep",
          kv_heads: str = "tile", ffn_factor: int | None = None, noise: float = 0.0, seed: int = 0) -> onnx.ModelProto:
    """Return the widened model (hidden, FFN and head size times `factor`) computing the same function.

    residual: "repeat" (canonical) or "orthogonal" (the post's R(x)/sqrt(k), eps/k).
    rope: "spread" (the wide config's own frequencies) or "remap" (repeated frequencies).
    heads: "keep" (head size times factor) or "grow" (head count times factor, head size kept);
    kv_heads (with heads="grow"): "tile" (kv heads times factor) or "keep" (query copies interleaved).
    ffn_factor: the FFN inner size's own factor (default: factor); factor=1 with ffn_factor>1 widens the FFN only.
    noise, seed: exact symmetry-breaking noise (relative std) on weights that read copied units."""
    model = load_model(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path
    p = build_plan(model, plan_mod.Options(factor=factor, residual=residual, rope=rope, heads=heads, kv_heads=kv_heads,
                                                   ffn_factor=ffn_factor, noise=noise, seed=seed))
    return apply(p)


def inspect(model_or_path):
    model = load_model(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path
    return analyse(model)


def validate(small, wide, **kw):
    from .validation import validate as _validate

    return _validate(small, wide, **kw)
