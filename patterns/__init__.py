"""Declared patterns, one module per subgraph kind. Order matters only where two patterns
claim the same op type: the first whose condition holds wins (a MatMul with a constant weight
is a linear layer before it is an attention product)."""
from onnx_widen.match import Registry

from . import activation, attention, elementwise, embedding, fused_attention, layernorm, linear, quantized, rmsnorm, rope, shape_constants

MODULES = (quantized, rope, embedding, linear, attention, fused_attention, layernorm, rmsnorm, activation, elementwise, shape_constants)
PATTERNS = [p for m in MODULES for p in m.PATTERNS]
RECOGNIZERS = [r for m in MODULES for r in getattr(m, "RECOGNIZERS", ())]
REGISTRY = Registry(PATTERNS)
