"""``jaxformer sample``: text from a run of any family that generates, by sampling, greedy,
beam search or speculative decoding.

The command parses; ``SampleOptions.check`` validates before anything is loaded; ``sample``
loads the run and yields the text to print (a single prompt's text as it is generated).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

from jaxformer.errors import UserError
from jaxformer.inference import prompt_cache
from jaxformer.inference import speech as speech_inputs
from jaxformer.inference.beam_search import beam_search
from jaxformer.inference.mtp_speculative import mtp_generate
from jaxformer.inference.processors import SamplingParams
from jaxformer.inference.restore import LoadedRun, load_for_generation
from jaxformer.inference.speculative import speculative_generate

# Defaults of the sampling flags when none is given (beam search takes none of them).
DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
EARLY_STOPPING = {"true": True, "false": False, "never": "never"}


@dataclasses.dataclass
class SampleOptions:
    """What the command line asks for; None: not given."""

    run_dir: Path
    prompts: list[str]
    max_new_tokens: int = 200
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_tokens: list[str] = dataclasses.field(default_factory=list)
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: str = "false"
    num_return_sequences: int = 1
    draft: Path | None = None
    draft_k: int = 4
    mtp: bool = False
    save_prompt_cache: Path | None = None
    prompt_cache: Path | None = None
    seed: int = 0
    step: int | None = None
    audio: list[str] = dataclasses.field(default_factory=list)  # speech runs: WAVs, heldout:K

    def sampling(self) -> SamplingParams:
        given = {k: getattr(self, k) for k in ("temperature", "top_k", "top_p", "min_p")
                 if getattr(self, k) is not None}
        params = SamplingParams(**{**DEFAULT_SAMPLING, **given},
                                repetition_penalty=self.repetition_penalty,
                                presence_penalty=self.presence_penalty,
                                frequency_penalty=self.frequency_penalty,
                                no_repeat_ngram_size=self.no_repeat_ngram_size)
        params.check()
        return params

    def check(self) -> None:
        """Every flag in range and no two that conflict (before any loading)."""
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.seed < 2**31:
            raise UserError(f"--seed must be in [0, 2**31), got {self.seed}")
        if self.num_beams < 1:
            raise UserError(f"--num-beams must be at least 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise UserError(f"--num-return-sequences must be in [1, --num-beams "
                            f"{self.num_beams}], got {self.num_return_sequences}")
        if not math.isfinite(self.length_penalty):
            raise UserError(f"--length-penalty must be finite, got {self.length_penalty}")
        if self.draft_k < 1:
            raise UserError(f"--draft-k must be at least 1, got {self.draft_k}")
        self.sampling()
        if self.num_beams > 1:
            flags = [f"--{k.replace('_', '-')}" for k in ("temperature", "top_k", "top_p",
                                                        "min_p")
                     if getattr(self, k) is not None]
            if flags:
                raise UserError(f"beam search (--num-beams {self.num_beams}) is deterministic: "
                                f"drop {', '.join(flags)}")
            if (self.repetition_penalty, self.presence_penalty, self.frequency_penalty,
                    self.no_repeat_ngram_size) != (1.0, 0.0, 0.0, 0):
                raise UserError("beam search does not apply repetition, presence, frequency or "
                                "n-gram penalties: drop them or --num-beams")
            if self.draft is not None:
                raise UserError("--draft and --num-beams do not combine: speculative decoding "
                                "samples or decodes greedily")
            if self.stop:
                raise UserError("--stop strings do not combine with --num-beams (use "
                                "--stop-token)")
        if self.draft is not None and len(self.prompts) > 1:
            raise UserError("--draft decodes one prompt at a time: give one --prompt")
        if self.mtp:
            if self.num_beams > 1 or self.draft is not None or len(self.prompts) > 1:
                raise UserError("--mtp decodes one prompt greedily: no --num-beams, --draft or "
                                "second --prompt")
            if self.temperature not in (None, 0.0) or self.stop or any(
                    getattr(self, k) is not None for k in ("top_k", "top_p", "min_p")):
                raise UserError("--mtp decodes greedily: drop the sampling flags and --stop")
        cache_flag = "--save-prompt-cache" if self.save_prompt_cache else "--prompt-cache"
        if self.save_prompt_cache or self.prompt_cache:
            if self.save_prompt_cache and self.prompt_cache:
                raise UserError("give --save-prompt-cache or --prompt-cache, not both")
            if len(self.prompts) > 1 or self.num_beams > 1 or self.draft is not None:
                raise UserError(f"{cache_flag} takes one --prompt, without --num-beams or "
                                "--draft")
            if self.save_prompt_cache and not self.prompts:
                raise UserError("--save-prompt-cache needs the --prompt to cache")


def _stop_ids(run: LoadedRun, names: list[str]) -> list[int]:
    """``--stop-token`` values (a token of the tokenizer, or an id) -> ids, after the run's
    own end tokens."""
    ids = list(run.specials.eos_ids)
    vocab = run.cfg.model.vocab_size
    for name in names:
        token_id = run.tokenizer.token_to_id(name)
        if token_id is None and name.isdigit():
            token_id = int(name)
        if token_id is None or not 0 <= token_id < vocab:
            raise UserError(f"--stop-token {name!r} is not a token of the run's tokenizer "
                            f"(nor an id below the vocabulary size {vocab})")
        ids.append(token_id)
    return ids


def sample(opts: SampleOptions, note: Callable[[str], None] = print) -> Iterator[str]:
    """Yields the text to print: with one prompt and no beams, pieces as they are generated
    (the prompt first, for a decoder); else one block per prompt (and per returned beam)."""
    opts.check()
    run = load_for_generation(opts.run_dir, opts.step)
    if run.cfg.model.audio_mels > 0 or opts.audio:
        yield from _transcripts(run, opts)
        return
    prompts = opts.prompts or [""]
    if run.family.kind == "decoder":
        # Trailing spaces go: byte-level BPE keeps a word's space in the word's token.
        prompts = [p.rstrip(" ") or p for p in prompts]
    ids = [run.encode(p) for p in prompts]
    stops = _stop_ids(run, opts.stop_tokens)
    show_prompt = run.family.kind == "decoder"
    if opts.num_beams > 1:
        yield from _beams(run, opts, prompts, ids, stops, show_prompt)
        return
    if opts.draft is not None:
        yield from _speculative(run, opts, prompts[0], ids[0], stops, show_prompt, note)
        return
    if opts.mtp:
        if run.family.kind != "decoder":
            raise UserError("--mtp needs a decoder-only run trained with model.mtp_heads > 0")
        tokens, stats = mtp_generate(run.family, run.params, ids[0],
                                     max_new_tokens=opts.max_new_tokens, stop_tokens=stops)
        yield (prompts[0] if show_prompt else "") + run.decode(tokens) + "\n"
        note(f"self-speculative decoding: {stats.accepted}/{stats.proposed} MTP proposals "
             f"accepted, {stats.tokens_per_target_call:.2f} tokens per model call")
        return
    if opts.save_prompt_cache is not None:
        cache = prompt_cache.compute(run.family, run.params, ids[0])
        prompt_cache.save(cache, opts.save_prompt_cache)
        note(f"wrote {opts.save_prompt_cache}: the keys and values of {len(ids[0])} prompt "
             "tokens; continue it with --prompt-cache")
        return
    prefix = None
    if opts.prompt_cache is not None:
        prefix = prompt_cache.load(opts.prompt_cache, run.family, run.params)
        # The continuation alone (no begin token: the cached prefix has it).
        ids = [list(run.tokenizer.encode(prompts[0], add_special_tokens=False).ids)
               if prompts[0] else []]
        prompts = [run.decode(prefix.tokens) + prompts[0]]
    generator = run.generator()
    sampling = opts.sampling()
    if len(prompts) == 1:
        if show_prompt:
            yield prompts[0]
        new_ids: list[int] = []
        printed = ""
        for chunk in generator.stream(ids, opts.max_new_tokens, sampling, stop_tokens=stops,
                                      stop_strings=opts.stop, seed=opts.seed, prefix=prefix):
            new_ids.extend(chunk[0])
            # A character split between tokens decodes as U+FFFD until its last byte comes.
            text = run.decode(new_ids).rstrip("\ufffd")
            yield text[len(printed):]
            printed = text
        yield run.decode(new_ids)[len(printed):] + "\n"
        return
    gens = generator.generate(ids, opts.max_new_tokens, sampling, stop_tokens=stops,
                              stop_strings=opts.stop, seed=opts.seed)
    for i, (prompt, gen) in enumerate(zip(prompts, gens, strict=True)):
        yield ("" if i == 0 else "\n") + (prompt if show_prompt else "") + gen.text + "\n"


def _transcripts(run: LoadedRun, opts: SampleOptions) -> Iterator[str]:
    """A speech run: one line per ``--audio`` input, greedy or (``--num-beams``) beam
    search; a held-out clip's reference transcript beside it."""
    if run.cfg.model.audio_mels <= 0:
        raise UserError(f"--audio needs a speech run (model.audio_mels > 0); {opts.run_dir} "
                        "reads tokens: give --prompt")
    if not opts.audio:
        raise UserError("a speech run transcribes audio: give --audio FILE.wav or "
                        "--audio heldout:K (--prompt is not read)")
    if opts.temperature not in (None, 0.0) or opts.draft is not None or opts.mtp:
        raise UserError("speech runs decode greedily or by beam search (--num-beams): drop "
                        "--temperature, --draft and --mtp")
    inputs = speech_inputs.audio_inputs(run.cfg, opts.audio)
    max_chars = min(opts.max_new_tokens, run.cfg.data.seq_len) - 1
    if max_chars < 1:
        raise UserError("--max-new-tokens must leave room for one character and the end token")
    texts = speech_inputs.transcribe(run.family, run.params, [w for w, _ in inputs], max_chars,
                                     num_beams=opts.num_beams,
                                     length_penalty=opts.length_penalty)
    for spec, (_, ref), text in zip(opts.audio, inputs, texts, strict=True):
        yield f"{spec}: {text!r}" + ("" if ref is None else f" (reference {ref!r})") + "\n"


def _beams(run: LoadedRun, opts: SampleOptions, prompts: list[str], ids: list[list[int]],
           stops: list[int], show_prompt: bool) -> Iterator[str]:
    pad = run.specials.pad_id if run.specials.pad_id is not None else 0
    results = beam_search(run.family, run.params, ids, num_beams=opts.num_beams,
                          max_new_tokens=opts.max_new_tokens, eos_ids=stops, pad_id=pad,
                          length_penalty=opts.length_penalty,
                          early_stopping=EARLY_STOPPING[opts.early_stopping],
                          num_return_sequences=opts.num_return_sequences)
    first = True
    for prompt, beams in zip(prompts, results, strict=True):
        for beam in beams:
            text = run.decode([t for t in beam.tokens if t not in stops])
            yield ("" if first else "\n") + f"[score {beam.score:.4f}] " + \
                (prompt if show_prompt else "") + text + "\n"
            first = False


def _speculative(run: LoadedRun, opts: SampleOptions, prompt: str, ids: list[int],
                 stops: list[int], show_prompt: bool, note: Callable[[str], None]
                 ) -> Iterator[str]:
    if run.family.kind != "decoder":
        raise UserError("speculative decoding (--draft) needs a decoder-only target")
    draft = load_for_generation(opts.draft)
    if draft.family.kind != "decoder":
        raise UserError(f"the draft {opts.draft} is not a decoder-only model")
    if draft.cfg.model.vocab_size != run.cfg.model.vocab_size:
        raise UserError(f"the draft's vocabulary ({draft.cfg.model.vocab_size}) differs from "
                        f"the target's ({run.cfg.model.vocab_size})")
    tokens, stats = speculative_generate(
        run.family, run.params, draft.family, draft.params, ids,
        max_new_tokens=opts.max_new_tokens, k=opts.draft_k, sampling=opts.sampling(),
        stop_tokens=stops, seed=opts.seed)
    yield (prompt if show_prompt else "") + run.decode(tokens) + "\n"
    note(f"speculative decoding: {stats.accepted}/{stats.proposed} draft tokens accepted "
         f"({stats.acceptance_rate:.0%}), {stats.tokens_per_target_call:.2f} tokens per target "
         f"call ({stats.rounds} rounds for {len(tokens)} tokens)")
