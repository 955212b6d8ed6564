"""RMSNorm: SimplifiedLayerNormalization / RMSNormalization ops, and the decomposition
Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Reciprocal|Div(1, .) -> Mul(x) -> Mul gamma.
RMS(R(x)) = RMS(x): gamma repeats, epsilon stays (times a**2 if the input has scale a)."""
from onnx_widen.match import OpPattern
from onnx_widen.recognize import chain_from

from .layernorm import norm_op


def rms_norm(an, node):
    norm_op(an, node, params=("gamma",), kind="rmsnorm")


PATTERNS = [OpPattern("rmsnorm", ("SimplifiedLayerNormalization", "RMSNormalization"), rms_norm)]

RECOGNIZERS = [
    chain_from("rmsnorm (decomposed)", "Reciprocal", [("Sqrt", 0), ("Add", None), ("ReduceMean", None), ("Pow", 0)]),
    chain_from("rmsnorm (decomposed)", "Div", [("Sqrt", 1), ("Add", None), ("ReduceMean", None), ("Pow", 0)]),
]
