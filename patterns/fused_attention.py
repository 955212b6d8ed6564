"""onnxruntime's fused attention ops (com.microsoft): Attention (packed QKV projection inside),
MultiHeadAttention and GroupQueryAttention (projected q/k/v in), and RotaryEmbedding.

Inside the op, q, k and v are split into heads by the `num_heads` attributes, so the head
structure that a Reshape would give a decomposed graph is declared here: every q/k/v width is
heads x head size, the packed weight and bias are [q | k | v] of those, and `num_heads`,
`kv_num_heads`, `qkv_hidden_sizes`, `rotary_embedding_dim` follow the layouts of the dimensions
they count. The scores q.k * scale must keep their values (WIDENING.md, Attention): with no
`scale` attribute the op uses 1/sqrt(head_size), which follows the wide head size by itself, so
q and k absorb the rest (s_q + s_k = -log copies + log(growth)/2, split evenly by the solver);
an explicit scale equal to head_size**-0.5 takes the wide head size's value the same way, any
other explicit scale stays. Rotary caches (cos/sin [positions, rotary/2]) are rebuilt at the
wide config's frequencies like every other RoPE table (rules.ROTARY_TABLES).
"""
import math

from onnx_widen import dims as D
from onnx_widen.analysis import AttrValue, Match
from onnx_widen.graph import attr
from onnx_widen.match import OpPattern, adopt_graph_input, const_source, source_axes, source_read_axes
from onnx_widen.scales import Term

MS = "com.microsoft"


def _in(node, i):
    return node.input[i] if len(node.input) > i and node.input[i] else None


def _out(node, i):
    return node.output[i] if len(node.output) > i and node.output[i] else None


def _const(an, node, i, role):
    name = _in(node, i)
    src = const_source(an, name) if name and not an.tracked(name) else None
    if src is None:
        an.fail(node, f"{role} (input {i}) must be a constant")
    return src


def _width(an, node, name, what):
    sym = an.ax(name)[-1] if an.tracked(name) else None
    if sym is None:
        an.fail(node, f"{what} {name!r} carries no width on its last axis (it is not derived from the widened hidden state)")
    return sym


def _heads(an, node, sym, counts):
    """Factor a width into (heads..., head size) as the op splits it, and tag the pieces."""
    size = sym.find().size
    n = math.prod(counts)
    if size % n:
        an.fail(node, f"width {size} is not a multiple of the head count {n}")
    pieces = D.split(sym, list(counts) + [size // n], an.name(node))
    for p in pieces[:-1]:
        D.tag_all(p, "heads")
    D.tag_all(pieces[-1], "head_dim")
    return pieces


def _head_count(an, node, name, sym):
    if attr(node, name):
        an.attr_values.append(AttrValue(node, name, lambda plan: int(plan.layout(sym).wide)))


def _softmax_scale(an, node, coefs, head_sym):
    """The score relation s_q + s_k + log copies(dh) + log(scale~/scale) = 0 (softmax input at scale 1)."""
    dh = head_sym.find().size
    s = attr(node, "scale")
    terms = [Term("copies", head_sym, -1.0)]
    if not s or math.isclose(s, dh ** -0.5, rel_tol=1e-4):
        # 0 means "default" to onnxruntime: 1/sqrt(head size), of the wide head in the wide op.
        terms.append(Term("growth", head_sym, 0.5))
        if s:
            an.attr_values.append(AttrValue(node, "scale", lambda plan: float(plan.layout(head_sym).wide) ** -0.5))
        form = "1/sqrt(head_size)" + (" (attribute)" if s else " (implicit)")
    else:
        form = f"{s:g} (custom, kept)"
    an.scale.relation(coefs, an.name(node), *terms)
    return form


def _score_addend(an, node, i, head_sym):
    """attention_bias (B|1, N|1, S, T): added to the scores (scale 1), per head."""
    name = _in(node, i)
    if name is None:
        return
    if an.tracked(name):
        axes = an.ax(name)
        if any(a is not None for j, a in enumerate(axes) if j != 1):
            an.fail(node, f"attention bias {name!r} carries width outside its head axis")
        if axes[1] is not None:
            an.unify(axes[1], head_sym, node)
        an.scale.fix(name, an.name(node))
    elif an.shape(name)[1] != 1:
        an.identity_required.append((head_sym, node, name))


def _state(an, node, past, present, axes, like):
    """A KV cache pair: the past input (a graph input, adopted) and the present output have the
    widened head axes of k or v and their scale."""
    where = an.name(node)
    if past is not None:
        if an.tracked(past):
            for a, b in zip(an.ax(past), axes):
                an.unify(a, b, node)
        elif not adopt_graph_input(an, node, past, list(axes)):
            an.fail(node, f"past state {past!r} is neither a graph input nor derived from widened tensors")
        an.scale.equal(past, like, where)
    if present is not None:
        an.set(present, axes)
        an.scale.equal(present, like, where)


def _refuse(an, node, checks):
    for bad, why in checks:
        if bad:
            an.fail(node, why)


def _match(an, node, heads, head_size, scale, **more):
    an.matches.append(Match("attention (fused)", [an.name(node)], {
        "op": node.op_type, "heads": heads, "head_size": head_size, "scale": scale, **more}))


# ---- Attention: x @ W_qkv + b_qkv inside the op --------------------------------------------------
def attention(an, node):
    x, out = node.input[0], node.output[0]
    where = an.name(node)
    _refuse(an, node, [
        (attr(node, "do_rotary", 0), "rotary embedding inside Attention (do_rotary=1) is not supported"),
        (attr(node, "past_present_share_buffer", 0), "a shared past/present buffer is not supported"),
        (_in(node, 6) is not None, "past_sequence_length (shared buffer) is not supported"),
        (_in(node, 3) is not None and an.tracked(node.input[3]), "the mask carries width"),
    ])
    in_sym = _width(an, node, x, "input")
    src, perm = _const(an, node, 1, "packed QKV weight")
    w = an.shape(node.input[1])
    n = attr(node, "num_heads")
    sizes = list(attr(node, "qkv_hidden_sizes") or [w[1] // 3] * 3)
    if sum(sizes) != w[1] or sizes[0] != sizes[1] or any(s % n for s in sizes):
        an.fail(node, f"packed QKV layout {sizes} of a weight {list(w)} with {n} heads is not [q | k | v] by heads")
    heads = an.new_sym(n, node, tags={"heads"})
    dh = an.new_sym(sizes[0] // n, node, tags={"head_dim"})
    present = _out(node, 1)
    dv = dh if (_in(node, 4) or present) else an.new_sym(sizes[2] // n, node, tags={"head_dim"})
    q = D.merge([heads, dh], [n, sizes[0] // n], where)
    v = D.merge([heads, dv], [n, sizes[2] // n], where)
    packed = D.concat([q, q, v], where)
    an.param(src, node, source_axes((in_sym, packed), perm), {out: 1.0, x: -1.0},
             read_axes=source_read_axes({0}, perm), role="packed qkv weight")
    if _in(node, 2):
        bsrc, bperm = _const(an, node, 2, "packed QKV bias")
        an.param(bsrc, node, (packed,), {out: 1.0}, role="packed qkv bias")
    an.set(out, an.ax(x)[:-1] + (v,))
    # q, k and v leave the packed projection at one scale: the output's (probs @ v keeps v's).
    form = _softmax_scale(an, node, {out: 2.0}, dh)
    _score_addend(an, node, 5, heads)
    _state(an, node, _in(node, 4), present, (None, None, heads, None, dh), out)
    _head_count(an, node, "num_heads", heads)
    if attr(node, "qkv_hidden_sizes"):
        an.attr_values.append(AttrValue(node, "qkv_hidden_sizes", lambda plan: [int(plan.layout(s).wide) for s in (q, q, v)]))
    _match(an, node, n, sizes[0] // n, form, packed="q|k|v weight and bias")


# ---- MultiHeadAttention: projected q, k, v (3-D), optional packed bias -----------------------------
def multi_head_attention(an, node):
    q, k, v = (_in(node, i) for i in range(3))
    out = node.output[0]
    _refuse(an, node, [
        (k is None or v is None or len(an.shape(q)) != 3 or len(an.shape(k)) != 3 or len(an.shape(v)) != 3,
         "packed QKV/KV or BNSH key/value layouts are not supported (3-D query, key and value only)"),
        (_out(node, 3) is not None, "the qk output is not supported"),
        (_in(node, 9) is not None, "cache_indirection (beam search) is not supported"),
        (_in(node, 4) is not None and an.tracked(node.input[4]), "the key padding mask carries width"),
    ])
    n = attr(node, "num_heads")
    hq, dh = _heads(an, node, _width(an, node, q, "query"), [n])
    hk, dk = _heads(an, node, _width(an, node, k, "key"), [n])
    hv, dv = _heads(an, node, _width(an, node, v, "value"), [n])
    for a, b in ((hq, hk), (hq, hv), (dh, dk)):
        an.unify(a, b, node)
    where = an.name(node)
    if _in(node, 3):
        # One packed bias, one factor: q, k and v must share a scale (their projections absorb it).
        src, perm = _const(an, node, 3, "packed QKV bias")
        an.param(src, node, (D.concat([an.ax(t)[-1] for t in (q, k, v)], where),), {q: 1.0}, role="packed qkv bias")
        an.scale.equal(k, q, where)
        an.scale.equal(v, q, where)
    an.set(out, an.ax(q)[:-1] + (an.ax(v)[-1],))
    an.scale.equal(out, v, where)
    form = _softmax_scale(an, node, {q: 1.0, k: 1.0}, dh)
    _score_addend(an, node, 5, hq)
    _state(an, node, _in(node, 6), _out(node, 1), (None, hq, None, dh), k)
    _state(an, node, _in(node, 7), _out(node, 2), (None, hq, None, dv), v)
    _head_count(an, node, "num_heads", hq)
    _match(an, node, n, dh.find().size, form)


# ---- rotary embedding, shared by RotaryEmbedding and GroupQueryAttention(do_rotary=1) ---------------
def _rotary(an, node, head_sym, cos_i, sin_i, rotary_dim, interleaved):
    """Cut the head size into its rotary part and the rest, give the rotary pairs their own
    dimension (the caches' second axis) and register the caches."""
    where = an.name(node)
    dh = head_sym.find().size
    n = an.shape(node.input[cos_i])[-1]
    rot = rotary_dim or 2 * n
    if rot != 2 * n or rot > dh:
        an.fail(node, f"rotary caches of width {n} do not fit rotary dimension {rot} and head size {dh}")
    if interleaved:
        rot_part = D.split_parts(head_sym, [rot, dh - rot] if rot < dh else [dh], where)[0]
        pairs, two = D.split(rot_part, [n, 2], where)
        two.find().tags.add("fixed")
    else:
        parts = D.split_parts(head_sym, [n, n] + ([dh - rot] if rot < dh else []), where)
        pairs = an.unify(parts[0], parts[1], node)
    D.tag_all(pairs, "rotary")
    # Every piece is head size (kept whole when heads grow); pass-through units spread like the
    # rotary ones, so that q.k needs one factor for the whole head.
    D.tag_all(head_sym, "head_dim", "spread")
    for i, role in ((cos_i, "rotary cos cache"), (sin_i, "rotary sin cache")):
        src, perm = _const(an, node, i, role)
        if perm is not None:
            an.fail(node, f"{role} behind a Transpose is not supported")
        an.param(src, node, (None, pairs), {}, role=role)
    return pairs, rot


def rotary_embedding(an, node):
    x, out = node.input[0], node.output[0]
    _refuse(an, node, [(attr(node, "is_packed_batching", 0), "packed (ragged) batching is not supported")])
    shape = an.shape(x)
    n, rot = attr(node, "num_heads", 0), attr(node, "rotary_embedding_dim", 0)
    if len(shape) == 4:  # (B, N, S, head_size)
        heads, dh = an.ax(x)[1], an.ax(x)[3]
        if dh is None:
            an.fail(node, f"input {x!r} carries no width on its head axis")
    else:
        n = n or shape[-1] // (2 * an.shape(node.input[2])[-1])
        heads, dh = _heads(an, node, _width(an, node, x, "input"), [n])
    pairs, _ = _rotary(an, node, dh, 2, 3, rot, attr(node, "interleaved", 0))
    an.set(out, an.ax(x))
    an.scale.equal(out, x, an.name(node))
    if heads is not None:
        _head_count(an, node, "num_heads", heads)
    if rot:
        an.attr_values.append(AttrValue(node, "rotary_embedding_dim", lambda plan: 2 * int(plan.layout(pairs).wide)))
    an.matches.append(Match("rotary (fused)", [an.name(node)], {"op": node.op_type, "pairs": pairs.find().size,
                                                               "layout": "interleaved" if attr(node, "interleaved", 0) else "halves"}))


# ---- GroupQueryAttention: q heads grouped over kv heads ------------------------------------------
def group_query_attention(an, node):
    q, k, v = (_in(node, i) for i in range(3))
    out = node.output[0]
    where = an.name(node)
    _refuse(an, node, [
        ((k is None) != (v is None), "key without value (or value without key)"),
        (_in(node, 12) or _in(node, 13) or attr(node, "k_quant_type", "NONE") not in ("NONE", b"NONE"), "a quantized KV cache is not supported"),
        (_in(node, 14) or _in(node, 15), "per-head q/k norms (q_norm_weight, k_norm_weight) are not supported"),
        (_out(node, 3) is not None or attr(node, "qk_output", 0), "the qk output is not supported"),
    ])
    nq, nkv = attr(node, "num_heads"), attr(node, "kv_num_heads")
    if nq % nkv:
        an.fail(node, f"{nq} query heads do not group over {nkv} kv heads")
    group = nq // nkv
    qsym = _width(an, node, q, "query")
    if k is None:  # packed q | k | v in the query input
        dh_size = qsym.find().size // (nq + 2 * nkv)
        qsym, ksym, vsym = D.split_parts(qsym, [nq * dh_size, nkv * dh_size, nkv * dh_size], where)
        k_t = v_t = q
    else:
        ksym, vsym = _width(an, node, k, "key"), _width(an, node, v, "value")
        k_t, v_t = k, v
    # Query heads are [kv heads, group]: tiling kv heads keeps each query head with its kv head.
    qpieces = _heads(an, node, qsym, [nkv, group] if group > 1 else [nkv])
    kvh, dh = qpieces[0], qpieces[-1]
    kk, dk = _heads(an, node, ksym, [nkv])
    kv2, dv = _heads(an, node, vsym, [nkv])
    for a, b in ((kvh, kk), (kvh, kv2), (dh, dk)):
        an.unify(a, b, node)
    kvh.find().tags.add("kv_heads")
    qheads = kvh
    if group > 1:
        qpieces[1].find().tags.add("copies")
        qheads = D.merge(qpieces[:2], [nkv, group], where)
    rot = None
    if attr(node, "do_rotary", 0):
        _, rot = _rotary(an, node, dh, 7, 8, 0, attr(node, "rotary_interleaved", 0))
    if _in(node, 11):
        src, _ = _const(an, node, 11, "head sink")
        an.param(src, node, (qheads,), {}, role="head sink")
    an.set(out, an.ax(q)[:-1] + (D.merge([qheads, dv], [nq, dv.find().size], where),))
    an.scale.equal(out, v_t, where)
    coefs = {q: 2.0} if k is None else {q: 1.0, k: 1.0}
    form = _softmax_scale(an, node, coefs, dh)
    _score_addend(an, node, 10, qheads)
    _state(an, node, _in(node, 3), _out(node, 1), (None, kvh, None, dh), k_t)
    _state(an, node, _in(node, 4), _out(node, 2), (None, kvh, None, dv), v_t)
    _head_count(an, node, "num_heads", qheads)
    _head_count(an, node, "kv_num_heads", kvh)
    _match(an, node, nq, dh.find().size, form, kv_heads=nkv, rotary=rot or "none", packed=k is None)


PATTERNS = [
    OpPattern("attention (fused)", ("Attention",), attention, domain=MS),
    OpPattern("attention (fused)", ("MultiHeadAttention",), multi_head_attention, domain=MS),
    OpPattern("attention (fused)", ("GroupQueryAttention",), group_query_attention, domain=MS),
    OpPattern("rotary (fused)", ("RotaryEmbedding",), rotary_embedding, domain=MS),
]
