"""Recognisers: name multi-node subgraphs (decomposed LayerNorm, GELU forms...) for `inspect`
and the report. They never change the plan: the per-node patterns already carry the math."""
from __future__ import annotations

from .analysis import Match


def parent_path(an, node, path):
    """Follow (op_type, input index | None for any input) steps from `node` towards the inputs."""
    found = [node]
    cur = node
    for op, idx in path:
        candidates = range(len(cur.input)) if idx is None else [idx]
        nxt = None
        for i in candidates:
            if i >= len(cur.input):
                continue
            p = an.graph.producer.get(cur.input[i])
            if p is not None and p.op_type == op:
                nxt = p
                break
        if nxt is None:
            return None
        found.append(nxt)
        cur = nxt
    return found


def chain_from(kind, anchor_op, path, info=None, reject=None, on_match=None):
    def recognize(an):
        out = []
        for node in an.graph.nodes:
            if node.op_type != anchor_op or an.name(node) not in an.claims:
                continue
            nodes = parent_path(an, node, path)
            if nodes is None or (reject is not None and reject(an, nodes)):
                continue
            for n in nodes:
                an.claims[an.name(n)] = kind
            if on_match is not None:
                on_match(an, nodes)
            out.append(Match(kind, [an.name(n) for n in reversed(nodes)], info(an, nodes) if info else {}))
        return out

    recognize.kind = kind
    return recognize
