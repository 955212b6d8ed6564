"""Activations. A non-linearity f needs its input at scale 1 unless f(c x) = c f(x)
(WIDENING.md, Linear layer): the first group pins input and output scales to 1, the second
passes the scale through. Elementwise, so width axes pass unchanged. GELU and SiLU, which
exporters decompose, are recognised for the report."""
from onnx_widen import dims as D
from onnx_widen.match import OpPattern, const_source, width_param_axes
from onnx_widen.recognize import chain_from

# f(c x) != c f(x): input must arrive at scale 1.
NONLINEAR = ("Erf", "Tanh", "Sigmoid", "Exp", "Log", "Softplus", "Softsign", "Gelu", "FastGelu", "Elu", "Selu", "Celu",
             "Mish", "HardSigmoid", "HardSwish", "Sin", "Cos", "Swish", "QuickGelu")
# Positively homogeneous of degree 1: f(c x) = c f(x) for c > 0.
HOMOGENEOUS = ("Relu", "LeakyRelu", "Neg", "Abs")


def _pin(an, node, x, out, out_axes=None):
    an.set(out, an.ax(x) if out_axes is None else out_axes)
    an.scale.fix(x, an.name(node))
    an.scale.fix(out, an.name(node))


def _pass(an, node, x, out):
    an.set(out, an.ax(x))
    an.scale.equal(out, x, an.name(node))


def nonlinear(an, node):
    _pin(an, node, node.input[0], node.output[0])


def homogeneous(an, node):
    _pass(an, node, node.input[0], node.output[0])


def activate(an, node, op, x, out):
    """An activation named by an attribute (FusedGemm's `activation`), from x to out."""
    if op in NONLINEAR:
        _pin(an, node, x, out)
    elif op in HOMOGENEOUS:
        _pass(an, node, x, out)
    else:
        an.fail(node, f"activation {op!r} is not supported")


def biased_nonlinear(an, node, out_axes=None):
    """onnxruntime's BiasGelu / FastGelu(x, bias): f(x + bias), the bias at the input's scale (1).
    `out_axes`: the output's, where they are not the input's (BiasSplitGelu halves the last)."""
    x = node.input[0]
    if len(node.input) > 1 and node.input[1]:
        axes = width_param_axes(an, node.input[1], an.ax(x))
        src = const_source(an, node.input[1])
        if axes is not None:
            if src is None or src[1] is not None:
                an.fail(node, "bias must be a constant")
            an.param(src[0], node, axes, {x: 1.0}, role="bias")
    _pin(an, node, x, node.output[0], out_axes)


def split_gelu(an, node):
    """onnxruntime's BiasSplitGelu(x, bias): x + bias cut in halves a | b along the last axis,
    out = a * gelu(b). The halves are two parts of the axis that multiply unit by unit, so they
    grow alike; gelu pins b, hence x, and the product's scale to 1."""
    xa = an.ax(node.input[0])
    half = an.shape(node.input[0])[-1] // 2
    last = None
    if xa[-1] is not None:
        a, b = D.split_parts(xa[-1], [half, half], an.name(node))
        last = an.unify(a, b, node)
    biased_nonlinear(an, node, xa[:-1] + (last,))


PATTERNS = [
    OpPattern("activation", NONLINEAR, nonlinear),
    OpPattern("activation", ("FastGelu", "QuickGelu", "Gelu", "BiasGelu"), biased_nonlinear, domain="com.microsoft"),
    OpPattern("activation (split)", ("BiasSplitGelu",), split_gelu, domain="com.microsoft"),
    OpPattern("activation (homogeneous)", HOMOGENEOUS, homogeneous),
]

RECOGNIZERS = [
    chain_from("gelu (erf)", "Erf", [("Div", 0)]),
    chain_from("gelu (erf)", "Erf", [("Mul", None)]),
    chain_from("gelu (tanh)", "Tanh", [("Mul", None), ("Add", None), ("Mul", None), ("Pow", 0)]),
    chain_from("gelu (tanh)", "Tanh", [("Mul", None), ("Add", None), ("Mul", None), ("Mul", None)]),
    chain_from("silu", "Sigmoid", []),
    chain_from("tanh", "Tanh", []),
]
