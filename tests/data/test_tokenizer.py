"""Byte-level BPE: exact round trips, special token ids, vocab size, save/load."""

import os
import stat

import numpy as np
import pytest

from jaxformer.data.errors import DataError
from jaxformer.data.tokenizer import (
    EOS,
    PAD,
    encode_documents,
    eos_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

CODE = '''import os\n\n\nclass Widget:\n    """A widget."""\n\n    def __init__(self, name):
        self.name = name  # keep it\n\n    def render(self, width=80):\n\t\treturn f"<{self.name}>"
'''


def corpus(n: int = 60) -> list[str]:
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "value", "index", "total", "for", "in", "range", "if"]
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(words, 40)) + f" = {int(rng.integers(1000))}\n"
        docs.append(CODE.replace("Widget", f"Widget{i}") + body)
    return docs


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(), vocab_size=400)


@pytest.mark.parametrize(
    "text",
    [
        CODE,
        "\tindented\twith tabs\n\t\tand  double  spaces   \n",
        "unicode: café, naïve, 日本語, emoji 🐍🚀, Ελληνικά\n",
        "windows\r\nline\r\nends\r\n and trailing spaces   ",
        "  leading spaces and no newline",
        "control \x00\x01\x7f chars and a lone \\ backslash",
        "",
    ],
)
def test_round_trip_is_exact(tok, text):
    ids = encode_documents(tok, [text])[0]
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == text


def test_special_token_ids_and_vocab_size(tok):
    assert tok.token_to_id(EOS) == 0 == eos_id(tok)
    assert tok.token_to_id(PAD) == 1
    assert tok.get_vocab_size() == 400
    # Merges were learned: common code compresses well below one token per byte.
    ids = encode_documents(tok, [CODE])[0]
    assert len(ids) < 0.6 * len(CODE.encode())


def test_vocab_size_is_an_upper_bound_on_tiny_data():
    small = train_tokenizer(["ab ab ab"], vocab_size=1000)
    assert 258 <= small.get_vocab_size() < 1000
    assert small.decode(encode_documents(small, ["xyz ü"])[0].tolist()) == "xyz ü"


def test_too_small_vocab_is_a_data_error():
    with pytest.raises(DataError, match="vocab size 258"):
        train_tokenizer(corpus(2), vocab_size=258)


def test_encode_documents_types_and_literal_eos(tok):
    out = encode_documents(tok, ["x = 1", f"s = '{EOS}'", "y"])
    assert len(out) == 3 and all(a.dtype == np.int32 for a in out)
    # A literal "<|endoftext|>" in a document is text, not the separator token.
    assert 0 not in out[1].tolist()
    assert tok.decode(out[1].tolist()) == f"s = '{EOS}'"
    # ...and encode_documents leaves the tokenizer's own setting unchanged.
    assert tok.encode(EOS).ids == [0]


def test_save_and_load(tok, tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    save_tokenizer(tok, path)
    loaded = load_tokenizer(path)
    assert loaded.to_str() == tok.to_str()
    np.testing.assert_array_equal(
        encode_documents(loaded, [CODE])[0], encode_documents(tok, [CODE])[0]
    )
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp files left


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_file_has_the_mode_of_a_plain_new_file(tok, tmp_path, umask):
    """0666 less the umask (0644 under the usual 022), as ``open(path, "w")`` gives: a run
    dir's tokenizer is shared with whoever reads the run, not private (mkstemp's 0600)."""
    old = os.umask(umask)
    try:
        save_tokenizer(tok, tmp_path / "tokenizer.json")
        (tmp_path / "reference.txt").write_text("x")  # what a plain create gives
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "tokenizer.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "reference.txt").stat().st_mode)
    assert mode == 0o666 & ~umask


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        load_tokenizer(bad)
