"""The plan: for every constant use, its new value or recipe; for every graph input/output,
its mapping. Built from the analysis and the options; nothing is written here."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from . import dims as D
from . import rules
from .analysis import Analysis
from .errors import WidenError
from .graph import attr
from .scales import Term
from .shapes import evaluate

TRANSPARENT_TO_OUTPUT = {"Reshape", "Transpose", "Identity", "Cast", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather",
                         "Softmax", "LogSoftmax", "Sigmoid", "Flatten", "Concat", "Add", "Sub", "Mul", "Div"}


@dataclass
class Options:
    factor: int | None = None  # hidden, FFN and head size (or head count) factor; None: 2, or 1 beside a target size
    residual: str = "repeat"  # or "orthogonal"
    rope: str = "spread"  # or "remap"
    heads: str = "keep"  # or "grow"
    ffn_factor: int | None = None  # FFN inner size factor; None: the same as factor
    noise: float = 0.0  # relative std of the exact symmetry-breaking noise (0: pure copies)
    seed: int = 0
    kv_heads: str = "tile"  # or "keep" (with heads="grow")
    depth: int = 0  # new blocks per stack, inserted before widening (see depth.py)
    depth_at: tuple | None = None  # after which blocks (1..L); None: evenly spaced

    @property
    def added_blocks(self) -> int:
        return self.depth or len(self.depth_at or ())
    # Target sizes, any count (WIDENING.md, Non-integer factors); what is not named keeps its size.
    hidden: int | None = None  # residual stream width (instead of factor)
    ffn_size: int | None = None  # FFN inner size (instead of ffn_factor)
    num_heads: int | None = None  # query head count, head size kept
    # Post-norm LayerNorm under a target hidden size: copy a random choice of units, report the error;
    # with --depth and --noise: the new blocks' output projections get noise, not zeros.
    allow_approximate: bool = False

    def __post_init__(self):
        self.factor_given = self.factor is not None
        if self.factor is None:
            self.factor = 1 if self.targets else 2

    @property
    def targets(self) -> bool:
        return any(v is not None for v in (self.hidden, self.ffn_size, self.num_heads))

    @property
    def ffn(self) -> int:
        return self.factor if self.ffn_factor is None else self.ffn_factor

    @property
    def head_mode(self) -> str:
        """A head-count target grows the heads whatever `heads` says."""
        return "grow" if self.num_heads is not None else self.heads

    def check(self):
        from .errors import UsageError

        for name, v in (("factor", self.factor), ("ffn factor", self.ffn), ("hidden size", self.hidden),
                        ("FFN size", self.ffn_size), ("head count", self.num_heads)):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise UsageError(f"{name} must be an integer >= 1, got {v!r}")
        if self.hidden is not None and self.factor_given:
            raise UsageError("give either a factor or a hidden size, not both")
        if self.ffn_size is not None and self.ffn_factor is not None:
            raise UsageError("give either an FFN factor or an FFN size, not both")
        if not (isinstance(self.noise, (int, float)) and self.noise >= 0):
            raise UsageError(f"noise must be a number >= 0, got {self.noise!r}")
        self._check_depth()
        if self.factor == 1 and self.ffn == 1 and not self.targets and not self.added_blocks:
            raise UsageError("nothing to widen: factor and FFN factor are both 1")
        if self.residual not in rules.RESIDUAL_SCHEMES:
            raise UsageError(f"residual scale must be one of {', '.join(rules.RESIDUAL_SCHEMES)}, got {self.residual!r}")
        if self.heads not in rules.HEAD_MODES:
            raise UsageError(f"heads must be one of {', '.join(rules.HEAD_MODES)}, got {self.heads!r}")
        if self.kv_heads not in rules.KV_HEAD_MODES:
            raise UsageError(f"kv heads must be one of {', '.join(rules.KV_HEAD_MODES)}, got {self.kv_heads!r}")
        if self.rope not in rules.ROPE_PLACEMENTS:
            raise UsageError(f"rope placement must be one of {', '.join(rules.ROPE_PLACEMENTS)}, got {self.rope!r}")

    def _check_depth(self):
        from .errors import UsageError

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        if not is_int(self.depth) or self.depth < 0:
            raise UsageError(f"depth must be an integer >= 0, got {self.depth!r}")
        if self.depth_at is not None:
            if not self.depth_at or not all(is_int(p) and p >= 1 for p in self.depth_at):
                raise UsageError(f"depth positions must be integers >= 1 (after that block), got {self.depth_at!r}")
            if self.depth and self.depth != len(self.depth_at):
                raise UsageError(f"--depth {self.depth} but {len(self.depth_at)} --depth-at positions")

    def to_json(self) -> dict:
        """What the wide model's metadata records (and `localize` rebuilds the plan from)."""
        return {"factor": self.factor, "residual": self.residual, "rope": self.rope, "heads": self.head_mode,
                "kv_heads": self.kv_heads, "ffn_factor": self.ffn, "noise": self.noise, "seed": self.seed,
                "hidden": self.hidden, "ffn_size": self.ffn_size, "num_heads": self.num_heads,
                "allow_approximate": self.allow_approximate,
                **({"depth": self.added_blocks, "depth_at": list(self.depth_at) if self.depth_at else None} if self.added_blocks else {})}

    @staticmethod
    def from_json(meta: dict) -> "Options":
        keys = ("residual", "rope", "heads", "kv_heads", "noise", "seed", "ffn_size", "num_heads", "allow_approximate")
        opts = {k: meta[k] for k in keys if meta.get(k) is not None}
        if meta.get("hidden") is not None:
            opts["hidden"] = meta["hidden"]
        else:
            opts["factor"] = meta.get("factor", 2)
        if meta.get("ffn_size") is None and "ffn_factor" in meta:
            opts["ffn_factor"] = meta["ffn_factor"]
        return Options(**opts)


@dataclass
class Growth:
    """Each kind of width dimension's growth ratio, resolved against the model's own sizes."""

    hidden: Fraction
    ffn: Fraction
    heads: Fraction

    @property
    def hidden_integer(self) -> int | None:
        return int(self.hidden) if self.hidden.denominator == 1 else None


@dataclass
class Recipe:
    """How one use of a constant is rewritten: a widened parameter or a replaced small value."""

    key: tuple
    param: object = None  # ParamUse
    layouts: tuple = ()
    factor: float = 1.0
    value: np.ndarray | None = None
    noise: tuple | None = None  # (relative std, seed): zero-sum noise over the copies of read axes
    zero_mean: frozenset = frozenset()  # axes whose mean units are zero (read, or a norm's own), not means

    def wide_dims(self, small_dims) -> tuple:
        """The rewritten tensor's shape, known before any value is computed (the writer lays
        the file out first)."""
        if self.value is not None:
            return tuple(self.value.shape)
        return tuple(lay.wide if lay is not None else n for lay, n in zip(self.layouts, small_dims))

    def compute(self, original: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The wide values (in `out` where the rule writes its result in one piece)."""
        if self.value is not None:
            return self.value
        widened = [i for i, l in enumerate(self.layouts) if l is not None and not l.identity]
        if self.param.role in rules.ROTARY_TABLES and widened:
            axis = widened[0]
            compute = rules.ROTARY_TABLES[self.param.role]
            out = compute(original, self.layouts[axis], axis)
            if out is None:
                raise WidenError(f"{self.param.role} {self.param.name!r} do not follow a geometric series of frequencies "
                                 "(scaled RoPE): the wide config's frequencies are unknown; use --rope remap")
            return out
        # Mean units have one copy: as read axes they divide by 1, so the read set only decides
        # whether they are zero or the mean.
        mean = {i for i, lay in enumerate(self.layouts) if lay is not None and lay.has_mean_units}
        read = (self.param.read_axes - mean) | self.zero_mean
        direct = self.noise is None and out is not None and out.dtype == original.dtype
        wide = rules.widen_tensor(original, list(self.layouts), read, self.factor, out if direct else None)
        if self.noise is not None:
            wide = rules.symmetry_breaking_noise(wide, original, list(self.layouts), self.param.read_axes, *self.noise)
        return rules.cast_back(wide, original.dtype, self.param.name)


@dataclass
class Plan:
    an: Analysis
    opts: Options
    layouts: dict = field(default_factory=dict)
    edits: dict = field(default_factory=dict)  # (id(node), idx) -> (node, idx, name, Recipe)
    attr_edits: list = field(default_factory=list)  # (node, attr name, new value)
    scales: dict = field(default_factory=dict)
    io: dict = field(default_factory=dict)  # graph input/output name -> mapping json
    notes: list = field(default_factory=list)  # departures from the canonical wide config
    wide_values: dict = field(default_factory=dict)  # shape-domain values evaluated in the wide world
    depth: dict | None = None  # blocks inserted before widening (depth.deepen's info)

    growth: Growth | None = None
    norm_kinds: dict = field(default_factory=dict)  # root Sym id -> kinds of the norms over it
    approximate: bool = False  # post-norm LayerNorm under a non-integer hidden size, allowed

    # ---- layouts -----------------------------------------------------------------------------
    def layout(self, sym) -> D.Layout:
        root = sym.find()
        if root.id not in self.layouts:
            if rules.kept_whole(root.tags, self.opts.head_mode):
                lay = D.Layout.repeat(root.size, 1)  # kept as a whole, whatever it is made of
            elif root.factors:
                lay = D.Layout.product([self.layout(f) for f in root.factors])
            elif root.parts:
                lay = D.Layout.concat([self.layout(p) for p in root.parts])
            else:
                lay = self._leaf_layout(root)
            self.layouts[root.id] = lay
        return self.layouts[root.id]

    def _leaf_layout(self, root) -> D.Layout:
        o, g, tags, size = self.opts, self.growth, root.tags, root.size
        if o.head_mode == "grow" and tags & {"heads", "copies", "kv_heads"}:
            return rules.head_count_layout(tags, size, g.heads, o.kv_heads)
        if "ffn" in tags:
            return rules.ffn_layout(size, g.ffn)
        if g.hidden_integer is not None:
            return rules.layout_for(tags, size, g.hidden_integer, o.rope, o.head_mode, o.kv_heads)
        if tags & {"rotary", "spread"}:
            heads = self.head_count()
            hint = f" (e.g. --heads {heads * g.hidden})" if (heads * g.hidden).denominator == 1 else ""
            raise WidenError(f"the head size {size if 'rotary' not in tags else 'of a RoPE model'} cannot grow by the "
                             f"non-integer ratio {g.hidden}: RoPE frequencies only line up for an integer head-size factor "
                             f"(WIDENING.md, RoPE); grow the head count instead, head size kept{hint}")
        if "head_dim" in tags:
            return rules.head_size_layout(size, g.hidden)
        wide = rules.grown(size, g.hidden, "width dimension")
        return rules.hidden_layout(size, wide, self.norm_kinds.get(root.id, set()), self.approximate, o.seed)

    def head_count(self) -> int:
        """The query head count of every attention in the model (they must agree)."""
        counts = {m.info.get("heads") for m in self.an.matches if m.kind == "attention"} - {None}
        if len(counts) != 1:
            raise WidenError("a head-count target needs attention layers with one query head count; found "
                             + (", ".join(map(str, sorted(counts))) if counts else "no attention"))
        return counts.pop()

    def wide_shape(self, name) -> tuple:
        shape = self.an.shape(name)
        return tuple(self.layout(a).wide if a is not None else n for a, n in zip(self.an.ax(name), shape))

    def widened(self, name) -> bool:
        return any(a is not None and not self.layout(a).identity for a in self.an.ax(name))

    # ---- terms of the scale system -------------------------------------------------------------
    def log_copies(self, sym) -> float:
        lay = self.layout(sym)
        if not lay.even:
            if self.approximate:
                return 0.0  # readers divide per unit; the statistics are what is approximate
            raise WidenError(f"dimension {sym!r}: uneven copies cannot be summed exactly")
        return math.log(int(lay.copies[0]))

    def log_stat(self, sym) -> float:
        """A norm's statistic over the wide axis against the small one (rules.norm_statistic_log)."""
        lay = self.layout(sym)
        return rules.norm_statistic_log(lay) if lay.even or not self.approximate else 0.0

    def log_mean(self, sym) -> float:
        """ReduceMean over a widened axis: its units must copy evenly; zero units count as zeros.
        Mean units hold the mean in the residual but zero once centred: no one ratio fits both."""
        lay = self.layout(sym)
        if lay.has_mean_units:
            raise WidenError(f"a ReduceMean (a decomposed LayerNorm) reads the average-expanded dimension {sym!r}: "
                             "its mean and its variance would need different corrections; export LayerNormalization "
                             "as one op (opset >= 17) or use an integer factor")
        if not lay.even and not self.approximate:
            raise WidenError(f"a ReduceMean reads dimension {sym!r}, whose units are not copied evenly")
        return rules.norm_statistic_log(lay)

    def log_growth(self, sym) -> float:
        """log(wide size / small size) of a dimension (an implicit 1/sqrt(head_size) follows it)."""
        lay = self.layout(sym)
        return math.log(lay.wide / lay.small)

    def log_ratio(self, use) -> float:
        node, idx = use
        small = self.an.value(node.input[idx])
        edit = self.edits.get((id(node), idx))
        wide = edit[3].value if edit is not None and edit[3].value is not None else self.wide_values.get(node.input[idx])
        if small is None or wide is None or np.size(small) != 1 or np.size(wide) != 1:
            return 0.0
        s, w = float(np.asarray(small).reshape(())), float(np.asarray(wide).reshape(()))
        if s == 0 or w == 0 or (s > 0) != (w > 0):
            return 0.0
        return math.log(w / s)

    def log_attr_ratio(self, use) -> float:
        """log(wide / small) of a float attribute the plan rewrites (FusedMatMul's folded alpha)."""
        node, name = use
        for n, a, value in self.attr_edits:
            if n is node and a == name:
                return math.log(value / attr(node, name, 1.0))
        return 0.0

    def log_output(self, name) -> float:
        k = self.growth.hidden_integer
        return rules.output_log_scale(k) if self.widened(name) and k is not None else 0.0

    # ---- edits ---------------------------------------------------------------------------------
    def edit_value(self, node, idx, value: np.ndarray):
        name = node.input[idx]
        self.edits[(id(node), idx)] = (node, idx, name, Recipe(("value", value.dtype.str, value.shape, value.tobytes()), value=value))

    def use_overrides(self):
        return {k: e[3].value for k, e in self.edits.items() if e[3].value is not None}


def build(an: Analysis, opts: Options) -> Plan:
    plan = Plan(an, opts)
    _mark_terminal(an)
    _mark_ffn(an)
    plan.growth = _growth(plan)
    for sym, node, kind in an.norms:
        plan.norm_kinds.setdefault(sym.find().id, set()).add(kind)
    if plan.growth.hidden_integer is None:
        _residual_checks(plan)
    for sym, node, kind in an.norms:
        _check_norm_layout(plan, sym, node, kind)
    for sym, node, name in an.identity_required:
        if not plan.layout(sym).identity:
            raise WidenError(f"node {an.name(node)!r} ({node.op_type}): input {name!r} spans a widened axis "
                             "but carries no width (it is not derived from widened tensors)")
    _canonical_scale_constants(plan)
    _shape_constants(plan)
    _io_conventions(plan)
    tracked = set(an.axes)
    plan.scales = an.scale.solve(plan, rules.residual_log_scale(opts.residual, plan.growth.hidden_integer or 1), tracked)
    _parameters(plan)
    _scalars_and_attrs(plan)
    _io_mappings(plan)
    return plan


def _growth(plan: Plan) -> Growth:
    """Ratios from the options and the model's own sizes (a target size names the wide size)."""
    an, o = plan.an, plan.opts
    hidden = Fraction(o.factor) if o.hidden is None else Fraction(o.hidden, _hidden_size(an))
    if hidden.denominator != 1 and o.residual != "repeat":
        from .errors import UsageError

        raise UsageError(f"the {o.residual} residual scale needs an integer hidden factor, not {hidden}")
    ffn = Fraction(o.ffn)
    if o.ffn_size is not None:
        sizes = {s.find().size for s, _ in an.linears if s is not None and "ffn" in s.find().tags}
        if len(sizes) != 1:
            raise WidenError("an FFN size target needs one FFN inner size; found " + (", ".join(map(str, sorted(sizes))) or "no FFN"))
        ffn = Fraction(o.ffn_size, sizes.pop())
    heads = Fraction(o.factor) if o.num_heads is None else Fraction(o.num_heads, plan.head_count())
    return Growth(hidden, ffn, heads)


def _hidden_size(an: Analysis) -> int:
    """The residual stream's width: the width most norms normalise, else the embeddings' width."""
    sizes = Counter(sym.find().size for sym, _, _ in an.norms)
    if not sizes:
        sizes = Counter(p.axes[1].find().size for p in an.params if p.role == "embedding table" and p.axes[1] is not None)
    if not sizes:
        raise WidenError("a hidden size target needs a residual stream: no norm and no embedding table found")
    return sizes.most_common(1)[0][0]


def _residual_checks(plan: Plan):
    """A non-integer hidden ratio under LayerNorm needs pre-norm (LEMON's average expansion: a norm's
    new outputs are constants, so only readers, never the residual stream, may take them). Post-norm
    has no exact construction: refuse, or lay the units out as a random choice and measure."""
    an = plan.an
    for sym, node, kind in an.norms:
        if kind != "centred" or not _grows_with_hidden(plan, sym):
            continue
        why = _not_pre_norm(an, node)
        if why is None:
            continue
        if not plan.opts.allow_approximate:
            raise WidenError(f"node {an.name(node)!r} ({node.op_type}): {why}, i.e. post-norm LayerNorm: no exact widening to a "
                             f"non-integer hidden ratio ({plan.growth.hidden}) exists (WIDENING.md, Non-integer factors); use an "
                             "integer factor, or allow an approximate result (--allow-approximate)")
        if not plan.approximate:
            plan.notes.append(f"approximate: {an.name(node)!r} is a post-norm LayerNorm ({why}); new units copy a fixed random "
                              "choice of units, so LayerNorm statistics change (error measured by validation)")
        plan.approximate = True
    for node in an.graph.nodes:
        _check_nonlinear_on_padding(plan, node)


_READERS = ("MatMul", "Gemm")
_THROUGH = ("Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze")


def _grows_with_hidden(plan: Plan, sym) -> bool:
    r = sym.find()
    return not (r.factors or r.parts or rules.kept_whole(r.tags, plan.opts.head_mode)
                or r.tags & {"ffn", "heads", "copies", "kv_heads", "head_dim"})


def _norm_output(an, node):
    """The tensor a norm hands on: past a decomposed norm's gain and bias (Mul/Add by constants)."""
    from .match import is_constlike

    name = node.output[0]
    while True:
        cs = an.graph.consumers.get(name, [])
        if len(cs) != 1 or cs[0].op_type not in ("Mul", "Add") or not any(is_constlike(an, i) for i in cs[0].input):
            return name
        name = cs[0].output[0]


def _not_pre_norm(an, node):
    """Why a LayerNorm's output is not only read (by linear layers, or as a graph output), or None."""
    todo, seen = [_norm_output(an, node)], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for c in an.graph.consumers.get(name, []):
            if c.op_type in _THROUGH:
                todo.append(c.output[0])
            elif c.op_type in ("Shape", "Size"):
                continue
            elif c.op_type not in _READERS or c.input[0] != name:
                return f"its output reaches {c.op_type} node {an.name(c)!r}, not only linear layers"
    return None


def _check_nonlinear_on_padding(plan: Plan, node):
    """Units that copy none hold zero (or the mean) only through ops that keep them there."""
    an = plan.an
    if node.op_type not in rules.PADDING_UNSAFE or not node.input or not an.tracked(node.input[0]):
        return
    for a in an.ax(node.input[0]):
        if a is None:
            continue
        lay = plan.layout(a)
        fill = "mean" if lay.has_mean_units else "zero" if (lay.src < 0).any() else None
        if fill and not rules.keeps_fill(node.op_type, fill):
            raise WidenError(f"node {an.name(node)!r} ({node.op_type}) acts on the widened hidden dimension, whose new units hold "
                             f"the {fill}: the non-linearity would not keep them there; no exact non-integer widening")


def _check_norm_layout(plan: Plan, sym, node, kind):
    lay = plan.layout(sym)
    where = f"node {plan.an.name(node)!r} ({node.op_type})"
    if not lay.even and not plan.approximate:
        raise WidenError(f"{where}: normalises over a dimension whose units are not copied evenly; its statistics would change")
    if kind == "centred" and (lay.src == D.ZERO).any():
        raise WidenError(f"{where}: LayerNorm over a dimension with zero units: its mean would change")
    if kind == "rms" and lay.has_mean_units:
        raise WidenError(f"{where}: RMSNorm over an average-expanded dimension: its mean square would change")


def _io_conventions(plan: Plan):
    """Graph outputs (and hidden-state inputs, so that an encoder's output fed to a separately
    exported decoder arrives as it left) that keep their shape keep their values exactly. A
    widened hidden state leaves as R(h)/sqrt(k), the post's convention, unless that would cost a
    canonical epsilon (the same norm feeding a tied head): then it leaves at the scale the graph
    gives it, recorded in the mapping. Attention state (KV caches) keeps its layer's scale."""
    an = plan.an
    for vi in list(an.graph.outputs) + list(an.graph.inputs):
        name = vi.name
        if name not in an.axes or any(a is not None and "heads" in a.find().tags for a in an.ax(name)):
            continue
        where = f"graph input/output {name!r}"
        if plan.widened(name):
            an.scale.prefer(name, where, weight=1e3, target=Term("output", name), tier=2)
        else:
            an.scale.fix(name, where)


def _mark_ffn(an: Analysis):
    """The FFN inner dimension: made by one linear layer and read by another that writes the
    residual stream. It grows by --ffn-factor, which may differ from the hidden factor."""
    for in_sym, out_sym in an.linears:
        if in_sym is None or out_sym is None:
            continue
        i, o = in_sym.find(), out_sym.find()
        if "embed" in o.tags and "embed" not in i.tags and "linear_out" in i.tags and not (i.factors or i.parts):
            i.tags.add("ffn")


def _mark_terminal(an: Analysis):
    """A linear output that reaches only graph outputs, through ops that do not mix units, is a
    head's output axis (labels, vocabulary): the wide config keeps it."""
    by_root: dict[int, list] = {}
    for sym, tensor in an.born:
        by_root.setdefault(sym.find().id, []).append((sym.find(), tensor))
    for items in by_root.values():
        root = items[0][0]
        if root.tags & {"embed", "heads"}:
            continue
        if all(_reaches_only_outputs(an, t) for _, t in items):
            root.tags.add("terminal")


def _reaches_only_outputs(an, tensor, seen=None):
    seen = seen if seen is not None else set()
    if tensor in seen:
        return True
    seen.add(tensor)
    consumers = an.graph.consumers.get(tensor, [])
    if not consumers:
        return tensor in an.graph.output_names
    for c in consumers:
        if c.op_type not in TRANSPARENT_TO_OUTPUT:
            return False
        if c.op_type in ("Add", "Sub", "Mul", "Div") and sum(an.tracked(i) for i in c.input) > 1:
            return False
        if not all(_reaches_only_outputs(an, o, seen) for o in c.output if o):
            return False
    return True


def _canonical_scale_constants(plan: Plan):
    for sc in plan.an.scale_consts:
        node, idx = sc["node"], sc.get("index")
        wide_dh = plan.layout(sc["sym"]).wide
        if "attr" in sc:  # folded into an attribute: FusedMatMul's alpha
            old = attr(node, sc["attr"], 1.0)
            new = rules.canonical_folded_scale(old, sc["sym"].find().size, wide_dh, sc["exponent"])
            if new != float(np.float32(old)):
                plan.attr_edits.append((node, sc["attr"], new))
            continue
        old = np.asarray(plan.an.graph.const(node.input[idx]))
        new = np.full(old.shape, rules.canonical_scale_constant(wide_dh, sc["exponent"]), dtype=old.dtype)
        if not np.array_equal(new, old):
            plan.edit_value(node, idx, new)


def _wide_world(plan: Plan):
    an = plan.an
    shapes = {name: plan.wide_shape(name) if name in an.axes else s for name, s in an.info.shapes.items()}
    return evaluate(an.graph, shapes, {}, plan.use_overrides())


def _shape_slots():
    from .patterns.shape_constants import SHAPE_SLOTS

    return SHAPE_SLOTS


def _check_shapes(plan: Plan, fix: bool):
    an = plan.an
    wide = _wide_world(plan)
    plan.wide_values = wide
    by_role = {(id(su.node), su.index): su for su in an.shape_uses}
    problems = []
    for node in an.graph.nodes:
        for idx in _shape_slots().get(node.op_type, ()):
            if idx >= len(node.input) or not node.input[idx]:
                continue
            name = node.input[idx]
            small = an.value(name)
            su = by_role.get((id(node), idx))
            required = su.required(plan) if su is not None else small
            if required is None:
                if su is not None and plan.widened(node.output[0]):
                    problems.append((node, idx, f"shape operand {name!r} is computed from data, so its wide value cannot be checked"))
                continue
            edit = plan.edits.get((id(node), idx))
            current = edit[3].value if edit is not None else wide.get(name)
            if current is not None and np.array_equal(np.asarray(current).reshape(-1), np.asarray(required).reshape(-1)):
                continue
            if not fix:
                problems.append((node, idx, f"shape operand {name!r} is {None if current is None else np.asarray(current).tolist()} in the wide graph, role requires {np.asarray(required).tolist()}"))
                continue
            if current is None:
                problems.append((node, idx, f"shape operand {name!r} cannot be evaluated"))
                continue
            cur = np.asarray(current).reshape(-1)
            req = np.asarray(required).reshape(-1)
            for e in np.flatnonzero(cur != req):
                why = _retarget(plan, node, idx, int(e), int(req[e]))
                if why:
                    problems.append((node, idx, why))
    return problems


def _shape_constants(plan: Plan):
    problems = _check_shapes(plan, fix=True)
    if not problems:
        problems = _check_shapes(plan, fix=False)
    if problems:
        node, idx, why = problems[0]
        raise WidenError(f"node {plan.an.name(node)!r} ({node.op_type}) input {idx}: {why}")


def _retarget(plan: Plan, node, idx, elem, value):
    """Rewrite the constant element that element `elem` of node.input[idx] comes from."""
    an = plan.an
    g = an.graph
    name = node.input[idx]
    while not g.is_const(name):
        p = g.producer.get(name)
        if p is None:
            return f"shape value {name!r} does not come from a constant"
        if p.op_type == "Concat" and attr(p, "axis", 0) in (0, -1):
            off = 0
            for j, inp in enumerate(p.input):
                n = int(np.size(an.value(inp))) if an.value(inp) is not None else None
                if n is None:
                    return f"shape value built by {an.name(p)!r} from a non-constant part"
                if elem < off + n:
                    node, idx, name, elem = p, j, inp, elem - off
                    break
                off += n
            continue
        if p.op_type in ("Unsqueeze", "Squeeze", "Identity", "Cast", "Reshape", "Flatten"):
            node, idx, name = p, 0, p.input[0]
            continue
        if p.op_type == "Mul" and np.size(an.value(name) if an.value(name) is not None else 0) == 1:
            # n_kv_heads * n_rep: the constant factor takes what the wide product needs.
            consts = [j for j in (0, 1) if g.is_const(p.input[j])]
            other = plan.wide_values.get(p.input[1 - consts[0]]) if len(consts) == 1 else None
            if other is None or int(np.asarray(other).reshape(())) == 0 or value % int(np.asarray(other).reshape(())):
                return f"shape element {elem} is a product {an.name(p)!r} that no constant factor can make {value}"
            node, idx, name, elem = p, consts[0], p.input[consts[0]], 0
            value = value // int(np.asarray(other).reshape(()))
            continue
        if p.op_type == "Where" and an.value(p.input[0]) is not None:
            # TorchScript's expand: Where(shape == -1, 1, shape); follow the branch the element takes.
            cond = np.broadcast_to(an.value(p.input[0]), np.shape(an.value(name))).reshape(-1)
            branch = 1 if cond[elem] else 2
            if np.size(an.value(p.input[branch])) != np.size(an.value(name)):
                return f"shape element {elem} is selected by {an.name(p)!r} from a broadcast value"
            node, idx, name = p, branch, p.input[branch]
            continue
        return f"element {elem} of the shape is computed by {p.op_type} node {an.name(p)!r}, which is not a constant to rewrite"
    edit = plan.edits.get((id(node), idx))
    base = edit[3].value.copy() if edit is not None else np.array(g.const(name), copy=True)
    flat = base.reshape(-1)
    flat[elem] = value
    plan.edit_value(node, idx, base)
    return None


def _factor(plan: Plan, coefs: dict, const: float | Term = 0.0, terms=()) -> float:
    if isinstance(const, Term):
        const = const.eval(plan)
    log = sum(c * plan.scales.get(t, 0.0) for t, c in coefs.items()) + const + sum(t.eval(plan) for t in terms)
    return 1.0 if abs(log) < 1e-9 else math.exp(log)  # solver round-off is not a rescale


def _parameters(plan: Plan):
    unread = {p.name for p in plan.an.params if not p.read_axes}  # also used as a plain table/gain
    for p in plan.an.params:
        layouts = tuple(plan.layout(a) if a is not None else None for a in p.axes)
        factor = _factor(plan, p.log_factor, p.const, p.terms)
        noise = None
        if plan.opts.noise and p.read_axes and p.name not in unread and any(
                layouts[a] is not None and layouts[a].copies.max() > 1 for a in p.read_axes):
            # Only a weight that reads copies may differ between them (WIDENING.md, Symmetry breaking);
            # a table tied to a lookup must stay one tensor.
            noise = (float(plan.opts.noise), int(plan.opts.seed))
        zero_mean = _zero_mean_axes(plan, p, layouts)
        key = ("param",) + _normal_form(layouts, p.read_axes, factor) + ((p.name, noise) if noise else ()) \
            + ((("zero mean units",) + tuple(sorted(zero_mean))) if zero_mean else ())
        idxs = [i for i, n in enumerate(p.node.input) if n and _source_of(plan, p.node, i) == p.name]
        for i in idxs:
            # The edit sits on the node that reads the initializer (possibly through a Transpose).
            reader, ridx = _reader(plan, p.node, i)
            existing = plan.edits.get((id(reader), ridx))
            if existing is not None and existing[3].key != key:
                raise WidenError(f"node {plan.an.name(p.node)!r}: parameter {p.name!r} has two incompatible roles")
            plan.edits[(id(reader), ridx)] = (reader, ridx, p.name, Recipe(key, param=p, layouts=layouts, factor=factor, noise=noise,
                                                                       zero_mean=zero_mean))


def _zero_mean_axes(plan: Plan, p, layouts) -> frozenset:
    """Axes on which mean units (average expansion) are zero rather than the mean: a reader's input
    axis (readers ignore new units) and a LayerNorm's own gamma and beta (its new outputs are then
    exactly zero). A reader of such a norm output may read anything there: it keeps the means, so
    that a table tied to a lookup stays one tensor."""
    mean = frozenset(i for i, lay in enumerate(layouts) if lay is not None and lay.has_mean_units)
    if not mean:
        return frozenset()
    if p.role in rules.NORM_PARAMS:
        return mean
    read = mean & p.read_axes
    return frozenset() if read and _reads_zeroed_norm(plan, p.node) else read


def _reads_zeroed_norm(plan: Plan, node) -> bool:
    g, name = plan.an.graph, node.input[0]
    while (prod := g.producer.get(name)) is not None and prod.op_type in _THROUGH:
        name = prod.input[0]
    return prod is not None and any(n is prod and kind == "centred" and n.op_type in rules.CENTRED_NORM_OPS
                                    for _, n, kind in plan.an.norms)


def _normal_form(layouts, read_axes, factor):
    """Recipes that give the same tensor compare equal: an axis read with uniform copies is just a
    factor 1/copies (a tied table is one tensor for its lookup and for the output head)."""
    uneven = []
    for axis in sorted(read_axes):
        lay = layouts[axis]
        if lay is None:
            continue
        c = lay.copies[lay.src[lay.src >= 0]]
        if c.min() == c.max():
            factor /= float(c[0])
        else:
            uneven.append(axis)
    return (tuple(l.key if l is not None and not l.identity else None for l in layouts), tuple(uneven), round(factor, 12))


def _source_of(plan, node, i):
    from .match import const_source

    src = const_source(plan.an, node.input[i])
    return src[0] if src else None


def _reader(plan, node, i):
    """The node that reads the constant itself: `node` or the Transpose/Identity/Cast in front of it."""
    g = plan.an.graph
    name = node.input[i]
    while not g.is_const(name):
        node = g.producer[name]
        i = 0
        name = node.input[0]
    return node, i


def _scalars_and_attrs(plan: Plan):
    an = plan.an
    for s in an.scalars:
        f = _factor(plan, s.log_factor)
        if abs(f - 1.0) < 1e-12:
            continue
        idx = list(s.node.input).index(s.name)
        reader, ridx = _reader(plan, s.node, idx)
        old = np.asarray(an.graph.const(reader.input[ridx]))
        plan.edit_value(reader, ridx, (old * f).astype(old.dtype))
        role = "epsilon" if "norm (decomposed)" in an.claims.get(an.name(s.node), "") else s.role
        plan.notes.append(f"{role} {s.name!r} at {an.name(s.node)} scaled by {f:.6g}"
                          + (" (not the wide config's value)" if role == "epsilon" else ""))
    for a in an.attrs:
        f = _factor(plan, a.log_factor, terms=a.terms)
        if abs(f - 1.0) < 1e-12:
            continue
        old = attr(a.node, a.attr, 1e-5)
        plan.attr_edits.append((a.node, a.attr, old * f))
        plan.notes.append(f"{a.attr} of {an.name(a.node)} changed from {old:.3g} to {old * f:.3g} (not the wide config's value)")
    for a in an.attr_values:
        new = a.value(plan)
        if new != attr(a.node, a.attr):
            plan.attr_edits.append((a.node, a.attr, new))


def _io_mappings(plan: Plan):
    an = plan.an
    for vi in list(an.graph.inputs) + list(an.graph.outputs):
        name = vi.name
        if name not in an.axes or not plan.widened(name):
            continue
        conv = plan.log_output(name)
        heads = any(a is not None and "heads" in a.find().tags for a in an.ax(name))
        if not heads and abs(plan.scales.get(name, 0.0) - conv) > 1e-9:
            plan.notes.append(f"{name!r} leaves at scale {math.exp(plan.scales.get(name, 0.0)):.6g}, not 1/sqrt(K): "
                              "the same norm feeds a tied head, whose factor keeps the epsilons canonical (see the mapping)")
        axes = {str(i): plan.layout(a).to_json() for i, a in enumerate(an.ax(name)) if a is not None and not plan.layout(a).identity}
        plan.io[name] = {"axes": axes, "scale": math.exp(plan.scales.get(name, 0.0))}
