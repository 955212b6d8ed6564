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
    # "copies" (copies of each unit of a dim), "output" (the convention for a graph output)
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

    def prefer(self, t: str, where: str, weight: float = 1.0):
        self.prefs.append(Preference(t, where, weight))

    def solve(self, ctx, residual_log: float, tracked: set[str]) -> dict[str, float]:
        """Strong preferences (norm inputs) are first tried as hard constraints, then as heavy weights."""
        strong = [p for p in self.prefs if p.weight > 1.0]
        if strong:
            try:
                return self._solve(ctx, residual_log, tracked, as_constraints=strong)
            except WidenError:
                pass
        return self._solve(ctx, residual_log, tracked, as_constraints=[])

    def _solve(self, ctx, residual_log, tracked, as_constraints):
        hard = [Constraint({p.tensor: 1.0}, [Term("const", residual_log)], p.where) for p in as_constraints]
        soft = [p for p in self.prefs if not any(p is q for q in as_constraints)]
        constraints = self.constraints + hard
        names = sorted({t for c in constraints for t in c.coefs} | {p.tensor for p in soft})
        names = [n for n in names if n in tracked]
        idx = {n: i for i, n in enumerate(names)}
        rows, rhs, wheres = [], [], []
        for c in constraints:
            row = np.zeros(len(names))
            for t, v in c.coefs.items():
                if t in idx:
                    row[idx[t]] += v  # untracked tensors have scale 1 (log 0)
            b = sum(term.eval(ctx) for term in c.terms)
            if not row.any():
                if abs(b) > 1e-9:
                    raise WidenError(f"{c.where}: requires a scale factor of {math.exp(b):.6g} on an unscaled tensor")
                continue
            rows.append(row)
            rhs.append(b)
            wheres.append(c.where)
        n = len(names)
        if n == 0:
            return {}
        A = np.array(rows).reshape(-1, n)
        b = np.array(rhs)
        P = np.zeros((n, n))
        q = np.zeros(n)
        for p in soft:
            if p.tensor in idx:
                i = idx[p.tensor]
                P[i, i] += p.weight
                q[i] += p.weight * residual_log
        # Variables neither preferred nor pinned get a tiny pull to 0 so the system stays regular.
        P += np.eye(n) * 1e-9
        m = A.shape[0]
        K = np.block([[2 * P, A.T], [A, np.zeros((m, m))]])
        sol, *_ = np.linalg.lstsq(K, np.concatenate([2 * q, b]), rcond=None)
        x = sol[:n]
        resid = A @ x - b
        bad = np.flatnonzero(np.abs(resid) > 1e-6)
        if bad.size:
            raise WidenError(
                f"{wheres[bad[0]]}: the scale constraints of this node contradict others (off by a factor {math.exp(resid[bad[0]]):.6g}); "
                "a width path mixes tensors that cannot carry the same scale"
            )
        return {name: float(x[i]) for name, i in idx.items()}
