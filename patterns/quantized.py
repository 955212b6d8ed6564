"""Quantized graphs are refused, wherever their nodes are (a dequantized table seeds no width at
all): widening integer weights would need their scales and zero points re-derived per copied unit,
and widening first then quantizing gives the same model with the quantizer's own choices."""
from onnx_widen.match import OpPattern

WHY = "quantized weights: widen the float model, then quantize it again (onnxruntime.quantization)"

STANDARD = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul",
            "QLinearConv")
CONTRIB = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4",
           "GatherBlockQuantized", "QAttention", "QEmbedLayerNormalization", "QGemm", "DynamicQuantizeLSTM",
           "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearConcat", "QLinearWhere",
           "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearReduceMean", "QLinearConvTranspose",
           "QOrderedMatMul", "QOrderedLayerNormalization", "QOrderedGelu", "QOrderedAttention", "QOrderedLongformerAttention")


def refuse(an, node):
    an.claims.pop(an.name(node), None)  # not covered: listed with the reason instead
    an.uncovered.append((node, WHY))


PATTERNS = [
    OpPattern("quantized", STANDARD, refuse, seed=True),
    OpPattern("quantized", CONTRIB, refuse, seed=True, domain="com.microsoft"),
]
