#!/usr/bin/env python
"""Generate the small sample ONNX exports (+ native-wide skeletons) used by onnx-widen's tests.

For every sample this script

1. builds a tiny Hugging Face model from a config (no pretrained weights), seeds it, and
   perturbs *every* parameter so that no bias is zero, no LayerNorm gamma is one, and no two
   parameter tensors are equal (weight tying is kept: tied tensors are the same Parameter);
2. exports it with the TorchScript exporter (opset 17, dynamic ``batch``/``sequence`` axes,
   suffix ``_ts17``; BERT also opset 14, ``_ts14``) and/or the dynamo exporter (opset 18,
   static batch 2 x sequence 8, suffix ``_dyn18``);
3. exports the native wide configs (hidden and intermediate size times K, K = 2, 3) of the
   same architecture with the same exporter/settings and stores them as *skeletons*: every
   tensor with more than 64 elements keeps name/dtype/dims but loses its data;
4. checks that small and wide exports have the same op multiset, verifies each small export
   with onnxruntime against PyTorch on random inputs (with padding), and checks skeletons load;
5. writes ``manifest.json``.

Usage::

    python sample_models/make_samples.py [--out sample_models] [--only NAME_OR_ARCH ...]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from torch import nn

SKELETON_MAX_KEEP = 64  # tensors with more elements than this lose their data in skeletons
WIDE_FACTORS = (2, 3)
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8
TOL = 1e-3  # max abs error accepted between onnxruntime and torch

# ---------------------------------------------------------------------------------------------
# Configs. Base sizes: hidden 64, 4 heads, intermediate 256, 2 layers, vocab 160, positions 144.
#
# Why vocab 160 and max_position_embeddings 144 (not 128/64): the dynamo exporter's optimizer
# (onnxscript constant folding, input_size_limit = 8192 elements) folds
#   * Gather(position_embeddings, constant position_ids) when the table has <= 8192 elements
#     (static shapes make the position ids a constant) -> needs max_pos * hidden > 8192;
#   * Transpose(word_embeddings) feeding the tied MLM decoder (the table has two consumers, so
#     the "always fold single-use Transpose" rule does not apply) -> needs vocab * hidden > 8192.
# With both tables > 8192 elements at hidden 64, small and K=2/3 wide exports fold the same way.
# Single-use Transpose(weight) of every nn.Linear is always folded regardless of size, so
# hidden 64 itself is fine. All small dims are distinct (2, 4, 8, 16, 64, 144, 160, 256) so a
# dimension value identifies its role unambiguously.
# ---------------------------------------------------------------------------------------------
HIDDEN, HEADS, INTER, LAYERS, VOCAB, MAXPOS = 64, 4, 256, 2, 160, 144

NOTES = (
    "Config (all archs): hidden 64, 4 heads (head dim 16), intermediate 256, 2 layers, vocab 160, "
    "max_position_embeddings 144, float32; wide K: hidden and intermediate (ELECTRA also "
    "embedding_size) times K, all else kept. vocab*hidden = 10240 and max_pos*hidden = 9216 exceed "
    "the onnxscript constant-folding input_size_limit (8192), so the dynamo optimizer folds neither "
    "Gather(position_embeddings, const position_ids) nor Transpose(tied word embeddings) in the "
    "small model, like in the wide ones (with vocab 128 / max_pos 64 they fold in the small model "
    "but not in all wide ones); op multisets of small/wide2/wide3 are asserted equal. Known difference (sdpa + dynamo "
    "only, see wide_structure_diffs): with head dim 16 the SDPA factor sqrt(1/sqrt(16)) = 0.5 "
    "(applied to both Q and K) equals GELU's 0.5, so the exporter shares ONE scalar initializer "
    "between the attention-scale Muls and the GELU Muls; wide exports have a separate one. "
    "TorchScript: Linear weights are pre-transposed [in, out] initializers named onnx::MatMul_N; "
    "the tied MLM decoder gets its own transposed [hidden, vocab] copy next to word_embeddings "
    "(tying not visible in the graph). Dynamo: one tied initializer (named after the decoder "
    "weight) feeds Gather and Transpose->MatMul; Linear weights are pre-transposed initializers "
    "named val_N. RoBERTa/XLM-R/DistilBERT take no token_type_ids input (optimum convention). "
    "dyn18 files have the pkg.torch.onnx.stack_trace node metadata removed (machine paths, size); "
    "skeletons drop all node metadata_props and the data of every tensor with > 64 elements."
)


def _bert_cfg(attn: str, k: int = 1):
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN * k, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTER * k, max_position_embeddings=MAXPOS,
        type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation=attn,
    )


def _roberta_cfg(attn: str, k: int = 1):
    return transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN * k, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTER * k, max_position_embeddings=MAXPOS,
        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_act="gelu",
        layer_norm_eps=1e-5, attn_implementation=attn,
    )


def _xlmr_cfg(attn: str, k: int = 1):
    return transformers.XLMRobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN * k, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTER * k, max_position_embeddings=MAXPOS,
        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_act="gelu",
        layer_norm_eps=1e-5, num_labels=2, attn_implementation=attn,
    )


def _distilbert_cfg(attn: str, k: int = 1):
    return transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN * k, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTER * k,
        max_position_embeddings=MAXPOS, activation="gelu", num_labels=3, pad_token_id=0,
        attn_implementation=attn,
    )


def _electra_cfg(attn: str, k: int = 1):
    return transformers.ElectraConfig(
        vocab_size=VOCAB, embedding_size=HIDDEN * k, hidden_size=HIDDEN * k,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTER * k,
        max_position_embeddings=MAXPOS, type_vocab_size=2, hidden_act="gelu",
        layer_norm_eps=1e-12, attn_implementation=attn,
    )


# ---------------------------------------------------------------------------------------------
# Wrappers: positional inputs in a fixed order, plain tuple outputs.
# ---------------------------------------------------------------------------------------------
class BertPreTrainingWrapper(nn.Module):
    """Returns (prediction_logits, seq_relationship_logits, last_hidden_state)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model.bert(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids, return_dict=True)
        seq = out.last_hidden_state
        prediction_logits, seq_relationship_logits = self.model.cls(seq, out.pooler_output)
        return prediction_logits, seq_relationship_logits, seq


class LogitsWrapper(nn.Module):
    """Calls the HF model with keyword inputs and returns ``.logits``."""

    def __init__(self, model, input_names):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *inputs):
        kwargs = dict(zip(self.input_names, inputs))
        return self.model(**kwargs, return_dict=True).logits


@dataclass
class Arch:
    arch: str
    hf_class: str
    make_config: Callable
    inputs: list
    outputs: list  # output names
    output_axes: dict  # output name -> {axis: name} for TorchScript dynamic axes
    wrap: Callable
    seed: int
    hidden_state_outputs: list = field(default_factory=list)
    tied: list = field(default_factory=list)  # (param_a, param_b) that must stay tied
    pad_token_id: int | None = None
    variants: list = field(default_factory=list)  # (sample name, attn impl, exporter, opset)


BSQ = {0: "batch", 1: "sequence"}
B = {0: "batch"}


def _variants(prefix, attn="sdpa", extra=()):
    v = [(f"{prefix}_ts17", attn, "torchscript", 17), (f"{prefix}_dyn18", attn, "dynamo", 18)]
    return v + list(extra)


ARCHS = [
    Arch(
        arch="bert", hf_class="BertForPreTraining", make_config=_bert_cfg,
        inputs=["input_ids", "attention_mask", "token_type_ids"],
        outputs=["prediction_logits", "seq_relationship_logits", "last_hidden_state"],
        output_axes={"prediction_logits": BSQ, "seq_relationship_logits": B,
                     "last_hidden_state": BSQ},
        wrap=lambda m, names: BertPreTrainingWrapper(m), seed=1001,
        hidden_state_outputs=["last_hidden_state"],
        tied=[("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
              ("cls.predictions.bias", "cls.predictions.decoder.bias")],
        variants=_variants("bert", "sdpa", [("bert_ts14", "sdpa", "torchscript", 14)])
        + _variants("bert_eager", "eager"),
    ),
    Arch(
        arch="roberta", hf_class="RobertaForMaskedLM", make_config=_roberta_cfg,
        inputs=["input_ids", "attention_mask"], outputs=["logits"],
        output_axes={"logits": BSQ}, wrap=lambda m, names: LogitsWrapper(m, names), seed=1002,
        tied=[("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight"),
              ("lm_head.bias", "lm_head.decoder.bias")],
        pad_token_id=1, variants=_variants("roberta"),
    ),
    Arch(
        arch="distilbert", hf_class="DistilBertForSequenceClassification",
        make_config=_distilbert_cfg, inputs=["input_ids", "attention_mask"], outputs=["logits"],
        output_axes={"logits": B}, wrap=lambda m, names: LogitsWrapper(m, names), seed=1003,
        pad_token_id=0, variants=_variants("distilbert"),
    ),
    Arch(
        arch="electra", hf_class="ElectraForPreTraining", make_config=_electra_cfg,
        inputs=["input_ids", "attention_mask", "token_type_ids"], outputs=["logits"],
        output_axes={"logits": BSQ}, wrap=lambda m, names: LogitsWrapper(m, names), seed=1004,
        pad_token_id=0, variants=_variants("electra"),
    ),
    Arch(
        arch="xlmr", hf_class="XLMRobertaForSequenceClassification", make_config=_xlmr_cfg,
        inputs=["input_ids", "attention_mask"], outputs=["logits"],
        output_axes={"logits": B}, wrap=lambda m, names: LogitsWrapper(m, names), seed=1005,
        pad_token_id=1, variants=_variants("xlmr"),
    ),
]


# ---------------------------------------------------------------------------------------------
# Model construction and perturbation
# ---------------------------------------------------------------------------------------------
def perturb_parameters(model: nn.Module, seed: int) -> None:
    """Overwrite every (deduplicated) parameter with non-trivial values.

    biases ~ N(0, 0.1); LayerNorm gammas ~ 1 + N(0, 0.2); everything else ~ N(0, 0.05).
    Tied parameters are one Parameter object, which ``named_parameters`` yields once, so tying
    is preserved. Fails if any parameter still equals its init or two parameters are equal.
    """
    gen = torch.Generator().manual_seed(seed)
    owner = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), (mod, p_name))
    seen = {}
    with torch.no_grad():
        for name, p in model.named_parameters():  # remove_duplicate=True -> tied once
            init = p.detach().clone()
            mod, leaf = owner[id(p)]
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if isinstance(mod, nn.LayerNorm) and leaf == "weight":
                new = 1.0 + 0.2 * noise
            elif leaf == "bias" or name.endswith("bias"):
                new = 0.1 * noise
            else:
                new = 0.05 * noise
            p.copy_(new.to(p.dtype))
            if torch.equal(p, init):
                raise RuntimeError(f"parameter {name} unchanged by perturbation")
            key = (p.dtype, tuple(p.shape), p.detach().numpy().tobytes())
            if key in seen:
                raise RuntimeError(f"parameters {seen[key]} and {name} are equal")
            seen[key] = name


def build_model(a: Arch, attn: str, k: int):
    cfg = a.make_config(attn, k)
    torch.manual_seed(a.seed + 100 * k)
    model = getattr(transformers, a.hf_class)(cfg)
    model.eval()
    perturb_parameters(model, a.seed + 100 * k + 7)
    params = dict(model.named_parameters(remove_duplicate=False))
    for x, y in a.tied:
        if params[x] is not params[y]:
            raise RuntimeError(f"{a.arch}: {x} and {y} are not tied")
    if model.config._attn_implementation != attn:
        raise RuntimeError(f"attn_implementation {model.config._attn_implementation} != {attn}")
    wrapper = a.wrap(model, a.inputs).eval()
    return cfg, model, wrapper


def make_inputs(a: Arch, batch: int, seq: int, seed: int, pad: bool):
    """ids in vocab (avoiding pad id), attention mask of ones, or with padded tails if pad."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen, dtype=torch.long)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        for b in range(1, batch):
            n_pad = min(seq - 1, b * 2 + 1)
            mask[b, seq - n_pad:] = 0
            if a.pad_token_id is not None:
                ids[b, seq - n_pad:] = a.pad_token_id
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in a.inputs:
        tt = torch.zeros(batch, seq, dtype=torch.long)
        tt[:, seq // 2:] = 1
        feeds["token_type_ids"] = tt
    return tuple(feeds[n] for n in a.inputs)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _drop_node_metadata(g: onnx.GraphProto, keys: set | None) -> None:
    """Remove node metadata_props whose key is in ``keys`` (all of them if keys is None)."""
    for n in g.node:
        keep = [] if keys is None else [(p.key, p.value) for p in n.metadata_props
                                         if p.key not in keys]
        if len(keep) != len(n.metadata_props):
            n.ClearField("metadata_props")
            for k, v in keep:
                n.metadata_props.add(key=k, value=v)
        for at in n.attribute:
            if at.type == onnx.AttributeProto.GRAPH:
                _drop_node_metadata(at.g, keys)
            for sg in at.graphs:
                _drop_node_metadata(sg, keys)


def export(a: Arch, wrapper: nn.Module, exporter: str, opset: int, path: str, log: list,
           keep_stack_traces: bool = False):
    args = make_inputs(a, EXAMPLE_BATCH, EXAMPLE_SEQ, seed=0, pad=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            if exporter == "torchscript":
                axes = {n: dict(BSQ) for n in a.inputs}
                axes.update({n: dict(a.output_axes[n]) for n in a.outputs})
                torch.onnx.export(
                    wrapper, args, path, dynamo=False, opset_version=opset,
                    input_names=a.inputs, output_names=a.outputs, dynamic_axes=axes,
                    do_constant_folding=True,
                )
            else:
                prog = torch.onnx.export(
                    wrapper, args, dynamo=True, opset_version=opset, input_names=a.inputs,
                    output_names=a.outputs, verbose=False, optimize=True,
                )
                prog.save(path, external_data=False)
    if exporter == "dynamo" and not keep_stack_traces:
        # Drop the per-node ``pkg.torch.onnx.stack_trace`` annotations (about half the node
        # metadata; they embed absolute file paths of the generating machine). The other node
        # metadata (namespace, class_hierarchy, fx_node, name_scopes) is kept as exported.
        m = onnx.load(path)
        _drop_node_metadata(m.graph, {"pkg.torch.onnx.stack_trace"})
        onnx.save(m, path)
    for w in caught:
        where = os.path.basename(os.path.dirname(w.filename)) + "/" + os.path.basename(w.filename)
        msg = f"{w.category.__name__} ({where}:{w.lineno}): {str(w.message).splitlines()[0][:160]}"
        if msg not in log:
            log.append(msg)
    return onnx.load(path)


def op_multiset(model: onnx.ModelProto) -> collections.Counter:
    c = collections.Counter()

    def walk(g):
        for n in g.node:
            c[(n.domain or "ai.onnx", n.op_type)] += 1
            for at in n.attribute:
                if at.type == onnx.AttributeProto.GRAPH:
                    walk(at.g)
                for sg in at.graphs:
                    walk(sg)

    walk(model.graph)
    return c


def _numel(t: onnx.TensorProto) -> int:
    return int(math.prod(t.dims)) if len(t.dims) else 1


_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data",
                "double_data", "uint64_data")


def _strip(t: onnx.TensorProto) -> bool:
    if _numel(t) <= SKELETON_MAX_KEEP:
        return False
    for f in _DATA_FIELDS:
        t.ClearField(f)
    return True


def skeletonize(model: onnx.ModelProto, keep_node_metadata: bool = False
                ) -> tuple[onnx.ModelProto, int]:
    """Copy of ``model`` with the data of every tensor of > 64 elements removed.

    Unless ``keep_node_metadata``, node-level ``metadata_props`` (the dynamo exporter's
    ``pkg.torch.onnx.stack_trace``/``namespace``/... annotations, ~2/3 of a skeleton's bytes,
    irrelevant to structure comparison) are dropped too. Everything else is kept as exported.
    """
    m = copy.deepcopy(model)
    stripped = 0

    def walk(g):
        nonlocal stripped
        if not keep_node_metadata:
            _drop_node_metadata(g, None)
        for init in g.initializer:
            stripped += _strip(init)
        for sp in g.sparse_initializer:
            stripped += _strip(sp.values)
        for n in g.node:
            for at in n.attribute:
                if at.type == onnx.AttributeProto.TENSOR:
                    stripped += _strip(at.t)
                for t in at.tensors:
                    stripped += _strip(t)
                if at.type == onnx.AttributeProto.GRAPH:
                    walk(at.g)
                for sg in at.graphs:
                    walk(sg)

    walk(m.graph)
    for p in m.metadata_props:
        if p.key == "onnx_widen.skeleton":
            break
    else:
        m.metadata_props.add(key="onnx_widen.skeleton", value="1")
    return m, stripped


def verify(a: Arch, wrapper: nn.Module, path: str, dynamic: bool) -> float:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got_in = [i.name for i in sess.get_inputs()]
    got_out = [o.name for o in sess.get_outputs()]
    if got_in != a.inputs or got_out != a.outputs:
        raise RuntimeError(f"{path}: graph signature {got_in} -> {got_out}")
    shapes = [(EXAMPLE_BATCH, EXAMPLE_SEQ)]
    if dynamic:
        shapes += [(3, 13), (1, 5)]
    worst = 0.0
    for i, (b, s) in enumerate(shapes):
        for pad in (False, True):
            args = make_inputs(a, b, s, seed=1234 + i * 10 + pad, pad=pad)
            with torch.no_grad():
                ref = wrapper(*args)
            if isinstance(ref, torch.Tensor):
                ref = (ref,)
            outs = sess.run(None, {n: t.numpy() for n, t in zip(a.inputs, args)})
            for name, r, o in zip(a.outputs, ref, outs):
                if tuple(r.shape) != o.shape:
                    raise RuntimeError(f"{path}: {name} shape {o.shape} != torch {tuple(r.shape)}")
                err = float(np.max(np.abs(r.numpy() - o)))
                worst = max(worst, err)
    if not worst < TOL:
        raise RuntimeError(f"{path}: max abs err vs torch {worst:g} >= {TOL}")
    return worst


def config_summary(cfg) -> dict:
    d = {
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": getattr(cfg, "intermediate_size", getattr(cfg, "hidden_dim", None)),
        "num_hidden_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        # DistilBERT hard-codes LayerNorm eps=1e-12
        "layer_norm_eps": getattr(cfg, "layer_norm_eps", 1e-12),
        "max_position_embeddings": cfg.max_position_embeddings,
    }
    for k in ("type_vocab_size", "embedding_size", "pad_token_id"):
        if getattr(cfg, k, None) is not None:
            d[k] = getattr(cfg, k)
    d["hidden_act"] = getattr(cfg, "hidden_act", getattr(cfg, "activation", None))
    return d


def fmt_ops(c: collections.Counter) -> str:
    return ", ".join(f"{op}:{n}" for (dom, op), n in sorted(c.items(), key=lambda x: x[0][1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--only", nargs="*", default=None,
                    help="sample names (e.g. bert_ts17) or archs (e.g. bert) to (re)generate")
    ap.add_argument("--keep-node-metadata", action="store_true",
                    help="keep node metadata_props (dynamo stack traces etc.) in skeletons")
    ap.add_argument("--keep-stack-traces", action="store_true",
                    help="keep the dynamo exporter's pkg.torch.onnx.stack_trace node metadata")
    ns = ap.parse_args(argv)
    out = os.path.abspath(ns.out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))

    manifest_path = os.path.join(out, "manifest.json")
    entries = {}
    if ns.only and os.path.exists(manifest_path):
        with open(manifest_path) as f:
            for e in json.load(f):
                entries[e["name"]] = e

    todo = []
    for a in ARCHS:
        for (name, attn, exporter, opset) in a.variants:
            if ns.only and name not in ns.only and a.arch not in ns.only:
                continue
            todo.append((a, name, attn, exporter, opset))
    if ns.only and not todo:
        sys.exit(f"--only {ns.only} matched no sample")

    failures = []
    for a, name, attn, exporter, opset in todo:
        print(f"=== {name} ({a.hf_class}, {exporter}, opset {opset}, attn {attn})", flush=True)
        d = os.path.join(out, a.arch)
        os.makedirs(d, exist_ok=True)
        log: list = []
        rel = f"{a.arch}/{name}.onnx"
        cfg, model, wrapper = build_model(a, attn, 1)
        small = export(a, wrapper, exporter, opset, os.path.join(out, rel), log,
                       ns.keep_stack_traces)
        small_ops = op_multiset(small)
        err = verify(a, wrapper, os.path.join(out, rel), dynamic=(exporter == "torchscript"))
        print(f"  small: {len(small.graph.node)} nodes, {len(small.graph.initializer)} inits, "
              f"{os.path.getsize(os.path.join(out, rel)) / 1024:.0f} KiB, "
              f"max abs err vs torch {err:.3g}")
        print(f"  ops: {fmt_ops(small_ops)}")
        wide = {}
        wide_cfgs = {}
        diffs = {}
        for k in WIDE_FACTORS:
            wcfg, _, wwrapper = build_model(a, attn, k)
            with tempfile.TemporaryDirectory() as td:
                full = export(a, wwrapper, exporter, opset, os.path.join(td, "w.onnx"), log,
                              ns.keep_stack_traces)
            skel, n_stripped = skeletonize(full, keep_node_metadata=ns.keep_node_metadata)
            wrel = f"{a.arch}/{name}_wide{k}.skel.onnx"
            onnx.save(skel, os.path.join(out, wrel))
            onnx.load(os.path.join(out, wrel))  # must load
            wops = op_multiset(full)
            if wops != small_ops:
                failures.append(name)
                print(f"  !! op multiset of wide{k} differs from small: "
                      f"small-only {dict(small_ops - wops)} wide-only {dict(wops - small_ops)}",
                      file=sys.stderr)
            sd = {i.name: list(i.dims) for i in small.graph.initializer}
            wd = {i.name: list(i.dims) for i in full.graph.initializer}
            diff = {}
            if sd.keys() - wd.keys():
                diff["initializers_only_in_small"] = {n: sd[n] for n in sorted(sd.keys() - wd.keys())}
            if wd.keys() - sd.keys():
                diff["initializers_only_in_wide"] = {n: wd[n] for n in sorted(wd.keys() - sd.keys())}
            if diff:
                diffs[str(k)] = diff
                print(f"  note: initializers differ small vs wide{k}: {diff}")
            print(f"  wide{k}: {n_stripped} tensors stripped, "
                  f"{os.path.getsize(os.path.join(out, wrel)) / 1024:.0f} KiB")
            wide[str(k)] = wrel
            wide_cfgs[str(k)] = config_summary(wcfg)
        for msg in log:
            print(f"  warning: {msg}")
        summ = config_summary(cfg)
        if a.hf_class.endswith("SequenceClassification"):
            summ["num_labels"] = cfg.num_labels
        for kk, wc in wide_cfgs.items():
            if "num_labels" in summ:
                wc["num_labels"] = summ["num_labels"]
        entries[name] = {
            "name": name,
            "path": rel,
            "arch": a.arch,
            "hf_class": a.hf_class,
            "exporter": exporter,
            "opset": opset,
            "dynamic": exporter == "torchscript",
            "example_shape": [EXAMPLE_BATCH, EXAMPLE_SEQ],
            "attn_implementation": attn,
            "config": summ,
            "inputs": list(a.inputs),
            "outputs": list(a.outputs),
            "wide": wide,
            "wide_configs": wide_cfgs,
            "wide_structure_diffs": diffs,
            "hidden_state_outputs": list(a.hidden_state_outputs),
            "tied_parameters": [list(t) for t in a.tied],
            "seed": a.seed,
            "torch_max_abs_err": err,
            "num_nodes": len(small.graph.node),
            "op_counts": {op: n for (dom, op), n in sorted(small_ops.items())},
            "export_warnings": log,
            "notes": NOTES,
        }

    order = [v[0] for a in ARCHS for v in a.variants]
    result = [entries[n] for n in order if n in entries]
    result += [e for n, e in entries.items() if n not in order]
    with open(manifest_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {manifest_path} ({len(result)} entries)")
    if failures:
        sys.exit(f"FAILED: small and wide op multisets differ for {failures}")


if __name__ == "__main__":
    main()
