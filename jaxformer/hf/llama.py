"""Llama (``LlamaForCausalLM``) and Mistral (``MistralForCausalLM``) <-> jaxformer's decoder
with RMSNorm, RoPE (rotate-half pairing, as transformers stores these models), SwiGLU and
grouped-query attention; Mistral adds the sliding window.

torch ``nn.Linear`` stores weights as [out, in]; ours are [in, out] with the head axes split
out, so every projection converts by a transpose and a reshape.
"""

from __future__ import annotations

from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.hf.checkpoint_io import HFConversionError
from jaxformer.hf.mapping import Rule, flat, in_major, out_major, transpose
from jaxformer.hf.tokens import known
from jaxformer.models import presets

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
GENERATES = True  # exports a generation_config.json


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise HFConversionError(f"rope_type {kind!r} (RoPE scaling) is not supported; only "
                                "'default' is")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config(hf: dict[str, Any], family: str = "llama") -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise HFConversionError(f"{family} hidden_act {hf['hidden_act']!r} is not supported "
                                "(silu is)")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise HFConversionError("attention_bias != mlp_bias is not supported")
    n_heads = hf["num_attention_heads"]
    window = (hf.get("sliding_window") or 0) if family == "mistral" else 0
    return presets.preset(
        family, n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        vocab_size=hf["vocab_size"], d_ff=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 2048), rope_theta=_rope_theta(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6), use_bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), sliding_window=window,
        init_std=hf.get("initializer_range", 0.02))


def hf_config(cfg: ModelConfig, model_type: str = MODEL_TYPE,
              architecture: str = ARCHITECTURE) -> dict[str, Any]:
    out = {"model_type": model_type, "architectures": [architecture],
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
           "intermediate_size": cfg.ff_width, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.head_size, "hidden_act": "silu",
           "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias, "attention_dropout": 0.0,
           "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
           "use_cache": True}
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window or None
    return out


def special_token_ids(eos: int | None, pad: int | None) -> dict[str, int]:
    """Llama's own begin (<s>, 1) and end (</s>, 2) tokens become the end-of-text token: a
    jaxformer document starts after one and ends with one."""
    return known(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)


# Every other value of these keys has no Llama counterpart.
LAYOUT = {"arch": "decoder", "pos_encoding": "rope", "rope_fraction": 1.0, "norm": "rmsnorm",
          "norm_position": "pre", "final_norm": True, "activation": "swiglu",
          "embed_scale": False, "embed_norm": False, "type_vocab_size": 0, "num_labels": 0,
          "attention_scale": 0.0, "attention_type": "mha", "scale_tied_logits": False,
          "reversible": False}


def check_exportable(cfg: ModelConfig, family: str = "Llama") -> None:
    for key, value in LAYOUT.items():
        if getattr(cfg, key) != value:
            raise HFConversionError(f"{family} needs model.{key}={value!r}, the model has "
                                    f"{getattr(cfg, key)!r}")
    if family == "Llama" and cfg.sliding_window:
        raise HFConversionError("Llama has no sliding window; export as Mistral")


def rules(cfg: ModelConfig) -> list[Rule]:
    out = [Rule("embed/table", "model.embed_tokens.weight"),
           Rule("final_norm/scale", "model.norm.weight")]
    if not cfg.tie_embeddings:
        out.append(Rule("unembed/lm_head", "lm_head.weight", to_ours=transpose,
                        to_theirs=in_major))
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks/{i}/", f"model.layers.{i}."
        out += [Rule(ours + "attn_norm/scale", theirs + "input_layernorm.weight"),
                Rule(ours + "mlp_norm/scale", theirs + "post_attention_layernorm.weight"),
                Rule(ours + "attn/w_out", theirs + "self_attn.o_proj.weight",
                     to_ours=transpose, to_theirs=out_major),
                Rule(ours + "mlp/wo", theirs + "mlp.down_proj.weight", to_ours=transpose,
                     to_theirs=out_major)]
        for p in "qkv":
            out.append(Rule(ours + f"attn/w_{p}", theirs + f"self_attn.{p}_proj.weight",
                            to_ours=transpose, to_theirs=in_major))
        for ours_name, theirs_name in (("wi_gate", "gate_proj"), ("wi_up", "up_proj")):
            out.append(Rule(ours + f"mlp/{ours_name}", theirs + f"mlp.{theirs_name}.weight",
                            to_ours=transpose, to_theirs=in_major))
        if cfg.use_bias:
            out += [Rule(ours + f"attn/b_{p}", theirs + f"self_attn.{p}_proj.bias",
                         to_theirs=flat) for p in "qkv"]
            out += [Rule(ours + "attn/b_out", theirs + "self_attn.o_proj.bias"),
                    Rule(ours + "mlp/bi_gate", theirs + "mlp.gate_proj.bias"),
                    Rule(ours + "mlp/bi_up", theirs + "mlp.up_proj.bias"),
                    Rule(ours + "mlp/bo", theirs + "mlp.down_proj.bias")]
    return out
