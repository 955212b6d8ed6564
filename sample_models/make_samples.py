#!/usr/bin/env python
"""Generate the small sample ONNX exports (+ native-wide skeletons) used by onnx-widen's tests.

Families: BERT-style encoders (bert, roberta, distilbert, electra, xlmr), decoders (gpt2, llama,
llama_past = LLaMA step with a KV cache, qwen2, gptj) and encoder-decoders (t5, t5v11).

For every sample this script

1. builds a tiny Hugging Face model from a config (no pretrained weights), seeds it, and
   perturbs *every* parameter so that no bias is zero, no norm gamma is one, and no two
   parameter tensors are equal (weight tying is kept: tied tensors are the same Parameter);
2. exports it with the TorchScript exporter (opset 17, dynamic ``batch``/``sequence`` axes,
   suffix ``_ts17``; BERT also opset 14, ``_ts14``) and/or the dynamo exporter (opset 18,
   static batch 2 x sequence 8 -- 7 for the decoder families --, suffix ``_dyn18``);
3. exports the native wide configs (hidden, intermediate and, for decoders, head size times
   K, K = 2, 3) of the same architecture with the same exporter/settings and stores them as
   *skeletons*: every tensor with more than 64 elements keeps name/dtype/dims but loses its data;
4. checks that small and wide exports have the same op multiset, verifies each small export
   with onnxruntime against PyTorch on random inputs (with padding), and checks skeletons load;
5. writes ``manifest.json``.

Usage::

    python sample_models/make_samples.py [--out sample_models] [--only NAME_OR_ARCH ...]

e.g. only the decoder / encoder-decoder samples (existing files untouched, their manifest entries
kept and given family/rope/kv_cache/example_input_shapes)::

    python sample_models/make_samples.py --only gpt2 llama llama_past qwen2 t5 t5v11 gptj

An exporter error does not stop the run: the variant is skipped, its files removed, and the
error's first line is appended to the notes of the same arch's other entries.
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
# Decoder and encoder-decoder families. Base sizes: hidden 64, 4 heads x head dim 16, 2 layers,
# vocab 160, positions 144; LLaMA/Qwen2: GQA with 2 KV heads, intermediate 128; T5: d_ff 128,
# 8 relative-position buckets; GPT-2/GPT-J: FFN 4*hidden = 256. Wide K: hidden, FFN and head
# dim times K (GPT-J also rotary_dim), heads / KV heads / buckets / rope_theta kept.
#
# These samples use example sequence 7 (T5 decoder 5; llama_past sequence 3 + past 5), not 8:
# 8 is here a *width* dim (half the RoPE head dim 16 in the rotate_half Slice bounds, the GPT-J
# rotary_dim) and the T5 bucket count, so a static sequence 8 in the dyn18 graphs would be
# indistinguishable from them. For the same reason llama_past_dyn18 (static) uses past 6: with
# past 5 + sequence 3 = 8 the exporter shares ONE int64 constant 8 between the total-length
# shapes and the rotate_half Slice bounds in the small model only (initializer names then
# shift between small and wide exports).
# ---------------------------------------------------------------------------------------------
KV_HEADS, HEAD_DIM, DEC_INTER, T5_FF, T5_BUCKETS, GPTJ_ROTARY = 2, 16, 128, 128, 8, 8
DEC_SEQ, T5_DEC_SEQ, PAST_SEQ, PAST_LEN, PAST_LEN_STATIC = 7, 5, 3, 5, 6


def _llama_cfg(attn: str, k: int = 1):
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN * k, intermediate_size=DEC_INTER * k,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM * k, hidden_act="silu", max_position_embeddings=MAXPOS,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, use_cache=False, bos_token_id=1, eos_token_id=2,
        attn_implementation=attn,
    )


def _qwen2_cfg(attn: str, k: int = 1):
    return transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN * k, intermediate_size=DEC_INTER * k,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM * k, hidden_act="silu", max_position_embeddings=MAXPOS,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, use_sliding_window=False,
        use_cache=False, bos_token_id=1, eos_token_id=2, attn_implementation=attn,
    )


def _gpt2_cfg(attn: str, k: int = 1):
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN * k, n_layer=LAYERS, n_head=HEADS, n_inner=None,
        n_positions=MAXPOS, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        tie_word_embeddings=True, use_cache=False, bos_token_id=1, eos_token_id=2,
        attn_implementation=attn,
    )


def _gptj_cfg(attn: str, k: int = 1):
    return transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=HIDDEN * k, n_layer=LAYERS, n_head=HEADS, n_inner=None,
        rotary_dim=GPTJ_ROTARY * k, n_positions=MAXPOS, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, tie_word_embeddings=False, use_cache=False, bos_token_id=1,
        eos_token_id=2, attn_implementation=attn,
    )


def _t5_cfg(attn: str, k: int = 1, gated: bool = False):
    return transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN * k, d_kv=HEAD_DIM * k, d_ff=T5_FF * k,
        num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=HEADS,
        relative_attention_num_buckets=T5_BUCKETS, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu", layer_norm_epsilon=1e-6,
        tie_word_embeddings=not gated, use_cache=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, attn_implementation=attn,
    )


def _t5v11_cfg(attn: str, k: int = 1):
    return _t5_cfg(attn, k, gated=True)


def _untie_lm_head(model):
    """T5 v1.1 has its own LM head. transformers 5 forces ``tie_word_embeddings=True`` for T5
    (``tie_word_embeddings=False`` only turns off the d_model**-0.5 rescale, stored as
    ``scale_decoder_outputs``), so give ``lm_head`` its own Parameter before perturbing."""
    model.lm_head.weight = nn.Parameter(model.shared.weight.detach().clone())
    return model


def _rope_theta(cfg):
    rp = getattr(cfg, "rope_parameters", None) or {}
    return rp.get("rope_theta", getattr(cfg, "rope_theta", None))


def _summary(keys):
    """Config summary: the listed attributes (``rope_theta`` read from ``rope_parameters``)."""

    def f(cfg):
        d = {}
        for k in keys:
            v = _rope_theta(cfg) if k == "rope_theta" else getattr(cfg, k)
            d[k] = v
        return d

    return f


_LLAMA_KEYS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "num_hidden_layers", "vocab_size", "rms_norm_eps",
               "rope_theta", "max_position_embeddings", "hidden_act", "tie_word_embeddings",
               "attention_bias", "mlp_bias"]
_QWEN2_KEYS = [k for k in _LLAMA_KEYS if k not in ("attention_bias", "mlp_bias")]
_GPT2_KEYS = ["n_embd", "n_head", "n_inner", "n_layer", "vocab_size", "layer_norm_epsilon",
              "n_positions", "activation_function", "tie_word_embeddings"]
_GPTJ_KEYS = _GPT2_KEYS[:-1] + ["rotary_dim", "tie_word_embeddings"]
_T5_KEYS = ["d_model", "num_heads", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
            "vocab_size", "layer_norm_epsilon", "relative_attention_num_buckets",
            "relative_attention_max_distance", "feed_forward_proj", "dense_act_fn",
            "is_gated_act", "scale_decoder_outputs"]


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


class CausalLMHiddenWrapper(nn.Module):
    """GPT-2: returns (logits, last_hidden_state); last_hidden_state is after the final ln_f."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False, return_dict=True)
        seq = out.last_hidden_state
        return self.model.lm_head(seq), seq


class CausalLMWithPastWrapper(nn.Module):
    """Decoder step with a KV cache in flat tensors (optimum's naming).

    Inputs ``input_ids, attention_mask, position_ids, past_key_values.{i}.key,
    past_key_values.{i}.value, ...``; outputs ``logits, present.{i}.key, present.{i}.value, ...``
    (caches [batch, kv_heads, past(+seq), head_dim]). transformers 5 takes Cache objects, so a
    ``DynamicCache`` is built from the flat tensors and read back after the step. Its layers
    are filled directly: ``cache.update(k, v, i)`` on an empty cache concatenates with an empty
    ``torch.tensor([])``, which TorchScript exports as a stray one-input Concat.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = transformers.DynamicCache()
        for i in range(self.num_layers):
            layer = transformers.cache_utils.DynamicLayer()
            layer.lazy_initialization(past[2 * i], past[2 * i + 1])
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            cache.layers.append(layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True,
                         return_dict=True)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


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
    # --- decoder / encoder-decoder extensions (defaults reproduce the encoder samples) ---
    family: str = "encoder"  # "encoder" | "decoder" | "encoder-decoder"
    rope: str | None = None  # "rotate_half" | "interleaved" | None
    kv_cache: bool = False
    input_axes: dict | None = None  # input name -> {axis: name}; None: batch/sequence for all
    input_fn: Callable | None = None  # (a, cfg, spec, seed, pad) -> tuple; None: make_inputs
    example: tuple = (EXAMPLE_BATCH, EXAMPLE_SEQ)  # export spec (input_fn's shape tuple)
    example_static: tuple | None = None  # spec of the static (dynamo) exports; None: example
    verify_specs: tuple = ((3, 13), (1, 5))  # extra specs checked for dynamic exports
    summarize: Callable | None = None  # cfg -> manifest config dict; None: config_summary
    post_build: Callable | None = None  # model -> model, before perturbation
    notes: str | None = None  # None: NOTES


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


# Manifest notes of the decoder / encoder-decoder samples (NOTES above is the encoders' text).
_DEC_COMMON = (
    "Config: hidden 64, 4 heads x head dim 16, 2 layers, vocab 160, max positions 144, float32; "
    "wide K: hidden, FFN and head dim times K (heads, KV heads, buckets, rope_theta kept; see "
    "wide_configs). Perturbation as for the encoders, RMSNorm/T5LayerNorm gammas ~ 1 + N(0, 0.2). "
    "Example sequence 7 (not 8: 8 is half the head dim 16, i.e. the rotate_half Slice bound, "
    "the GPT-J rotary_dim and the T5 bucket count); dyn18 graphs bake batch 2 and these lengths "
    "into Reshape/Expand constants (e.g. [2, 7, -1, 16]) and batch*heads = 8 appears in "
    "K-transpose Reshapes ([8, 7, 16]). Inputs: right padding (tails of rows >= 1 masked); "
    "position_ids, where an input, are arange(seq) + 2*row in the checks. Causal LMs mask with "
    "a causal & padding boolean mask -> Where(mask, 0, -inf (ts17) / -3.4e38 (dyn18)) added to "
    "the scores (SDPA: IsNaN/Where after Softmax). dyn18 files "
    "have the pkg.torch.onnx.stack_trace metadata removed; skeletons drop all node "
    "metadata_props and the data of every tensor with > 64 elements (e.g. Qwen2 wide2 keeps its "
    "64-element k/v biases). TorchScript: Linear weights are pre-transposed [in, out] "
    "initializers onnx::MatMul_N (a tied LM head gets its own [hidden, vocab] copy); dyn18: "
    "val_N, and a tied embedding is ONE initializer (named after lm_head) feeding Gather and "
    "Transpose->MatMul. "
)
_ROPE_HALF = (
    "RoPE (rotate_half): cos/sin are computed in the graph from the inv_freq buffer [head_dim/2] "
    "(ts17: a Constant node, dyn18: initializer rotary_emb.inv_freq): Cast(Unsqueeze("
    "position_ids, 2)) * inv_freq -> Concat(f, f) -> Cos, Sin (ts17 keeps the * attention_scaling "
    "1.0 Muls), Unsqueeze(1) per layer; q*cos + Concat(Neg(Slice(q, h/2:)), Slice(q, :h/2))*sin. "
    "Slice bounds: dyn18 int64 initializers [0], [8], [INT64_MAX] on axis [3]; ts17 computed "
    "Shape(q)[3] / 2 -> Cast -> Unsqueeze. GQA repeat_kv (2 KV heads -> 4): Unsqueeze(axis 2) -> "
    "Expand -> Reshape; dyn18 constants [2, 2, 2, 7, 16] (batch, kv, n_rep, seq, dh) and "
    "[2, 4, 7, 16] for V, and for K the fused Reshape [8, 7, 16] -> Transpose -> Reshape "
    "[2, 4, 16, 7]; ts17 builds them from Shape/Gather with constant n_rep 2 in the Concat and "
    "Mul(kv_heads, 2). SDPA scale sqrt(1/sqrt(16)) = 0.5 on both Q and K^T. RMSNorm: Pow 2 -> "
    "ReduceMean -> Add eps -> Sqrt -> Div(1, .) (ts17) / Reciprocal (dyn18) -> Mul -> Mul gamma. "
    "FFN SwiGLU: Sigmoid*x gate * up -> down. "
)
NOTES_BY_ARCH = {
    "gpt2": _DEC_COMMON + (
        "GPT-2: Conv1D = Gemm with [in, out] weights (fused c_attn [64, 192] -> Split into q, k, "
        "v); gelu_new = tanh GELU (Pow 3, Tanh); learned positions wpe [144, 64] gathered with "
        "Range (ts17) / constant ids (dyn18; 144*64 > 8192, not folded); wte tied to lm_head; "
        "last_hidden_state is after ln_f. dyn18 small shares one 0.5 scalar between the SDPA "
        "scale and gelu_new (wide: separate, see wide_structure_diffs), like BERT."),
    "llama": _DEC_COMMON + _ROPE_HALF + "LLaMA: no biases, untied lm_head.",
    "llama_past": _DEC_COMMON + _ROPE_HALF + (
        "LLaMA decoder step with KV cache (optimum naming): past_key_values.{i}.key/value "
        "[batch, 2, past, 16] are Concat'ed (axis -2) with the new (rotated) keys / values and "
        "returned as present.{i}.key/value [batch, 2, past+seq, 16]; attention_mask is "
        "[batch, past+seq]; position_ids are the absolute positions. ts17: dynamic batch, "
        "sequence, past_sequence, total_sequence (traced with past 5, sequence 3; checked also "
        "with past 7/seq 1, past 2/seq 4 and past 0). dyn18: static batch 2, sequence 3, past 6 "
        "(not 5: with past+seq = 8 = head_dim/2 the exporter shares one int64 constant 8 between "
        "the total length and the rotate_half Slice bounds in the small model only). Widening "
        "multiplies the head dim (axis 3) of every cache input/output by K."),
    "qwen2": _DEC_COMMON + _ROPE_HALF + (
        "Qwen2: q/k/v biases (Add after MatMul; k/v bias [32]), no o bias, tied "
        "embed_tokens/lm_head."),
    "t5": _DEC_COMMON + (
        "T5 (encoder-decoder, relu FFN d_ff 128): no softmax scale (SDPA scale=1.0: ts17 keeps "
        "Mul(q, 1.0) and Mul(k^T, 1.0), dyn18 a plain MatMul). RMSNorm-style T5LayerNorm "
        "(eps 1e-6, no mean). Relative position bias "
        "(8 buckets x 4 heads table, first layer of each stack, reused by layer 1): ts17 computes "
        "the buckets (Range, Sub, Abs/Neg-Min, Less, Log, Div, Min, Where) -> Gather(table) -> "
        "Transpose -> Unsqueeze -> Add mask; dyn18 folds it to constants: encoder [1, 4, 7, 7] "
        "(Where(mask, bias, -max)), decoder self-attention [2, 4, 5, 5] (bias + causal mask), "
        "cross-attention zeros [1, 4, 5, 7]. Tied shared embedding (encoder/decoder Gather and "
        "lm_head) with the d_model**-0.5 rescale: Mul(decoder output, 0.125) before the LM "
        "MatMul (wide: (64K)**-0.5). Decoder inputs are decoder_input_ids only (no decoder "
        "mask); logits [batch, decoder_sequence, 160]."),
    "t5v11": _DEC_COMMON + (
        "T5 v1.1 (gated-gelu: gelu_new(wi_0 x) * wi_1 x, d_ff 128), no softmax scale, relative "
        "position bias as for t5, NO d_model**-0.5 rescale and an untied lm_head. transformers "
        "5.23 forces T5's tie_word_embeddings to True (tie_word_embeddings=False only sets "
        "scale_decoder_outputs=False), so the script gives lm_head its own Parameter before "
        "perturbing (as in real v1.1 checkpoints); encoder/decoder embed_tokens stay tied to "
        "shared."),
    "gptj": _DEC_COMMON + (
        "GPT-J (eager attention; transformers has no SDPA path for it): parallel residual "
        "(one ln_1 feeds attention and MLP), untied lm_head with bias, gelu_new FFN 256. "
        "Interleaved RoPE (rotate_every_two) on the first rotary_dim = 8 of head dim 16 (wide: "
        "rotary_dim 8K): sin/cos come from the constant sinusoid buffer embed_positions [144, 8] "
        "(ts17: Constant node; dyn18: folded with the batch repeat to an initializer [2, 144, 8]) "
        "-> GatherElements by position_ids -> Split -> repeat_interleave(2) via Unsqueeze/Expand/"
        "Reshape; q_rot = Slice(q, :8), pass = Slice(q, 8:); rotation = stack(-x[1::2], x[::2]) "
        "(Slice step 2, Neg, Unsqueeze, Concat, Reshape) -> Concat(rot, pass). Scores Div by "
        "sqrt(head_dim) = 4.0."),
}

# ---------------------------------------------------------------------------------------------
# Inputs of the decoder / encoder-decoder samples. ``spec`` is the shape tuple of Arch.example /
# Arch.verify_specs: (batch, seq) for decoders, (batch, seq, decoder_seq) for T5, (batch, seq,
# past) for llama_past. Padding as in make_inputs: tails of rows >= 1 masked (right padding);
# llama_past masks a left part of the past instead (left-padded batch generation).
# ---------------------------------------------------------------------------------------------
def _ids_and_mask(a: Arch, gen, batch: int, seq: int, pad: bool):
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen, dtype=torch.long)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        for b in range(1, batch):
            n_pad = min(seq - 1, b * 2 + 1)
            mask[b, seq - n_pad:] = 0
            if a.pad_token_id is not None:
                ids[b, seq - n_pad:] = a.pad_token_id
    return ids, mask


def causal_lm_inputs(a: Arch, cfg, spec, seed: int, pad: bool):
    """input_ids, attention_mask and (if an input) position_ids = arange(seq) + 2 * row."""
    batch, seq = spec
    gen = torch.Generator().manual_seed(seed)
    ids, mask = _ids_and_mask(a, gen, batch, seq, pad)
    pos = torch.arange(seq).unsqueeze(0) + 2 * torch.arange(batch).unsqueeze(1)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    return tuple(feeds[n] for n in a.inputs)


def seq2seq_inputs(a: Arch, cfg, spec, seed: int, pad: bool):
    """input_ids, attention_mask (encoder), decoder_input_ids starting with the start token 0."""
    batch, seq, dec_seq = spec
    gen = torch.Generator().manual_seed(seed)
    ids, mask = _ids_and_mask(a, gen, batch, seq, pad)
    dec = torch.randint(3, VOCAB, (batch, dec_seq), generator=gen, dtype=torch.long)
    dec[:, 0] = cfg.decoder_start_token_id
    feeds = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    return tuple(feeds[n] for n in a.inputs)


def past_inputs(a: Arch, cfg, spec, seed: int, pad: bool):
    """One decoding step: seq new tokens after a cache of length past (random N(0,1) keys and
    values [batch, kv_heads, past, head_dim]); mask [batch, past+seq]; position ids from the
    mask (HF generate: cumsum - 1), so left-padded rows continue at their own position."""
    batch, seq, past = spec
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen, dtype=torch.long)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if pad:
        for b in range(1, batch):
            mask[b, :min(past, b * 2 + 1)] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    kv_shape = (batch, cfg.num_key_value_heads, past, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = torch.randn(kv_shape, generator=gen)
    return tuple(feeds[n] for n in a.inputs)


_PAST_IN = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
_PRESENT = [f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
BS_DEC = {0: "batch", 1: "decoder_sequence"}

# What T5 and T5 v1.1 share (they differ in config, seed, tying of the LM head and notes).
_T5_TIED = [("shared.weight", "encoder.embed_tokens.weight"), ("shared.weight", "decoder.embed_tokens.weight")]
_T5_COMMON = dict(
    hf_class="T5ForConditionalGeneration",
    inputs=["input_ids", "attention_mask", "decoder_input_ids"], outputs=["logits"],
    output_axes={"logits": BS_DEC},
    input_axes={"input_ids": BSQ, "attention_mask": BSQ, "decoder_input_ids": BS_DEC},
    wrap=lambda m, names: LogitsWrapper(m, names), pad_token_id=0, family="encoder-decoder",
    input_fn=seq2seq_inputs, example=(EXAMPLE_BATCH, DEC_SEQ, T5_DEC_SEQ),
    verify_specs=((3, 13, 4), (1, 5, 9)), summarize=_summary(_T5_KEYS),
)

ARCHS += [
    Arch(
        arch="gpt2", hf_class="GPT2LMHeadModel", make_config=_gpt2_cfg,
        inputs=["input_ids", "attention_mask"], outputs=["logits", "last_hidden_state"],
        output_axes={"logits": BSQ, "last_hidden_state": BSQ},
        wrap=lambda m, names: CausalLMHiddenWrapper(m), seed=1011,
        hidden_state_outputs=["last_hidden_state"],
        tied=[("transformer.wte.weight", "lm_head.weight")],
        variants=_variants("gpt2"), family="decoder", input_fn=causal_lm_inputs,
        example=(EXAMPLE_BATCH, DEC_SEQ), summarize=_summary(_GPT2_KEYS),
        notes=NOTES_BY_ARCH["gpt2"],
    ),
    Arch(
        arch="llama", hf_class="LlamaForCausalLM", make_config=_llama_cfg,
        inputs=["input_ids", "attention_mask", "position_ids"], outputs=["logits"],
        output_axes={"logits": BSQ}, wrap=lambda m, names: LogitsWrapper(m, names), seed=1012,
        variants=_variants("llama"), family="decoder", rope="rotate_half",
        input_fn=causal_lm_inputs, example=(EXAMPLE_BATCH, DEC_SEQ),
        summarize=_summary(_LLAMA_KEYS), notes=NOTES_BY_ARCH["llama"],
    ),
    Arch(
        arch="llama_past", hf_class="LlamaForCausalLM", make_config=_llama_cfg,
        inputs=["input_ids", "attention_mask", "position_ids"] + _PAST_IN,
        outputs=["logits"] + _PRESENT,
        output_axes={"logits": BSQ, **{n: {0: "batch", 2: "total_sequence"} for n in _PRESENT}},
        input_axes={"input_ids": BSQ, "attention_mask": {0: "batch", 1: "total_sequence"},
                    "position_ids": BSQ,
                    **{n: {0: "batch", 2: "past_sequence"} for n in _PAST_IN}},
        wrap=lambda m, names: CausalLMWithPastWrapper(m), seed=1013,
        variants=_variants("llama_past"), family="decoder", rope="rotate_half", kv_cache=True,
        input_fn=past_inputs, example=(EXAMPLE_BATCH, PAST_SEQ, PAST_LEN),
        example_static=(EXAMPLE_BATCH, PAST_SEQ, PAST_LEN_STATIC),
        verify_specs=((3, 1, 7), (1, 4, 2), (2, 3, 0)),
        summarize=_summary(_LLAMA_KEYS), notes=NOTES_BY_ARCH["llama_past"],
    ),
    Arch(
        arch="qwen2", hf_class="Qwen2ForCausalLM", make_config=_qwen2_cfg,
        inputs=["input_ids", "attention_mask", "position_ids"], outputs=["logits"],
        output_axes={"logits": BSQ}, wrap=lambda m, names: LogitsWrapper(m, names), seed=1014,
        tied=[("model.embed_tokens.weight", "lm_head.weight")],
        variants=_variants("qwen2"), family="decoder", rope="rotate_half",
        input_fn=causal_lm_inputs, example=(EXAMPLE_BATCH, DEC_SEQ),
        summarize=_summary(_QWEN2_KEYS), notes=NOTES_BY_ARCH["qwen2"],
    ),
    Arch(
        arch="t5", make_config=_t5_cfg, seed=1015, variants=_variants("t5"), notes=NOTES_BY_ARCH["t5"],
        tied=_T5_TIED + [("shared.weight", "lm_head.weight")], **_T5_COMMON,
    ),
    Arch(
        arch="t5v11", make_config=_t5v11_cfg, seed=1016, variants=_variants("t5v11"), tied=list(_T5_TIED), **_T5_COMMON,
        post_build=_untie_lm_head, notes=NOTES_BY_ARCH["t5v11"],
    ),
    Arch(
        arch="gptj", hf_class="GPTJForCausalLM", make_config=_gptj_cfg,
        inputs=["input_ids", "attention_mask", "position_ids"], outputs=["logits"],
        output_axes={"logits": BSQ}, wrap=lambda m, names: LogitsWrapper(m, names), seed=1017,
        variants=_variants("gptj", "eager"), family="decoder", rope="interleaved",
        input_fn=causal_lm_inputs, example=(EXAMPLE_BATCH, DEC_SEQ),
        summarize=_summary(_GPTJ_KEYS), notes=NOTES_BY_ARCH["gptj"],
    ),
]


# ---------------------------------------------------------------------------------------------
# Model construction and perturbation
# ---------------------------------------------------------------------------------------------
def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith(("RMSNorm", "LayerNorm"))


def perturb_parameters(model: nn.Module, seed: int) -> None:
    """Overwrite every (deduplicated) parameter with non-trivial values.

    biases ~ N(0, 0.1); LayerNorm gammas ~ 1 + N(0, 0.2); everything else ~ N(0, 0.05).
    "LayerNorm gammas" are the weights of nn.LayerNorm and of norm modules whose class name ends
    in RMSNorm / LayerNorm (LlamaRMSNorm, Qwen2RMSNorm, T5LayerNorm).
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
            if _is_norm(mod) and leaf == "weight":
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
    if a.post_build is not None:
        model = a.post_build(model)
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
    ids, mask = _ids_and_mask(a, gen, batch, seq, pad)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in a.inputs:
        tt = torch.zeros(batch, seq, dtype=torch.long)
        tt[:, seq // 2:] = 1
        feeds["token_type_ids"] = tt
    return tuple(feeds[n] for n in a.inputs)


def example_spec(a: Arch, exporter: str) -> tuple:
    if exporter == "dynamo" and a.example_static is not None:
        return tuple(a.example_static)
    return tuple(a.example)


def arch_inputs(a: Arch, cfg, spec, seed: int, pad: bool):
    if a.input_fn is None:
        return make_inputs(a, *spec, seed=seed, pad=pad)
    return a.input_fn(a, cfg, spec, seed, pad)


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


def export(a: Arch, cfg, wrapper: nn.Module, exporter: str, opset: int, path: str, log: list,
           keep_stack_traces: bool = False):
    args = arch_inputs(a, cfg, example_spec(a, exporter), seed=0, pad=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            if exporter == "torchscript":
                axes = {n: dict((a.input_axes or {}).get(n, BSQ)) for n in a.inputs}
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


def verify(a: Arch, cfg, wrapper: nn.Module, path: str, exporter: str) -> float:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got_in = [i.name for i in sess.get_inputs()]
    got_out = [o.name for o in sess.get_outputs()]
    if got_in != a.inputs or got_out != a.outputs:
        raise RuntimeError(f"{path}: graph signature {got_in} -> {got_out}")
    shapes = [example_spec(a, exporter)]
    if exporter == "torchscript":  # dynamic axes
        shapes += [tuple(v) for v in a.verify_specs]
    worst = 0.0
    for i, spec in enumerate(shapes):
        for pad in (False, True):
            args = arch_inputs(a, cfg, spec, seed=1234 + i * 10 + pad, pad=pad)
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


class ExportFailure(RuntimeError):
    """The exporter raised; the message is the first line of its error."""


def _export_or_fail(*args, **kw):
    try:
        return export(*args, **kw)
    except Exception as e:  # noqa: BLE001 - any exporter error is recorded, not fatal
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ExportFailure(f"{type(e).__name__}: {first}") from e


_ENTRY_KEYS = ["name", "path", "arch", "hf_class", "family", "rope", "kv_cache", "exporter",
               "opset", "dynamic", "example_shape", "example_input_shapes",
               "attn_implementation", "config", "inputs", "outputs", "wide", "wide_configs",
               "wide_structure_diffs", "hidden_state_outputs", "tied_parameters", "seed",
               "torch_max_abs_err", "num_nodes", "op_counts", "export_warnings", "notes"]


def _canonical_entry(e: dict) -> dict:
    """Entry with the keys in _ENTRY_KEYS order; entries written before the decoder families
    existed (all encoders) get family/rope/kv_cache/example_input_shapes filled in."""
    e = dict(e)
    e.setdefault("family", "encoder")
    e.setdefault("rope", None)
    e.setdefault("kv_cache", False)
    e.setdefault("example_input_shapes", {n: list(e["example_shape"]) for n in e["inputs"]})
    out = {k: e[k] for k in _ENTRY_KEYS if k in e}
    out.update({k: v for k, v in e.items() if k not in out})
    return out


def make_sample(a: Arch, name: str, attn: str, exporter: str, opset: int, out: str, ns,
                failures: list) -> dict:
    d = os.path.join(out, a.arch)
    os.makedirs(d, exist_ok=True)
    log: list = []
    rel = f"{a.arch}/{name}.onnx"
    cfg, model, wrapper = build_model(a, attn, 1)
    small = _export_or_fail(a, cfg, wrapper, exporter, opset, os.path.join(out, rel), log,
                            ns.keep_stack_traces)
    small_ops = op_multiset(small)
    err = verify(a, cfg, wrapper, os.path.join(out, rel), exporter)
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
            full = _export_or_fail(a, wcfg, wwrapper, exporter, opset,
                                   os.path.join(td, "w.onnx"), log, ns.keep_stack_traces)
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
        wide_cfgs[str(k)] = (a.summarize or config_summary)(wcfg)
    for msg in log:
        print(f"  warning: {msg}")
    summ = (a.summarize or config_summary)(cfg)
    if a.hf_class.endswith("SequenceClassification"):
        summ["num_labels"] = cfg.num_labels
    for kk, wc in wide_cfgs.items():
        if "num_labels" in summ:
            wc["num_labels"] = summ["num_labels"]
    example_args = arch_inputs(a, cfg, example_spec(a, exporter), seed=0, pad=False)
    return {
        "name": name,
        "path": rel,
        "arch": a.arch,
        "hf_class": a.hf_class,
        "family": a.family,
        "rope": a.rope,
        "kv_cache": a.kv_cache,
        "exporter": exporter,
        "opset": opset,
        "dynamic": exporter == "torchscript",
        "example_shape": list(example_spec(a, exporter)[:2]),
        "example_input_shapes": {n: list(t.shape) for n, t in zip(a.inputs, example_args)},
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
        "notes": NOTES if a.notes is None else a.notes,
    }


import dataclasses as _dc  # noqa: E402

# GPT-NeoX: per-head interleaved fused QKV ([H, 3*dh] split per head), partial rotary
# (rotary_pct 0.5, rotate_half on the first half of each head), parallel residual.
def _neox_cfg(attn: str, k: int = 1):
    return transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN * k, intermediate_size=DEC_INTER * k, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, rotary_pct=0.5, max_position_embeddings=MAXPOS, layer_norm_eps=1e-5,
        use_parallel_residual=True, tie_word_embeddings=False, use_cache=False, bos_token_id=1, eos_token_id=2,
        attn_implementation=attn,
    )


ARCHS.append(_dc.replace(
    next(a for a in ARCHS if a.arch == "llama"), arch="neox", hf_class="GPTNeoXForCausalLM", make_config=_neox_cfg,
    variants=_variants("neox"), seed=1019, rope="rotate_half", summarize=lambda cfg: config_summary(cfg),
    notes="GPT-NeoX: per-head interleaved fused QKV (view [B, S, H, 3*dh] then split), partial rotary "
          "(rotary_pct 0.5: rotate_half on 8 of 16 head units), parallel residual, untied head.",
))


# The trap a rewrite-by-value tool falls into: LLaMA with a KV cache exported with past 5 +
# sequence 3 = 8 = head_dim / 2, so the dynamo exporter keeps ONE int64 constant 8 for both the
# total length (must stay 8) and the rotate_half Slice bound (must become 8K).

ARCHS.append(_dc.replace(
    next(a for a in ARCHS if a.arch == "llama_past"), arch="llama_trap",
    variants=[("llama_trap_dyn18", "sdpa", "dynamo", 18)],
    example_static=(EXAMPLE_BATCH, PAST_SEQ, PAST_LEN),
    notes="LLaMA with KV cache, dynamo, static past 5 + sequence 3 = 8 = head_dim/2: one shared "
          "int64 constant 8 serves as total length and as rotate_half Slice bound (the value trap).",
))


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
    export_failures = {}  # arch -> ["name (exporter): first line of the error", ...]
    for a, name, attn, exporter, opset in todo:
        print(f"=== {name} ({a.hf_class}, {exporter}, opset {opset}, attn {attn})", flush=True)
        try:
            entry = make_sample(a, name, attn, exporter, opset, out, ns, failures)
        except ExportFailure as e:
            msg = f"{name} ({exporter}, opset {opset}): {e}"
            print(f"  !! export failed: {msg}", file=sys.stderr)
            for rel in [f"{a.arch}/{name}.onnx"] + [f"{a.arch}/{name}_wide{k}.skel.onnx"
                                                    for k in WIDE_FACTORS]:
                if os.path.exists(os.path.join(out, rel)):
                    os.remove(os.path.join(out, rel))
            export_failures.setdefault(a.arch, []).append(msg)
            entries.pop(name, None)
            continue
        entries[name] = entry
    # Failed exports are recorded in the notes of the same arch's entries (written this run).
    for arch, msgs in export_failures.items():
        for e in entries.values():
            if e["arch"] == arch and e["name"] in {t[1] for t in todo}:
                e["notes"] += " Export failed (no file written): " + "; ".join(msgs)

    order = [v[0] for a in ARCHS for v in a.variants]
    result = [_canonical_entry(entries[n]) for n in order if n in entries]
    result += [e for n, e in entries.items() if n not in order]
    with open(manifest_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {manifest_path} ({len(result)} entries)")
    if export_failures:
        print("export failures (recorded in the manifest notes): "
              + "; ".join(m for v in export_failures.values() for m in v))
    if failures:
        sys.exit(f"FAILED: small and wide op multisets differ for {failures}")


if __name__ == "__main__":
    main()
