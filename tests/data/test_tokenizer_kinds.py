"""The tokenizer kinds of ``data.tokenizer`` (``jaxformer.data.tokenizer_kinds``): each trained
on a corpus, checked against what the text is (round trips, an independent WordPiece), against
Hugging Face ``transformers`` (the saved file loads there and encodes the same ids), and
through the real training set-up with an objective that uses its special tokens."""

from __future__ import annotations

import math
import re
import string
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxformer import cli
from jaxformer import config as config_lib
from jaxformer.config import ConfigError
from jaxformer.data.special_tokens import of_jaxformer_tokenizer
from jaxformer.data.tokenizer import encode_documents, load_tokenizer, save_tokenizer
from jaxformer.data.tokenizer_kinds import (
    KINDS,
    MASK_ROLE,
    SENTINELS_ROLE,
    kind_of,
    train,
    word_starts,
)
from jaxformer.objectives.masked_lm import mask_example
from jaxformer.runs import rundir
from jaxformer.runs.specials import load_run_tokenizer
from jaxformer.train.loop import train as train_run
from tests.command_line import assert_user_error, jaxformer
from tests.corpus import document, write_corpus
from tests.train.helpers import task_batches

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512
NEW_KINDS = ("wordpiece", "unigram", "char", "bytes")
# Exact round trips for any text: the byte-level kinds, and char through its byte fallback.
EXACT = ("bpe", "char", "bytes")
EXAMPLES = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
# Printable text, whitespace, non-Latin scripts, emoji; no control characters (WordPiece's
# pre-tokenizer and Python disagree on which of those are whitespace).
TEXT = st.text(st.one_of(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")),
                         st.sampled_from(" \n\t")), max_size=60)
# The Basic Multilingual Plane: the punctuation of newer Unicode versions (U+11660, say) is
# not punctuation to the Rust crate's older tables.
BMP_TEXT = st.text(st.one_of(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"),
                                           max_codepoint=0xFFFF),
                             st.sampled_from(" \n\t")), max_size=60)


def _texts() -> list[str]:
    rng = np.random.default_rng(0)
    return [*(document(rng, i) for i in range(60)), "héllo wörld, ça va? naïve café", "日本語"]


def _train(kind: str):
    spec = KINDS[kind]
    roles = [MASK_ROLE] + ([SENTINELS_ROLE] if spec.supports(SENTINELS_ROLE) else [])
    return train(kind, _texts(), VOCAB, spec.extra_tokens(roles))


class _Trained(dict):
    def __repr__(self) -> str:  # hypothesis prints its arguments: not 50 kB of vocabularies
        return f"<tokenizers of kinds {', '.join(self)}>"


@pytest.fixture(scope="module")
def tokenizers():
    return _Trained({kind: _train(kind) for kind in KINDS})


def _decode(tok, text: str) -> str:
    return tok.decode(encode_documents(tok, [text])[0].tolist(), skip_special_tokens=False)


# --- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", EXACT)
@EXAMPLES
@given(text=TEXT)
def test_byte_kinds_round_trip_any_text_exactly(tokenizers, kind, text):
    assert _decode(tokenizers[kind], text) == text


def test_char_is_one_token_per_character_and_bytes_one_per_byte(tokenizers):
    text = "def alpha(x):\n\treturn é + 日 + Ω"
    char = tokenizers["char"]
    ids = encode_documents(char, [text])[0]
    # Seen characters are one token each; the unseen Ω is its 2 UTF-8 bytes.
    assert len(ids) == len(text) - 1 + 2
    assert [char.id_to_token(int(i)) for i in ids[-2:]] == ["<0xCE>", "<0xA9>"]
    assert len(encode_documents(tokenizers["bytes"], [text])[0]) == len(text.encode())


def _unigram_known(tok) -> set[str]:
    return {p for p in tok.get_vocab() if len(p) == 1 and p != "▁"} | {" "}


@EXAMPLES
@given(text=TEXT)
def test_unigram_round_trips_and_turns_unknown_characters_into_unk(tokenizers, text):
    tok = tokenizers["unigram"]
    known = _unigram_known(tok)
    text = text.replace("▁", "")  # SentencePiece's own space mark reads back as a space
    # Each run of characters the vocabulary lacks becomes one <unk>; a leading space is the
    # word mark Metaspace puts before the first word anyway, and is not read back.
    expected = re.sub("[^" + re.escape("".join(sorted(known))) + "]+", "<unk>", text)
    expected = expected.removeprefix(" ")
    assert _decode(tok, text) == expected


def _is_punctuation(c: str) -> bool:
    """BERT's rule: ASCII punctuation or a Unicode punctuation character (category P*)."""
    return (c.isascii() and c in string.punctuation) or unicodedata.category(c).startswith("P")


def _bert_words(text: str) -> list[str]:
    """BERT's basic split, written here: at whitespace, and every punctuation character alone."""
    words = []
    for chunk in text.split():
        word = ""
        for c in chunk:
            if _is_punctuation(c):
                words += [word] if word else []
                words.append(c)
                word = ""
            else:
                word += c
        words += [word] if word else []
    return words


def _wordpiece(word: str, vocab: set[str]) -> list[str] | None:
    """Greedy longest-match-first pieces of a word (None: unknown), as BERT's WordPiece."""
    if len(word) > 100:
        return None
    pieces, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                pieces.append(piece)
                start = end
                break
        else:
            return None
    return pieces


@EXAMPLES
@given(text=st.one_of(BMP_TEXT, st.lists(st.sampled_from(
    ["alpha", "beta_1", "(", "count", "é", "y", "??", "deltagamma", "日本"]), max_size=12
).map(" ".join)))
def test_wordpiece_matches_an_independent_wordpiece_and_decodes_unknown_words_as_unk(
        tokenizers, text):
    tok = tokenizers["wordpiece"]
    vocab = set(tok.get_vocab())
    expected = []
    for word in _bert_words(text):
        expected += _wordpiece(word, vocab) or ["[UNK]"]
    ids = encode_documents(tok, [text])[0].tolist()
    assert [tok.id_to_token(i) for i in ids] == expected
    # Decoding joins words with spaces (and BERT's clean-up drops some before punctuation).
    decoded = tok.decode(ids, skip_special_tokens=False)
    assert re.sub(r"\s", "", decoded) == "".join(p.removeprefix("##") for p in expected)


def test_wordpiece_unknown_word_is_unk(tokenizers):
    tok = tokenizers["wordpiece"]
    assert _decode(tok, "alpha yak beta") == "alpha [UNK] beta"


# --- special tokens -----------------------------------------------------------------------------

def _specials(kind: str) -> list[str]:
    spec = KINDS[kind]
    sentinels = spec.sentinels() if spec.supports(SENTINELS_ROLE) else []
    return list(dict.fromkeys([*spec.base, spec.mask, *sentinels]))


@pytest.mark.parametrize("kind", list(KINDS))
def test_special_tokens_have_the_first_ids_and_are_never_split(tokenizers, kind):
    tok, spec = tokenizers[kind], KINDS[kind]
    names = _specials(kind)
    assert [tok.token_to_id(t) for t in names] == list(range(len(names)))
    for name in names:
        token_id = tok.token_to_id(name)
        ids = tok.encode(f"x {name}a{name}", add_special_tokens=False).ids
        assert ids.count(token_id) == 2, (name, ids)
        # Inside a document the same text is text: no special id comes out of it (but the
        # unknown token for what the vocabulary lacks: WordPiece's "UNK" in "[UNK]").
        if name != spec.unk:
            assert token_id not in encode_documents(tok, [f"x {name}a{name}"])[0]
    # The run's special tokens are the kind's own.
    specials = of_jaxformer_tokenizer(tok, encoder_decoder=True)
    assert specials.eos_id == tok.token_to_id(spec.eos)
    assert specials.pad_id == specials.decoder_start_id == tok.token_to_id(spec.pad)


def test_wordpiece_has_berts_tokens_and_no_sentinels(tokenizers):
    tok = tokenizers["wordpiece"]
    assert [tok.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                      "[MASK]"]
    assert not KINDS["wordpiece"].supports(SENTINELS_ROLE)
    assert tok.token_to_id("<extra_id_0>") is None and tok.token_to_id("<|extra_0|>") is None


def test_mask_and_sentinels_are_added_only_when_asked():
    plain = train("unigram", _texts(), VOCAB)
    assert [plain.token_to_id(t) for t in ("<mask>", "<extra_id_0>")] == [None, None]
    assert plain.token_to_id("</s>") == 1


@pytest.mark.parametrize("kind", list(KINDS))
def test_saved_file_loads_as_the_same_kind_and_in_transformers(tokenizers, kind, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers[kind]
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    loaded = load_tokenizer(path)
    assert kind_of(loaded).name == kind
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in ["def alpha_1(x, y):\n    return x + 3", "naïve café 日本 🙂", ""]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert loaded.encode(text, add_special_tokens=False).ids == ids
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.encode(text) == ids  # no template adds tokens around a text
        assert hf.decode(ids) == tok.decode(ids, skip_special_tokens=False)
    eos = KINDS[kind].eos
    assert hf.convert_tokens_to_ids(eos) == tok.token_to_id(eos)


def test_a_too_small_vocabulary_is_a_data_error():
    from jaxformer.data.errors import DataError

    with pytest.raises(DataError, match="too small for a bytes tokenizer"):
        train("bytes", _texts(), 200)
    with pytest.raises(DataError, match="too small for a unigram tokenizer of this corpus"):
        train("unigram", _texts(), 60)
    with pytest.raises(DataError, match="too small for a wordpiece tokenizer of this corpus"):
        train("wordpiece", _texts(), 60)  # its characters, as c and ##c, take more


# --- word boundaries ----------------------------------------------------------------------------

WORDS = "alpha beta gamma deltagamma total countvalue index item data alphabet"


def _word_of_each_char(text: str) -> list[int]:
    """The word each character belongs to; a space belongs to the word after it."""
    out, word = [], 0
    for i, c in enumerate(text):
        if c == " " and i and text[i - 1] != " ":
            word += 1
        out.append(word)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_word_starts_are_the_kinds_own_word_boundaries(tokenizers, kind):
    tok = tokenizers[kind]
    enc = tok.encode(WORDS, add_special_tokens=False)
    word_of = _word_of_each_char(WORDS)
    words = [word_of[max(end - 1, start)] for start, end in enc.offsets]
    expected = [words[i] != words[i - 1] for i in range(1, len(words))]
    table = word_starts(tok)
    # (the first token of a row is a start whatever it is: mask_example makes it one)
    assert table[enc.ids].tolist()[1:] == expected
    # Whole-word masking selects whole words only.
    ids = np.asarray(enc.ids)
    out = mask_example(ids, np.ones_like(ids), np.random.default_rng(0), mask_rate=0.3,
                       mask_id=tok.token_to_id(KINDS[kind].mask), vocab_size=VOCAB,
                       special_ids=[0, 1], word_starts=table[ids])
    chosen = {words[i] for i in np.flatnonzero(out["loss_weights"])}
    assert chosen and all(out["loss_weights"][np.asarray(words) == w].all() for w in chosen)


# --- config ---------------------------------------------------------------------------------------

def test_the_default_kind_is_bpe_and_a_bad_one_names_the_choices():
    assert config_lib.Config().data.tokenizer == "bpe"
    with pytest.raises(ConfigError, match=r"data.tokenizer: 'wordpeice'; did you mean "
                                          r"'wordpiece'\?"):
        config_lib.apply_overrides(config_lib.Config(), ["data.tokenizer=wordpeice"])


def test_span_corruption_refuses_a_tokenizer_without_sentinels():
    cfg = config_lib.load_experiment(ROOT / "experiments" / "t5_tiny.py")
    with pytest.raises(ConfigError, match="span_corruption.*data.tokenizer='wordpiece'"):
        config_lib.apply_overrides(cfg, ["data.tokenizer=wordpiece"])
    for kind in ("bpe", "unigram", "char", "bytes"):
        config_lib.apply_overrides(cfg, [f"data.tokenizer={kind}"])


@pytest.mark.parametrize("experiment, value, needles", [
    ("gpt_tiny", "sentencepiece", ["data.tokenizer", "'sentencepiece'", "wordpiece"]),
    ("t5_tiny", "wordpiece", ["span_corruption", "data.tokenizer='wordpiece'", "unigram"]),
])
def test_the_command_refuses_a_bad_kind_in_one_line(tmp_path, experiment, value, needles):
    out = jaxformer("train", str(ROOT / "experiments" / f"{experiment}.py"), "--set",
                    f"data.tokenizer={value}", "--run-dir", str(tmp_path / "run"))
    assert_user_error(out, *needles)
    assert not (tmp_path / "run").exists()


# --- a tiny run of each kind, through the real set-up --------------------------------------------

TINY = ("model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
        "train.batch_size=2", "train.steps=2", "train.warmup_steps=1", "eval.every=2",
        "eval.batches=1", "log.every=1", "checkpoint.every=2", "sample.count=0",
        "sample.prompts=[]", f"model.vocab_size={VOCAB}", "data.seq_len=32", "model.max_len=32")
# Each kind with an objective that uses its special tokens: BERT's with whole-word masking,
# T5's with its sentinels, ByT5's too.
RUNS = {"bpe": ("gpt_tiny", ()),
        # a small vocabulary, so that words are split into "##" pieces
        "wordpiece": ("bert_tiny", ("objective.whole_word=true", "model.vocab_size=90")),
        "unigram": ("t5_tiny", ("model.n_decoder_layers=1",)),
        "char": ("prefixlm_tiny", ()),
        "bytes": ("t5_tiny", ("model.n_decoder_layers=1",))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("kinds") / "corpus", n_docs=40)


@pytest.mark.parametrize("kind", list(RUNS))
def test_a_tiny_run_trains_with_each_kind(kind, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXFORMER_PEAK_FLOPS", "1e11")
    experiment, extra = RUNS[kind]
    cfg = config_lib.load_experiment(ROOT / "experiments" / f"{experiment}.py")
    cfg = config_lib.apply_overrides(cfg, [*TINY, f"data.source={corpus}",
                                           f"data.tokenizer={kind}", *extra])
    run_dir = tmp_path / "run"
    result = train_run(cfg, run_dir, progress=False, echo=lambda _: None)
    assert sorted(result.losses) == [1, 2]
    assert all(math.isfinite(v) and v > 0 for v in result.losses.values()), result.losses
    assert rundir.read_config(run_dir).data.tokenizer == kind
    tok, specials = load_run_tokenizer(run_dir)
    assert kind_of(tok).name == kind
    assert specials.eos_id == tok.token_to_id(KINDS[kind].eos)
    if kind in NEW_KINDS:  # its special tokens, not byte-level BPE's
        assert tok.token_to_id("<|endoftext|>") is None
    # The objective's batches hold the kind's own special tokens where they belong.
    spec, batch = KINDS[kind], task_batches(cfg, run_dir / "tokenizer.json")(0)
    if cfg.objective.kind == "span_corruption":
        sentinel = tok.token_to_id(spec.sentinel(0))
        assert sentinel in batch["enc_inputs"] and sentinel in batch["targets"]
        assert tok.token_to_id(spec.eos) in batch["targets"]
        assert (batch["inputs"][:, 0] == tok.token_to_id(spec.pad)).all()  # decoder start
    elif cfg.objective.kind == "masked_lm":
        assert tok.token_to_id(spec.mask) in batch["inputs"]
        # Whole words: a selected "##" piece continues a selected word.
        continues = np.vectorize(lambda i: tok.id_to_token(int(i)).startswith("##"))(
            batch["targets"])
        picked = batch["loss_weights"] > 0
        assert (picked[:, 1:] <= picked[:, :-1] | ~continues[:, 1:]).all()
        assert (picked & continues).any()
    else:  # documents end with the kind's end token
        assert tok.token_to_id(spec.eos) in batch["inputs"]
    # The commands that read the run read its tokenizer: sampling a decoder run, attention
    # maps of an encoder run (one token string per token of the kind).
    capsys.readouterr()
    if kind in ("char", "bpe"):
        assert cli.main(["sample", str(run_dir), "--prompt", "def alpha", "--max-new-tokens",
                         "4", "--temperature", "0"]) == 0
        assert capsys.readouterr().out.startswith("def alpha")
    if kind == "wordpiece":
        text = "def alpha_1(beta):"
        assert cli.main(["attention", str(run_dir), "--text", text, "--out",
                         str(tmp_path / "maps")]) == 0
        maps = np.load(tmp_path / "maps" / "attention.npz")
        ids = tok.encode(text).ids
        assert maps["tokens"].tolist() == ids
        assert maps["token_strings"].tolist() == [tok.decode([i]) for i in ids]
