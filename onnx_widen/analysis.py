"""The analysis pass: walk the graph once in order and let the declared patterns say, node by
node, which axes carry width, which constants are parameters of which role, and how scales
relate. Nothing is rewritten here; the result is what `inspect` shows and what the plan reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from . import dims as D
from .errors import WidenError
from .graph import Graph
from .scales import ScaleSystem
from .shapes import ShapeInfo


@dataclass
class ParamUse:
    """One use of a constant as a width-carrying parameter."""

    name: str  # initializer or Constant output
    node: onnx.NodeProto
    axes: tuple  # Sym | None per axis of the constant
    read_axes: frozenset  # axes summed against a widened input (divided by the copies)
    log_factor: dict  # tensor -> coef; factor = exp(sum coef * s_tensor + const)
    const: object = 0.0  # float, or a Term the plan evaluates (a rewritten attribute's ratio)
    role: str = ""
    terms: tuple = ()  # scales.Term: factors the plan knows (a norm's statistic ratio)


@dataclass
class ScalarUse:
    """A scalar constant whose value must follow a scale (bias-like addends such as eps)."""

    name: str
    node: onnx.NodeProto
    log_factor: dict
    role: str


@dataclass
class AttrUse:
    """A float attribute (LayerNormalization epsilon) that must follow the square of a scale."""

    node: onnx.NodeProto
    attr: str
    log_factor: dict
    terms: tuple = ()


@dataclass
class AttrValue:
    """An attribute whose wide value follows from the plan (a head count, packed part sizes, a
    canonical softmax scale): `value(plan)` gives it."""

    node: onnx.NodeProto
    attr: str
    value: object  # callable(plan) -> int | float | list[int]


@dataclass
class ShapeUse:
    """An integer input read as a shape; `required(plan)` gives its wide value."""

    node: onnx.NodeProto
    index: int
    required: object  # callable(plan) -> np.ndarray | None


@dataclass
class Match:
    """A recognised subgraph, for inspect and the report."""

    kind: str
    nodes: list
    info: dict = field(default_factory=dict)


class Analysis:
    def __init__(self, graph: Graph, info: ShapeInfo):
        self.graph = graph
        self.info = info
        self.axes: dict[str, tuple] = {}  # tracked tensors -> Sym|None per axis
        self.params: list[ParamUse] = []
        self.scalars: list[ScalarUse] = []
        self.attrs: list[AttrUse] = []
        self.attr_values: list[AttrValue] = []
        self.shape_uses: list[ShapeUse] = []
        self.scale = ScaleSystem()
        self.matches: list[Match] = []
        self.claims: dict[str, str] = {}  # node name -> pattern that covers it
        self.born: list[tuple] = []  # (Sym, tensor) for dims created by a linear layer's output
        self.linears: list[tuple] = []  # (input Sym | None, output Sym | None) of every linear layer
        self.scale_consts: list[dict] = []  # attention scale constants and their exponent of head size
        self.uncovered: list[tuple] = []
        # (Sym, norm node, "rms" | "centred"): normalised axes need even copies; zero units only
        # under RMSNorm, mean units only under LayerNorm (WIDENING.md, Non-integer factors)
        self.norms: list[tuple] = []
        self.identity_required: list[tuple] = []  # (Sym, node, untracked input) that must keep their size
        self.grown_fills: dict = {}  # id(ConstantOfShape) -> {output axis: Sym} (match.grow_fills)

    # ---- queries used by patterns ----------------------------------------------------------
    def tracked(self, name: str) -> bool:
        return name in self.axes

    def ax(self, name: str) -> tuple:
        if name in self.axes:
            return self.axes[name]
        return (None,) * len(self.shape(name))

    def shape(self, name: str) -> tuple:
        s = self.info.shapes.get(name)
        if s is None:
            raise WidenError(f"tensor {name!r}: unknown shape")
        return s

    def value(self, name: str):
        return self.info.values.get(name)

    def name(self, node) -> str:
        return self.graph.node_name(node)

    # ---- records made by patterns ----------------------------------------------------------
    def set(self, out: str, axes):
        axes = tuple(a.find() if a is not None else None for a in axes)
        if len(axes) != len(self.shape(out)):
            raise WidenError(f"tensor {out!r}: rank mismatch in width analysis ({len(axes)} vs {len(self.shape(out))})")
        self.axes[out] = axes

    def internal(self, node, what: str, like: str) -> str:
        """Name a tensor a fused op computes inside without a graph name (EmbedLayerNormalization's
        embedding sum), shaped like `like`, so that its scale can be solved for like any other."""
        name = f"{self.name(node)}/{what}"
        self.info.shapes[name] = self.shape(like)
        return name

    def claim(self, node, pattern: str):
        self.claims[self.name(node)] = pattern

    def param(self, name, node, axes, log_factor, read_axes=(), role="", const=0.0, terms=()):
        self.params.append(ParamUse(name, node, tuple(axes), frozenset(read_axes), dict(log_factor), const, role, tuple(terms)))

    def new_sym(self, size: int, node, tags=()):
        return D.Sym(size, self.name(node), tags)

    def unify(self, a, b, node):
        if a is None or b is None:
            return a if b is None else b
        return D.unify(a, b, f"node {self.name(node)!r} ({node.op_type})")

    def refusal(self) -> str:
        return refusal_line(self.uncovered, self.name)

    def fail(self, node, why: str):
        raise WidenError(f"node {self.name(node)!r} ({node.op_type}): {why}")


def refusal_line(uncovered: list, name_of) -> str:
    """One line for what no pattern covers, from (node, why) pairs. Nodes refused for one shared
    reason (a quantized graph's) are named together, a few and how many: the reason most nodes
    share goes first, as the likely cause of the others."""
    whys = [why for _, why in uncovered]
    why = max(whys, key=whys.count)  # the first of the commonest
    nodes = [n for n, w in uncovered if w == why]
    others = len(uncovered) - len(nodes)
    tail = f" (and {others} more)" if others else ""
    if len(nodes) == 1:
        return f"node {name_of(nodes[0])!r} ({nodes[0].op_type}): {why}{tail}"
    names = ", ".join(f"{name_of(n)!r} ({n.op_type})" for n in nodes[:3])
    return f"{len(nodes)} nodes ({names}{', ...' if len(nodes) > 3 else ''}): {why}{tail}"


def run(graph: Graph, info: ShapeInfo, registry) -> Analysis:
    an = Analysis(graph, info)
    for node in graph.nodes:
        tracked_in = [i for i in node.input if i and an.tracked(i)]
        handler = registry.handler_for(node, an, bool(tracked_in))
        if handler is None:
            if tracked_in:
                an.uncovered.append((node, f"no pattern covers {node.op_type} on a width path (input {tracked_in[0]!r})"))
            continue
        handler(an, node)
    return an
