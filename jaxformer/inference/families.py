"""How each model family is decoded: a prompt batch in, next-token logits out, and one more
slot of cache per step. Generation loops (``generate``, beam search, speculative decoding)
call only these two functions, so every loop works for every family.

- ``DecoderFamily``: decoder-only and prefix-LM models. Prompts of different lengths are
  right-aligned (left padding) so that every row writes the same cache slot at each step; a
  row's positions count from its first real token and its padding is masked out. A prefix-LM
  prefills its prompt bidirectionally, as it was trained (the prompt is the prefix).
- ``Seq2SeqFamily``: encoder-decoder models. The source is encoded once and every decoder
  layer's cross-attention keys and values are projected once; decoding starts from the
  decoder-start token.
- ``AudioSeq2SeqFamily``: an encoder-decoder whose encoder reads audio (Whisper,
  ``model.audio_mels > 0``): the prompts are waves (1-D float arrays at the model's sample
  rate), packed into a zero-padded [B, N] float batch whose lengths count samples.
- ``ImagePrefixFamily``: an image-prefix decoder (``model.arch='image_prefix'``): the prompts
  are images, whose projected patches are the cache's first slots.

Each family packs its own prompts (``pack``): token ids, or waves.

State: a dict of arrays, each with the batch on axis 0 (beam search gathers rows with one
``tree_map``). Letters: B batch, P prompt width, T new tokens this call, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import AUDIO_HOP, Config, ModelConfig, ObjectiveConfig, audio_encoder_frames
from jaxformer.errors import UserError
from jaxformer.models.build import abstract_model
from jaxformer.nn.attention import cache_length, extend_cache

State = dict[str, Any]
# The attention types generation can decode: a per-slot KV cache, or linear attention's state.
DECODING_ATTENTION = ("mha", "mla", "linear")
Unpack = Callable[[Any], Any]  # stored parameters -> the parameters the model takes


@dataclasses.dataclass(frozen=True)
class Prompts:
    """A batch of token prompts, padded to one width."""

    tokens: np.ndarray  # [B, P] int32
    lengths: np.ndarray  # [B] int32, the real tokens of each row

    @classmethod
    def pack(cls, prompts: Sequence[Sequence[int]], pad_id: int, *, left: bool) -> Prompts:
        """Pads every prompt to the longest: on the left (decoders: the prompts end at one
        slot) or on the right (encoder sources)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        tokens = np.full((len(prompts), width), pad_id, np.int32)
        for row, p in enumerate(prompts):
            if left:
                tokens[row, width - len(p):] = p
            else:
                tokens[row, :len(p)] = p
        return cls(tokens, np.asarray([len(p) for p in prompts], np.int32))


def check_prompt_ids(prompts: Sequence[Sequence[int]], vocab: int) -> None:
    """A UserError (one line) for a prompt token outside [0, vocab)."""
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise UserError(f"a prompt token is outside the vocabulary [0, {vocab})")


class DecoderFamily:
    """Decoder-only language models (GPT-2, Llama, Mistral, MLA ...), causal or prefix-LM."""

    kind = "decoder"
    left_pad = True

    def __init__(self, cfg: ModelConfig, graphdef: nnx.GraphDef, *, prefix_lm: bool = False,
                 unpack: Unpack | None = None):
        self.cfg, self.graphdef, self.prefix_lm = cfg, graphdef, prefix_lm
        self.unpack = unpack or (lambda p: p)
        self.vocab_size = cfg.vocab_size

    def _model(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, self.unpack(params))

    def pack(self, prompts: Sequence[Sequence[int]], pad_id: int) -> Prompts:
        """Token prompts, left-padded (each checked against the vocabulary)."""
        check_prompt_ids(prompts, self.vocab_size)
        return Prompts.pack(prompts, pad_id, left=True)

    def require_slot_cache(self, what: str) -> None:
        """UserError for ``what`` (a technique that rewinds, pages or stores per-slot keys and
        values) when this model decodes with linear attention's running state instead."""
        if self.cfg.attention_type == "linear":
            raise UserError(f"{what} needs a per-slot KV cache; model.attention_type='linear' "
                            "decodes with a running state (plain, sampled or beam decoding)")

    def cache_len(self, prompt_width: int, max_new_tokens: int) -> int:
        """Cache slots a generation needs (checked against the model's context)."""
        need = prompt_width + max_new_tokens
        if need > self.cfg.max_len:
            raise UserError(f"the prompt ({prompt_width} tokens) + max new tokens "
                            f"({max_new_tokens}) = {need} exceeds the model's context "
                            f"(model.max_len {self.cfg.max_len})")
        return need

    def prefill(self, params: Any, tokens: jnp.ndarray, lengths: jnp.ndarray,
                cache_len: int) -> tuple[jnp.ndarray, State, int]:
        """tokens [B, P] left-padded, lengths [B] -> (next-token logits [B, V] float32, state,
        the cache slot of the next token)."""
        model = self._model(params)
        b, p = tokens.shape
        offsets = (p - lengths).astype(jnp.int32)
        # The prompt attends over its own P slots, not the whole cache (whose other slots are
        # still empty), and the cache is padded to its length after: a 16 x 128 prompt with a
        # 256-slot cache took 107 ms one way, 86 ms this way (docs/benchmarks.md, "Decoding").
        cache = model.init_cache(b, min(p, cache_len))
        logits, cache = model.decode(tokens, cache, jnp.zeros((), jnp.int32), offsets=offsets,
                                     prefix_end=p if self.prefix_lm else None, last_only=True)
        if p < cache_len:
            cache = [extend_cache(layer, cache_len) for layer in cache]
        return logits[:, -1], {"cache": cache, "offsets": offsets}, p

    def prefill_cached(self, params: Any, prefix_kv: list[dict[str, jnp.ndarray]],
                       tokens: jnp.ndarray, cache_len: int) -> tuple[jnp.ndarray, State, int]:
        """Like ``prefill``, after a prefix whose cache is given (``inference.prompt_cache``:
        [B, C, ...] per layer array, the same prefix in every row): tokens [B, T] unpadded
        continue it at slot C."""
        model = self._model(params)
        b, t = tokens.shape
        c = cache_length(prefix_kv[0])
        cache = [{k: jax.lax.dynamic_update_slice(a, p[k].astype(a.dtype), (0,) * a.ndim)
                  for k, a in layer.items()}
                 for layer, p in zip(model.init_cache(b, cache_len), prefix_kv, strict=True)]
        offsets = jnp.zeros((b,), jnp.int32)
        logits, cache = model.decode(tokens, cache, jnp.asarray(c, jnp.int32), offsets=offsets,
                                     last_only=True)
        return logits[:, -1], {"cache": cache, "offsets": offsets}, c + t

    def history(self, tokens: jnp.ndarray, lengths: jnp.ndarray
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The tokens logits processors see before the first new one (a repetition penalty
        counts the prompt) -> (tokens [B, H], left padding [B])."""
        return tokens, (tokens.shape[1] - lengths).astype(jnp.int32)

    def step(self, params: Any, tokens: jnp.ndarray, state: State,
             slot: jnp.ndarray) -> tuple[jnp.ndarray, State]:
        """tokens [B, T] at cache slots slot .. slot + T - 1 -> (logits [B, T, V], state)."""
        logits, cache = self._model(params).decode(tokens, state["cache"], slot,
                                                   offsets=state["offsets"])
        return logits, {**state, "cache": cache}


class Seq2SeqFamily:
    """Encoder-decoder models (the 2017 Transformer, T5): the prompt is the source."""

    kind = "encoder_decoder"
    left_pad = False

    def __init__(self, cfg: ModelConfig, graphdef: nnx.GraphDef, *, decoder_start_id: int,
                 unpack: Unpack | None = None):
        self.cfg, self.graphdef = cfg, graphdef
        self.decoder_start_id = decoder_start_id
        self.unpack = unpack or (lambda p: p)
        self.vocab_size = cfg.vocab_size

    def _model(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, self.unpack(params))

    def pack(self, prompts: Sequence[Sequence[int]], pad_id: int) -> Prompts:
        """Source ids, right-padded (each checked against the vocabulary)."""
        check_prompt_ids(prompts, self.vocab_size)
        return Prompts.pack(prompts, pad_id, left=False)

    def cache_len(self, prompt_width: int, max_new_tokens: int) -> int:
        if prompt_width > self.cfg.max_len or max_new_tokens > self.cfg.max_len:
            raise UserError(f"the source ({prompt_width} tokens) or the target (max new tokens"
                            f" {max_new_tokens}) exceeds the model's context "
                            f"(model.max_len {self.cfg.max_len})")
        # The start token, then every new token (the last one's logits are never read).
        return max_new_tokens + 1

    def prefill(self, params: Any, tokens: jnp.ndarray, lengths: jnp.ndarray,
                cache_len: int) -> tuple[jnp.ndarray, State, int]:
        """Sources [B, S] right-padded, lengths [B] -> (logits of the first target token
        [B, V], state, 1: the start token took slot 0)."""
        model = self._model(params)
        b, s = tokens.shape
        segment_ids = (jnp.arange(s)[None, :] < lengths[:, None]).astype(jnp.int32)
        memory = model.encode(tokens, segment_ids)
        state = {"cache": model.init_cache(b, cache_len), "cross_kv": model.cross_cache(memory),
                 "enc_segment_ids": segment_ids}
        start = jnp.full((b, 1), self.decoder_start_id, jnp.int32)
        logits, state = self._step(model, start, state, jnp.zeros((), jnp.int32))
        return logits[:, -1], state, 1

    def history(self, tokens: jnp.ndarray, lengths: jnp.ndarray
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """What logits processors see before the first new token: the decoder's start token
        (as transformers, which penalizes repeats of the target, not of the source)."""
        b = tokens.shape[0]
        return (jnp.full((b, 1), self.decoder_start_id, jnp.int32),
                jnp.zeros((b,), jnp.int32))

    def step(self, params: Any, tokens: jnp.ndarray, state: State,
             slot: jnp.ndarray) -> tuple[jnp.ndarray, State]:
        return self._step(self._model(params), tokens, state, slot)

    @staticmethod
    def _step(model: nnx.Module, tokens: jnp.ndarray, state: State,
              slot: jnp.ndarray) -> tuple[jnp.ndarray, State]:
        logits, cache = model.decode(tokens, None, state["enc_segment_ids"], state["cache"],
                                     slot, cross_kv=state["cross_kv"])
        return logits, {**state, "cache": cache}


class AudioSeq2SeqFamily(Seq2SeqFamily):
    """An encoder-decoder with an audio encoder: the prompts are waves [n] float (at
    ``model.audio_sample_rate``), encoded once; decoding is ``Seq2SeqFamily``'s."""

    PAD_TO = 16000  # waves pad to whole multiples of this many samples: few compilations

    def pack(self, prompts: Sequence[np.ndarray], pad_id: int) -> Prompts:
        """Waves -> Prompts(tokens=[B, N] float32 zero-padded, lengths=[B] samples)."""
        del pad_id  # audio pads with silence
        waves = [np.asarray(w, np.float32) for w in prompts]
        if not waves or any(w.ndim != 1 or len(w) == 0 for w in waves):
            raise UserError("every audio prompt needs a non-empty 1-D wave")
        width = -(-max(len(w) for w in waves) // self.PAD_TO) * self.PAD_TO
        audio = np.zeros((len(waves), width), np.float32)
        for row, w in enumerate(waves):
            audio[row, :len(w)] = w
        return Prompts(audio, np.asarray([len(w) for w in waves], np.int32))

    def cache_len(self, prompt_width: int, max_new_tokens: int) -> int:
        """prompt_width: samples; the encoder frames must fit ``model.max_len``."""
        frames = audio_encoder_frames(prompt_width)
        if frames > self.cfg.max_len or max_new_tokens > self.cfg.max_len:
            raise UserError(f"the audio ({prompt_width / self.cfg.audio_sample_rate:.2f} s, "
                            f"{frames} encoder frames) or the transcript (max new tokens "
                            f"{max_new_tokens}) exceeds the model's context (model.max_len "
                            f"{self.cfg.max_len})")
        return max_new_tokens + 1

    def prefill(self, params: Any, tokens: jnp.ndarray, lengths: jnp.ndarray,
                cache_len: int) -> tuple[jnp.ndarray, State, int]:
        """Waves [B, N] float (``pack``), lengths [B] samples -> (logits of the first
        transcript token [B, V], state, 1)."""
        model = self._model(params)
        b, n = tokens.shape
        audio_mask = (jnp.arange(n // AUDIO_HOP)[None, :]
                      < (lengths // AUDIO_HOP)[:, None]).astype(jnp.int32)
        memory, segment_ids = model.encode_audio(tokens, audio_mask)
        state = {"cache": model.init_cache(b, cache_len), "cross_kv": model.cross_cache(memory),
                 "enc_segment_ids": segment_ids}
        start = jnp.full((b, 1), self.decoder_start_id, jnp.int32)
        logits, state = self._step(model, start, state, jnp.zeros((), jnp.int32))
        return logits[:, -1], state, 1


class ImagePrefixFamily(Seq2SeqFamily):
    """An image-prefix decoder (``model.arch='image_prefix'``): the prompts are images
    [H, W, C] float; the image's projected patches fill cache slots 0..N-1 (attending both ways,
    as trained), the decoder-start token slot N, and each new token the next slot. Its
    bookkeeping is ``Seq2SeqFamily``'s (a decoder-start token, the start token as history)."""

    kind = "image_prefix"

    def __init__(self, cfg: ModelConfig, graphdef: nnx.GraphDef, *, decoder_start_id: int,
                 unpack: Unpack | None = None):
        super().__init__(cfg, graphdef, decoder_start_id=decoder_start_id, unpack=unpack)
        self.patches = (cfg.image_size // cfg.patch_size) ** 2

    def pack(self, prompts: Sequence[np.ndarray], pad_id: int) -> Prompts:
        """Images -> Prompts(tokens=[B, H, W, C] float32, lengths=[B] patches)."""
        del pad_id  # every image is whole
        m = self.cfg
        want = (m.image_size, m.image_size, m.image_channels)
        images = [np.asarray(x, np.float32) for x in prompts]
        if not images or any(x.shape != want for x in images):
            got = sorted({str(x.shape) for x in images}) or ["none"]
            raise UserError(f"this model reads images of shape {want} (model.image_size, "
                            f"model.image_channels), got {', '.join(got)}")
        return Prompts(np.stack(images), np.full((len(images),), self.patches, np.int32))

    def cache_len(self, prompt_width: int, max_new_tokens: int) -> int:
        """The image's patches, the start token and the new tokens (the last one's logits are
        never read), within ``model.max_len``."""
        need = self.patches + max_new_tokens
        if need > self.cfg.max_len:
            raise UserError(f"the image ({self.patches} patches) + max new tokens "
                            f"({max_new_tokens}) = {need} exceeds the model's context "
                            f"(model.max_len {self.cfg.max_len})")
        return need

    def prefill(self, params: Any, tokens: jnp.ndarray, lengths: jnp.ndarray,
                cache_len: int) -> tuple[jnp.ndarray, State, int]:
        """Images [B, H, W, C] -> (logits of the first text token [B, V], state, N + 1)."""
        model = self._model(params)
        b = tokens.shape[0]
        start = jnp.full((b, 1), self.decoder_start_id, jnp.int32)
        logits, cache = model.prefill(tokens, start, model.init_cache(b, cache_len))
        return logits[:, -1], {"cache": cache}, self.patches + 1

    def step(self, params: Any, tokens: jnp.ndarray, state: State,
             slot: jnp.ndarray) -> tuple[jnp.ndarray, State]:
        logits, cache = self._model(params).decode(tokens, state["cache"], slot)
        return logits, {**state, "cache": cache}


Family = DecoderFamily | Seq2SeqFamily


def decodes(model: ModelConfig) -> bool:
    """Whether generation can decode this model (its attention keeps a KV cache or a state)."""
    return model.attention_type in DECODING_ATTENTION


def model_family(model: ModelConfig, *, prefix_lm: bool = False,
                 decoder_start_id: int | None = None, unpack: Unpack | None = None) -> Family:
    """The family of a bare model config (a model from ``jaxformer.hf.from_pretrained``, or
    built in Python): ``Generator(model_family(m.config), m.params)``."""
    graphdef, _ = abstract_model(model)
    cfg = Config(model=model, objective=ObjectiveConfig(kind="prefix_lm" if prefix_lm
                                                        else "causal"))
    return family_for(cfg, graphdef, decoder_start_id=decoder_start_id, unpack=unpack)


def family_for(cfg: Config, graphdef: nnx.GraphDef, *, decoder_start_id: int | None = None,
               unpack: Unpack | None = None) -> Family:
    """The family a run's model decodes as: its architecture, and for decoders whether it was
    trained as a prefix-LM."""
    arch = cfg.model.arch
    if not decodes(cfg.model):
        raise UserError(f"model.attention_type={cfg.model.attention_type!r} trains and "
                        "evaluates but does not decode: generation needs attention_type "
                        "'mha', 'mla' or 'linear' (a running state instead of a KV cache)")
    if arch == "decoder":
        return DecoderFamily(cfg.model, graphdef, prefix_lm=cfg.objective.kind == "prefix_lm",
                             unpack=unpack)
    if arch == "encoder_decoder":
        if decoder_start_id is None:
            raise UserError("an encoder-decoder model needs its decoder-start token id")
        family = AudioSeq2SeqFamily if cfg.model.audio_mels > 0 else Seq2SeqFamily
        return family(cfg.model, graphdef, decoder_start_id=decoder_start_id, unpack=unpack)
    if arch == "image_prefix":
        if decoder_start_id is None:
            raise UserError("an image-prefix model needs its decoder-start token id")
        return ImagePrefixFamily(cfg.model, graphdef, decoder_start_id=decoder_start_id,
                                 unpack=unpack)
    if arch == "xlnet":
        raise UserError("model.arch='xlnet' (objective.kind='permutation_lm') does not "
                        "generate text: it is trained to fill tokens in a sampled order and "
                        "has no decode cache; train a decoder to sample")
    raise UserError(f"model.arch={arch!r} does not generate text: an encoder predicts labels "
                    "or masked tokens, not continuations")
