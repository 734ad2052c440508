"""GPT-2 (``GPT2LMHeadModel``) <-> jaxformer's decoder with learned positions.

GPT-2 stores its projections as ``Conv1D`` weights, i.e. [in, out]: the same orientation as
ours, so the layouts differ only by reshapes (the fused ``c_attn`` output splits as q|k|v, each
heads-major, into our ``w_q``, ``w_k``, ``w_v``).
"""

from __future__ import annotations

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.hf.checkpoint_io import HFConversionError
from jaxformer.hf.mapping import Rule
from jaxformer.hf.tokens import known

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"
GENERATES = True  # exports a generation_config.json


def _fused_qkv(*qkv: np.ndarray) -> np.ndarray:
    """Our w_q, w_k, w_v [D, N, H] (or biases [N, H]) -> their c_attn [D, 3*N*H] (or [3*N*H])."""
    lead = qkv[0].shape[:-2]
    return np.concatenate([x.reshape(*lead, -1) for x in qkv], axis=-1)


def _split_qkv(x: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.split(x, 3, axis=-1))


def model_config(hf: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFConversionError(f"GPT-2 activation_function {act!r} is not supported "
                                "(gelu_new / gelu_pytorch_tanh are)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                 "add_cross_attention"):
        if hf.get(flag):
            raise HFConversionError(f"GPT-2 with {flag}=true is not supported")
    if hf.get("tie_word_embeddings", True) is False:
        raise HFConversionError("GPT-2 with tie_word_embeddings=false is not supported")
    d = hf["n_embd"]
    return ModelConfig(n_layers=hf["n_layer"], d_model=d, n_heads=hf["n_head"],
                       vocab_size=hf["vocab_size"], d_ff=hf.get("n_inner") or 4 * d,
                       max_len=hf["n_positions"], pos_encoding="learned",
                       init_std=hf.get("initializer_range", 0.02),
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def hf_config(cfg: ModelConfig) -> dict:
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE],
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff or None,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "initializer_range": cfg.init_std, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "tie_word_embeddings": True, "use_cache": True}


def special_token_ids(eos: int | None, pad: int | None) -> dict[str, int]:
    """GPT-2 begins and ends documents with end-of-text (its own is 50256); jaxformer packs
    documents the same way, so a document starts after one."""
    return known(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)


# What a GPT-2 checkpoint can hold: every other value of these keys has no GPT-2 counterpart.
GPT2_LAYOUT = {"arch": "decoder", "pos_encoding": "learned", "norm": "layernorm",
               "norm_position": "pre", "final_norm": True, "activation": "gelu_tanh",
               "use_bias": True, "tie_embeddings": True, "embed_scale": False,
               "embed_norm": False, "type_vocab_size": 0, "num_labels": 0, "n_kv_heads": 0,
               "head_dim": 0, "sliding_window": 0, "attention_scale": 0.0,
               "attention_type": "mha", "scale_tied_logits": False, "reversible": False}


def check_exportable(cfg: ModelConfig) -> None:
    for key, value in GPT2_LAYOUT.items():
        if getattr(cfg, key) != value and not (key == "n_kv_heads" and cfg.kv_heads == cfg.n_heads):
            raise HFConversionError(f"GPT-2 needs model.{key}={value!r}, the model has "
                                    f"{getattr(cfg, key)!r}")


def rules(cfg: ModelConfig) -> list[Rule]:
    out = [Rule("embed/table", "transformer.wte.weight"),
           Rule("inputs/positions/table", "transformer.wpe.weight"),
           Rule("final_norm/scale", "transformer.ln_f.weight"),
           Rule("final_norm/bias", "transformer.ln_f.bias")]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks/{i}/", f"transformer.h.{i}."
        out += [
            Rule(ours + "attn_norm/scale", theirs + "ln_1.weight"),
            Rule(ours + "attn_norm/bias", theirs + "ln_1.bias"),
            Rule(tuple(ours + f"attn/w_{p}" for p in "qkv"), theirs + "attn.c_attn.weight",
                 to_ours=_split_qkv, to_theirs=_fused_qkv),
            Rule(tuple(ours + f"attn/b_{p}" for p in "qkv"), theirs + "attn.c_attn.bias",
                 to_ours=_split_qkv, to_theirs=_fused_qkv),
            # Conv1D [in, out]: our [N, H, D] -> their [N*H, D].
            Rule(ours + "attn/w_out", theirs + "attn.c_proj.weight",
                 to_theirs=lambda x: x.reshape(-1, x.shape[-1])),
            Rule(ours + "attn/b_out", theirs + "attn.c_proj.bias"),
            Rule(ours + "mlp_norm/scale", theirs + "ln_2.weight"),
            Rule(ours + "mlp_norm/bias", theirs + "ln_2.bias"),
            Rule(ours + "mlp/wi", theirs + "mlp.c_fc.weight"),
            Rule(ours + "mlp/bi", theirs + "mlp.c_fc.bias"),
            Rule(ours + "mlp/wo", theirs + "mlp.c_proj.weight"),
            Rule(ours + "mlp/bo", theirs + "mlp.c_proj.bias"),
        ]
    return out
