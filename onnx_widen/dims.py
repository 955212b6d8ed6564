"""Width-carrying dimensions as union-find classes, and the index layout each one gets.

A `Sym` is one width-carrying dimension of the small model (hidden, FFN, a head's size...).
Dimensions that the graph forces to be equal (both sides of an Add, the contracted axes of a
MatMul) are unified. A Reshape that splits a dimension into several gives it `factors`, so that
heads and head size can be told apart and laid out independently.
"""
from __future__ import annotations

import itertools

import numpy as np

from .errors import WidenError

_ids = itertools.count()


class Sym:
    __slots__ = ("id", "size", "parent", "factors", "parts", "tags", "origin")

    def __init__(self, size: int, origin: str, tags=()):
        self.id = next(_ids)
        self.size = int(size)
        self.parent = self
        self.factors: list | None = None  # list of Sym (a merged axis such as heads x head_dim)
        self.parts: list | None = None  # list of Sym laid end to end (fused q|k|v, rotary halves)
        self.tags = set(tags)
        self.origin = origin

    def find(self) -> "Sym":
        root = self
        while root.parent is not root:
            root = root.parent
        node = self
        while node.parent is not root:
            node.parent, node = root, node.parent
        return root

    def __repr__(self):
        r = self.find()
        f = f"={'x'.join(repr(x) for x in r.factors)}" if r.factors else ""
        p = f"={'|'.join(repr(x) for x in r.parts)}" if r.parts else ""
        return f"S{r.id}({r.size}{f}{p})"


def unify(a: Sym, b: Sym, where: str) -> Sym:
    ra, rb = a.find(), b.find()
    if ra is rb:
        return ra
    if ra.size != rb.size:
        raise WidenError(f"{where}: width dimensions {ra!r} and {rb!r} must be equal but have sizes {ra.size} and {rb.size}")
    if (ra.factors and rb.parts) or (ra.parts and rb.factors):
        raise WidenError(f"{where}: {ra!r} and {rb!r} are structured incompatibly (a product and a concatenation)")
    fa, fb = ra.factors, rb.factors
    pa, pb = ra.parts, rb.parts
    rb.parent = ra
    ra.tags |= rb.tags
    if fa is None:
        ra.factors = fb
    elif fb is not None:
        _unify_factor_lists(fa, fb, where)
    if pa is None:
        ra.parts = pb
    elif pb is not None:
        _unify_parts(ra, pa, pb, where)
    if ra.tags & INHERITED:
        tag_all(ra, *(ra.tags & INHERITED))
    return ra


# Tags that hold for every piece of a dimension: a kept head count keeps each of its factors.
INHERITED = frozenset({"heads"})


def tag_all(sym, *tags):
    root = sym.find()
    root.tags.update(tags)
    for child in (root.factors or []) + (root.parts or []):
        if not set(tags) <= child.find().tags:
            tag_all(child, *tags)


def _cuts(parts):
    out, c = [], 0
    for p in parts:
        c += p.find().size
        out.append(c)
    return out


def _unify_parts(root, pa, pb, where):
    common = sorted(set(_cuts(pa)) | set(_cuts(pb)))
    fa = cut_parts(pa, common, where)
    fb = cut_parts(pb, common, where)
    for x, y in zip(fa, fb):
        unify(x, y, where)
    root.find().parts = [x.find() for x in fa]


def cut_parts(parts, cuts, where):
    """Refine a list of parts so that it has a boundary at every cut (cuts are cumulative ends)."""
    out, start = [], 0
    for p in parts:
        p = p.find()
        end = start + p.size
        inner = [c - start for c in cuts if start < c < end]
        if inner:
            sizes = [b - a for a, b in zip([0] + inner, inner + [p.size])]
            out.extend(split_parts(p, sizes, where))
        else:
            out.append(p)
        start = end
    return out


def split_parts(sym: Sym, sizes: list[int], origin: str) -> list[Sym]:
    """Cut `sym` into consecutive pieces of the given sizes (a concatenation)."""
    root = sym.find()
    if sum(sizes) != root.size:
        raise WidenError(f"{origin}: cannot cut {root!r} into {sizes}")
    if len(sizes) == 1:
        return [root]
    if root.factors is not None:
        raise WidenError(f"{origin}: cannot cut {root!r}, already split into heads, into pieces {sizes}")
    cuts = list(np.cumsum(sizes))
    if root.parts is None:
        root.parts = [Sym(s, origin, tags=root.tags & {"rotary"}) for s in sizes]
        return list(root.parts)
    root.parts = [p.find() for p in cut_parts(root.parts, cuts, origin)]
    out, i = [], 0
    for size in sizes:
        group, total = [], 0
        while total < size:
            group.append(root.parts[i])
            total += root.parts[i].find().size
            i += 1
        out.append(group[0] if len(group) == 1 else concat(group, origin))
    return out


def concat(syms: list, origin: str) -> Sym:
    s = Sym(sum(x.find().size for x in syms), origin)
    s.parts = [x.find() for x in syms]
    return s


def _unify_factor_lists(fa, fb, where):
    if [f.find().size for f in fa] != [f.find().size for f in fb]:
        # Different factorisations of one dimension (e.g. [4, 24] vs [2, 48]) cannot be laid out consistently.
        raise WidenError(f"{where}: one width dimension is split two incompatible ways: {fa} vs {fb}")
    for x, y in zip(fa, fb):
        unify(x, y, where)


def split(sym: Sym, sizes: list[int], origin: str) -> list[Sym]:
    """Factor `sym` into consecutive sub-dimensions of the given sizes (row-major)."""
    root = sym.find()
    if root.factors is not None:
        have = [f.find().size for f in root.factors]
        if have == sizes:
            return [f.find() for f in root.factors]
        if int(np.prod(sizes)) == root.size:
            grouped = _group(root.factors, sizes, origin)
            if grouped is not None:
                return grouped
            # Refine: an existing factor may itself split further ([H, D] then [H, D/2, 2]).
            return _refine(root.factors, sizes, origin)
        raise WidenError(f"{origin}: cannot split {root!r} into {sizes}")
    if int(np.prod(sizes)) != root.size:
        raise WidenError(f"{origin}: cannot split {root!r} into {sizes}")
    root.factors = [Sym(s, origin) for s in sizes]
    return list(root.factors)


def _group(factors, sizes, origin):
    """Coarser sizes than the existing factors ([B, kvH, rep] read as [B, kvH*rep]): merge runs."""
    out, i = [], 0
    for size in sizes:
        group, prod = [], 1
        while prod < size and i < len(factors):
            group.append(factors[i].find())
            prod *= factors[i].find().size
            i += 1
        if prod != size or not group:
            return None
        out.append(group[0] if len(group) == 1 else merge(group, [g.size for g in group], origin))
    return out if i == len(factors) else None


def _refine(factors, sizes, origin):
    out, i = [], 0
    for f in factors:
        f = f.find()
        group, prod = [], 1
        while prod < f.size and i < len(sizes):
            group.append(sizes[i])
            prod *= sizes[i]
            i += 1
        if prod != f.size:
            raise WidenError(f"{origin}: cannot split {factors} into {sizes}")
        out.extend([f] if len(group) == 1 else split(f, group, origin))
    return out


def merge(syms: list, sizes: list[int], origin: str) -> Sym:
    """A dimension made by merging consecutive axes; `syms` entries may be None (not width)."""
    if len(syms) == 1 and syms[0] is not None:
        return syms[0].find()
    parts = [s.find() if s is not None else Sym(n, origin, tags={"fixed"}) for s, n in zip(syms, sizes)]
    m = Sym(int(np.prod(sizes)), origin)
    m.factors = parts
    return m


def leaves(sym: Sym) -> list[Sym]:
    root = sym.find()
    children = root.factors or root.parts
    if children is None:
        return [root]
    return [leaf for f in children for leaf in leaves(f)]


# Wide units that copy no small unit: a zero unit holds 0 in every tensor on the axis (RMSNorm
# zero-padding); a mean unit holds the mean of the small units in every tensor written onto the
# axis (LEMON's average expansion under LayerNorm). Readers give both zero weight.
ZERO = -1
MEAN = -2


class Layout:
    """How a small axis becomes a wide one: `src[j]` is the small index copied to wide index j
    (ZERO or MEAN for a unit that copies none)."""

    __slots__ = ("src", "small", "copies", "key")

    def __init__(self, src: np.ndarray, small: int):
        self.src = np.asarray(src, dtype=np.int64)
        self.small = small
        counts = np.bincount(self.src[self.src >= 0], minlength=small)
        self.copies = counts
        self.key = (small, self.src.tobytes())

    @property
    def wide(self) -> int:
        return len(self.src)

    @property
    def identity(self) -> bool:
        return self.wide == self.small and bool(np.all(self.src == np.arange(self.small)))

    @staticmethod
    def repeat(n: int, k: int) -> "Layout":
        return Layout(np.repeat(np.arange(n), k), n)

    @staticmethod
    def block_repeat(n: int, k: int, block: int) -> "Layout":
        """Repeat whole blocks of `block` units k times ([h1, h1, h2, h2] for heads)."""
        h = n // block
        return Layout((np.repeat(np.arange(h), k)[:, None] * block + np.arange(block)[None, :]).ravel(), n)

    @staticmethod
    def stretch(n: int, wide: int) -> "Layout":
        """Every unit copied once or more, copies consecutive and spread evenly over the axis
        (src[j] = j*n // wide): the plain repeat when wide = k*n, any count otherwise."""
        return Layout(np.arange(wide) * n // wide, n)

    @staticmethod
    def pad(n: int, wide: int, fill: int = ZERO) -> "Layout":
        """The small units first, then wide - n units that copy none (ZERO or MEAN)."""
        return Layout(np.concatenate([np.arange(n), np.full(wide - n, fill)]), n)

    @staticmethod
    def choice(n: int, wide: int, seed: int) -> "Layout":
        """The small units first, then copies of a fixed random choice of them (bert2BERT /
        Net2Net style; uneven copies, so only approximate under a norm)."""
        rng = np.random.default_rng([seed, n, wide])
        extra = wide - n
        more = np.concatenate([np.tile(np.arange(n), extra // n), np.sort(rng.choice(n, extra % n, replace=False))])
        return Layout(np.concatenate([np.arange(n), more]), n)

    @property
    def has_mean_units(self) -> bool:
        return bool((self.src == MEAN).any())

    @property
    def even(self) -> bool:
        """Every small unit has the same number of copies."""
        return self.copies.min() == self.copies.max()

    def statistic_ratio(self) -> float:
        """mean over the wide axis / mean over the small one, for a per-unit quantity that is
        zero on units copying none (a square, a centred square): sum(copies) / wide."""
        return float(self.copies.sum()) / self.wide

    @staticmethod
    def spread(n: int, k: int) -> "Layout":
        """Unit j at wide position k*j, the other positions zero (RoPE pairs at the wide frequencies)."""
        src = np.full(n * k, -1, dtype=np.int64)
        src[::k] = np.arange(n)
        return Layout(src, n)

    @staticmethod
    def concat(parts: list["Layout"]) -> "Layout":
        srcs, off = [], 0
        for p in parts:
            srcs.append(np.where(p.src < 0, p.src, p.src + off))
            off += p.small
        return Layout(np.concatenate(srcs), off)

    @staticmethod
    def product(parts: list["Layout"]) -> "Layout":
        src = np.zeros(1, dtype=np.int64)
        small = 1
        for p in parts:
            if (src == MEAN).any() or (p.src == MEAN).any():
                raise WidenError("an average-expanded dimension (mean units) cannot be split into factors")
            combined = src[:, None] * p.small + p.src[None, :]
            dead = (src[:, None] < 0) | (p.src[None, :] < 0)  # a zero unit stays zero
            src = np.where(dead, -1, combined).ravel()
            small *= p.small
        return Layout(src, small)

    def to_json(self) -> dict:
        if np.array_equal(self.src, np.repeat(np.arange(self.small), self.wide // self.small)) and self.wide % self.small == 0:
            return {"small": self.small, "repeat": self.wide // self.small}
        return {"small": self.small, "src": self.src.tolist()}

    @staticmethod
    def from_json(d: dict) -> "Layout":
        if "repeat" in d:
            return Layout.repeat(d["small"], d["repeat"])
        return Layout(np.asarray(d["src"]), d["small"])
