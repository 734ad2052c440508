"""A run dir ready to generate: its weights (``jaxformer.runs.restore``), its family's decoding
hooks, its tokenizer and special tokens (``jaxformer.runs.specials``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxformer.config import Config
from jaxformer.data import speech
from jaxformer.data.special_tokens import SpecialTokens as _SpecialTokens
from jaxformer.data.speech_task import CharTokenizer, is_speech
from jaxformer.data.synthetic import SymbolTokenizer, is_synthetic
from jaxformer.data.tokenizer import EOS, PAD
from jaxformer.errors import UserError
from jaxformer.inference.families import Family, Unpack, family_for
from jaxformer.inference.generate import Generator
from jaxformer.inference.quantize import is_quantized, load_quantized
from jaxformer.models.build import abstract_model
from jaxformer.runs.restore import load_run, read_run_config
from jaxformer.runs.specials import (
    SpecialTokens,
    encode_prompt,
    load_run_tokenizer,
    read_special_tokens,
)


@dataclasses.dataclass
class LoadedRun:
    """What generating from a run needs."""

    cfg: Config
    params: Any
    family: Family
    tokenizer: Any  # tokenizers.Tokenizer, or the synthetic tasks' SymbolTokenizer
    specials: SpecialTokens

    def generator(self) -> Generator:
        pad = self.specials.pad_id if self.specials.pad_id is not None else 0
        return Generator(self.family, self.params, pad_id=pad, decode=self.decode)

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens left out."""
        return self.tokenizer.decode([i for i in ids if i not in self.specials.ids()])

    def encode(self, text: str) -> list[int]:
        """A prompt's ids: a decoder's prompt after the BOS its tokenizer adds (an empty one
        starts a new document); an encoder-decoder's source ends with the end token, as the
        model was trained."""
        if self.family.kind == "decoder":
            return encode_prompt(self.tokenizer, self.specials, text)
        ids = list(self.tokenizer.encode(text).ids)
        if not ids:
            raise UserError("the source text is empty: an encoder-decoder needs a source")
        eos = self.specials.eos_id
        return ids if eos is None or ids[-1] == eos else [*ids, eos]


def load_for_generation(run_dir: Path, step: int | None = None, *,
                        params: Any = None, unpack: Unpack | None = None) -> LoadedRun:
    """Loads a run dir of any family that generates (decoder, prefix-LM, encoder-decoder).
    ``params``/``unpack``: parameters loaded elsewhere (a quantized run) and the function that
    turns them into the model's inside the jitted step."""
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    if saved.model.arch == "encoder":
        raise UserError(f"{run_dir} holds an encoder (model.arch='encoder'): it predicts labels "
                        "or masked tokens and does not generate text")
    if is_synthetic(saved.data.source):  # fixed symbol vocabulary, no tokenizer file
        tokenizer, specials = SymbolTokenizer(EOS, PAD), read_special_tokens(run_dir)
    elif is_speech(saved.data.source):  # transcripts: the fixed character vocabulary
        tokenizer = CharTokenizer()
        specials = _SpecialTokens(bos_id=speech.BOS_ID, eos_ids=(speech.EOS_ID,),
                                  pad_id=speech.PAD_ID, decoder_start_id=speech.BOS_ID,
                                  add_bos=False)
    else:
        tokenizer, specials = load_run_tokenizer(run_dir)
    if params is None and is_quantized(run_dir):  # int weights, dequantized inside the jit
        if step not in (None, 0):
            raise UserError(f"{run_dir} is a quantized run: its one checkpoint is step 0")
        _, params, unpack = load_quantized(run_dir)
    if params is None:
        cfg, params = load_run(run_dir, step)
    else:
        cfg = saved
    graphdef, _ = abstract_model(cfg.model)
    family = family_for(cfg, graphdef, decoder_start_id=specials.decoder_start_id,
                        unpack=unpack)
    return LoadedRun(cfg, params, family, tokenizer, specials)
