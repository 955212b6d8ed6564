"""RMSNorm: SimplifiedLayerNormalization / RMSNormalization ops, and the decomposition
Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Reciprocal|Div(1, .) -> Mul(x) -> Mul gamma.
RMS(R(x)) = RMS(x): gamma repeats, epsilon stays (times a**2 if the input has scale a)."""
from onnx_widen.match import OpPattern
from onnx_widen.recognize import chain_from

from .layernorm import hold_rms_input, norm_op


def rms_norm(an, node):
    norm_op(an, node, params=("gamma",), kind="rmsnorm")


PATTERNS = [OpPattern("rmsnorm", ("SimplifiedLayerNormalization", "RMSNormalization"), rms_norm)]

def _mean_centred(an, nodes):
    """Pow(x - mean, 2) is a LayerNorm's variance, not a root mean square."""
    p = an.graph.producer.get(nodes[-1].input[0])
    return p is not None and p.op_type == "Sub"


RECOGNIZERS = [
    chain_from("rmsnorm (decomposed)", "Reciprocal", [("Sqrt", 0), ("Add", None), ("ReduceMean", None), ("Pow", 0)], reject=_mean_centred, on_match=hold_rms_input),
    chain_from("rmsnorm (decomposed)", "Div", [("Sqrt", 1), ("Add", None), ("ReduceMean", None), ("Pow", 0)], reject=_mean_centred, on_match=hold_rms_input),
]
