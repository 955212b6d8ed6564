"""Transformer blocks found by structure (for --depth): residual stream, blocks, output projections.

- A residual Add has one input that is an ancestor of the other: x and branch(x).
- Residual Adds chained output to stream input form one stack's residual stream (a decoder-only
  model has one stack, T5 an encoder and a decoder stack).
- A block starts at a residual Add whose branch holds a self-attention (a MatMul of two tensors
  both computed from the block's input); the Adds up to the next such one (cross-attention, FFN)
  belong to it. GPT-J / GPT-NeoX parallel blocks are one Add of both branches.
- A branch's output projection is its last linear layer before the Add, seen through bias Adds,
  reshapes and the Add joining parallel branches.
- Post-norm (a norm between one residual Add and the next block's stream input) is recognised
  so that it can be refused with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import WidenError
from .graph import Graph
from .match import CONST_PASSTHROUGH

_VIEWS = ("Reshape", "Transpose", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten", "Dropout")
_NORM_HOPS = 16  # a decomposed LayerNorm is about 9 nodes deep
_SHAPE_ONLY = ("Shape", "Size")  # read only the shape: no data flows through them
_SAME_VALUE = ("Identity", "Cast")  # a norm's cast to float32 sits on the stream in TorchScript exports


@dataclass
class Block:
    adds: list  # residual Add nodes, in stream order
    x_in: str  # the stream tensor the block reads
    x_out: str  # the stream tensor it writes
    projections: list  # constant names (weights and biases) of its branches' output projections


@dataclass
class Stack:
    blocks: list


def downstream(g: Graph, tensors) -> set:
    """ids of the nodes that read, directly or not, any of `tensors`."""
    seen, todo = set(), list(tensors)
    while todo:
        for c in g.consumers.get(todo.pop(), []):
            if id(c) not in seen:
                seen.add(id(c))
                todo.extend(o for o in c.output if o)
    return seen


def upstream(g: Graph, tensors, within=None, data_only=False) -> set:
    """ids of the nodes that produce, directly or not, any of `tensors` (inside `within` if given;
    with `data_only`, not through what a Shape node reads)."""
    seen, todo = set(), list(tensors)
    while todo:
        p = g.producer.get(todo.pop())
        if p is None or id(p) in seen or (within is not None and id(p) not in within):
            continue
        seen.add(id(p))
        if not (data_only and p.op_type in _SHAPE_ONLY):
            todo.extend(i for i in p.input if i)
    return seen


def const_root(g: Graph, name: str):
    """The initializer or Constant behind `name` (seen through Transpose/Identity/Cast), else None."""
    while name and not g.is_const(name):
        p = g.producer.get(name)
        if p is None or p.op_type not in CONST_PASSTHROUGH:
            return None
        name = p.input[0]
    return name or None


class _Index:
    def __init__(self, g: Graph):
        self.g = g
        self.order = {id(n): k for k, n in enumerate(g.nodes)}

    def is_ancestor(self, x: str, y: str) -> bool:
        """Is tensor x read on some path that produces tensor y? (searched upstream of y only as
        far back as x's producer, so a short branch costs little)."""
        px = self.g.producer.get(x)
        floor = self.order[id(px)] if px is not None else -1
        seen, todo = set(), [self.g.producer.get(y)]
        while todo:
            n = todo.pop()
            if n is None or id(n) in seen or self.order[id(n)] <= floor:
                continue
            seen.add(id(n))
            if n.op_type in _SHAPE_ONLY:
                continue
            for i in n.input:
                if i == x:
                    return True
                if i:
                    todo.append(self.g.producer.get(i))
        return False

    def branch(self, x: str, y: str) -> set:
        """ids of the nodes on paths from x to y."""
        return downstream(self.g, [x]) & upstream(self.g, [y])


def residual_adds(g: Graph, index: _Index) -> dict:
    """Add node id -> (node, stream input, branch input) for every residual Add."""
    out = {}
    for n in g.nodes:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        a, b = n.input
        if not a or not b or a == b or g.is_const(a) or g.is_const(b):
            continue
        for x, y in ((a, b), (b, a)):
            if index.is_ancestor(x, y):
                out[id(n)] = (n, x, y)
                break
    return out


def stream_source(g: Graph, x: str) -> str:
    """x seen back through Identity / Cast (the block owns them: the exporter writes one per block)."""
    p = g.producer.get(x)
    while p is not None and p.op_type in _SAME_VALUE:
        x = p.input[0]
        p = g.producer.get(x)
    return x


def _chains(g: Graph, adds: dict) -> list:
    """Maximal sequences of residual Adds, each reading the previous one's output as its stream."""
    by_stream: dict[str, list] = {}
    for n, x, _ in adds.values():
        by_stream.setdefault(stream_source(g, x), []).append(n)
    outputs = {n.output[0] for n, _, _ in adds.values()}
    chains = []
    for n, x, _ in adds.values():
        if stream_source(g, x) in outputs:
            continue  # not a chain start
        chain = [n]
        while True:
            nxt = by_stream.get(chain[-1].output[0], [])
            if len(nxt) != 1:
                if len(nxt) > 1:
                    raise WidenError(f"--depth: residual stream {chain[-1].output[0]!r} feeds {len(nxt)} residual Adds; "
                                     "cannot tell the blocks apart")
                break
            chain.append(nxt[0])
        chains.append(chain)
    return chains


def _self_attention(g: Graph, x: str, branch: set) -> bool:
    """A MatMul of two tensors both computed from x (query times key), and a Softmax."""
    nodes = [n for n in g.nodes if id(n) in branch]
    if not any(n.op_type == "Softmax" for n in nodes):
        return False

    def from_x(t):
        p = g.producer.get(t)
        return t == x or (p is not None and id(p) in branch)

    return any(n.op_type == "MatMul" and len(n.input) == 2 and all(from_x(t) for t in n.input) for n in nodes)


def output_projections(g: Graph, add, y: str, branch: set) -> list:
    """Constant names of the weights and biases of the linear layers that end the branch y."""
    found, todo = [], [y]
    where = f"residual Add {g.node_name(add)!r}"
    while todo:
        t = todo.pop()
        n = g.producer.get(t)
        if n is None or id(n) not in branch:
            raise WidenError(f"--depth: the branch into {where} does not end in a linear layer ({t!r} is not computed in it)")
        if n.op_type in ("MatMul", "Gemm"):
            w = const_root(g, n.input[1])
            if w is None:
                raise WidenError(f"--depth: the branch into {where} ends in {n.op_type} {g.node_name(n)!r} without a constant weight")
            found.append(w)
            if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2]:
                b = const_root(g, n.input[2])
                if b is None:
                    raise WidenError(f"--depth: the branch into {where} ends in Gemm {g.node_name(n)!r} without a constant bias")
                found.append(b)
        elif n.op_type == "Add":
            consts = [i for i in n.input if const_root(g, i)]
            others = [i for i in n.input if not const_root(g, i)]
            if len(consts) > 1:
                raise WidenError(f"--depth: the branch into {where} ends in an Add of two constants ({g.node_name(n)!r})")
            found.extend(const_root(g, c) for c in consts)  # a bias
            todo.extend(others)  # one input: the linear; two: parallel branches (GPT-J, GPT-NeoX)
        elif n.op_type in _VIEWS:
            todo.append(n.input[0])
        else:
            raise WidenError(f"--depth: the branch into {where} ends in {n.op_type} {g.node_name(n)!r}, not a linear layer "
                             "whose output could be set to zero")
    return found


def _post_norm(g: Graph, adds: dict, attention: list):
    """(residual Add, node before the attention Add) when a residual Add reaches a self-attention
    Add's stream input through other nodes (a norm), i.e. post-norm blocks; else None."""
    outputs = {n.output[0]: n for n, _, _ in adds.values()}
    for n in attention:
        x = adds[id(n)][1]
        frontier, seen = [x], set()
        for _ in range(_NORM_HOPS):
            nxt = []
            for t in frontier:
                if t in outputs:
                    return outputs[t], g.producer.get(x)
                p = g.producer.get(t)
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    nxt.extend(i for i in p.input if i and not g.is_const(i))
            frontier = nxt
    return None


def find_stacks(g: Graph) -> list:
    """Every stack of pre-norm blocks, in graph order; refuses post-norm and unrecognised streams."""
    index = _Index(g)
    adds = residual_adds(g, index)
    stacks, attention = [], []
    for chain in _chains(g, adds):
        branches = [index.branch(*adds[id(n)][1:]) for n in chain]
        starts = [k for k, (n, b) in enumerate(zip(chain, branches)) if _self_attention(g, adds[id(n)][1], b)]
        attention.extend(chain[k] for k in starts)
        if len(chain) == 1 and not starts:
            continue  # x + f(x) inside a branch (tanh GELU), not a stream
        if len(chain) == 1 or starts[0] != 0:
            continue  # post-norm blocks (one Add per chain) or no attention: refused below if nothing else
        projections = [output_projections(g, n, adds[id(n)][2], b) for n, b in zip(chain, branches)]
        bounds = starts + [len(chain)]
        blocks = [Block(chain[a:b], stream_source(g, adds[id(chain[a])][1]), chain[b - 1].output[0], [w for p in projections[a:b] for w in p])
                  for a, b in zip(bounds, bounds[1:])]
        stacks.append(Stack(blocks))
    if not stacks:
        post = _post_norm(g, adds, attention)
        if post is not None:
            add, norm = post
            raise WidenError(f"--depth: post-norm blocks (residual Add {g.node_name(add)!r} reaches the next block through "
                             f"{norm.op_type} {g.node_name(norm)!r}): a norm after the residual add makes an inserted block "
                             "change the stream; only pre-norm models can be deepened exactly")
        fused = next((n for n in g.nodes if n.op_type.startswith("Skip")), None)
        why = (f"; the residual adds are fused into {fused.op_type} {g.node_name(fused)!r}: deepen the export before "
               "optimizing it") if fused is not None else ""
        raise WidenError("--depth: no residual stream of Transformer blocks found (pre-norm blocks whose residual Adds "
                         f"chain from one block to the next, starting with a self-attention){why}")
    stacks.sort(key=lambda s: index.order[id(s.blocks[0].adds[0])])
    return stacks
