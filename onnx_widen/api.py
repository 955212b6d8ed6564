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
    """The plan for `options`; with --depth, for the deeper model made first (plan.an.graph.model)."""
    options.check()
    depth_info = None
    if options.added_blocks:
        from .depth import deepen

        model, depth_info = deepen(model, options.depth, options.depth_at, options.noise, options.seed, options.allow_approximate)
    an = analyse(model)
    if an.uncovered:
        raise WidenError(an.refusal())
    plan = plan_mod.build(an, options)
    plan.depth = depth_info
    if depth_info and options.noise and not depth_info["approximate"]:
        plan.notes.append("the new blocks' output projections stay exactly zero (--noise breaks the widening's symmetry "
                          "only); --allow-approximate puts noise there too, at the cost of an exact function")
    return plan


def widen(model_or_path, factor: int | None = None, residual: str = "repeat", rope: str = "spread", heads: str = "keep",
          kv_heads: str = "tile", ffn_factor: int | None = None, noise: float = 0.0, seed: int = 0,
          hidden: int | None = None, ffn_size: int | None = None, num_heads: int | None = None, depth: int = 0,
          depth_at=None, allow_approximate: bool = False) -> onnx.ModelProto:
    """Return the widened model (hidden, FFN and head size times `factor`, default 2) computing the same function.

    residual: "repeat" (canonical) or "orthogonal" (the post's R(x)/sqrt(k), eps/k).
    rope: "spread" (the wide config's own frequencies) or "remap" (repeated frequencies).
    heads: "keep" (head size times factor) or "grow" (head count times factor, head size kept);
    kv_heads (with heads="grow"): "tile" (kv heads times factor) or "keep" (query copies interleaved).
    ffn_factor: the FFN inner size's own factor (default: factor); factor=1 with ffn_factor>1 widens the FFN only.
    noise, seed: exact symmetry-breaking noise (relative std) on weights that read copied units.
    hidden, ffn_size, num_heads: target sizes, any count (hidden replaces factor; what is not named keeps
    its size): RMSNorm models zero-pad the residual stream, pre-norm LayerNorm models average-expand it
    (epsilons change, see the notes), post-norm LayerNorm is refused unless allow_approximate (then the
    result is approximate, marked so in its metadata). num_heads keeps the head size (RoPE needs it).
    depth, depth_at: insert `depth` pre-norm blocks per stack (after blocks `depth_at`, 1-based; default evenly
    spaced), each a copy of the block before it with zero output projections (factor=1 deepens only);
    with noise and allow_approximate, those projections get noise too (the function then changes slightly)."""
    model = load_model(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path
    p = build_plan(model, plan_mod.Options(factor=factor, residual=residual, rope=rope, heads=heads, kv_heads=kv_heads,
                                           ffn_factor=ffn_factor, noise=noise, seed=seed, hidden=hidden, ffn_size=ffn_size,
                                           num_heads=num_heads, depth=depth, depth_at=tuple(depth_at) if depth_at else None,
                                           allow_approximate=allow_approximate))
    return apply(p)


def inspect(model_or_path):
    model = load_model(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path
    return analyse(model)


def validate(small, wide, **kw):
    from .validation import validate as _validate

    return _validate(small, wide, **kw)
