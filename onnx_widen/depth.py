"""--depth: a deeper model with the same function, before any widening.

Each new block is a copy of the block before it whose output projections (weights and biases)
are zero, so it adds exactly 0 to the residual stream. What is copied is the block's own
subgraph: the nodes on paths from its stream input to its stream output (and to its own graph
outputs, a KV cache's present tensors), plus the constants and nodes that only it reads. Tensors
it shares with other blocks (attention mask, positions, RoPE tables, T5's position bias) stay
shared: the copy reads the same ones. Copied initializers are new tensors with new names.

Naming: the original block's output is renamed and the copy writes the old name, so everything
downstream reads the new block without being rewired. A copied cache input/output takes the
exporter's name with the next free layer number (past_key_values.2.key after 0 and 1): the
existing names keep their meaning, so a cache from the small model still fits.
"""
from __future__ import annotations

import heapq
import math
import re

import numpy as np
import onnx
from onnx import numpy_helper

from .blocks import _SHAPE_ONLY, downstream, find_stacks, upstream
from .errors import UsageError, WidenError
from .graph import Graph


def positions(n_blocks: int, depth: int, at=None) -> list:
    """After which original block (1..n_blocks) each new block goes, ascending. By default evenly
    spaced: the j-th new block after block round((j + 1/2) * L / D)."""
    if at:
        bad = [p for p in at if not 1 <= p <= n_blocks]
        if bad:
            raise UsageError(f"--depth-at {bad[0]}: the model has {n_blocks} blocks; positions are 1..{n_blocks} "
                             "(a new block goes after that block)")
        return sorted(at)
    return [min(n_blocks, max(1, math.floor((j + 0.5) * n_blocks / depth + 0.5))) for j in range(depth)]


def deepen(model: onnx.ModelProto, depth: int, at=None, noise: float = 0.0, seed: int = 0,
           approximate: bool = False) -> tuple:
    """(deeper model, info). Every stack of blocks (T5: encoder and decoder) gets `depth` new
    blocks at the same positions. With `approximate`, the new output projections get noise of
    `noise` times the source projection's std instead of zeros (the function then changes)."""
    model = _copy(model)
    stacks = find_stacks(Graph(model))
    sizes = [len(s.blocks) for s in stacks]
    plan = [positions(n, depth, at) for n in sizes]
    info = {"blocks_before": sizes, "blocks_after": [n + len(p) for n, p in zip(sizes, plan)], "after_block": plan,
            "approximate": bool(approximate and noise > 0), "new_inputs": [], "new_outputs": []}
    rng = np.random.default_rng(seed)
    for s, where in enumerate(plan):
        for j, p in enumerate(where):
            g = Graph(model)
            blocks = find_stacks(g)[s].blocks
            after = blocks[p - 1 + j]  # earlier new blocks shift the later ones
            ins, outs = _insert_copy(model, g, _source(g, blocks, p - 1 + j), after, sizes[s] + j,
                                     rng if info["approximate"] else None, noise)
            info["new_inputs"] += ins
            info["new_outputs"] += outs
    return model, info


def _copy(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _renumber(name: str, index: int, taken: set) -> str:
    """The same name with its one layer number replaced (past_key_values.0.key -> ...2.key)."""
    numbers = re.findall(r"\d+", name)
    new = re.sub(r"\d+", str(index), name) if len(numbers) == 1 else None
    if new is None or new in taken:
        raise WidenError(f"--depth: cannot name the new block's copy of graph input/output {name!r} "
                         "(expected one layer number in the name, e.g. past_key_values.0.key)")
    taken.add(new)
    return new


class _Names:
    def __init__(self, model, suffix):
        g = model.graph
        self.taken = {n.name for n in g.node} | {o for n in g.node for o in n.output} | {t.name for t in g.initializer} \
            | {v.name for v in g.input} | {v.name for v in g.output}
        self.suffix = suffix

    def fresh(self, name: str) -> str:
        new = f"{name}{self.suffix}"
        while new in self.taken:
            new += "_"
        self.taken.add(new)
        return new


def _source(g: Graph, blocks: list, k: int):
    """The block to copy for a new block after blocks[k]: blocks[k], unless it also computes what
    other blocks share (T5's first block: the relative position bias) and a plain block follows;
    a copy of that one is what the exporter writes for a deeper config."""
    if k + 1 < len(blocks) and _block_parts(g, blocks[k])[3]:
        return blocks[k + 1]
    return blocks[k]


def _block_parts(g: Graph, block):
    """(nodes to copy, nodes only the block reads, graph outputs of the block, whether it computes
    tensors that other blocks read), as id sets / names."""
    below_in, below_out = downstream(g, [block.x_in]), downstream(g, [block.x_out])
    own = below_in - below_out
    outs = [o.name for o in g.outputs if o.name != block.x_out and id(g.producer.get(o.name)) in own]
    core = upstream(g, [block.x_out] + outs, within=below_in)
    # Core tensors that other blocks read (T5's position bias, shapes merged by the exporter) stay
    # shared: the copy reads them, so what computes them is not copied either.
    sinks = {block.x_out, *outs}
    shared = [o for n in g.nodes if id(n) in core for o in n.output
              if o and o not in sinks and any(id(c) not in core for c in g.consumers.get(o, []))]
    kept = upstream(g, shared, within=core, data_only=True)
    copy = upstream(g, list(sinks), within=core - kept)  # what only fed the shared part (a Shape's input) is not copied
    for n in block.adds:
        if id(n) not in copy:
            raise WidenError(f"--depth: residual Add {g.node_name(n)!r} is shared with other blocks; cannot copy its block")
    before = upstream(g, [block.x_in])
    only, grew = set(), True
    while grew:  # constants and nodes that nothing but the block reads (Constant, the block's own mask view)
        grew = False
        for n in g.nodes:
            if id(n) in core or id(n) in before or id(n) in only or any(o in g.output_names for o in n.output):
                continue
            readers = [c for o in n.output if o for c in g.consumers.get(o, [])]
            if readers and all(id(c) in copy or id(c) in only for c in readers):
                only.add(id(n))
                grew = True
    return copy, only, outs, bool(kept)


def _insert_copy(model, g: Graph, block, after, index: int, rng, noise: float):
    """Insert a copy of `block` after the block `after` (the same one or the next)."""
    copy, only, outs, _ = _block_parts(g, block)
    names = _Names(model, f"__depth{index}")
    members = [n for n in g.nodes if id(n) in copy or id(n) in only]
    member_ids = copy | only
    zero = {w for w in block.projections}
    skip = {id(g.producer[w]) for w in zero if w in g.producer}  # a projection held in a Constant node: replaced
    members = [n for n in members if id(n) not in skip]
    x_mid = names.fresh(after.x_out)
    rename = {block.x_in: x_mid, block.x_out: after.x_out}
    graph = model.graph
    for n in members:
        for o in n.output:
            if o and o not in rename:
                rename[o] = _renumber(o, index, names.taken) if o in outs else names.fresh(o)
    new_inits = []
    for t in list(graph.initializer):
        users = g.consumers.get(t.name, [])
        if t.name in zero:
            new_inits.append(_projection(t, names.fresh(t.name), rng, noise))
            rename[t.name] = new_inits[-1].name
        elif users and all(id(c) in member_ids for c in users):
            rename[t.name] = names.fresh(t.name)
            new_inits.append(_renamed(t, rename[t.name]))
    for w in zero - {t.name for t in graph.initializer}:  # projections in Constant nodes
        t = numpy_helper.from_array(g.const(w), w)
        new_inits.append(_projection(t, names.fresh(w), rng, noise))
        rename[w] = new_inits[-1].name
    new_inputs = []
    for v in g.inputs:
        users = [c for c in g.consumers.get(v.name, []) if c.op_type not in _SHAPE_ONLY]
        if users and all(id(c) in copy for c in users):  # a per-block input (a KV cache); shapes may be read elsewhere
            rename[v.name] = _renumber(v.name, index, names.taken)
            new_inputs.append(_renamed_value(v, rename[v.name]))
    clones = []
    for n in members:
        c = _clone(n)
        if c.name:
            c.name = names.fresh(n.name)
        c.input[:] = [rename.get(i, i) for i in n.input]
        c.output[:] = [rename.get(o, o) for o in n.output]
        clones.append(c)
    last = after.adds[-1]
    last.output[0] = x_mid  # the original block now writes x_mid; its copy writes the old name
    new_outputs = [_renamed_value(o, rename[o.name]) for o in g.outputs if o.name in outs]
    infos = [_renamed_value(v, rename[v.name]) for v in graph.value_info if v.name in rename and rename[v.name] != v.name]
    infos += [_renamed_value(v, x_mid) for v in graph.value_info if v.name == after.x_out]
    nodes = [_clone(n) for n in graph.node]
    at = max(k for k, n in enumerate(graph.node) if id(n) in member_ids or n is last) + 1
    graph.ClearField("node")
    graph.node.extend(_stable_toposort(nodes[:at] + clones + nodes[at:], graph))
    graph.initializer.extend(new_inits)
    graph.input.extend(new_inputs)
    graph.output.extend(new_outputs)
    graph.value_info.extend(infos)
    return [v.name for v in new_inputs], [v.name for v in new_outputs]


def _clone(n):
    c = onnx.NodeProto()
    c.CopyFrom(n)
    return c


def _projection(t, name, rng, noise):
    """Zeros, or (approximate) noise of `noise` times the source projection's std."""
    src = numpy_helper.to_array(t)
    value = np.zeros_like(src)
    if rng is not None and src.ndim >= 2 and np.issubdtype(src.dtype, np.floating):
        value = (rng.standard_normal(src.shape) * noise * float(np.std(src.astype(np.float64)))).astype(src.dtype)
    return numpy_helper.from_array(value, name)


def _renamed(t, name):
    c = onnx.TensorProto()
    c.CopyFrom(t)
    c.name = name
    return c


def _renamed_value(v, name):
    c = onnx.ValueInfoProto()
    c.CopyFrom(v)
    c.name = name
    return c


def _stable_toposort(nodes, graph):
    """Topological order that keeps the given order wherever it is already valid."""
    known = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    waiting = {k: {i for i in n.input if i not in known and i in producer} for k, n in enumerate(nodes)}
    readers: dict[int, list] = {}
    for k, deps in waiting.items():
        for i in deps:
            readers.setdefault(producer[i], []).append(k)
    need = {k: len({producer[i] for i in deps}) for k, deps in waiting.items()}
    ready = [k for k, c in need.items() if c == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        k = heapq.heappop(ready)
        out.append(nodes[k])
        for r in set(readers.get(k, [])):
            need[r] -= 1
            if need[r] == 0:
                heapq.heappush(ready, r)
    if len(out) != len(nodes):
        raise WidenError("--depth: the deepened graph has a cycle (internal error)")
    return out
