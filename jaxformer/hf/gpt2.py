"""GPT-2 (``GPT2LMHeadModel``) <-> jaxformer's decoder with learned positions.

GPT-2 stores its projections as ``Conv1D`` weights, i.e. [in, out]: the same orientation as
ours, so the layouts differ only by reshapes (the fused ``c_attn`` output splits as q|k|v, each
heads-major).
"""

from __future__ import annotations

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.hf.checkpoint_io import HFConversionError
from jaxformer.hf.mapping import Rule

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"


def _matrix(x: np.ndarray) -> np.ndarray:
    """[D, ...] -> [D, prod(...)] (their 2-D Conv1D weight)."""
    return x.reshape(x.shape[0], -1)


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1)


def _out_matrix(x: np.ndarray) -> np.ndarray:
    """Our [N, H, D] output projection -> their [N*H, D]."""
    return x.reshape(-1, x.shape[-1])


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
                       layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def hf_config(cfg: ModelConfig) -> dict:
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE],
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff or None,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_eps,
            "initializer_range": cfg.init_std, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "tie_word_embeddings": True, "use_cache": True}


def check_exportable(cfg: ModelConfig) -> None:
    if cfg.pos_encoding != "learned":
        raise HFConversionError(f"GPT-2 needs learned positions, the model has "
                                f"{cfg.pos_encoding!r}")


def rules(cfg: ModelConfig) -> list[Rule]:
    out = [Rule("embed/table", "transformer.wte.weight"),
           Rule("positions/table", "transformer.wpe.weight"),
           Rule("final_norm/scale", "transformer.ln_f.weight"),
           Rule("final_norm/bias", "transformer.ln_f.bias")]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks/{i}/", f"transformer.h.{i}."
        out += [
            Rule(ours + "ln_attn/scale", theirs + "ln_1.weight"),
            Rule(ours + "ln_attn/bias", theirs + "ln_1.bias"),
            Rule(ours + "attn/w_qkv", theirs + "attn.c_attn.weight", to_theirs=_matrix),
            Rule(ours + "attn/b_qkv", theirs + "attn.c_attn.bias", to_theirs=_flat),
            Rule(ours + "attn/w_out", theirs + "attn.c_proj.weight", to_theirs=_out_matrix),
            Rule(ours + "attn/b_out", theirs + "attn.c_proj.bias"),
            Rule(ours + "ln_mlp/scale", theirs + "ln_2.weight"),
            Rule(ours + "ln_mlp/bias", theirs + "ln_2.bias"),
            Rule(ours + "mlp/wi", theirs + "mlp.c_fc.weight"),
            Rule(ours + "mlp/bi", theirs + "mlp.c_fc.bias"),
            Rule(ours + "mlp/wo", theirs + "mlp.c_proj.weight"),
            Rule(ours + "mlp/bo", theirs + "mlp.c_proj.bias"),
        ]
    return out
