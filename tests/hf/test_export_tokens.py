"""`jaxformer convert --to-hf` carries the run's special tokens: transformers loads the export
with the run's end-of-text and padding ids (no fallback to GPT-2's 50256 or Llama's 1 and 2,
no warning), `generate` stops at end of text, T5 starts decoding where jaxformer does, and
AutoTokenizer loads the run's tokenizer."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxformer.cli import main  # noqa: E402
from jaxformer.config import Config, DataConfig, ModelConfig, ObjectiveConfig  # noqa: E402
from jaxformer.data.tokenizer import EOS, PAD, save_tokenizer, train_tokenizer  # noqa: E402
from jaxformer.data.tokenizer_kinds import KINDS, MASK_ROLE, SENTINELS_ROLE  # noqa: E402
from jaxformer.models import presets  # noqa: E402
from jaxformer.models.build import init_params  # noqa: E402
from jaxformer.objectives.specials import MASK, sentinel  # noqa: E402
from jaxformer.runs import rundir  # noqa: E402
from jaxformer.runs.checkpoint import Checkpointer  # noqa: E402
from tests.corpus import document  # noqa: E402

SIZE = dict(n_layers=1, d_model=32, n_heads=2, vocab_size=320, max_len=64)
FAMILIES = {  # model_type -> (model config, objective, extra special tokens, Auto class)
    "gpt2": (ModelConfig(**SIZE), "causal", [], "AutoModelForCausalLM"),
    "llama": (presets.llama(**SIZE), "causal", [], "AutoModelForCausalLM"),
    "t5": (presets.t5_v1_1(**SIZE), "span_corruption", [sentinel(i) for i in range(64)],
           "AutoModelForSeq2SeqLM"),
    "bert": (presets.bert(**SIZE), "masked_lm", [MASK], "AutoModelForMaskedLM"),
}
# What each family's config.json must say, in the run tokenizer's ids (EOS 0, PAD 1).
IDS = {"gpt2": {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1},
       "llama": {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1},
       "t5": {"eos_token_id": 0, "pad_token_id": 1, "decoder_start_token_id": 1},
       "bert": {"pad_token_id": 1}}


def write_run(directory, model: ModelConfig, objective: str, specials: list[str],
              edit=None, kind: str = "bpe"):
    """A run dir as training leaves it: config, tokenizer (of ``kind``), a checkpoint of
    ``model``'s (random, or ``edit``ed) weights."""
    rng = np.random.default_rng(0)
    tok = train_tokenizer([document(rng, i) for i in range(40)], 300 + len(specials),
                          extra_special_tokens=specials, kind=kind)
    cfg = Config(name=directory.name, model=model, data=DataConfig(seq_len=32, tokenizer=kind),
                 objective=ObjectiveConfig(kind=objective))
    params = jax.tree.map(np.array, init_params(model, 0))
    if edit is not None:
        edit(params)
    directory.mkdir()
    rundir.write_config(directory, cfg)
    save_tokenizer(tok, directory / rundir.TOKENIZER_FILE)
    ckpt = Checkpointer(directory / rundir.CHECKPOINT_DIR, 1)
    ckpt.save_params(0, params, {"config": rundir.config_lib.to_dict(cfg)})
    ckpt.close()
    return tok


@contextlib.contextmanager
def transformers_messages():
    """Every warning and log record transformers emits inside the block, as text."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, logger = Collect(level=logging.WARNING), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages += [str(w.message) for w in caught]
    finally:
        logger.removeHandler(handler)


def export(run, out):
    assert main(["convert", "--to-hf", str(run), "--out", str(out)]) == 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_has_the_runs_special_token_ids(family, tmp_path, capsys):
    model, objective, specials, auto = FAMILIES[family]
    tok = write_run(tmp_path / "run", model, objective, specials)
    assert (tok.token_to_id(EOS), tok.token_to_id(PAD)) == (0, 1)  # what IDS is written in
    export(tmp_path / "run", tmp_path / "hf")
    capsys.readouterr()
    with transformers_messages() as messages:
        loaded = getattr(transformers, auto).from_pretrained(tmp_path / "hf")
    assert not [m for m in messages if "token_id" in m or "vocabulary" in m], messages
    for key, value in IDS[family].items():
        assert getattr(loaded.config, key) == value, key
    generation = tmp_path / "hf" / "generation_config.json"
    if family == "bert":  # an encoder: nothing to generate
        assert not generation.exists()
    else:
        assert json.loads(generation.read_text()) == IDS[family]
        for key, value in IDS[family].items():
            assert getattr(loaded.generation_config, key) == value, key
    # The tokenizer: special tokens by name, the same ids and text as the run's.
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.eos_token, hf_tok.pad_token) == ((EOS, PAD) if family != "bert"
                                                    else (None, PAD))
    assert hf_tok.pad_token_id == 1
    if family == "bert":
        assert hf_tok.mask_token == MASK and hf_tok.mask_token_id == tok.token_to_id(MASK)
    if family == "t5":
        assert hf_tok.convert_tokens_to_ids(sentinel(63)) == tok.token_to_id(sentinel(63))
        assert sentinel(5) in hf_tok.all_special_tokens
    text = "def alpha_0(alpha, beta):\n    return alpha * 2\n"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.decode(tok.encode(text).ids) == text


@pytest.mark.parametrize("family, kind", [("bert", "wordpiece"), ("t5", "unigram")])
def test_export_of_another_kind_of_tokenizer_names_its_own_tokens(family, kind, tmp_path,
                                                                   capsys):
    """BERT's WordPiece and T5's Unigram (``data.tokenizer``) export with their own special
    tokens: [PAD], [UNK], [MASK]; <pad>, </s>, <unk>, <extra_id_N>."""
    model, objective, _, auto = FAMILIES[family]
    spec = KINDS[kind]
    roles = [MASK_ROLE] if objective == "masked_lm" else [SENTINELS_ROLE]
    tok = write_run(tmp_path / "run", model, objective, list(spec.extra_tokens(roles)),
                    kind=kind)
    export(tmp_path / "run", tmp_path / "hf")
    capsys.readouterr()
    loaded = getattr(transformers, auto).from_pretrained(tmp_path / "hf")
    assert loaded.config.pad_token_id == tok.token_to_id(spec.pad) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.pad_token, hf_tok.unk_token) == (spec.pad, spec.unk)
    if family == "bert":
        assert hf_tok.mask_token == "[MASK]" and hf_tok.mask_token_id == 4
    else:
        assert loaded.config.eos_token_id == tok.token_to_id("</s>") == 1
        assert hf_tok.eos_token == "</s>"
        assert hf_tok.convert_tokens_to_ids("<extra_id_63>") == tok.token_to_id("<extra_id_63>")
        assert "<extra_id_5>" in hf_tok.all_special_tokens
    text = "def alpha_0(alpha, beta):\n    return alpha * 2\n"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids


def test_generate_stops_at_the_runs_end_of_text(tmp_path, capsys):
    """A GPT-2 whose every position predicts end-of-text (the final norm outputs a constant
    vector that only the end-of-text embedding row aligns with): greedy `generate` emits it
    once and stops, instead of running to max_new_tokens."""
    def eos_dominates(params):
        params["final_norm"]["scale"][:] = 0.0
        params["final_norm"]["bias"][:] = 1.0
        params["embed"]["table"][0] = 10.0  # logit 10 * d_model for EOS, ~0.1 for the rest

    model, objective, specials, _ = FAMILIES["gpt2"]
    tok = write_run(tmp_path / "run", model, objective, specials, edit=eos_dominates)
    export(tmp_path / "run", tmp_path / "hf")
    capsys.readouterr()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([tok.encode("def alpha_0(alpha):").ids])
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assert out[0, prompt.shape[1]:].tolist() == [tok.token_to_id(EOS)]
