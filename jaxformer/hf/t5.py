"""T5 (``T5ForConditionalGeneration``, v1.0 and v1.1 / Flan-T5) <-> jaxformer's encoder-decoder.

T5 stores ``nn.Linear`` weights as [out, in], the transpose of ours: q/k/v are [N*H, D] against
our [D, N, H], ``o`` is [D, N*H] against our [N, H, D], and the MLP matrices transpose likewise.
One embedding, ``shared.weight``, feeds both stacks; the relative-position bias lives in block 0
of each stack (``relative_attention_bias``) and is shared by the stack's other layers, as ours.

The head: T5 v1.0 un-embeds with the shared table, its input scaled by d_model^-0.5; v1.1 has
its own ``lm_head.weight`` and no scaling. transformers 5 always declares
``tie_word_embeddings: true`` and records the scaling as ``scale_decoder_outputs``; it keeps a
separate ``lm_head.weight`` when the checkpoint holds one that differs from ``shared.weight``.
Here the config decides: ``tie_word_embeddings: false`` means a separate ``lm_head.weight``;
otherwise the head is the shared table, scaled when ``scale_decoder_outputs`` (default true).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.hf.checkpoint_io import HFConversionError
from jaxformer.hf.mapping import Rule, in_major, out_major, transpose
from jaxformer.hf.tokens import known
from jaxformer.models import presets

MODEL_TYPE = "t5"
ARCHITECTURE = "T5ForConditionalGeneration"
GENERATES = True  # exports a generation_config.json

# feed_forward_proj -> our activation (transformers maps "gated-gelu" to gelu_new, the tanh form).
ACTIVATIONS = {"relu": "relu", "gated-gelu": "geglu_tanh", "gelu": "gelu",
               "gelu_new": "gelu_tanh", "gated-gelu_new": "geglu_tanh", "gated-silu": "swiglu"}


def _scales_head(hf: dict) -> bool:
    if hf.get("tie_word_embeddings", True) is False:
        return False
    return bool(hf.get("scale_decoder_outputs", True))


def model_config(hf: dict) -> ModelConfig:
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ACTIVATIONS:
        raise HFConversionError(f"T5 feed_forward_proj {proj!r} is not supported "
                                f"({', '.join(ACTIVATIONS)} are)")
    tied = hf.get("tie_word_embeddings", True) is not False
    make = presets.t5_v1_0 if proj == "relu" else presets.t5_v1_1
    n_layers = hf["num_layers"]
    n_dec = hf.get("num_decoder_layers") or n_layers
    return make(n_layers=n_layers, n_decoder_layers=n_dec if n_dec != n_layers else 0,
                d_model=hf["d_model"], n_heads=hf["num_heads"], head_dim=hf["d_kv"],
                d_ff=hf["d_ff"], vocab_size=hf["vocab_size"], activation=ACTIVATIONS[proj],
                tie_embeddings=tied, scale_tied_logits=tied and _scales_head(hf),
                relative_buckets=hf.get("relative_attention_num_buckets", 32),
                relative_max_distance=hf.get("relative_attention_max_distance", 128),
                norm_eps=hf.get("layer_norm_epsilon", 1e-6))


def config_for_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> ModelConfig:
    """The head as transformers 5 loads it: separate when the checkpoint holds an
    ``lm_head.weight`` that differs from ``shared.weight``, else the shared table."""
    head = tensors.get("lm_head.weight")
    separate = head is not None and not np.array_equal(head, tensors.get("shared.weight"))
    if separate == (not cfg.tie_embeddings):
        return cfg
    if separate and cfg.scale_tied_logits:
        raise HFConversionError("T5 with a separate lm_head.weight and scale_decoder_outputs=true "
                                "is not supported")
    return dataclasses.replace(cfg, tie_embeddings=not separate)


def hf_config(cfg: ModelConfig) -> dict:
    proj = next(k for k, v in ACTIVATIONS.items() if v == cfg.activation)
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE],
            "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_size,
            "d_ff": cfg.ff_width, "num_layers": cfg.n_layers,
            "num_decoder_layers": cfg.n_decoder_layers or cfg.n_layers,
            "num_heads": cfg.n_heads, "feed_forward_proj": proj,
            "relative_attention_num_buckets": cfg.relative_buckets,
            "relative_attention_max_distance": cfg.relative_max_distance,
            "layer_norm_epsilon": cfg.norm_eps, "dropout_rate": 0.0,
            "initializer_factor": 1.0, "is_encoder_decoder": True,
            "tie_word_embeddings": cfg.tie_embeddings,
            "scale_decoder_outputs": cfg.tie_embeddings and cfg.scale_tied_logits,
            "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
            "use_cache": True}


def special_token_ids(eos: int | None, pad: int | None) -> dict[str, int]:
    """T5's conventions with the run's tokens: no begin token, the decoder starts from the
    padding token (as jaxformer's span corruption and seq2seq do). Without a tokenizer the
    export keeps T5's own ids (pad 0, eos 1)."""
    return known(eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=pad)


# What a T5 checkpoint can hold: every other value of these keys has no T5 counterpart.
T5_LAYOUT = {"arch": "encoder_decoder", "pos_encoding": "t5_relative", "norm": "rmsnorm",
             "norm_position": "pre", "final_norm": True, "use_bias": False,
             "embed_scale": False, "embed_norm": False, "type_vocab_size": 0, "num_labels": 0,
             "n_kv_heads": 0, "sliding_window": 0, "attention_scale": 1.0,
             "attention_type": "mha"}


def check_exportable(cfg: ModelConfig) -> None:
    for key, value in T5_LAYOUT.items():
        if getattr(cfg, key) != value and not (key == "n_kv_heads" and cfg.kv_heads == cfg.n_heads):
            raise HFConversionError(f"T5 needs model.{key}={value!r}, the model has "
                                    f"{getattr(cfg, key)!r}")
    if cfg.activation not in ACTIVATIONS.values():
        raise HFConversionError(f"T5 has no feed-forward for model.activation={cfg.activation!r}")
    if cfg.scale_tied_logits and not cfg.tie_embeddings:
        raise HFConversionError("T5 scales the head's input only with a tied head "
                                "(model.scale_tied_logits needs model.tie_embeddings)")


def _attention_rules(ours: str, theirs: str) -> list[Rule]:
    return [*(Rule(f"{ours}/w_{p}", f"{theirs}.{p}.weight", to_ours=transpose,
                   to_theirs=in_major) for p in "qkv"),
            Rule(f"{ours}/w_out", f"{theirs}.o.weight", to_ours=transpose,
                 to_theirs=out_major)]


def _mlp_rules(cfg: ModelConfig, ours: str, theirs: str) -> list[Rule]:
    names = ([("wi_gate", "wi_0"), ("wi_up", "wi_1")]
             if cfg.activation in ("geglu_tanh", "geglu", "swiglu") else [("wi", "wi")])
    return [Rule(f"{ours}/{a}", f"{theirs}.DenseReluDense.{b}.weight", to_ours=transpose,
                 to_theirs=transpose) for a, b in [*names, ("wo", "wo")]]


def rules(cfg: ModelConfig) -> list[Rule]:
    out = [Rule("embed/table", "shared.weight"),
           Rule("enc_rel_bias/module/embedding",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
           Rule("dec_rel_bias/module/embedding",
                "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
           Rule("enc_norm/scale", "encoder.final_layer_norm.weight"),
           Rule("dec_norm/scale", "decoder.final_layer_norm.weight")]
    if not cfg.tie_embeddings:
        out.append(Rule("unembed/lm_head", "lm_head.weight", to_ours=transpose,
                        to_theirs=transpose))
    for i in range(cfg.n_layers):
        ours, theirs = f"encoder/{i}", f"encoder.block.{i}.layer"
        out += [Rule(f"{ours}/attn_norm/scale", f"{theirs}.0.layer_norm.weight"),
                *_attention_rules(f"{ours}/attn", f"{theirs}.0.SelfAttention"),
                Rule(f"{ours}/mlp_norm/scale", f"{theirs}.1.layer_norm.weight"),
                *_mlp_rules(cfg, f"{ours}/mlp", f"{theirs}.1")]
    for i in range(cfg.n_decoder_layers or cfg.n_layers):
        ours, theirs = f"decoder/{i}", f"decoder.block.{i}.layer"
        out += [Rule(f"{ours}/attn_norm/scale", f"{theirs}.0.layer_norm.weight"),
                *_attention_rules(f"{ours}/attn", f"{theirs}.0.SelfAttention"),
                Rule(f"{ours}/cross_norm/scale", f"{theirs}.1.layer_norm.weight"),
                *_attention_rules(f"{ours}/cross_attn", f"{theirs}.1.EncDecAttention"),
                Rule(f"{ours}/mlp_norm/scale", f"{theirs}.2.layer_norm.weight"),
                *_mlp_rules(cfg, f"{ours}/mlp", f"{theirs}.2")]
    return out
