"""Absolute encodings and RoPE against naive numpy, against transformers (Llama, GPT-NeoX, GPT-J,
torch CPU) and against the properties the papers state."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxformer.nn.positional import apply_rope, sinusoidal_encoding

B, T, N, H = 2, 12, 3, 16


def packed_positions() -> np.ndarray:
    """Row 0: one document; row 1: three packed documents, each restarting at 0."""
    return np.stack([np.arange(T), np.r_[np.arange(5), np.arange(4), np.arange(3)]])


def random_x(seed: int = 0, shape: tuple[int, ...] = (B, T, N, H)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Sinusoidal


def test_sinusoidal_matches_the_paper_formula():
    d, base = 16, 10000.0
    pos = np.arange(50)
    got = np.asarray(sinusoidal_encoding(jnp.asarray(pos)[None], d, base))[0]
    want = np.zeros((50, d))
    for t in pos:
        for i in range(d // 2):
            want[t, 2 * i] = np.sin(t / base ** (2 * i / d))
            want[t, 2 * i + 1] = np.cos(t / base ** (2 * i / d))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("delta", [1, 3, 17, 60])
def test_sinusoidal_shift_is_a_fixed_rotation(delta):
    # Vaswani et al.: PE(t + delta) is a linear function of PE(t) that depends only on delta,
    # a 2x2 rotation by delta * w_i on each (sin, cos) pair.
    d, base = 32, 10000.0
    t = np.arange(200)
    pe = np.asarray(sinusoidal_encoding(jnp.asarray(t)[None], d, base))[0]  # [T, D]
    shifted = np.asarray(sinusoidal_encoding(jnp.asarray(t + delta)[None], d, base))[0]
    m = np.zeros((d, d))
    for i in range(d // 2):
        a = delta / base ** (2 * i / d)
        m[2 * i: 2 * i + 2, 2 * i: 2 * i + 2] = [[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]
    np.testing.assert_allclose(shifted, pe @ m.T, atol=1e-4)
    assert np.abs(shifted - pe).max() > 0.1  # the shift is not the identity


# ---------------------------------------------------------------------------------------------
# RoPE: naive reference


def naive_rope(x: np.ndarray, pos: np.ndarray, theta: float, fraction: float,
               interleaved: bool) -> np.ndarray:
    """Pair by pair, in float64: rotate (x[a], x[b]) by pos * theta^(-2i/R)."""
    x = x.astype(np.float64)
    out = x.copy()
    rot = int(x.shape[-1] * fraction)
    for i in range(rot // 2):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + rot // 2)
        ang = pos[:, :, None] * theta ** (-2.0 * i / rot)  # [B, T, 1]
        out[..., a] = x[..., a] * np.cos(ang) - x[..., b] * np.sin(ang)
        out[..., b] = x[..., b] * np.cos(ang) + x[..., a] * np.sin(ang)
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_matches_naive_numpy(interleaved, fraction):
    x, pos = random_x(1), packed_positions()
    pos = pos + np.array([[40], [0]])  # row 0 starts mid-sequence, as in a decode step
    got = apply_rope(jnp.asarray(x), jnp.asarray(pos), theta=1000.0, fraction=fraction,
                     interleaved=interleaved)
    want = naive_rope(x, pos, 1000.0, fraction, interleaved)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    rot = int(H * fraction)
    np.testing.assert_array_equal(np.asarray(got)[..., rot:], x[..., rot:])  # passed through


def test_rope_interleaved_matches_complex_multiplication():
    # Meta's original Llama code: view channel pairs (2i, 2i+1) as complex numbers and multiply
    # by e^{i * pos * freq_i}.
    x, pos = random_x(2), packed_positions()
    freqs = 1.0 / 10000.0 ** (np.arange(0, H, 2) / H)
    phasor = np.exp(1j * pos[:, :, None, None] * freqs)  # [B, T, 1, H/2]
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * phasor
    want = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    got = apply_rope(jnp.asarray(x), jnp.asarray(pos), interleaved=True)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# RoPE: transformers (torch CPU)


def test_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    theta = 500000.0
    config = LlamaConfig(hidden_size=N * H, num_attention_heads=N, head_dim=H,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    q, k, pos = random_x(3), random_x(4), packed_positions()
    cos, sin = LlamaRotaryEmbedding(config)(torch.from_numpy(q), torch.from_numpy(pos))
    # transformers lays out [B, N, T, H] and unsqueezes at 1; ours is [B, T, N, H]: dim 2.
    want_q, want_k = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin,
                                          unsqueeze_dim=2)
    for x, want in [(q, want_q), (k, want_k)]:
        got = apply_rope(jnp.asarray(x), jnp.asarray(pos), theta=theta)
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


def test_rope_partial_matches_transformers_gpt_neox():
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import (
        GPTNeoXRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    fraction = 0.25  # GPT-NeoX's default rotary_pct
    config = GPTNeoXConfig(hidden_size=N * H, num_attention_heads=N,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": fraction})
    q, pos = random_x(5), packed_positions()
    cos, sin = GPTNeoXRotaryEmbedding(config)(torch.from_numpy(q), torch.from_numpy(pos))
    assert cos.shape[-1] == H * fraction
    want, _ = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(q), cos, sin,
                                   unsqueeze_dim=2)
    got = apply_rope(jnp.asarray(q), jnp.asarray(pos), fraction=fraction)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


def test_rope_interleaved_partial_matches_transformers_gptj():
    from transformers.models.gptj.modeling_gptj import (
        apply_rotary_pos_emb,
        create_sinusoidal_positions,
    )

    rot = H // 2  # GPT-J rotates its first rotary_dim channels, adjacent pairs
    q, pos = random_x(6), packed_positions()
    sincos = create_sinusoidal_positions(T, rot)[torch.from_numpy(pos)]  # [B, T, R]
    sin, cos = torch.split(sincos, rot // 2, dim=-1)
    qt = torch.from_numpy(q)
    want = torch.cat([apply_rotary_pos_emb(qt[..., :rot], sin, cos), qt[..., rot:]], dim=-1)
    got = apply_rope(jnp.asarray(q), jnp.asarray(pos), fraction=0.5, interleaved=True)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# RoPE: properties


def rope_score(q: np.ndarray, k: np.ndarray, m: int, n: int, **kw) -> float:
    """<rope(q, m), rope(k, n)> for single vectors q, k: [H]."""
    rq = apply_rope(jnp.asarray(q)[None, None, None], jnp.asarray([[m]]), **kw)
    rk = apply_rope(jnp.asarray(k)[None, None, None], jnp.asarray([[n]]), **kw)
    return float(jnp.sum(rq * rk))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_score_depends_only_on_relative_position(interleaved, fraction):
    rng = np.random.default_rng(7)
    q, k = rng.normal(size=(2, H)).astype(np.float32)
    q, k = q / np.linalg.norm(q), k / np.linalg.norm(k)
    kw = dict(interleaved=interleaved, fraction=fraction)
    by_delta = {}
    for delta in [0, 1, 2, 5, -3]:
        pairs = [(n + delta, n) for n in [3, 10, 37, 64] if n + delta >= 0]
        scores = [rope_score(q, k, m, n, **kw) for m, n in pairs]
        np.testing.assert_allclose(scores, scores[0], atol=1e-5, err_msg=f"delta {delta}")
        by_delta[delta] = scores[0]
    # Different offsets score differently: apart by ten times the tolerance above, at least.
    assert min(np.diff(sorted(by_delta.values()))) > 1e-4, by_delta


def test_rope_scores_of_a_packed_document_do_not_depend_on_its_offset():
    # The whole [T, S] score matrix: a Toeplitz matrix in (i, j), and identical whether the
    # document starts at 0 or at position 50.
    q, k = random_x(8, (1, T, N, H)), random_x(9, (1, T, N, H))
    pos = np.arange(T)[None]
    scores = []
    for offset in [0, 50]:
        rq = apply_rope(jnp.asarray(q), jnp.asarray(pos + offset))
        rk = apply_rope(jnp.asarray(k), jnp.asarray(pos + offset))
        scores.append(np.asarray(jnp.einsum("BTNH,BSNH->BNTS", rq, rk)))
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-4)
    # With q = k = a constant vector, only the rotation varies: constant along diagonals.
    c = np.broadcast_to(random_x(10, (1, 1, N, H)), (1, T, N, H))
    rc = apply_rope(jnp.asarray(c), jnp.asarray(pos))
    s = np.asarray(jnp.einsum("BTNH,BSNH->BNTS", rc, rc))[0]  # [N, T, S]
    np.testing.assert_allclose(s[:, 1:, 1:], s[:, :-1, :-1], atol=1e-4)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_preserves_norms(interleaved):
    x, pos = random_x(11), packed_positions() * 100
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), interleaved=interleaved))
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)
    assert not np.allclose(got, x)  # it did rotate


def test_rope_position_zero_is_the_identity():
    x = random_x(12)
    got = apply_rope(jnp.asarray(x), jnp.zeros((B, T), jnp.int32))
    np.testing.assert_allclose(np.asarray(got), x, atol=1e-7)


def test_rope_low_precision_input_is_rotated_in_float32():
    # At position 1000 a bfloat16 angle would be off by several radians; the result must be the
    # float32 rotation rounded once.
    x = jnp.asarray(random_x(13)).astype(jnp.bfloat16)
    pos = jnp.asarray(packed_positions() + 1000)
    got = apply_rope(x, pos)
    assert got.dtype == jnp.bfloat16
    want = apply_rope(x.astype(jnp.float32), pos).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_rope_rejects_an_odd_number_of_rotated_channels():
    with pytest.raises(ValueError, match="even"):
        apply_rope(jnp.zeros((1, 1, 1, 10)), jnp.zeros((1, 1), jnp.int32), fraction=0.5)
