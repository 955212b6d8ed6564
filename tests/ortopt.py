"""onnxruntime's deployment tools, run offline on the samples: the transformer optimizer (contrib
op fusions after an onnxruntime optimization level) and an InferenceSession that saves the graph
it optimized (FusedMatMul and friends)."""
import logging
import os
import tempfile

import onnx

# The family sweeps in test_optimized.py run with attention fusion on (Attention, MultiHeadAttention:
# patterns/fused_attention.py).
ATTENTION = True

HEADS = 4


def _tmp(suffix=".onnx"):
    fd, path = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    return path


def _as_path(model_or_path):
    if isinstance(model_or_path, onnx.ModelProto):
        path = _tmp()
        onnx.save(model_or_path, path)
        return path
    return str(model_or_path)


def optimize(model_or_path, model_type, hidden, level=0, attention=ATTENTION, embed=True, fp16=False, heads=HEADS, **options):
    """onnxruntime.transformers.optimizer with every fusion it applies to the model type (and any
    FusionOptions attribute given), saved and reloaded (saving adds the com.microsoft opset import,
    as a user's file has it)."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(model_type)
    opts.enable_attention = attention
    opts.enable_embed_layer_norm = embed
    for k, v in options.items():
        setattr(opts, k, v)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    src = _as_path(model_or_path)
    if level:
        # What optimize_model does for opt_level > 0 (an InferenceSession's graph optimizations with
        # the same optimizers disabled, then the fusions at level 0), without its torch import.
        src, level = _session_optimize(src, level, OPTIMIZER_DISABLED + (FUSION_DISABLED if level > 1 else [])), 0
    m = optimizer.optimize_model(src, model_type=model_type, num_heads=heads, hidden_size=hidden,
                                 optimization_options=opts, opt_level=level)
    if fp16:
        m.convert_float_to_float16(keep_io_types=True)
    path = _tmp()
    m.save_model_to_file(path)
    return onnx.load(path)


# onnxruntime.transformers.optimizer.optimize_model's own choices for its onnxruntime pass.
OPTIMIZER_DISABLED = ["ConstantSharing"]
FUSION_DISABLED = ["MatMulScaleFusion", "MatMulAddFusion", "MatmulTransposeFusion", "GemmActivationFusion", "BiasSoftmaxFusion"]


def _session_optimize(src: str, level, disabled=()) -> str:
    """The file an InferenceSession writes to optimized_model_filepath at an optimization level
    (1, 2, 99 or "extended", "all")."""
    import onnxruntime as ort

    levels = {1: "ORT_ENABLE_BASIC", 2: "ORT_ENABLE_EXTENDED", 99: "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[level])
    so.optimized_model_filepath = _tmp()
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"], **({"disabled_optimizers": list(disabled)} if disabled else {}))
    return so.optimized_model_filepath


def session_optimized(model_or_path, level="extended"):
    """What an InferenceSession at ORT_ENABLE_EXTENDED / ENABLE_ALL writes to optimized_model_filepath."""
    return onnx.load(_session_optimize(_as_path(model_or_path), level))


def ort_loads(model) -> bool:
    """onnxruntime 1.2x cannot reload some graphs its own level-1 optimizer wrote (it re-folds a
    constant it had already folded: 'Attempt to replace the existing tensor')."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return True
    except Exception:
        return False


def run_unoptimized(model, feeds):
    """Outputs with onnxruntime's own graph optimizations off (they are what fails to reload)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(s.get_outputs(), s.run(None, feeds))}
