"""Rotary position embeddings (RoPE).

Frequencies: Mul(positions, inv_freq) feeding Cos/Sin (both exporters fold the transformers
`inv_freq @ position_ids` product into a broadcast Mul). inv_freq's axis is where the rotary
pair dimension is born; Concat(freqs, freqs) makes the rotate_half layout [pairs | pairs], and
rotate_half's Slice/Neg/Concat on q and k cut the head size the same way, so the q/k head
dimension becomes "rotary halves" by unification alone. The layout of that dimension is then
the spread placement (pair j -> pair k*j at the wide config's own frequencies, other pairs zero)
or, with --rope remap, the plain repeat (WIDENING.md, RoPE). Partial rotary works the same way:
only the sliced-off rotary part carries the rotary tag.
"""
from onnx import TensorProto

from onnx_widen.analysis import Match
from onnx_widen.match import OpPattern, const_source, width_param_axes

_TO_TRIG = ("Concat", "Unsqueeze", "Transpose", "Cast", "Identity", "Reshape", "Mul")


def _reaches_trig(an, name, depth=4):
    if depth == 0:
        return False
    for c in an.graph.consumers.get(name, []):
        if c.op_type in ("Cos", "Sin"):
            return True
        if c.op_type in _TO_TRIG and any(_reaches_trig(an, o, depth - 1) for o in c.output):
            return True
    return False


def _freq_operand(an, node):
    for idx in (0, 1):
        name = node.input[idx]
        src = const_source(an, name)
        if src is None or an.tracked(name):
            continue
        if an.info.dtypes.get(name) not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            continue
        shape = an.shape(name)
        if shape and shape[-1] > 1 and sum(d > 1 for d in shape) == 1:
            return idx
    return None


def _is_frequencies(an, node):
    if an.tracked(node.input[0]) or an.tracked(node.input[1]):
        return False
    return _freq_operand(an, node) is not None and _reaches_trig(an, node.output[0])


def frequencies(an, node):
    idx = _freq_operand(an, node)
    freq, out = node.input[idx], node.output[0]
    n = an.shape(freq)[-1]
    sym = an.new_sym(n, node, tags={"rotary"})
    axes = [None] * len(an.shape(out))
    axes[-1] = sym
    an.set(out, axes)
    src, perm = const_source(an, freq)
    an.param(src, node, width_param_axes(an, freq, axes), {out: 1.0}, role="rotary frequencies")
    an.matches.append(Match("rotary frequencies", [an.name(node)], {"inv_freq": src, "pairs": n}))


PATTERNS = [OpPattern("rotary frequencies", ("Mul",), frequencies, when=_is_frequencies, seed=True)]
