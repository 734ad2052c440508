"""Weight-only quantization: INT8 per output channel and INT4 group-wise against numpy math
written here, storage dtypes and bytes, logits and greedy generation of a tiny decoder through
the in-jit ``unpack``, and ``quantize_run`` on a run dir (the copy loads; the source is left
byte-for-byte as it was; a quantized run is refused)."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import config as config_lib
from jaxformer.cli import main
from jaxformer.data.tokenizer import save_tokenizer, train_tokenizer
from jaxformer.errors import UserError
from jaxformer.inference.families import DecoderFamily
from jaxformer.inference.generate import Generator
from jaxformer.inference.quantize import (
    QTensor,
    dequantize,
    describe,
    load_quantized,
    param_bytes,
    quantize_array,
    quantize_command,
    quantize_params,
    quantize_run,
    validation_loss,
)
from jaxformer.inference.restore import load_for_generation
from jaxformer.models import presets
from jaxformer.models.build import abstract_model
from jaxformer.runs import rundir
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.runs.restore import load_run
from tests.command_line import snapshot
from tests.corpus import document, write_corpus
from tests.stored import stored_bytes

VOCAB = 40


def _weight(shape, seed=0):
    # heavy-tailed, so that channels and groups have different ranges
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, shape) * rng.uniform(0.01, 1.0, shape[-1])).astype(np.float32)


def _nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """The test's own unpacking: byte b holds values 2i (low nibble) and 2i+1 (high)."""
    b = packed.astype(np.uint8)
    lo, hi = (b & 0xF).astype(np.int16), (b >> 4).astype(np.int16)
    vals = np.stack([lo, hi], axis=-1).reshape(-1)[:n]
    return np.where(vals > 7, vals - 16, vals)


def test_int8_is_symmetric_per_output_channel():
    w = _weight((64, 4, 8))  # [in, heads, head_dim]: contraction axis 0
    t = quantize_array(w, (0,), bits=8, group_size=128)
    scale = np.abs(w).max(axis=0, keepdims=True) / 127  # one per (head, head_dim) channel
    assert t.values.dtype == jnp.int8 and t.values.shape == w.shape
    assert t.scales.dtype == jnp.float32 and t.scales.shape == (1, 1, 4, 8)
    np.testing.assert_allclose(np.asarray(t.scales).reshape(1, 4, 8), scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(t.values), np.rint(w / scale))
    assert np.abs(np.asarray(t.values)).max() == 127
    dq = np.asarray(dequantize(t))
    assert dq.dtype == np.float32 and dq.shape == w.shape
    assert np.all(np.abs(w - dq) <= scale / 2 * (1 + 1e-5))
    assert t.nbytes == w.size + 4 * 32


def test_int4_is_symmetric_per_group_and_packs_two_per_byte():
    w = _weight((256, 24), seed=1)  # contraction 256 = 2 groups of 128
    t = quantize_array(w, (0,), bits=4, group_size=128)
    groups = w.reshape(2, 128, 24)
    scale = np.abs(groups).max(axis=1, keepdims=True) / 7
    stored = np.asarray(t.scales, np.float32)
    assert t.scales.dtype == jnp.float16 and stored.shape == (2, 1, 24)
    # float16, rounded up: within one float16 step above the exact scale, never below
    assert np.all(stored >= scale) and np.all(stored <= scale * (1 + 2**-9))
    assert t.values.dtype == jnp.int8 and t.values.shape == (256 * 24 // 2,)
    q = _nibbles(np.asarray(t.values), w.size).reshape(2, 128, 24)
    np.testing.assert_array_equal(q, np.rint(groups / stored))
    assert q.min() >= -7 and q.max() <= 7
    dq = np.asarray(dequantize(t)).reshape(2, 128, 24)
    np.testing.assert_allclose(dq, q * stored, rtol=1e-6)
    assert np.all(np.abs(groups - dq) <= stored / 2 * (1 + 1e-5))
    assert t.nbytes == w.size // 2 + 2 * 2 * 24


@pytest.mark.parametrize("shape, axes, group_size, group", [
    ((192, 16), (0,), 128, 96),  # 192 is not a multiple of 128: the largest divisor below it
    ((64, 16), (0,), 128, 64),  # shorter than a group: the whole axis
    ((4, 8, 32), (0, 1), 16, 16),  # attention w_out: contracts heads x head_dim (32 values)
    ((50, 32), (1,), 16, 16),  # an embedding table: one scale per row and group of columns
    ((3, 32, 24), (1,), 16, 16),  # MoE experts: the expert axis is a batch axis
])
def test_int4_group_layouts(shape, axes, group_size, group):
    w = _weight(shape, seed=2)
    t = quantize_array(w, axes, bits=4, group_size=group_size)
    assert t.spec.group == group
    # reference: move the contraction axes to the front, flatten them, cut into groups
    moved = np.moveaxis(w, axes, tuple(range(len(axes))))
    k = int(np.prod([shape[a] for a in axes]))
    flat = moved.reshape(k // group, group, -1)
    scale = np.abs(flat).max(axis=1, keepdims=True) / 7
    dq = np.moveaxis(np.asarray(dequantize(t)), axes, tuple(range(len(axes)))).reshape(flat.shape)
    assert np.all(np.abs(flat - dq) <= scale * (1 + 2**-9) / 2 * (1 + 1e-5))
    # an odd element count still packs (a half byte of padding)
    odd = quantize_array(_weight((7, 3)), (0,), bits=4, group_size=8)
    assert odd.spec.group == 7 and odd.values.shape == (11,)
    np.testing.assert_allclose(np.asarray(dequantize(odd)), _weight((7, 3)),
                               atol=float(np.abs(_weight((7, 3))).max() / 7))


def test_bad_group_and_bits_are_user_errors():
    with pytest.raises(UserError, match="no divisor"):
        quantize_array(_weight((257, 4)), (0,), bits=4, group_size=128)  # 257 is prime
    with pytest.raises(UserError, match="8 or 4"):
        quantize_params({"w": _weight((8, 8))}, bits=3)
    with pytest.raises(UserError, match="at least 1"):
        quantize_params({"w": _weight((8, 8))}, bits=4, group_size=0)


def _random_params(cfg, std: float = 0.1, seed: int = 0):
    """Random weights drawn here with numpy (much faster than the model's eager init):
    N(0, std^2) matrices, unit norm scales, zero biases; -> (graphdef, params)."""
    graphdef, abstract = abstract_model(cfg)
    rng = np.random.default_rng(seed)

    def init(path, sds):
        if len(sds.shape) >= 2 and not str(path[-1].key).startswith("b_"):
            return jnp.asarray(std * rng.standard_normal(sds.shape), sds.dtype)
        return jnp.full(sds.shape, 1.0 if path[-1].key == "scale" else 0.0, sds.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(abstract))


@functools.cache
def _model(family: str):
    kw = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=VOCAB, max_len=32)
    if family == "llama":
        kw["n_kv_heads"] = 2
    cfg = presets.preset(family, **kw)
    return (cfg, *_random_params(cfg))


@pytest.mark.parametrize("family, quantized", [
    ("llama", {"w_q", "w_k", "w_v", "w_out", "wi_gate", "wi_up", "wo", "table", "lm_head"}),
    ("gpt2", {"w_q", "w_k", "w_v", "w_out", "wi", "wo", "table"}),  # tied: no lm_head
])
def test_quantize_params_picks_the_matmul_weights(family, quantized):
    _, _, params = _model(family)
    for bits in (8, 4):
        q = quantize_params(params, bits)
        rec = describe(q)
        names = {n.split("/")[-1] for n in rec["quantized"]}
        assert names == quantized and rec["bits"] == bits
        assert "embed/table" in rec["quantized"]  # the token table; positions stay float
        assert all(n.split("/")[-1] in ("scale", "bias", "table", "b_q", "b_k", "b_v", "b_out",
                                        "bi", "bo") for n in rec["float"])
        floats = [x for x in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, QTensor))
                  if not isinstance(x, QTensor)]
        assert all(x.dtype == jnp.float32 for x in floats)
        ratio = param_bytes(params) / param_bytes(q)
        assert (3.0 < ratio < 4.0) if bits == 8 else (4.5 < ratio < 8.0), ratio


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dequantized_model_is_close_and_unpack_in_the_jit_generates_the_same(family):
    cfg, graphdef, params = _model(family)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 12)), jnp.int32)
    pos, seg = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones((2, 12), jnp.int32)

    @jax.jit
    def logits(p):
        return nnx.merge(graphdef, p)(tokens, pos, seg)

    ref = np.asarray(logits(params))
    for bits, tol in ((8, 0.03), (4, 0.4)):  # measured: 0.014, 0.23 (llama)
        q = quantize_params(params, bits)
        got = np.asarray(logits(dequantize(q)))
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < tol, (bits, rel)
    if family != "llama":
        return  # the generation loop compiles slowly: one family is enough
    # int8 weights in memory, dequantized inside the jitted steps == the float weights
    q = quantize_params(params, 8)
    prompts = [[5, 9, 2], [7, 1, 3, 3, 8]]
    inside = Generator(DecoderFamily(cfg, graphdef, unpack=dequantize), q).generate(prompts, 8)
    outside = Generator(DecoderFamily(cfg, graphdef), dequantize(q)).generate(prompts, 8)
    assert [g.tokens for g in inside] == [g.tokens for g in outside]
    assert all(len(g.tokens) == 8 for g in inside)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir as training leaves one: config, tokenizer, a weights checkpoint at step 5."""
    tmp = tmp_path_factory.mktemp("quant")
    corpus = write_corpus(tmp / "corpus", n_docs=30)
    cfg = config_lib.apply_overrides(config_lib.Config(), [
        f"data.source={corpus}", "data.seq_len=32", "model.max_len=32", "model.n_layers=2",
        "model.d_model=32", "model.n_heads=2", "model.vocab_size=300", "train.batch_size=4",
        "eval.batches=2"])
    run = tmp / "run"
    run.mkdir()
    rundir.write_config(run, cfg)
    tok = train_tokenizer([document(np.random.default_rng(0), i) for i in range(30)], 300)
    save_tokenizer(tok, run / rundir.TOKENIZER_FILE)
    ckpt = Checkpointer(run / rundir.CHECKPOINT_DIR, keep=2)
    params = _random_params(cfg.model, std=0.02)[1]
    ckpt.save_params(5, params, {"config": config_lib.to_dict(cfg)})
    ckpt.close()
    return run


def test_quantize_run_writes_a_run_dir_that_loads(run_dir, tmp_path):
    before = snapshot(run_dir)
    out = tmp_path / "int4"
    line = quantize_command(run_dir, out, 4, 16)
    assert line.startswith(f"wrote {out}: ") and "MiB ->" in line
    assert snapshot(run_dir) == before
    assert {"config.json", "tokenizer.json", "quantization.json", "checkpoints"} <= {
        p.name for p in out.iterdir()}
    record = json.loads((out / "quantization.json").read_text())
    assert record["bits"] == 4 and record["group_size"] == 16
    assert record["quantized"]["blocks/0/attn/w_q"] == {
        "bits": 4, "shape": [32, 2, 16], "dtype": "float32", "axes": [0], "group": 16}
    cfg, params = load_run(run_dir)
    cfg_q, qparams, unpack = load_quantized(out)
    assert cfg_q == cfg
    expected = quantize_params(params, 4, 16)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(qparams), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(qparams["blocks"][0]["mlp"]["wi"], QTensor)
    assert qparams["blocks"][0]["mlp"]["wi"].values.dtype == jnp.int8
    # the stored arrays shrink too (the int4 nibbles are stored packed): 0.20 of the float
    # weights here, the group scales and the float embeddings being the rest
    stored = lambda d: stored_bytes(next((d / "checkpoints").iterdir()) / "state")  # noqa: E731
    assert stored(out) < 0.25 * stored(run_dir)
    # the validation loss through the in-jit unpack is close to the float one's
    tok = run_dir / rundir.TOKENIZER_FILE
    ref = validation_loss(cfg, params, tok)
    got = validation_loss(cfg_q, qparams, tok, unpack=unpack)
    assert ref["tokens"] == got["tokens"] > 0
    assert abs(got["loss"] - ref["loss"]) < 0.05 * ref["loss"]
    # what `sample` does with a quantized run: its tokenizer, int weights, in-jit unpack
    loaded = load_for_generation(out, params=qparams, unpack=unpack)
    [gen] = loaded.generator().generate([loaded.encode("def alpha")], 4)
    assert 0 < len(gen.tokens) <= 4 or gen.finish_reason == "stop"


def test_quantize_run_refuses_a_quantized_run_and_a_busy_out(run_dir, tmp_path):
    out = tmp_path / "int8"
    quantize_run(run_dir, out, 8)
    before = snapshot(out)
    with pytest.raises(UserError, match="already quantized"):
        quantize_run(out, tmp_path / "again", 4)
    assert snapshot(out) == before and not (tmp_path / "again").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        quantize_run(run_dir, busy, 8)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(UserError, match="8 or 4"):
        quantize_run(run_dir, tmp_path / "bits", 2)
    assert not (tmp_path / "bits").exists()


def test_cli_quantizes_samples_and_refuses_a_quantized_run(run_dir, tmp_path, capsys):
    """Through the command (in process): quantize, sample the result, refuse to quantize it
    again (one error line, exit 2, nothing written)."""
    out = tmp_path / "int8"
    assert main(["quantize", str(run_dir), "--bits", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: ") and "MiB ->" in printed
    assert main(["sample", str(out), "--prompt", "def ", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def")  # the prompt, then 4 tokens
    before = snapshot(out)
    assert main(["quantize", str(out), "--bits", "4", "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "already quantized" in err and len(err.strip().splitlines()) == 1
    assert snapshot(out) == before and not (tmp_path / "again").exists()
