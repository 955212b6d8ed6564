"""Synthetic Transformer exports of any size, built with onnx.helper and numpy (no torch), with
their weights streamed to one external data file as they are drawn (a 1B-parameter model is
never in memory whole).

- `bert`: post-norm encoder as the TorchScript exporter writes BERT (LayerNormalization, biases,
  erf GELU, softmax scale as Mul, dynamic batch and sequence), MLM head on the word embeddings'
  transpose.
- `llama`: pre-norm decoder as HF LLaMA exports (decomposed RMSNorm, rotate_half RoPE from an
  inv_freq constant, SwiGLU, no biases, untied LM head).

    python benchmarks/synth.py llama --hidden 2048 --layers 22 --ffn 5632 --heads 32 --vocab 32000 -o /tmp/llama1b.onnx
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from onnx import TensorProto, helper, numpy_helper

# Presets: (hidden, layers, ffn, heads, vocab). "1b" is TinyLlama's shape without GQA (1.26B parameters),
# "100m" BERT-base's (110M).
PRESETS = {
    ("llama", "100m"): (768, 12, 2048, 12, 32000),
    ("llama", "1b"): (2048, 22, 5632, 32, 32000),
    ("bert", "100m"): (768, 12, 3072, 12, 30522),
    ("bert", "1b"): (2048, 20, 8192, 16, 30522),
}


class Weights:
    """Initializers drawn one at a time and appended to a data file (or kept inline when small)."""

    def __init__(self, data_path: str | None, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.data_path = data_path
        self.file = open(data_path, "wb") if data_path else None
        self.inits: list = []
        self.names: set = set()
        self.params = 0

    def add(self, name: str, arr: np.ndarray) -> str:
        if name in self.names:
            return name
        self.names.add(name)
        arr = np.ascontiguousarray(arr)
        if self.file is None or arr.nbytes < 1024:
            self.inits.append(numpy_helper.from_array(arr, name))
        else:
            offset = self.file.tell()
            pad = (-offset) % 4096
            self.file.write(bytes(pad))
            arr.tofile(self.file)
            t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", os.path.basename(self.data_path)), ("offset", str(offset + pad)), ("length", str(arr.nbytes))):
                t.external_data.add(key=k, value=v)
            self.inits.append(t)
        if arr.dtype.kind == "f":
            self.params += arr.size
        return name

    def normal(self, name, *shape, std=0.02, mean=0.0) -> str:
        if name in self.names:
            return name
        arr = self.rng.standard_normal(shape, dtype=np.float32)
        arr *= np.float32(std)
        arr += np.float32(mean)
        return self.add(name, arr)

    def close(self):
        if self.file:
            self.file.close()


class Builder:
    def __init__(self, w: Weights):
        self.w = w
        self.nodes: list = []

    def node(self, op, ins, out, **kw) -> str:
        self.nodes.append(helper.make_node(op, ins, [out], name=f"/{out}", **kw))
        return out

    def const(self, name, value, dtype=np.int64) -> str:
        return self.w.add(name, np.asarray(value, dtype=dtype))

    def linear(self, x, din, dout, name, bias=True) -> str:
        y = self.node("MatMul", [x, self.w.normal(f"{name}.weight", din, dout, std=din ** -0.5)], f"{name}/MatMul")
        if bias:
            y = self.node("Add", [self.w.normal(f"{name}.bias", dout, std=0.02), y], f"{name}/Add")
        return y

    def heads(self, x, shape, name, perm=(0, 2, 1, 3)) -> str:
        return self.node("Transpose", [self.node("Reshape", [x, shape], f"{name}/Reshape")], f"{name}/Transpose", perm=list(perm))

    def attention(self, q, k, v, dh, name) -> str:
        kt = self.node("Transpose", [k], f"{name}/Transpose_k", perm=[0, 1, 3, 2])
        s = self.node("MatMul", [q, kt], f"{name}/scores")
        s = self.node("Mul", [s, self.const("attn_scale", dh ** -0.5, np.float32)], f"{name}/scaled")
        p = self.node("Softmax", [s], f"{name}/Softmax", axis=-1)
        ctx = self.node("Transpose", [self.node("MatMul", [p, v], f"{name}/ctx")], f"{name}/ctx_t", perm=[0, 2, 1, 3])
        return self.node("Reshape", [ctx, self.const("merge_shape", [0, 0, -1])], f"{name}/merged")


def bert(b: Builder, d, layers, ffn, heads, vocab):
    w = b.w
    dh = d // heads
    split = b.const("split_shape", [0, 0, heads, dh])

    def layernorm(x, name):
        g = w.normal(f"{name}.weight", d, std=0.1, mean=1.0)
        return b.node("LayerNormalization", [x, g, w.normal(f"{name}.bias", d, std=0.1)], f"{name}/LayerNorm", axis=-1, epsilon=1e-12)

    word = w.normal("embeddings.word_embeddings.weight", vocab, d, std=1.0)
    x = b.node("Gather", [word, "input_ids"], "embeddings/word")
    x = b.node("Add", [x, b.node("Gather", [w.normal("embeddings.position_embeddings.weight", 512, d), "position_ids"], "embeddings/pos")],
               "embeddings/sum")
    x = layernorm(x, "embeddings.LayerNorm")
    for i in range(layers):
        n = f"encoder.layer.{i}"
        q, k, v = (b.heads(b.linear(x, d, d, f"{n}.attention.self.{p}"), split, f"{n}/{p}") for p in ("query", "key", "value"))
        o = b.linear(b.attention(q, k, v, dh, f"{n}/attn"), d, d, f"{n}.attention.output.dense")
        x = layernorm(b.node("Add", [o, x], f"{n}/res1"), f"{n}.attention.output.LayerNorm")
        up = b.linear(x, d, ffn, f"{n}.intermediate.dense")
        e = b.node("Erf", [b.node("Div", [up, b.const("sqrt2", np.sqrt(2.0), np.float32)], f"{n}/gelu/Div")], f"{n}/gelu/Erf")
        g = b.node("Mul", [b.node("Mul", [up, b.node("Add", [e, b.const("one", 1.0, np.float32)], f"{n}/gelu/Add")], f"{n}/gelu/Mul"),
                           b.const("half", 0.5, np.float32)], f"{n}/gelu/out")
        x = layernorm(b.node("Add", [b.linear(g, ffn, d, f"{n}.output.dense"), x], f"{n}/res2"), f"{n}.output.LayerNorm")
    head = b.node("Transpose", [word], "cls/decoder_weight", perm=[1, 0])
    logits = b.node("Add", [b.node("MatMul", [x, head], "cls/MatMul"), w.normal("cls.predictions.bias", vocab)], "logits")
    return ["input_ids", "position_ids"], [logits]


def llama(b: Builder, d, layers, ffn, heads, vocab):
    w = b.w
    dh = d // heads
    split = b.const("split_shape", [0, 0, heads, dh])

    def rmsnorm(x, name):
        sq = b.node("Pow", [x, b.const("two", 2.0, np.float32)], f"{name}/Pow")
        ms = b.node("ReduceMean", [sq], f"{name}/ReduceMean", axes=[-1], keepdims=1)
        r = b.node("Sqrt", [b.node("Add", [ms, b.const("rms_eps", 1e-5, np.float32)], f"{name}/Add")], f"{name}/Sqrt")
        inv = b.node("Div", [b.const("one", 1.0, np.float32), r], f"{name}/Div")
        return b.node("Mul", [w.normal(f"{name}.weight", d, std=0.1, mean=1.0), b.node("Mul", [x, inv], f"{name}/Mul")], f"{name}/out")

    # Rotary tables from inv_freq, as the export computes them: positions x inv_freq, [f | f].
    inv_freq = (10000.0 ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)).astype(np.float32)
    pos = b.node("Cast", [b.node("Unsqueeze", ["position_ids", b.const("axis2", [2])], "rotary/Unsqueeze")], "rotary/Cast", to=TensorProto.FLOAT)
    f = b.node("Mul", [pos, w.add("rotary.inv_freq", inv_freq)], "rotary/Mul")
    emb = b.node("Concat", [f, f], "rotary/Concat", axis=-1)
    cos = b.node("Unsqueeze", [b.node("Cos", [emb], "rotary/Cos"), b.const("axis1", [1])], "rotary/cos")
    sin = b.node("Unsqueeze", [b.node("Sin", [emb], "rotary/Sin"), b.const("axis1", [1])], "rotary/sin")

    def rope(x, name):
        x1 = b.node("Slice", [x, b.const("zero_1", [0]), b.const("half_dh", [dh // 2]), b.const("axis3", [3])], f"{name}/Slice")
        x2 = b.node("Slice", [x, b.const("half_dh", [dh // 2]), b.const("int_max", [2**62]), b.const("axis3", [3])], f"{name}/Slice_1")
        rot = b.node("Concat", [b.node("Neg", [x2], f"{name}/Neg"), x1], f"{name}/Concat", axis=-1)
        return b.node("Add", [b.node("Mul", [x, cos], f"{name}/Mul"), b.node("Mul", [rot, sin], f"{name}/Mul_1")], f"{name}/Add")

    x = b.node("Gather", [w.normal("model.embed_tokens.weight", vocab, d, std=1.0), "input_ids"], "embed_tokens")
    for i in range(layers):
        n = f"model.layers.{i}"
        h = rmsnorm(x, f"{n}.input_layernorm")
        q, k, v = (b.heads(b.linear(h, d, d, f"{n}.self_attn.{p}_proj", bias=False), split, f"{n}/{p}") for p in "qkv")
        o = b.linear(b.attention(rope(q, f"{n}/rope_q"), rope(k, f"{n}/rope_k"), v, dh, f"{n}/attn"), d, d, f"{n}.self_attn.o_proj", bias=False)
        x = b.node("Add", [x, o], f"{n}/res1")
        h = rmsnorm(x, f"{n}.post_attention_layernorm")
        gate = b.linear(h, d, ffn, f"{n}.mlp.gate_proj", bias=False)
        act = b.node("Mul", [gate, b.node("Sigmoid", [gate], f"{n}/mlp/Sigmoid")], f"{n}/mlp/silu")
        prod = b.node("Mul", [act, b.linear(h, d, ffn, f"{n}.mlp.up_proj", bias=False)], f"{n}/mlp/Mul")
        x = b.node("Add", [x, b.linear(prod, ffn, d, f"{n}.mlp.down_proj", bias=False)], f"{n}/res2")
    logits = b.linear(rmsnorm(x, "model.norm"), d, vocab, "lm_head", bias=False)
    return ["input_ids", "position_ids"], [logits]


FAMILIES = {"bert": bert, "llama": llama}


def build(family: str, out: str, hidden: int, layers: int, ffn: int, heads: int, vocab: int, seed: int = 0,
          external: bool = True) -> int:
    """Write the model to `out` (weights in OUT.data when external); returns the parameter count."""
    w = Weights(out + ".data" if external else None, seed)
    b = Builder(w)
    try:
        inputs, outputs = FAMILIES[family](b, hidden, layers, ffn, heads, vocab)
    finally:
        w.close()
    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        b.nodes, f"synthetic_{family}",
        [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims + [vocab]) for n in outputs],
        initializer=w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx-widen synth")
    model.ir_version = 8
    with open(out, "wb") as f:
        f.write(model.SerializeToString())
    return w.params


SHAPE_ARGS = ("hidden", "layers", "ffn", "heads", "vocab")


def add_shape_args(ap, hidden=256, layers=2, ffn=1024, heads=4, vocab=1000):
    """--size (a preset) or --hidden/--layers/--ffn/--heads/--vocab: read back with `shape_of`."""
    ap.add_argument("--size", choices=["100m", "1b"], default=None, help="a preset shape (else --hidden etc.)")
    for name, default in zip(SHAPE_ARGS, (hidden, layers, ffn, heads, vocab)):
        ap.add_argument(f"--{name}", type=int, default=default)


def shape_of(a, family) -> tuple:
    return PRESETS[(family, a.size)] if a.size else tuple(getattr(a, n) for n in SHAPE_ARGS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("-o", "--output", required=True)
    add_shape_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    params = build(a.family, a.output, *shape_of(a, a.family), seed=a.seed)
    print(f"{a.output}: {params:,} parameters")


if __name__ == "__main__":
    main()
