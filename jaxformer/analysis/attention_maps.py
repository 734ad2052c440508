"""Attention maps: per-layer, per-head attention probabilities of a prompt, as PNG heat maps.

Letters: B batch (1 here), N heads, T query length, S key length.

Every attention module (``nn.attention.Attention``, ``nn.mla.MultiHeadLatentAttention``) has a
plain ``capture_attention`` flag, off by default so training is untouched. With it on, the
module runs the reference kernel's explicit softmax (whatever kernel the config names) and sows
the probabilities [B, N, T, S] (after masking: rows sum to 1, hidden keys are exactly 0) as
``nnx.Intermediate`` "attention_weights"; ``collect_attention`` gathers them with
``nnx.capture``.

What is drawn, per architecture (``stack`` names the file prefix):

    decoder          "layer": causal self-attention of the prompt's tokens.
    encoder          "layer": bidirectional self-attention of the prompt's tokens.
    encoder_decoder  "encoder": encoder self-attention over the source (the prompt + EOS, as
                     in training); "decoder": causal decoder self-attention; "cross": decoder
                     queries over the encoder output. The decoder input is the decoder start
                     token (PAD) followed by the model's greedy output up to (not including)
                     its EOS, or by ``target``'s tokens when given: the inputs that produce
                     that output under teacher forcing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.analysis.plots import _pyplot
from jaxformer.config import ModelConfig
from jaxformer.data.synthetic import SymbolTokenizer, is_synthetic
from jaxformer.data.tokenizer import EOS, PAD
from jaxformer.errors import UserError
from jaxformer.inference.families import Seq2SeqFamily
from jaxformer.inference.generate import Generator
from jaxformer.models.build import abstract_model
from jaxformer.runs import rundir
from jaxformer.runs.restore import load_run
from jaxformer.runs.specials import load_run_tokenizer, read_special_tokens

DPI = 100
MAX_COLUMNS = 4  # head panels per row
WEIGHTS_NAME = "attention_weights"


@dataclasses.dataclass
class AttentionMap:
    """One attention layer's probabilities for one example."""

    stack: str  # "layer" (decoder / encoder), or "encoder", "decoder", "cross"
    layer: int
    probs: np.ndarray  # [N, T, S] float32
    query_tokens: list[str]  # T labels
    key_tokens: list[str]  # S labels

    @property
    def name(self) -> str:
        """File stem and npz key: ``layer{i}`` or ``{stack}_layer{i}``."""
        return f"layer{self.layer}" if self.stack == "layer" else f"{self.stack}_layer{self.layer}"


def enable_attention_capture(model: nnx.Module, enabled: bool = True) -> int:
    """Sets ``capture_attention`` on every attention module of ``model`` -> how many."""
    count = 0
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "capture_attention"):
            module.capture_attention = enabled
            count += 1
    return count


def _flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, (*prefix, key)))
        return out
    return {prefix: tree}


def collect_attention(model: nnx.Module, fn: Callable[..., Any], *args: Any,
                      **kwargs: Any) -> tuple[Any, dict[tuple, jax.Array]]:
    """Runs ``fn(model, *args, **kwargs)`` with ``nnx.capture`` -> (its result, {module path:
    probabilities [B, N, T, S]}), e.g. {("blocks", 0, "attn"): ...}. ``model`` needs capture
    enabled (``enable_attention_capture``); a module called twice keeps its last call."""
    result, intermediates = nnx.capture(fn, nnx.Intermediate)(model, *args, **kwargs)
    weights = {}
    for path, value in _flatten(nnx.to_pure_dict(intermediates)).items():
        if path and path[-1] == WEIGHTS_NAME:
            weights[path[:-1]] = value[-1] if isinstance(value, tuple) else value
    return result, weights


def _stack_and_layer(path: tuple) -> tuple[str, int]:
    """("blocks", 3, "attn") -> ("layer", 3); ("decoder", 1, "cross_attn") -> ("cross", 1)."""
    layer = next((int(p) for p in path if isinstance(p, int) or str(p).isdigit()), 0)
    container = str(path[0])
    if container == "decoder" and "cross_attn" in path:
        return "cross", layer
    if container in ("encoder", "decoder"):
        return container, layer
    if container == "blocks":
        return "layer", layer
    return "_".join(str(p) for p in path if not str(p).isdigit()), layer


def model_attention(model: nnx.Module, tokens: np.ndarray,
                    dec_tokens: np.ndarray | None = None
                    ) -> tuple[jax.Array, dict[tuple[str, int], jax.Array]]:
    """One deterministic forward pass of one unpadded sequence, capturing attention.

    ``model``: a DecoderLM, EncoderModel or EncoderDecoderLM with capture enabled.
    tokens: [T] int (for an encoder-decoder the encoder input [S]); dec_tokens: [T] int, the
    decoder input (encoder-decoder only) -> (logits [1, T, V] (an encoder: final hidden
    states [1, T, D]), {(stack, layer): probabilities [1, N, T, S]}).
    """
    arch = model.cfg.arch
    toks = jnp.asarray(tokens, jnp.int32)[None]
    pos = jnp.arange(toks.shape[1], dtype=jnp.int32)[None]
    seg = jnp.ones_like(toks)
    if arch == "encoder_decoder":
        if dec_tokens is None:
            raise ValueError("an encoder-decoder needs dec_tokens")
        dec = jnp.asarray(dec_tokens, jnp.int32)[None]
        dec_pos = jnp.arange(dec.shape[1], dtype=jnp.int32)[None]
        out, weights = collect_attention(
            model, lambda m: m(toks, dec, seg, jnp.ones_like(dec), pos, dec_pos))
    elif arch == "encoder":
        out, weights = collect_attention(model, lambda m: m.encode(toks, pos, seg))
    else:
        out, weights = collect_attention(model, lambda m: m(toks, pos, seg))
    return out, {_stack_and_layer(path): w for path, w in weights.items()}


def figure_pixels(n_heads: int, n_queries: int, n_keys: int) -> tuple[int, int]:
    """The PNG size (width, height) in pixels of one layer's figure: up to MAX_COLUMNS head
    panels per row, each panel growing with the token count (16 px a token, 360..1400 px)
    plus a 120 px strip for the colour bar and 60 px for the title."""
    panel = max(360, min(1400, 160 + 16 * max(n_queries, n_keys)))
    cols = min(n_heads, MAX_COLUMNS)
    rows = math.ceil(n_heads / MAX_COLUMNS)
    return cols * panel + 120, rows * panel + 60


def token_label(text: str) -> str:
    """A readable tick label: spaces as an open box, control characters escaped ("\\n")."""
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                      for c in text)
    return escaped.replace(" ", "\u2423")


def plot_attention_map(amap: AttentionMap, out: Path, title: str = "") -> None:
    """One PNG of ``amap``: a heat map per head (rows: queries, columns: keys), a shared
    colour scale from 0 to the layer's largest probability; size ``figure_pixels``."""
    plt = _pyplot()
    n, t, s = amap.probs.shape
    width, height = figure_pixels(n, t, s)
    cols, rows = min(n, MAX_COLUMNS), math.ceil(n / MAX_COLUMNS)
    fig, axes = plt.subplots(rows, cols, figsize=(width / DPI, height / DPI), dpi=DPI,
                             squeeze=False, layout="constrained")
    fontsize = max(4.0, min(9.0, 420 / max(t, s, 1)))
    vmax = float(amap.probs.max()) or 1.0
    image = None
    for h, ax in enumerate(axes.flat):
        if h >= n:
            ax.axis("off")
            continue
        image = ax.imshow(amap.probs[h], cmap="viridis", vmin=0.0, vmax=vmax,
                          interpolation="nearest", aspect="auto")
        ax.set_xticks(range(s))
        ax.set_xticklabels([token_label(x) for x in amap.key_tokens], rotation=90,
                           fontsize=fontsize, parse_math=False)
        ax.set_yticks(range(t))
        ax.set_yticklabels([token_label(x) for x in amap.query_tokens], fontsize=fontsize,
                           parse_math=False)
        ax.set_title(f"head {h}", fontsize=10)
        ax.set_xlabel("key", fontsize=9)
        ax.set_ylabel("query", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    stack = {"layer": "", "encoder": "encoder self-attention, ",
             "decoder": "decoder self-attention, ", "cross": "cross-attention, "}
    fig.suptitle(f"{title}{stack.get(amap.stack, amap.stack + ', ')}layer {amap.layer}",
                 fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)  # no bbox_inches="tight": the size stays figure_pixels
    plt.close(fig)


def select_layers(n_layers: int, wanted: Sequence[int] | None) -> list[int]:
    """Layer indices to draw (None: all; negative counts from the end) -> sorted, unique."""
    if not wanted:
        return list(range(n_layers))
    out = set()
    for i in wanted:
        if not -n_layers <= i < n_layers:
            raise UserError(f"--layers {i} is out of range: the model has {n_layers} layers")
        out.add(i % n_layers)
    return sorted(out)


def _token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def _greedy_target(model_cfg: ModelConfig, graphdef: nnx.GraphDef, params: Any,
                   enc: np.ndarray, max_new: int, start_id: int, eos_id: int) -> list[int]:
    """The model's greedy output for source ``enc`` [S], up to (not including) EOS."""
    family = Seq2SeqFamily(model_cfg, graphdef, decoder_start_id=start_id)
    return Generator(family, params).generate([enc.tolist()], max_new,
                                              stop_tokens=[eos_id])[0].tokens


def write_attention_maps(run_dir: Path, text: str, out: Path, *, step: int | None = None,
                         layers: Sequence[int] | None = None, target: str | None = None,
                         max_new_tokens: int = 32) -> list[Path]:
    """Loads ``run_dir`` (config, tokenizer, the latest checkpoint or ``step``), runs ``text``
    through the model with the reference kernel, capturing every attention layer, and writes
    ``out/{name}.png`` per selected layer (``AttentionMap.name``) and ``out/attention.npz``
    (each map's [N, T, S] float32 probabilities under its name, plus the token ids and strings:
    ``tokens`` / ``token_strings``, or for an encoder-decoder ``enc_*`` and ``dec_*``).

    ``target``: an encoder-decoder's decoder text (None: its greedy output, at most
    ``max_new_tokens`` tokens). -> the paths written, PNGs first.
    """
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} does not exist")
    if not text.strip():
        raise UserError("--text is empty; give the prompt whose attention to draw")
    tok_path = run_dir / rundir.TOKENIZER_FILE
    saved = rundir.read_config(run_dir)
    if saved is None:
        raise UserError(f"{run_dir} is not a jaxformer run dir (no {rundir.CONFIG_FILE})")
    if saved.model.patch_size > 0:
        raise UserError(f"{run_dir} holds an image encoder (model.patch_size="
                        f"{saved.model.patch_size}); draw its [CLS] attention over a held-out "
                        "image with analysis.image_attention.write_image_attention (jaxformer "
                        "attention RUN_DIR --image I)")
    synthetic = is_synthetic(saved.data.source)  # fixed symbol vocabulary, no tokenizer file
    if not tok_path.is_file() and not synthetic:
        raise UserError(f"{run_dir} has no {rundir.TOKENIZER_FILE}; attention maps label "
                        "tokens with the run's tokenizer")
    if saved.model.attention_type not in ("mha", "mla"):
        raise UserError(f"{run_dir} uses model.attention_type={saved.model.attention_type!r}, "
                        "which forms no softmax attention map to draw")
    if saved.model.arch == "xlnet":
        raise UserError(f"{run_dir} holds a two-stream permutation LM (model.arch='xlnet'), "
                        "whose attention depends on a sampled order: no map is drawn for it")
    if target is not None and saved.model.arch != "encoder_decoder":
        raise UserError(f"--target is for encoder-decoder models; {run_dir} holds "
                        f"model.arch={saved.model.arch!r}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    # The run's special tokens: a converted model's own (its tokenizer's post-processor adds
    # them around the text as transformers does: Llama's <s>, BERT's [CLS] and [SEP], T5's
    # </s>), or jaxformer's EOS and PAD.
    if synthetic:
        tokenizer, specials = SymbolTokenizer(EOS, PAD), read_special_tokens(run_dir)
    else:
        tokenizer, specials = load_run_tokenizer(run_dir)
    cfg, params = load_run(run_dir, step)
    model_cfg = dataclasses.replace(cfg.model, attention="reference", attention_dropout=0.0,
                                    dropout=0.0)
    graphdef, _ = abstract_model(model_cfg)
    arch = model_cfg.arch
    eos = specials.eos_id
    ids = tokenizer.encode(text).ids
    if arch == "encoder_decoder" and eos is not None and ids[-1:] != [eos]:
        ids = ids + [eos]  # the source ends with the end token, as in training
    enc = np.asarray(ids, np.int32)
    if len(enc) > model_cfg.max_len:
        raise UserError(f"--text is {len(enc)} tokens; the model takes at most "
                        f"{model_cfg.max_len} (model.max_len)")
    dec = None
    if arch == "encoder_decoder":
        start = specials.decoder_start_id
        if start is None:
            start = specials.pad_id if specials.pad_id is not None else eos
        if target is None:
            new = _greedy_target(model_cfg, graphdef, params, enc,
                                 min(max_new_tokens, model_cfg.max_len - 1), start, eos)
        else:
            # Without an end token a post-processor appends (T5's), like the greedy output.
            new = tokenizer.encode(target).ids
            new = new[:-1] if new[-1:] == [eos] else new
        dec = np.asarray([start] + new, np.int32)
        if len(dec) > model_cfg.max_len:
            raise UserError(f"--target is {len(new)} tokens; the decoder takes at most "
                            f"{model_cfg.max_len - 1} after its start token")

    def forward(params, enc, dec):
        model = nnx.merge(graphdef, params)
        enable_attention_capture(model)
        return model_attention(model, enc, dec)[1]

    weights = jax.jit(forward)(params, enc, dec)
    enc_strings = _token_strings(tokenizer, enc)
    dec_strings = None if dec is None else _token_strings(tokenizer, dec)
    labels = {"layer": (enc_strings, enc_strings), "encoder": (enc_strings, enc_strings),
              "decoder": (dec_strings, dec_strings), "cross": (dec_strings, enc_strings)}
    maps: list[AttentionMap] = []
    for stack in ("layer", "encoder", "decoder", "cross"):
        found = sorted(layer for s, layer in weights if s == stack)
        if not found:
            continue
        for layer in select_layers(len(found), layers):
            q_labels, k_labels = labels[stack]
            probs = np.asarray(weights[stack, found[layer]][0], np.float32)
            maps.append(AttentionMap(stack, found[layer], probs, q_labels, k_labels))

    step_used = step if step is not None else rundir.latest_checkpoint_step(run_dir)
    title = f"{run_dir.name}" + ("" if step_used is None else f" step {step_used}") + ": "
    written = []
    for amap in maps:
        path = out / f"{amap.name}.png"
        plot_attention_map(amap, path, title)
        written.append(path)
    arrays: dict[str, np.ndarray] = {amap.name: amap.probs for amap in maps}
    if dec is None:
        arrays.update(tokens=enc, token_strings=np.asarray(enc_strings))
    else:
        arrays.update(enc_tokens=enc, enc_token_strings=np.asarray(enc_strings),
                      dec_tokens=dec, dec_token_strings=np.asarray(dec_strings))
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "attention.npz"
    np.savez(npz, **arrays)
    written.append(npz)
    return written
