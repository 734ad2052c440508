"""BERT (``BertForMaskedLM``, ``BertForSequenceClassification``,
``BertForTokenClassification``) <-> jaxformer's encoder.

Which head a directory holds is read from config.json's ``architectures``: a sequence
classifier becomes an encoder with ``num_labels`` > 0 (pooler + classifier, no masked-LM head),
a token classifier one with ``token_labels`` > 0 (a per-token classifier, no pooler), anything
else a masked-LM encoder. Export writes the class that matches.

BERT's projections are ``torch.nn.Linear`` weights, [out, in]: the transpose of ours ([in, out],
with the attention's out axis split into heads: w_q [D, N, H], w_out [N, H, D]).
"""

from __future__ import annotations

from jaxformer.config import ModelConfig
from jaxformer.hf.checkpoint_io import HFConversionError
from jaxformer.hf.mapping import (
    Rule,
    dense_rules,
    flat,
    in_major,
    layernorm_rules,
    out_major,
    transpose,
)
from jaxformer.hf.tokens import known
from jaxformer.models import presets

MODEL_TYPE = "bert"
MLM_ARCHITECTURE = "BertForMaskedLM"
CLASSIFIER_ARCHITECTURE = "BertForSequenceClassification"
TOKEN_CLASSIFIER_ARCHITECTURE = "BertForTokenClassification"
GENERATES = False  # an encoder: no generation_config.json

# hidden_act in config.json <-> our activation names.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def _num_labels(hf: dict) -> int:
    if hf.get("id2label"):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def is_classifier(hf: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def is_token_classifier(hf: dict) -> bool:
    return any(a.endswith("ForTokenClassification") for a in hf.get("architectures") or [])


def model_config(hf: dict) -> ModelConfig:
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise HFConversionError(f"BERT hidden_act {act!r} is not supported "
                                f"({', '.join(ACTIVATIONS)} are)")
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise HFConversionError(f"BERT position_embedding_type {pos!r} is not supported "
                                "(absolute is)")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag):
            raise HFConversionError(f"BERT with {flag}=true is not supported")
    archs = hf.get("architectures") or [MLM_ARCHITECTURE]
    known = (MLM_ARCHITECTURE, CLASSIFIER_ARCHITECTURE, TOKEN_CLASSIFIER_ARCHITECTURE,
             "BertModel", "BertForPreTraining")
    if not any(a in known for a in archs):
        raise HFConversionError(f"BERT architectures {archs} are not supported "
                                f"({MLM_ARCHITECTURE}, {CLASSIFIER_ARCHITECTURE} and "
                                f"{TOKEN_CLASSIFIER_ARCHITECTURE} are)")
    if not hf.get("type_vocab_size", 2):
        raise HFConversionError("BERT with type_vocab_size=0 is not supported")
    return presets.bert(
        n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"], vocab_size=hf["vocab_size"],
        d_ff=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2), activation=ACTIVATIONS[act],
        norm_eps=hf.get("layer_norm_eps", 1e-12), init_std=hf.get("initializer_range", 0.02),
        tie_embeddings=hf.get("tie_word_embeddings", True) is not False,
        num_labels=_num_labels(hf) if is_classifier(hf) else 0,
        token_labels=_num_labels(hf) if is_token_classifier(hf) else 0)


def hf_config(cfg: ModelConfig) -> dict:
    out = {"model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.ff_width,
           "hidden_act": EXPORT_ACTIVATIONS[cfg.activation],
           "max_position_embeddings": cfg.max_len, "type_vocab_size": cfg.type_vocab_size,
           "layer_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
           "classifier_dropout": None, "position_embedding_type": "absolute",
           "pad_token_id": 0, "tie_word_embeddings": cfg.tie_embeddings,
           "is_decoder": False, "add_cross_attention": False, "use_cache": True}
    labels = cfg.num_labels or cfg.token_labels
    if labels > 0:
        out["architectures"] = [CLASSIFIER_ARCHITECTURE if cfg.num_labels
                                else TOKEN_CLASSIFIER_ARCHITECTURE]
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    else:
        out["architectures"] = [MLM_ARCHITECTURE]
    return out


def special_token_ids(eos: int | None, pad: int | None) -> dict[str, int]:
    """BERT's config names padding only (its own [PAD] is 0)."""
    return known(pad_token_id=pad)


# What a BERT checkpoint can hold: every other value of these keys has no BERT counterpart.
BERT_LAYOUT = {"arch": "encoder", "pos_encoding": "learned", "norm": "layernorm",
               "norm_position": "post", "final_norm": False, "use_bias": True,
               "embed_scale": False, "embed_norm": True, "n_kv_heads": 0, "head_dim": 0,
               "sliding_window": 0, "attention_scale": 0.0, "scale_tied_logits": False,
               "attention_type": "mha", "two_tower": False,
               "pooling": "first", "patch_size": 0}


def check_exportable(cfg: ModelConfig) -> None:
    for key, value in BERT_LAYOUT.items():
        if getattr(cfg, key) != value and not (key == "n_kv_heads" and cfg.kv_heads == cfg.n_heads):
            raise HFConversionError(f"BERT needs model.{key}={value!r}, the model has "
                                    f"{getattr(cfg, key)!r}")
    if cfg.num_labels > 0 and not cfg.pooler:
        raise HFConversionError("BERT's classifier reads its pooler: it needs model.pooler=True, "
                                "the model has False")
    if cfg.activation not in EXPORT_ACTIVATIONS:
        raise HFConversionError(f"BERT needs model.activation in {sorted(EXPORT_ACTIVATIONS)}, "
                                f"the model has {cfg.activation!r}")
    if cfg.type_vocab_size < 1:
        raise HFConversionError("BERT needs model.type_vocab_size >= 1, the model has 0")
    if cfg.d_model % cfg.n_heads:
        raise HFConversionError(f"BERT needs n_heads ({cfg.n_heads}) to divide d_model "
                                f"({cfg.d_model})")


def rules(cfg: ModelConfig) -> list[Rule]:
    emb = "bert.embeddings."
    out = [Rule("embed/table", emb + "word_embeddings.weight"),
           Rule("inputs/positions/table", emb + "position_embeddings.weight"),
           Rule("inputs/token_types/table", emb + "token_type_embeddings.weight"),
           *layernorm_rules("inputs/norm", emb + "LayerNorm")]

    for i in range(cfg.n_layers):
        ours, theirs = f"blocks/{i}/", f"bert.encoder.layer.{i}."
        for p, name in (("q", "query"), ("k", "key"), ("v", "value")):
            out += [Rule(ours + f"attn/w_{p}", theirs + f"attention.self.{name}.weight",
                         to_ours=transpose, to_theirs=in_major),
                    Rule(ours + f"attn/b_{p}", theirs + f"attention.self.{name}.bias",
                         to_theirs=flat)]
        out += [
            Rule(ours + "attn/w_out", theirs + "attention.output.dense.weight",
                 to_ours=transpose, to_theirs=out_major),
            Rule(ours + "attn/b_out", theirs + "attention.output.dense.bias"),
            *layernorm_rules(ours + "attn_norm", theirs + "attention.output.LayerNorm"),
            Rule(ours + "mlp/wi", theirs + "intermediate.dense.weight", to_ours=transpose,
                 to_theirs=transpose),
            Rule(ours + "mlp/bi", theirs + "intermediate.dense.bias"),
            Rule(ours + "mlp/wo", theirs + "output.dense.weight", to_ours=transpose,
                 to_theirs=transpose),
            Rule(ours + "mlp/bo", theirs + "output.dense.bias"),
            *layernorm_rules(ours + "mlp_norm", theirs + "output.LayerNorm"),
        ]
    if cfg.num_labels > 0:
        out += dense_rules("pooler", "bert.pooler.dense") + dense_rules("classifier", "classifier")
        return out
    if cfg.token_labels > 0:  # BertForTokenClassification has no pooler
        return out + dense_rules("token_classifier", "classifier")
    out += [*dense_rules("mlm/transform", "cls.predictions.transform.dense"),
            *layernorm_rules("mlm/norm", "cls.predictions.transform.LayerNorm"),
            Rule("mlm/bias", "cls.predictions.bias")]
    if not cfg.tie_embeddings:
        # Untied, transformers saves the decoder's own copy of the bias too (and uses it).
        out += [Rule("mlm/unembed/lm_head", "cls.predictions.decoder.weight",
                     to_ours=transpose, to_theirs=transpose),
                Rule("mlm/bias", "cls.predictions.decoder.bias")]
    return out
