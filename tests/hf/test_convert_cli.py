"""`jaxformer convert` both ways, sampling from a converted run, fine-tuning from it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxformer.data.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from jaxformer.hf import from_pretrained  # noqa: E402
from jaxformer.runs.restore import load_run  # noqa: E402
from tests.command_line import EXPERIMENT, assert_user_error, jaxformer, snapshot  # noqa: E402
from tests.corpus import document, write_corpus  # noqa: E402

LAYERS, WIDTH, HEADS, MAX_LEN = 2, 32, 2, 64


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random-weight GPT-2 saved by transformers, with a tokenizer.json beside it."""
    tmp = tmp_path_factory.mktemp("hfcli")
    rng = np.random.default_rng(0)
    tok = train_tokenizer([document(rng, i) for i in range(40)], 300)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=MAX_LEN,
                                  n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                                  initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp / "hf")
    save_tokenizer(tok, tmp / "hf" / "tokenizer.json")
    return tmp, model, tok


def greedy_hf(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([out])).logits[0, -1]
            out.append(int(torch.argmax(logits)))
    return out[len(ids):]


def test_from_hf_then_greedy_sample_matches_transformers(hf_dir):
    tmp, model, tok = hf_dir
    run = tmp / "run"
    out = jaxformer("convert", "--from-hf", str(tmp / "hf"), "--out", str(run))
    assert out.returncode == 0, out.stderr[-2000:]
    assert {"config.json", "tokenizer.json", "checkpoints"} <= {p.name for p in run.iterdir()}
    prompt = "def alpha_0(alpha, beta):\n"
    out = jaxformer("sample", str(run), "--prompt", prompt, "--max-new-tokens", "12",
                    "--temperature", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    expected = greedy_hf(model, tok.encode(prompt).ids, 12)
    expected_text = prompt + tok.decode([t for t in expected if t != 0])
    assert out.stdout.rstrip("\n") == expected_text


def test_to_hf_round_trip_gives_transformers_the_same_logits(hf_dir):
    tmp, model, _ = hf_dir
    run, back = tmp / "run2", tmp / "back"
    assert jaxformer("convert", "--from-hf", str(tmp / "hf"), "--out", str(run)).returncode == 0
    out = jaxformer("convert", "--to-hf", str(run), "--out", str(back))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (back / "tokenizer.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    ids = torch.tensor(np.random.default_rng(3).integers(0, 300, (2, 20)))
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-4


def test_convert_refuses_non_empty_out_and_bad_input(hf_dir, tmp_path):
    tmp, _, _ = hf_dir
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    before = snapshot(busy)
    assert_user_error(jaxformer("convert", "--from-hf", str(tmp / "hf"), "--out", str(busy)),
                      "not empty")
    assert snapshot(busy) == before
    assert_user_error(jaxformer("convert", "--from-hf", str(tmp_path), "--out",
                                str(tmp_path / "x")), "no config.json")
    assert not (tmp_path / "x").exists()


def test_fine_tune_from_hf_dir_starts_from_its_weights(hf_dir):
    tmp, _, _ = hf_dir
    corpus = write_corpus(tmp / "corpus", n_docs=20)
    run = tmp / "ft"
    model_args = ["--set", f"model.n_layers={LAYERS}", "--set", f"model.d_model={WIDTH}",
                  "--set", f"model.n_heads={HEADS}", "--set", f"model.max_len={MAX_LEN}",
                  "--set", f"model.vocab_size={from_pretrained(tmp / 'hf').config.vocab_size}"]
    # lr 1e-12: one AdamW step moves a weight by about 1e-12, so the weights after it are the
    # imported ones (a random init would differ by ~0.2).
    out = jaxformer("train", EXPERIMENT, *model_args, "--set", f"data.source={corpus}",
                    "--set", "data.seq_len=32", "--set", "train.batch_size=2",
                    "--set", "train.steps=1", "--set", "train.warmup_steps=0",
                    "--set", "train.lr=1e-12", "--set", "eval.every=1",
                    "--set", "eval.batches=1", "--set", "sample.max_new_tokens=2",
                    "--set", f"train.init_from={tmp / 'hf'}", "--run-dir", str(run),
                    "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "initialized from" in out.stdout
    _, params = load_run(run)
    imported = from_pretrained(tmp / "hf").params
    same = jax.tree.map(lambda a, b: bool(np.allclose(a, b, rtol=0, atol=1e-9)),
                        params, imported)
    assert all(jax.tree.leaves(same))
    assert json.loads((run / "config.json").read_text())["train"]["init_from"] == str(tmp / "hf")
    # the tokenizer came with the weights
    assert (run / "tokenizer.json").read_bytes() == (tmp / "hf" / "tokenizer.json").read_bytes()


def test_init_from_that_does_not_fit_is_a_one_line_error(hf_dir, tmp_path):
    tmp, _, _ = hf_dir
    corpus = write_corpus(tmp_path / "corpus", n_docs=10)
    out = jaxformer("train", EXPERIMENT, "--set", "model.n_layers=1", "--set", "model.d_model=32",
                    "--set", "model.n_heads=2", "--set", "model.max_len=64",
                    "--set", "model.vocab_size=300", "--set", "data.seq_len=32",
                    "--set", f"data.source={corpus}", "--set", f"train.init_from={tmp / 'hf'}",
                    "--run-dir", str(tmp_path / "run"))
    assert_user_error(out, "does not fit the model")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_convert_round_trip_of_encoder_models_and_their_clear_limits(family, tmp_path):
    """BERT and T5 go HF -> run dir -> HF through the CLI with the same logits; sampling refuses
    BERT (it does not generate) and a T5 without a tokenizer in one line, as training with the
    causal objective refuses both."""
    torch.manual_seed(0)
    if family == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32)).eval()
        auto, kwargs = transformers.AutoModelForMaskedLM, {}
    else:
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            feed_forward_proj="gated-gelu")).eval()
        auto = transformers.AutoModelForSeq2SeqLM
        kwargs = {"decoder_input_ids": torch.tensor([[0, 5, 7, 9]])}
    model.save_pretrained(tmp_path / "hf")
    run, back = tmp_path / "run", tmp_path / "back"
    out = jaxformer("convert", "--from-hf", str(tmp_path / "hf"), "--out", str(run))
    assert out.returncode == 0, out.stderr[-2000:]
    assert jaxformer("convert", "--to-hf", str(run), "--out", str(back)).returncode == 0
    ids = torch.tensor([[3, 14, 15, 9, 2, 6]])
    with torch.no_grad():
        diff = (auto.from_pretrained(back).eval()(input_ids=ids, **kwargs).logits
                - model(input_ids=ids, **kwargs).logits).abs().max()
    assert float(diff) < 1e-4
    assert_user_error(jaxformer("sample", str(run), "--prompt", "x"),
                      "does not generate" if family == "bert" else "has no tokenizer.json")
    arch = "encoder" if family == "bert" else "encoder_decoder"
    assert_user_error(jaxformer("train", EXPERIMENT, "--set", f"model.arch={arch}",
                                "--run-dir", str(tmp_path / "t")),
                      "objective.kind='causal' trains model.arch='decoder'")
    assert not (tmp_path / "t").exists()


def test_fine_tune_a_classifier_from_a_hugging_face_bert(tmp_path):
    """`jaxformer train` with train.init_from=<HF BERT dir>: the encoder starts from the
    imported weights, the pooler and classifier are new, the masked-LM head is left out."""
    rng = np.random.default_rng(0)
    tok = train_tokenizer([document(rng, i) for i in range(40)], 300)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path / "hf")
    save_tokenizer(tok, tmp_path / "hf" / "tokenizer.json")
    run = tmp_path / "ft"
    out = jaxformer("train", "experiments/bert_classify.py", "--set", "model.n_layers=2",
                    "--set", "model.d_model=32", "--set", "model.n_heads=2",
                    "--set", "model.max_len=64", "--set", "model.d_ff=64",
                    "--set", f"model.vocab_size={tok.get_vocab_size()}",
                    "--set", "data.seq_len=32", "--set", "train.batch_size=8",
                    "--set", "train.steps=1", "--set", "train.warmup_steps=0",
                    "--set", "train.lr=1e-12", "--set", "eval.batches=1",
                    "--set", f"train.init_from={tmp_path / 'hf'}", "--run-dir", str(run),
                    "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    note = next(line for line in out.stdout.splitlines() if line.startswith("initialized from"))
    assert "new (initialized): classifier, pooler" in note
    assert "not used: mlm" in note
    _, params = load_run(run)
    imported = from_pretrained(tmp_path / "hf").params
    for name in ("embed", "inputs", "blocks"):
        same = jax.tree.map(lambda a, b: bool(np.allclose(a, b, rtol=0, atol=1e-9)),
                            params[name], imported[name])
        assert all(jax.tree.leaves(same)), name
    assert params["classifier"]["w"].shape == (32, 4)
