"""Multi-head latent attention (DeepSeek-V2): naive float64 math, the latent-only decode cache,
transformers' DeepseekV3Attention, and that a tiny MLA decoder learns."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer.config import Config, ConfigError, DataConfig, ModelConfig, validate
from jaxformer.models import DecoderLM
from jaxformer.nn.mla import MultiHeadLatentAttention

D, N, C, R, P = 32, 4, 8, 4, 8  # model width, heads, kv latent, rope dims, nope dims
EPS = 1e-6


def make_mla(q_lora_rank=0, v_head_dim=6, seed=0, **kwargs) -> MultiHeadLatentAttention:
    mla = MultiHeadLatentAttention(D, N, kv_lora_rank=C, q_lora_rank=q_lora_rank,
                                   qk_rope_head_dim=R, qk_nope_head_dim=P, v_head_dim=v_head_dim,
                                   norm_eps=EPS, init_std=0.3, rngs=nnx.Rngs(seed), **kwargs)
    # Non-trivial norm scales, so a swapped or skipped norm shows.
    rng = np.random.default_rng(seed + 1)
    for norm in (mla.kv_norm, mla.q_norm):
        if norm is not None:
            norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, norm.scale.shape), jnp.float32)
    return mla


def np_params(mla) -> dict[str, np.ndarray | None]:
    def get(p):
        return None if p is None else np.asarray(p[...], np.float64)

    return {name: get(getattr(mla, name)) for name in
            ("w_q", "w_dq", "w_uq", "w_dkv", "w_kr", "w_uk", "w_uv", "w_out")} | {
        "kv_scale": get(mla.kv_norm.scale),
        "q_scale": None if mla.q_norm is None else get(mla.q_norm.scale)}


def np_rms(x, scale):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + EPS) * scale


def np_rope(x, pos, theta=10000.0):
    """Rotate-half RoPE of one vector x [R] at integer position pos, written out pair by pair."""
    half = len(x) // 2
    y = x.copy()
    for i in range(half):
        a = pos * theta ** (-2.0 * i / len(x))
        y[i] = x[i] * np.cos(a) - x[i + half] * np.sin(a)
        y[i + half] = x[i + half] * np.cos(a) + x[i] * np.sin(a)
    return y


def naive_mla(x, positions, p):
    """The formulas of DeepSeek-V2 section 2.1 in float64, loops over batch, head and query."""
    b, t, _ = x.shape
    n, hv = p["w_uv"].shape[1], p["w_uv"].shape[2]
    out = np.zeros((b, t, D))
    for bi in range(b):
        xb = x[bi]
        if p["w_q"] is not None:
            q = np.einsum("td,dnh->tnh", xb, p["w_q"])
        else:
            q = np.einsum("tq,qnh->tnh", np_rms(xb @ p["w_dq"], p["q_scale"]), p["w_uq"])
        c_kv = np_rms(xb @ p["w_dkv"], p["kv_scale"])  # [T, C]
        k_rope = np.stack([np_rope(xb[s] @ p["w_kr"], positions[bi, s]) for s in range(t)])
        heads = np.zeros((t, n, hv))
        for ni in range(n):
            k = np.concatenate([c_kv @ p["w_uk"][:, ni], k_rope], axis=1)  # [T, P+R]
            v = c_kv @ p["w_uv"][:, ni]  # [T, V]
            for ti in range(t):
                qi = np.concatenate([q[ti, ni, :P], np_rope(q[ti, ni, P:], positions[bi, ti])])
                scores = np.array([qi @ k[s] for s in range(ti + 1)]) / np.sqrt(P + R)
                w = np.exp(scores - scores.max())
                heads[ti, ni] = (w / w.sum()) @ v[:ti + 1]
        out[bi] = heads.reshape(t, n * hv) @ p["w_out"].reshape(n * hv, D)
    return out


@pytest.mark.parametrize("q_lora_rank,v_head_dim,absorb", [
    (0, 6, False), (12, 6, False), (12, 16, False), (0, 16, True), (12, 6, True)])
def test_mla_matches_naive_math(q_lora_rank, v_head_dim, absorb):
    # v_head_dim 6 < P + R = 12 < 16: the kernel padding goes both ways.
    mla = make_mla(q_lora_rank, v_head_dim, absorb=absorb)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, D))
    positions = np.array([np.arange(7), np.arange(7) + 5])  # row 1 starts mid-sequence
    got, cache = nnx.jit(lambda m, x, pos: m(x, q_positions=pos, is_causal=True))(
        mla, jnp.asarray(x, jnp.float32), jnp.asarray(positions))
    assert cache is None
    want = naive_mla(x, positions, np_params(mla))
    assert np.abs(want).max() > 0.1  # not a vacuous comparison
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_mla_is_self_attention_only():
    mla = make_mla()
    x = jnp.zeros((1, 3, D))
    with pytest.raises(ValueError, match="self-attention only"):
        mla(x, context=x, is_causal=True)


def check(model: ModelConfig) -> ModelConfig:
    return validate(Config(model=model, data=DataConfig(seq_len=16))).model


def mla_config(**overrides) -> ModelConfig:
    fields = dict(n_layers=2, d_model=D, n_heads=N, vocab_size=50, max_len=32,
                  pos_encoding="none", norm="rmsnorm", activation="swiglu", use_bias=False,
                  attention_type="mla", kv_lora_rank=C, q_lora_rank=12, qk_rope_head_dim=R,
                  qk_nope_head_dim=P, v_head_dim=6, init_std=0.1)
    return check(ModelConfig(**(fields | overrides)))


@pytest.mark.parametrize("absorb", [False, True])
def test_mla_decoder_incremental_decode_matches_full_forward(absorb):
    cfg = mla_config()
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    for block in model.blocks:
        assert isinstance(block.attn, MultiHeadLatentAttention)
        block.attn.absorb = absorb
    b, t, prompt = 2, 12, 5
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
    full = nnx.jit(lambda m, x, pos: m(x, pos))(model, tokens,
                                                jnp.broadcast_to(jnp.arange(t), (b, t)))
    decode = nnx.jit(lambda m, x, cache, i: m.decode(x, cache, i))

    cache = model.init_cache(b, 16)
    for layer in cache:
        # Only the latent and the rope key: nothing per head, nothing else.
        assert set(layer) == {"latent", "k_rope"}
        assert layer["latent"].shape == (b, 16, cfg.kv_lora_rank)
        assert layer["k_rope"].shape == (b, 16, cfg.qk_rope_head_dim)
    logits, cache = decode(model, tokens[:, :prompt], cache, jnp.asarray(0))
    steps = [logits]
    for i in range(prompt, t):
        logits, cache = decode(model, tokens[:, i:i + 1], cache, jnp.asarray(i))
        steps.append(logits)
    for layer in cache:
        shapes = {k: v.shape for k, v in layer.items()}
        assert shapes == {"latent": (b, 16, C), "k_rope": (b, 16, R)}
    err = float(jnp.abs(jnp.concatenate(steps, axis=1) - full).max())
    assert err < 1e-5, err


def test_mla_config_validation():
    check(mla_config(q_lora_rank=0))
    bad = [dict(kv_lora_rank=0), dict(qk_rope_head_dim=3), dict(qk_rope_head_dim=0),
           dict(qk_nope_head_dim=0), dict(v_head_dim=0), dict(arch="encoder")]
    for change in bad:
        with pytest.raises(ConfigError, match="mla"):
            check(dataclasses.replace(mla_config(), **change))
    check(ModelConfig(max_len=32))  # mha defaults untouched


@pytest.mark.parametrize("q_lora_rank,interleave", [(None, False), (12, True)])
def test_mla_matches_transformers_deepseek_v3(q_lora_rank, interleave):
    torch = pytest.importorskip("torch")
    ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    v_head_dim = 6
    hf_cfg = DeepseekV3Config(hidden_size=D, num_attention_heads=N, num_key_value_heads=N,
                              q_lora_rank=q_lora_rank, kv_lora_rank=C, qk_rope_head_dim=R,
                              qk_nope_head_dim=P, v_head_dim=v_head_dim, rms_norm_eps=EPS,
                              rope_interleave=interleave, rope_theta=10000.0, vocab_size=50,
                              num_hidden_layers=1, intermediate_size=64,
                              moe_intermediate_size=16)
    hf_cfg._attn_implementation = "eager"
    hf = ds.DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    # The interleaved layout (DeepSeek's checkpoints) is apply_rope(interleaved=True).
    mla = make_mla(q_lora_rank or 0, v_head_dim, rope_interleaved=interleave)
    p = {k: None if v is None else torch.tensor(v, dtype=torch.float64)
         for k, v in np_params(mla).items()}
    hf = hf.double()
    sd = {"kv_a_proj_with_mqa.weight": torch.cat([p["w_dkv"], p["w_kr"]], 1).T,
          "kv_a_layernorm.weight": p["kv_scale"],
          "kv_b_proj.weight": torch.cat([p["w_uk"], p["w_uv"]], 2).reshape(C, -1).T,
          "o_proj.weight": p["w_out"].reshape(-1, D).T}
    if q_lora_rank is None:
        sd["q_proj.weight"] = p["w_q"].reshape(D, -1).T
    else:
        sd |= {"q_a_proj.weight": p["w_dq"].T, "q_a_layernorm.weight": p["q_scale"],
               "q_b_proj.weight": p["w_uq"].reshape(q_lora_rank, -1).T}
    hf.load_state_dict(sd, strict=True)

    b, t = 2, 9
    x = np.random.default_rng(3).normal(size=(b, t, D))
    positions = np.broadcast_to(np.arange(t), (b, t))
    xt = torch.tensor(x)
    cos, sin = ds.DeepseekV3RotaryEmbedding(hf_cfg)(xt, torch.tensor(positions))
    causal = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        want = hf(xt, (cos.double(), sin.double()), causal)[0].numpy()
    got, _ = nnx.jit(lambda m, x, pos: m(x, q_positions=pos, is_causal=True))(
        mla, jnp.asarray(x, jnp.float32), jnp.asarray(positions))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_tiny_mla_decoder_trains():
    cfg = mla_config(n_layers=1, init_std=0.02)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.0), wrt=nnx.Param)
    seq = jax.random.randint(jax.random.key(0), (1, 16), 0, cfg.vocab_size)
    tokens = jnp.tile(seq, (4, 2))  # a random sequence, repeated
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def loss_fn(model):
        logits = model(tokens[:, :-1], positions[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    final = float(nnx.jit(loss_fn)(model))
    assert losses[0] > 3.5  # ~ln(50) = 3.9 at init
    assert final < 0.5 * losses[0], (losses[0], final)


def test_mla_greedy_generation_follows_full_forward():
    from jaxformer.inference.families import DecoderFamily
    from jaxformer.inference.generate import Generator

    model = DecoderLM(mla_config(init_std=0.3), rngs=nnx.Rngs(2))
    graphdef, params = nnx.split(model)
    prompt = [3, 14, 15, 9]
    new = Generator(DecoderFamily(model.cfg, graphdef), nnx.to_pure_dict(params)).generate(
        [prompt], 8)[0].tokens
    seq = jnp.asarray([prompt + new])
    logits = nnx.jit(lambda m, x, pos: m(x, pos))(model, seq, jnp.arange(seq.shape[1])[None])
    assert new == np.asarray(jnp.argmax(logits[0, len(prompt) - 1:-1], -1)).tolist()
