"""Scale bookkeeping in log space.

Every tracked tensor t carries `x~ = exp(s_t) * R(x)`. Nodes constrain the s_t linearly
(a Transpose keeps it, a product adds them, a non-linearity pins its input to 0). Producers
whose parameters can absorb any scale (linear, norm, embedding) only state a preference: the
residual scale of the chosen scheme. The solution is the least-squares preference subject to the
constraints, which for attention scores splits the factor evenly between q and k. A norm's
input is preferred far more strongly (its epsilon would have to change otherwise), so a factor
owed to a tied head lands on the norm before the head, not on the embeddings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import WidenError


@dataclass
class Term:
    """A constant part of a constraint, evaluated once the plan (layouts, wide values) is known."""

    kind: str  # "const", or a quantity the plan knows: "ratio" (wide/small value of a scalar input),
    # "copies" (copies of each unit of a dim), "growth" (wide / small size of a dim),
    # "output" (the convention for a graph output)
    value: object = 0.0
    sign: float = 1.0

    def eval(self, ctx) -> float:
        if self.kind == "const":
            return self.sign * float(self.value)
        return self.sign * getattr(ctx, f"log_{self.kind}")(self.value)


@dataclass
class Constraint:
    coefs: dict  # tensor name -> coefficient
    terms: list  # sum(coef * s) = sum(terms)
    where: str


@dataclass
class Preference:
    tensor: str
    where: str
    weight: float = 1.0
    target: Term | None = None  # None: the residual scale
    tier: int = 0  # >0: tried as a hard constraint first, lower tiers before higher ones


@dataclass
class ScaleSystem:
    constraints: list = field(default_factory=list)
    prefs: list = field(default_factory=list)

    def equal(self, out: str, inp: str, where: str, *terms: Term):
        self.constraints.append(Constraint({out: 1.0, inp: -1.0}, list(terms), where))

    def fix(self, t: str, where: str, *terms: Term):
        self.constraints.append(Constraint({t: 1.0}, list(terms), where))

    def relation(self, coefs: dict, where: str, *terms: Term):
        c = {}
        for k, v in coefs.items():
            c[k] = c.get(k, 0.0) + v
        self.constraints.append(Constraint(c, list(terms), where))

    def prefer(self, t: str, where: str, weight: float = 1.0, target: Term | None = None, tier: int = 0):
        self.prefs.append(Preference(t, where, weight, target, tier))

    def solve(self, ctx, residual_log: float, tracked: set[str]) -> dict[str, float]:
        """Tiered preferences are tried as hard constraints, most important first (norm inputs,
        then output conventions); what cannot hold exactly stays a heavy preference."""
        tiers = sorted({p.tier for p in self.prefs if p.tier > 0})
        for cut in range(len(tiers), 0, -1):
            hard = [p for p in self.prefs if 0 < p.tier <= tiers[cut - 1]]
            try:
                return self._solve(ctx, residual_log, tracked, as_constraints=hard)
            except WidenError:
                continue
        return self._solve(ctx, residual_log, tracked, as_constraints=[])

    def _solve(self, ctx, residual_log, tracked, as_constraints):
        hard = [Constraint({p.tensor: 1.0}, [p.target or Term("const", residual_log)], p.where) for p in as_constraints]
        soft = [p for p in self.prefs if not any(p is q for q in as_constraints)]
        # Most constraints say x_a = x_b + c: fold them into classes first (union-find with offsets),
        # so the least-squares system has one unknown per class, not one per tensor.
        uf = _OffsetUnionFind()
        rows_in = []
        for c in self.constraints + hard:
            coefs = {t: v for t, v in c.coefs.items() if t in tracked and v != 0.0}
            b = sum(term.eval(ctx) for term in c.terms)
            if not coefs:
                if abs(b) > 1e-9:
                    raise WidenError(f"{c.where}: requires a scale factor of {math.exp(b):.6g} on an unscaled tensor")
                continue
            if len(coefs) == 2 and sorted(coefs.values()) == [-1.0, 1.0]:
                (a_, _), (b_, _) = sorted(coefs.items(), key=lambda kv: -kv[1])
                if uf.union(a_, b_, b):
                    continue
                raise WidenError(f"{c.where}: the scale constraints of this node contradict others; "
                                 "a width path mixes tensors that cannot carry the same scale")
            rows_in.append((coefs, b, c.where))
        roots = sorted({uf.find(t)[0] for coefs, _, _ in rows_in for t in coefs} | {uf.find(p.tensor)[0] for p in soft if p.tensor in tracked})
        idx = {r: i for i, r in enumerate(roots)}
        n = len(roots)
        rows, rhs, wheres = [], [], []
        for coefs, b, where in rows_in:
            row = np.zeros(n)
            for t, v in coefs.items():
                r, off = uf.find(t)
                row[idx[r]] += v
                b -= v * off
            rows.append(row)
            rhs.append(b)
            wheres.append(where)
        x = np.zeros(n)
        if n:
            A = np.array(rows).reshape(-1, n)
            bb = np.array(rhs)
            P = np.eye(n) * 1e-9  # classes neither preferred nor pinned get a tiny pull to 0
            q = np.zeros(n)
            for p in soft:
                if p.tensor in tracked:
                    r, off = uf.find(p.tensor)
                    goal = p.target.eval(ctx) if p.target is not None else residual_log
                    P[idx[r], idx[r]] += p.weight
                    q[idx[r]] += p.weight * (goal - off)
            m = A.shape[0]
            K = np.block([[2 * P, A.T], [A, np.zeros((m, m))]])
            sol, *_ = np.linalg.lstsq(K, np.concatenate([2 * q, bb]), rcond=None)
            x = sol[:n]
            resid = A @ x - bb
            bad = np.flatnonzero(np.abs(resid) > 1e-6)
            if bad.size:
                raise WidenError(
                    f"{wheres[bad[0]]}: the scale constraints of this node contradict others (off by a factor {math.exp(resid[bad[0]]):.6g}); "
                    "a width path mixes tensors that cannot carry the same scale"
                )
        out = {}
        for t in uf.members() | {t for p in soft for t in [p.tensor] if t in tracked}:
            r, off = uf.find(t)
            out[t] = float(x[idx[r]] + off) if r in idx else float(off)
        return out


class _OffsetUnionFind:
    """x_t = x_root + offset; union(a, b, c) records x_a = x_b + c, False if it contradicts."""

    def __init__(self):
        self.parent: dict[str, str] = {}
        self.off: dict[str, float] = {}

    def find(self, t):
        if t not in self.parent:
            self.parent[t], self.off[t] = t, 0.0
            return t, 0.0
        path = []
        while self.parent[t] != t:
            path.append(t)
            t = self.parent[t]
        root = t
        acc = 0.0
        for node in reversed(path):  # compress: offsets to the root
            acc += self.off[node]
            self.off[node], self.parent[node] = acc, root
        return root, (self.off[path[0]] if path else 0.0)

    def union(self, a, b, c) -> bool:
        ra, oa = self.find(a)
        rb, ob = self.find(b)
        if ra == rb:
            return abs(oa - ob - c) < 1e-9
        self.parent[ra], self.off[ra] = rb, c - oa + ob
        return True

    def members(self):
        return set(self.parent)
