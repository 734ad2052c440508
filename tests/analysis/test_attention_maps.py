"""Attention maps: the captured probabilities are the model's own (rows sum to 1, causal zeros,
a numpy recomputation, unchanged logits), and ``jaxformer attention`` writes one PNG of a known
size per layer (and per stack for an encoder-decoder) plus the raw npz."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import cli
from jaxformer.analysis.attention_maps import (
    collect_attention,
    enable_attention_capture,
    figure_pixels,
    model_attention,
)
from jaxformer.config import Config, DataConfig, ObjectiveConfig
from jaxformer.data.tokenizer import save_tokenizer, train_tokenizer
from jaxformer.models import build_model, presets
from jaxformer.models.build import init_params
from jaxformer.runs import rundir
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.train.optimizer import make_optimizer
from jaxformer.train.state import TrainState
from tests.corpus import document

TINY = dict(n_layers=2, d_model=32, n_heads=2, max_len=48)
MLA = dict(attention_type="mla", kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8,
           v_head_dim=12)
FAMILIES = {
    "gpt2": (presets.gpt2, {}, "causal"),
    "mla": (presets.llama, MLA, "causal"),
    "bert": (presets.bert, {}, "masked_lm"),
    "t5": (presets.t5_v1_1, {}, "span_corruption"),
}
PROMPT = "def alpha(beta):\n    return beta + 1\n"


@pytest.fixture(scope="module")
def tokenizer():
    rng = np.random.default_rng(0)
    return train_tokenizer([document(rng, i) for i in range(30)], 300)


def model_config(family: str, vocab: int):
    make, extra, _ = FAMILIES[family]
    return make(vocab_size=vocab, init_std=0.3, **TINY, **extra)


def build(family: str, vocab: int = 300):
    return build_model(model_config(family, vocab), nnx.Rngs(1))


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, tokenizer):
    """A step-0 run dir (config, tokenizer, checkpoint) per family, as ``convert`` writes."""
    tmp = tmp_path_factory.mktemp("attention_runs")
    out = {}
    for family, (_, _, objective) in FAMILIES.items():
        cfg = Config(name=family, model=model_config(family, tokenizer.get_vocab_size()),
                     data=DataConfig(seq_len=32), objective=ObjectiveConfig(kind=objective))
        params = init_params(cfg.model, 1)
        tx = make_optimizer(cfg.train, cfg.model.d_model)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))
        run = tmp / family
        run.mkdir()
        rundir.write_config(run, cfg)
        save_tokenizer(tokenizer, run / rundir.TOKENIZER_FILE)
        ckpt = Checkpointer(run / rundir.CHECKPOINT_DIR, 1)
        ckpt.save(state, {})
        ckpt.close()
        out[family] = run
    return out


def forward(model, enc: np.ndarray, dec: np.ndarray | None = None):
    """``model_attention`` under jit (tiny models run much faster compiled than eagerly)."""
    graphdef, state = nnx.split(model)

    def run(state, enc, dec):
        return model_attention(nnx.merge(graphdef, state), enc, dec)

    return jax.jit(run)(state, enc, dec)


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 300, n).astype(np.int32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_is_a_normalized_masked_softmax_and_changes_no_logit(family):
    model = build(family)
    enc = tokens(9)
    dec = tokens(6, 1) if family == "t5" else None
    off, off_weights = forward(model, enc, dec)
    assert off_weights == {}  # flag off: nothing sown
    assert enable_attention_capture(model) == (6 if family == "t5" else 2)
    on, weights = forward(model, enc, dec)
    np.testing.assert_array_equal(np.asarray(on), np.asarray(off))
    want = ({("encoder", i) for i in range(2)} | {("decoder", i) for i in range(2)}
            | {("cross", i) for i in range(2)} if family == "t5"
            else {("layer", 0), ("layer", 1)})
    assert set(weights) == want
    for (stack, _), w in weights.items():
        w = np.asarray(w)
        t = 6 if stack in ("decoder", "cross") else 9
        s = 6 if stack == "decoder" else 9
        assert w.shape == (1, 2, t, s) and w.dtype == np.float32
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
        assert (w >= 0).all()
        if stack == "decoder" or (stack == "layer" and family != "bert"):
            assert (w[..., np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] == 0).all()
            assert (np.tril(w[0, 0]) > 0)[np.tril_indices(t)].all()
    enable_attention_capture(model, False)
    assert not any(getattr(m, "capture_attention", False) for _, m in nnx.iter_modules(model))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_gpt2_layer_probabilities_equal_a_numpy_recomputation():
    from jaxformer.models.common import AttentionInputs

    model = build("gpt2")
    toks = tokens(11)
    enable_attention_capture(model)
    _, weights = forward(model, toks)
    # Layer 1's input: the embeddings through block 0 (capture off there, so nothing sown).
    t = len(toks)
    pos = jnp.arange(t)[None]
    x = model.inputs(model.embed, jnp.asarray(toks)[None], pos)
    enable_attention_capture(model, False)
    x, _ = model.blocks[0](x, AttentionInputs(q_positions=pos, is_causal=True,
                                              segment_ids=jnp.ones((1, t), jnp.int32)))
    block = model.blocks[1]
    h = np.asarray(block.attn_norm(x), np.float64)[0]  # [T, D] (pre-LN)
    attn = block.attn
    q = np.einsum("td,dnh->nth", h, np.asarray(attn.w_q[...])) + np.asarray(attn.b_q[...])[:, None]
    k = np.einsum("td,dnh->nth", h, np.asarray(attn.w_k[...])) + np.asarray(attn.b_k[...])[:, None]
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    np.testing.assert_allclose(np.asarray(weights["layer", 1])[0], softmax(scores), atol=1e-5)


def test_mla_absorbed_and_plain_capture_the_same_probabilities():
    model = build("mla")
    enable_attention_capture(model)
    toks = tokens(8)
    _, plain = forward(model, toks)
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "absorb"):
            module.absorb = True
    _, absorbed = forward(model, toks)
    for key in plain:
        np.testing.assert_allclose(np.asarray(absorbed[key]), np.asarray(plain[key]), atol=1e-5)


def test_collect_attention_keys_are_module_paths():
    model = build("t5")
    enable_attention_capture(model)
    graphdef, state = nnx.split(model)

    def run(state, enc, dec):
        return collect_attention(nnx.merge(graphdef, state), lambda m: m(enc, dec))[1]

    weights = jax.jit(run)(state, jnp.asarray(tokens(5))[None], jnp.asarray(tokens(3))[None])
    assert ("decoder", 1, "cross_attn") in weights and ("encoder", 0, "attn") in weights
    assert weights["decoder", 1, "cross_attn"].shape == (1, 2, 3, 5)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["attention", *[str(a) for a in args]])
    out = capsys.readouterr()
    return rc, out.out, out.err


def png_size(path) -> tuple[int, int]:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return image.shape[1], image.shape[0]


@pytest.mark.parametrize("family", ["gpt2", "mla", "bert"])
def test_cli_writes_one_png_per_layer_and_the_npz(family, run_dirs, tokenizer, tmp_path,
                                                  capsys):
    out = tmp_path / "maps"
    rc, stdout, stderr = run_cli(capsys, run_dirs[family], "--text", PROMPT, "--out", out)
    assert rc == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["attention.npz", "layer0.png",
                                                     "layer1.png"]
    assert stdout.count("wrote ") == 3 and str(out / "layer1.png") in stdout
    ids = tokenizer.encode(PROMPT).ids
    t = len(ids)
    for i in range(2):
        assert png_size(out / f"layer{i}.png") == figure_pixels(2, t, t)
    data = np.load(out / "attention.npz")
    assert data["tokens"].tolist() == ids
    assert data["token_strings"].tolist() == [tokenizer.decode([i]) for i in ids]
    assert data["layer0"].shape == (2, t, t)
    np.testing.assert_allclose(data["layer1"].sum(-1), 1.0, atol=1e-5)
    if family != "bert":
        assert (np.triu(data["layer0"][1], 1) == 0).all()
    if family == "gpt2":  # the npz holds the checkpoint's probabilities
        from jaxformer.models.build import abstract_model
        from jaxformer.runs.restore import load_run

        cfg, params = load_run(run_dirs[family])
        model = nnx.merge(abstract_model(cfg.model)[0], params)
        enable_attention_capture(model)
        _, weights = forward(model, np.asarray(ids))
        np.testing.assert_allclose(data["layer1"], np.asarray(weights["layer", 1])[0],
                                   atol=1e-6)
    rc, _, stderr = run_cli(capsys, run_dirs[family], "--text", PROMPT, "--out",
                            tmp_path / "last", "--layers", "-1")
    assert rc == 0, stderr
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["attention.npz",
                                                                     "layer1.png"]


def test_cli_encoder_decoder_draws_encoder_decoder_and_cross(run_dirs, tokenizer, tmp_path,
                                                             capsys):
    out = tmp_path / "t5"
    rc, _, stderr = run_cli(capsys, run_dirs["t5"], "--text", "x = 1", "--target", "y = 2",
                            "--out", out)
    assert rc == 0, stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["attention.npz"] + [f"{s}_layer{i}.png" for s in
                                                ("encoder", "decoder", "cross")
                                                for i in range(2)])
    s = len(tokenizer.encode("x = 1").ids) + 1  # + EOS
    t = len(tokenizer.encode("y = 2").ids) + 1  # decoder start (PAD) first
    assert png_size(out / "encoder_layer0.png") == figure_pixels(2, s, s)
    assert png_size(out / "decoder_layer1.png") == figure_pixels(2, t, t)
    assert png_size(out / "cross_layer0.png") == figure_pixels(2, t, s)
    data = np.load(out / "attention.npz")
    assert data["cross_layer1"].shape == (2, t, s)
    assert data["dec_token_strings"][0] == "<|pad|>" and data["enc_token_strings"][-1] == (
        "<|endoftext|>")
    assert (np.triu(data["decoder_layer0"][0], 1) == 0).all()
    # No --target: the decoder input is the start token plus the greedy output (at most 3).
    rc, _, stderr = run_cli(capsys, run_dirs["t5"], "--text", "x = 1", "--out",
                            tmp_path / "greedy", "--max-new-tokens", "3", "--layers", "0")
    assert rc == 0, stderr
    data = np.load(tmp_path / "greedy" / "attention.npz")
    assert 1 <= len(data["dec_tokens"]) <= 4
    assert data["cross_layer0"].shape == (2, len(data["dec_tokens"]), s)


@pytest.mark.parametrize("args, needle", [
    (["{missing}", "--text", "hi"], "does not exist"),
    (["{run}", "--text", "  "], "--text is empty"),
    (["{run}", "--text", "hi", "--layers", "5"], "out of range"),
    (["{run}", "--text", "hi", "--target", "x"], "encoder-decoder"),
])
def test_bad_input_is_one_error_line_exit_2(args, needle, run_dirs, tmp_path, capsys):
    args = [a.format(missing=tmp_path / "nope", run=run_dirs["gpt2"]) for a in args]
    rc, _, stderr = run_cli(capsys, *args, "--out", tmp_path / "out")
    assert rc == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], stderr
    assert not (tmp_path / "out").exists()


def test_figure_size_grows_with_heads_and_tokens():
    assert figure_pixels(2, 5, 5) == (2 * 360 + 120, 360 + 60)
    assert figure_pixels(6, 100, 100) == (4 * 1400 + 120, 2 * 1400 + 60)


def test_synthetic_task_runs_are_labelled_with_their_symbols(tmp_path, capsys):
    """A run on a synthetic task has no tokenizer file: its text is symbol numbers."""
    import dataclasses

    from jaxformer import config as config_lib
    from jaxformer.data.synthetic import SymbolTokenizer
    from jaxformer.data.tokenizer import EOS, PAD
    from jaxformer.train.loop import train

    tok = SymbolTokenizer(EOS, PAD)
    assert tok.encode("3 0 23").ids == [5, 2, 25]
    assert tok.decode([0, 1, 5, 2 + 24 + 7]) == "EOS PAD s3 t7"
    cfg = dataclasses.replace(Config(), model=presets.transformer_2017(**TINY, vocab_size=64))
    cfg = config_lib.apply_overrides(cfg, [
        "objective.kind=seq2seq", "data.source=synthetic:reverse", "data.seq_len=24",
        "train.steps=1", "train.batch_size=2", "train.warmup_steps=0", "eval.batches=1",
        "sample.count=0"])
    train(cfg, tmp_path / "run", progress=False, echo=lambda s: None)
    out = tmp_path / "maps"
    assert cli.main(["attention", str(tmp_path / "run"), "--text", "3 1 4", "--out",
                     str(out), "--layers", "-1", "--max-new-tokens", "3"]) == 0
    data = np.load(out / "attention.npz")
    assert list(data["enc_token_strings"]) == ["s3", "s1", "s4", "EOS"]
    cross = data["cross_layer1"]
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-5)
    assert cli.main(["attention", str(tmp_path / "run"), "--text", "3 x", "--out",
                     str(out)]) == 2
    assert "symbol numbers" in capsys.readouterr().err


def test_efficient_attention_family_run_is_refused(run_dirs, tmp_path, capsys):
    # Its layers form no softmax map: drawing the dense one would show what it never computed.
    run = tmp_path / "linear_run"
    shutil.copytree(run_dirs["gpt2"], run)
    cfg = rundir.read_config(run)
    rundir.write_config(run, dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, attention_type="linear")))
    rc, _, stderr = run_cli(capsys, run, "--text", "hi", "--out", tmp_path / "out")
    assert rc == 2 and "attention_type='linear'" in stderr and "no softmax attention map" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, needle", [
    ([], "attention on a text run needs --text"),
    (["--text", "x", "--image", "1"], "--image is for image runs"),
])
def test_text_runs_need_text_and_take_no_image(run_dirs, tmp_path, capsys, flags, needle):
    out = tmp_path / "maps"
    assert cli.main(["attention", str(run_dirs["gpt2"]), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not out.exists()
