"""Hugging Face tokenizers as they come: ``convert --from-hf`` carries a model's own tokenizer
and special tokens (GPT-2 byte-level BPE, Llama-style BPE with a begin token, BERT WordPiece,
T5 Unigram), checked against what transformers itself reports for the same directory; the data
pipeline, fine-tuning and export use them. Tokenizers are built here, nothing is downloaded."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import (  # noqa: E402
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from jaxformer import config as config_lib  # noqa: E402
from jaxformer.config import Config  # noqa: E402
from jaxformer.data.errors import DataError  # noqa: E402
from jaxformer.data.pipeline import DataPipeline  # noqa: E402
from jaxformer.data.sources import load_documents  # noqa: E402
from jaxformer.data.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from jaxformer.errors import UserError  # noqa: E402
from jaxformer.hf import tokens  # noqa: E402
from jaxformer.hf.run_dir import hf_to_run_dir, run_dir_to_hf  # noqa: E402
from jaxformer.runs import rundir  # noqa: E402
from jaxformer.runs.specials import (  # noqa: E402
    SpecialTokens,
    encode_prompt,
    load_run_tokenizer,
    read_chat_template,
    read_special_tokens,
    until_eos,
    write_special_tokens,
)
from jaxformer.train.init_from import explicit_keys, model_from_source  # noqa: E402
from jaxformer.train.loop import train  # noqa: E402
from tests.corpus import document, write_corpus  # noqa: E402

CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
TEXT = "def alpha_1(alpha, beta):\n    return alpha + beta\n"


def texts(n: int = 30) -> list[str]:
    rng = np.random.default_rng(0)
    return [document(rng, i) for i in range(n)]


def gpt2_dir(d: Path) -> None:
    """Byte-level BPE with <|endoftext|> added after the merges, so its id is the last one (as
    GPT-2's 50256), not jaxformer's 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens(["<|endoftext|>"])
    eos = tok.token_to_id("<|endoftext|>")
    assert eos == tok.get_vocab_size() - 1 > 0
    transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>").save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32,
                                  n_layer=2, n_head=2, bos_token_id=eos, eos_token_id=eos)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)


def llama_dir(d: Path) -> None:
    """Metaspace BPE with byte fallback; <s> put before text by the post-processor; two end
    tokens in the generation config (</s> and an end-of-turn token); a chat template."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<|eot|>"],
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    hf_tok = transformers.LlamaTokenizer(tokenizer_object=tok, bos_token="<s>",
                                         eos_token="</s>", unk_token="<unk>")
    hf_tok.chat_template = CHAT
    hf_tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        bos_token_id=1, eos_token_id=[2, 3])
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)


def bert_dir(d: Path) -> None:
    """WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK]; no begin or end token."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts(), trainers.WordPieceTrainer(
        vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    transformers.BertTokenizer(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                               pad_token="[PAD]", cls_token="[CLS]",
                               mask_token="[MASK]").save_pretrained(d)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
        pad_token_id=0)).save_pretrained(d)


def t5_dir(d: Path) -> None:
    """Unigram with <pad> </s> <unk>; </s> appended by the post-processor; the decoder starts
    from <pad>."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(texts(), trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    transformers.T5Tokenizer(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                             pad_token="<pad>", extra_ids=0).save_pretrained(d)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=tok.get_vocab_size(), d_model=16, d_kv=8, d_ff=32, num_layers=1,
        num_heads=2, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)).save_pretrained(d)


BUILDERS = {"gpt2": gpt2_dir, "llama": llama_dir, "bert": bert_dir, "t5": t5_dir}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (its Hugging Face dir, the run dir convert made of it), built on first use."""
    root = tmp_path_factory.mktemp("hf_tokenizers")
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            hf, run = root / family, root / f"{family}_run"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' deprecation notes
                BUILDERS[family](hf)
            hf_to_run_dir(hf, run)
            made[family] = hf, run
        return made[family]

    return get


def reference(hf: Path) -> tuple[SpecialTokens, object]:
    """The special tokens transformers reports for ``hf`` (-> them, the AutoTokenizer):
    generation config (from the model config when the directory has none, as transformers
    builds it), then the tokenizer; add_bos from whether its encoding starts with bos."""
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    if (hf / "generation_config.json").is_file():
        gen = transformers.GenerationConfig.from_pretrained(hf)
    else:
        gen = transformers.GenerationConfig.from_model_config(
            transformers.AutoConfig.from_pretrained(hf))

    def first(*values):
        return next((v for v in values if v is not None), None)

    eos = first(gen.eos_token_id, auto.eos_token_id)
    bos = first(gen.bos_token_id, auto.bos_token_id)
    add_bos = bos is not None and auto(TEXT).input_ids[0] == bos
    return SpecialTokens(
        bos_id=bos, eos_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        pad_id=first(gen.pad_token_id, auto.pad_token_id),
        decoder_start_id=gen.decoder_start_token_id, add_bos=add_bos), auto


@pytest.mark.parametrize("family", list(BUILDERS))
def test_convert_carries_the_models_tokenizer_and_special_tokens(family, converted, tmp_path):
    hf, run = converted(family)
    want, auto = reference(hf)
    got = read_special_tokens(run)
    assert got == want
    # The ids each directory was built with, so a reference that changed would show too.
    last = Tokenizer.from_file(str(hf / "tokenizer.json")).get_vocab_size() - 1
    assert (got.bos_id, got.eos_ids, got.add_bos) == {
        "gpt2": (last, (last,), False), "llama": (1, (2, 3), True), "bert": (None, (), False),
        "t5": (None, (1,), False)}[family]
    assert (got.pad_id, got.decoder_start_id) == {"bert": (0, None), "t5": (0, 0)}.get(
        family, (None, None))
    # The tokenizer and its files come as they were.
    assert (run / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert ((run / "tokenizer_config.json").read_bytes()
            == (hf / "tokenizer_config.json").read_bytes())
    tokenizer, specials = load_run_tokenizer(run)
    assert specials == got
    if family in ("gpt2", "llama"):  # decoders: a prompt's ids are what transformers gives
        assert encode_prompt(tokenizer, specials, TEXT) == auto(TEXT).input_ids
        assert until_eos([5, 6, got.eos_ids[-1], 7], specials) == [5, 6]
    assert read_chat_template(run) == (CHAT if family == "llama" else None)
    assert read_chat_template(run) == auto.chat_template
    # Back to transformers: the same special tokens, from the files the model came with.
    back = tmp_path / "back"
    run_dir_to_hf(run, back)
    again, auto_back = reference(back)
    assert again == want
    assert type(auto_back) is type(auto)


def test_a_converted_llama_tokenizer_packs_documents_as_the_model_saw_them(converted,
                                                                           tmp_path):
    """Training documents from a converted Llama-style run: <s> first (its tokenizer puts it
    before text), </s> (the first end id, not jaxformer's <|endoftext|>) after each one."""
    hf, run = converted("llama")
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    corpus = write_corpus(tmp_path / "corpus", n_docs=6)
    data = DataPipeline.create(str(corpus), seq_len=16, vocab_size=0, val_fraction=0.0, seed=0,
                               tokenizer_path=run / rundir.TOKENIZER_FILE,
                               cache_dir=tmp_path / "cache", log=lambda s: None)
    assert data.eos_id == 2 and data.specials == read_special_tokens(run)
    stream = data.train_rows.stream
    wanted = {tuple(auto(t).input_ids) for t in load_documents(str(corpus)).texts}
    starts = np.flatnonzero(np.diff(stream.doc_ids, prepend=-1) != 0)
    ends = np.append(starts[1:], len(stream.tokens))
    assert len(starts) == 6
    for start, end in zip(starts, ends, strict=True):
        doc = stream.tokens[start:end].tolist()
        assert doc[-1] == 2 and tuple(doc[:-1]) in wanted


def test_fine_tuning_a_converted_gpt2_run_uses_its_tokenizer(converted, tmp_path):
    """train.init_from=<converted GPT-2 run> through the real training set-up: the run takes
    the converted tokenizer and special tokens, packs documents with GPT-2's end token (its last
    id, not 0) exactly as transformers tokenizes them, and samples with it."""
    hf, run = converted("gpt2")
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    eos = auto.eos_token_id
    corpus = write_corpus(tmp_path / "corpus", n_docs=12)
    overrides = [f"data.source={corpus}", "data.seq_len=32", "train.batch_size=2",
                 "train.steps=1", "train.warmup_steps=0", "eval.every=1", "eval.batches=1",
                 f"train.init_from={run}", 'sample.prompts=["def "]',
                 "sample.max_new_tokens=3", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg, _ = model_from_source(config_lib.apply_overrides(Config(), overrides),
                               explicit_keys(overrides))
    seen = {}

    class Grab:
        def after_step(self, r, step, metrics):
            seen["pipeline"] = r.task.pipeline

    lines: list[str] = []
    result = train(cfg, tmp_path / "ft", progress=False, echo=lines.append, hooks=[Grab()])
    assert result.final_step == 1 and len(result.samples) == 1
    assert any(f"loaded from {run / 'tokenizer.json'}" in line for line in lines), lines
    ft = tmp_path / "ft"
    assert (Tokenizer.from_file(str(ft / "tokenizer.json")).get_vocab()
            == Tokenizer.from_file(str(run / "tokenizer.json")).get_vocab())
    for name in ("special_tokens.json", "tokenizer_config.json"):
        assert (ft / name).read_bytes() == (run / name).read_bytes()
    assert read_special_tokens(ft).eos_ids == (eos,)
    data = seen["pipeline"]
    assert data.eos_id == eos != 0
    stream = data.train_rows.stream
    ends = np.flatnonzero(np.diff(stream.doc_ids, append=-1) != 0)  # each document's last
    assert (stream.tokens[ends] == eos).all()
    inside = np.ones(len(stream.tokens), bool)
    inside[ends] = False
    assert not (stream.tokens[inside] == eos).any()
    wanted = {tuple(auto(t).input_ids) for t in load_documents(str(corpus)).texts}
    starts = np.append(0, ends[:-1] + 1)
    for start, end in zip(starts, ends, strict=True):
        assert tuple(stream.tokens[start:end].tolist()) in wanted


def test_precedence_generation_config_over_config_over_tokenizer_config(tmp_path):
    """Each id from the first file that names it; token strings resolved through the
    tokenizer; an id outside the model's vocabulary is a one-line error naming the file."""
    tok = train_tokenizer(texts(10), 300)
    tok.add_special_tokens(["[BEGIN]", "[END]", "[FILL]"])
    ids = {t: tok.token_to_id(t) for t in ("[BEGIN]", "[END]", "[FILL]")}
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "eos_token_id": 5, "pad_token_id": 6, "bos_token_id": None}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "[BEGIN]", "special": True}, "eos_token": "[END]",
         "pad_token": "[FILL]", "added_tokens_decoder": {}}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "[END]"}))
    specials, chat = tokens.imported_special_tokens(tmp_path, tok, 400, False)
    assert specials == SpecialTokens(bos_id=ids["[BEGIN]"], eos_ids=(7, 8), pad_id=6,
                                     decoder_start_id=None, add_bos=False)
    assert chat is None
    # An older tokenizer config (no added_tokens_decoder): the map wins, as transformers reads
    # it; an encoder-decoder without a decoder start starts from padding.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[BEGIN]"}))
    specials, _ = tokens.imported_special_tokens(tmp_path, tok, 400, True)
    assert specials.bos_id == ids["[END]"] and specials.decoder_start_id == 6
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 400}))
    with pytest.raises(UserError, match=r"generation_config\.json: eos_token_id names 400"):
        tokens.imported_special_tokens(tmp_path, tok, 400, False)


def test_a_run_trained_by_jaxformer_keeps_its_own_names(tmp_path):
    """No special_tokens.json: the run's tokenizer's EOS and PAD, the decoder starting from PAD
    for an encoder-decoder; a broken special_tokens.json is a one-line error."""
    tok = train_tokenizer(texts(10), 300)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    rundir.write_config(tmp_path, config_lib.apply_overrides(
        Config(), ["model.arch=encoder_decoder", "objective.kind=span_corruption",
                   "model.pos_encoding=t5_relative"]))
    specials = read_special_tokens(tmp_path)
    assert specials == SpecialTokens(bos_id=0, eos_ids=(0,), pad_id=1, decoder_start_id=1,
                                     add_bos=False)
    assert encode_prompt(tok, specials, "") == [0]
    write_special_tokens(tmp_path, SpecialTokens(3, (4, 5), None, None, True), chat_template="x")
    assert read_special_tokens(tmp_path) == SpecialTokens(3, (4, 5), None, None, True)
    assert read_chat_template(tmp_path) == "x"
    (tmp_path / "special_tokens.json").write_text('{"eos_ids": [1, "two"]}')
    with pytest.raises(DataError, match="eos_ids must be a list of token ids"):
        read_special_tokens(tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_sample_decodes_a_converted_model_as_transformers_generate(family, converted, capsys):
    """`jaxformer sample --temperature 0` on a converted run prints what transformers'
    greedy `generate` gives with the model's own tokenizer and generation config: BOS added
    for Llama, generation stopped at its end tokens, T5 decoding from its pad token."""
    from jaxformer.cli import main

    hf, run = converted(family)
    text = "def alpha_0(alpha, beta):" if family != "t5" else "alpha beta gamma"
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    auto = (transformers.AutoModelForSeq2SeqLM if family == "t5"
            else transformers.AutoModelForCausalLM)
    model = auto.from_pretrained(hf).eval()
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=10)
    new = out[0, 1:] if family == "t5" else out[0, ids.shape[1]:]
    want = (text if family != "t5" else "") + tok.decode(new, skip_special_tokens=True)
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", text, "--temperature", "0",
                 "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == want + "\n"
