"""Feed-forward blocks against naive numpy written here, against PyTorch and transformers."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch.nn import functional

from jaxformer.nn.feedforward import FeedForward, GeluMlp, default_d_ff

D, FF = 16, 40
PLAIN = ["relu", "gelu", "gelu_tanh"]
GATED = ["swiglu", "geglu", "geglu_tanh"]

# Naive activations, written from their definitions rather than taken from a library.
_erf = np.vectorize(math.erf)


def _gelu_exact(h):
    return 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))


def _gelu_tanh(h):
    return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))


def _silu(h):
    return h / (1.0 + np.exp(-h))


NAIVE_ACT = {"relu": lambda h: np.maximum(h, 0.0), "gelu": _gelu_exact, "gelu_tanh": _gelu_tanh,
             "swiglu": _silu, "geglu": _gelu_exact, "geglu_tanh": _gelu_tanh}
TORCH_ACT = {"relu": functional.relu, "gelu": lambda h: functional.gelu(h, approximate="none"),
             "gelu_tanh": lambda h: functional.gelu(h, approximate="tanh"),
             "swiglu": functional.silu,
             "geglu": lambda h: functional.gelu(h, approximate="none"),
             "geglu_tanh": lambda h: functional.gelu(h, approximate="tanh")}


def _ffn(activation: str, use_bias: bool, dtype=jnp.float32, d_ff: int = FF) -> FeedForward:
    """A block with random weights *and* random biases (they start at 0, which hides bugs)."""
    ffn = FeedForward(D, d_ff, activation=activation, use_bias=use_bias, init_std=0.3,
                      out_std=0.2, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for name in ("bi", "bi_gate", "bi_up", "bo"):
        p = getattr(ffn, name, None)
        if p is not None:
            p[...] = jnp.asarray(rng.normal(size=p.shape) * 0.5, p.dtype)
    return ffn


def _weights(ffn: FeedForward) -> dict[str, np.ndarray]:
    return {k[-1]: np.asarray(v[...], np.float64)
            for k, v in nnx.to_flat_state(nnx.state(ffn, nnx.Param))}


def _x(shape=(2, 7, D), seed=2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape) * 1.5


def _naive(activation: str, w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    act = NAIVE_ACT[activation]
    if activation in GATED:
        gate = x @ w["wi_gate"] + w.get("bi_gate", 0.0)
        up = x @ w["wi_up"] + w.get("bi_up", 0.0)
        h = act(gate) * up
    else:
        h = act(x @ w["wi"] + w.get("bi", 0.0))
    return h @ w["wo"] + w.get("bo", 0.0)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("activation", PLAIN + GATED)
def test_matches_naive_numpy(activation, use_bias):
    ffn = _ffn(activation, use_bias)
    x = _x()
    got = ffn(jnp.asarray(x, jnp.float32))
    assert got.shape == x.shape and got.dtype == jnp.float32
    want = _naive(activation, _weights(ffn), x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", PLAIN + GATED)
def test_matches_torch_with_copied_weights(activation):
    ffn = _ffn(activation, use_bias=True)
    w = {k: torch.from_numpy(v) for k, v in _weights(ffn).items()}
    x = _x(seed=3)
    act = TORCH_ACT[activation]
    xt = torch.from_numpy(x)
    if activation in GATED:
        h = act(xt @ w["wi_gate"] + w["bi_gate"]) * (xt @ w["wi_up"] + w["bi_up"])
    else:
        h = act(xt @ w["wi"] + w["bi"])
    want = (h @ w["wo"] + w["bo"]).numpy()
    np.testing.assert_allclose(np.asarray(ffn(jnp.asarray(x, jnp.float32))), want, rtol=1e-5,
                               atol=1e-5)


def test_the_activations_differ():
    # Guards the two tests above: if exact and tanh GELU were numerically indistinguishable at
    # these tolerances, a swapped approximation would pass them.
    x = _x(seed=4)
    outs = {a: np.asarray(_ffn(a, True)(jnp.asarray(x, jnp.float32)))
            for a in ("gelu", "gelu_tanh")}
    assert np.abs(outs["gelu"] - outs["gelu_tanh"]).max() > 1e-4


def _copy(linear: torch.nn.Linear, w: np.ndarray) -> None:
    linear.weight.copy_(torch.from_numpy(w.T).float())  # torch Linear stores [out, in]


def test_swiglu_matches_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    ffn = _ffn("swiglu", use_bias=False)
    w = _weights(ffn)
    ref = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=FF, num_attention_heads=2,
                                 num_key_value_heads=2, hidden_act="silu"))
    with torch.no_grad():
        _copy(ref.gate_proj, w["wi_gate"])
        _copy(ref.up_proj, w["wi_up"])
        _copy(ref.down_proj, w["wo"])
        x = _x(seed=5)
        want = ref(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(np.asarray(ffn(jnp.asarray(x, jnp.float32))), want, rtol=1e-5,
                               atol=1e-5)


def test_geglu_tanh_matches_t5_v1_1_gated_gelu():
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    cfg = T5Config(d_model=D, d_ff=FF, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    ref = T5DenseGatedActDense(cfg).eval()
    x = _x(seed=6)
    ffn = _ffn("geglu_tanh", use_bias=False)
    w = _weights(ffn)
    with torch.no_grad():
        _copy(ref.wi_0, w["wi_gate"])  # wi_0 goes through the activation
        _copy(ref.wi_1, w["wi_up"])
        _copy(ref.wo, w["wo"])
        want = ref(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(np.asarray(ffn(jnp.asarray(x, jnp.float32))), want, rtol=1e-5,
                               atol=1e-5)
    # T5 v1.1's "gated-gelu" is the tanh form: exact-erf "geglu" is measurably different.
    exact = _ffn("geglu", use_bias=False)
    assert np.abs(np.asarray(exact(jnp.asarray(x, jnp.float32))) - want).max() > 1e-4


def test_gelu_mlp_is_the_gpt2_mlp():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    mlp = GeluMlp(D, FF, init_std=0.3, out_std=0.2, dtype=jnp.float32,
                  param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(7)
    mlp.bi[...] = jnp.asarray(rng.normal(size=FF), jnp.float32)
    mlp.bo[...] = jnp.asarray(rng.normal(size=D), jnp.float32)
    w = _weights(mlp)
    assert {k: v.shape for k, v in w.items()} == {"wi": (D, FF), "bi": (FF,), "wo": (FF, D),
                                                   "bo": (D,)}
    ref = GPT2MLP(FF, GPT2Config(n_embd=D, resid_pdrop=0.0)).eval()
    with torch.no_grad():
        # GPT-2's Conv1D stores [in, out], the same layout as ours.
        for theirs, ours in ((ref.c_fc, "wi"), (ref.c_proj, "wo")):
            theirs.weight.copy_(torch.from_numpy(w[ours]).float())
        ref.c_fc.bias.copy_(torch.from_numpy(w["bi"]).float())
        ref.c_proj.bias.copy_(torch.from_numpy(w["bo"]).float())
        x = _x(seed=8)
        want = ref(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x, jnp.float32))), want, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize(("activation", "use_bias", "names"), [
    ("relu", True, {"wi": ((D, FF), ("embed", "mlp")), "bi": ((FF,), ("mlp",)),
                    "wo": ((FF, D), ("mlp", "embed")), "bo": ((D,), ("embed",))}),
    ("gelu", False, {"wi": ((D, FF), ("embed", "mlp")), "wo": ((FF, D), ("mlp", "embed"))}),
    ("swiglu", False, {"wi_gate": ((D, FF), ("embed", "mlp")), "wi_up": ((D, FF), ("embed", "mlp")),
                       "wo": ((FF, D), ("mlp", "embed"))}),
    ("geglu", True, {"wi_gate": ((D, FF), ("embed", "mlp")), "bi_gate": ((FF,), ("mlp",)),
                     "wi_up": ((D, FF), ("embed", "mlp")), "bi_up": ((FF,), ("mlp",)),
                     "wo": ((FF, D), ("mlp", "embed")), "bo": ((D,), ("embed",))}),
])
def test_param_names_shapes_and_logical_axes(activation, use_bias, names):
    ffn = _ffn(activation, use_bias)
    got = {k[-1]: (v.shape, v.get_metadata()["logical_axes"])
           for k, v in nnx.to_flat_state(nnx.state(ffn, nnx.Param))}
    assert got == names


def test_init_scales():
    ffn = FeedForward(256, 512, activation="swiglu", use_bias=True, init_std=0.05, out_std=0.01,
                      dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    for name, std in (("wi_gate", 0.05), ("wi_up", 0.05), ("wo", 0.01)):
        np.testing.assert_allclose(np.asarray(getattr(ffn, name)[...]).std(), std, rtol=0.02)
    assert np.all(np.asarray(ffn.bo[...]) == 0) and np.all(np.asarray(ffn.bi_up[...]) == 0)
    # the two gated projections are drawn independently
    assert not np.allclose(np.asarray(ffn.wi_gate[...]), np.asarray(ffn.wi_up[...]))


def test_any_leading_shape():
    ffn = _ffn("geglu", True)
    x = _x(shape=(2, 3, 4, D), seed=9)
    got = ffn(jnp.asarray(x, jnp.float32))
    assert got.shape == (2, 3, 4, D)
    np.testing.assert_allclose(np.asarray(got), _naive("geglu", _weights(ffn), x), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(ffn(jnp.asarray(x[0, 0], jnp.float32))),
                               np.asarray(got)[0, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_bfloat16_compute(activation):
    ffn = _ffn(activation, True, dtype=jnp.bfloat16)
    assert ffn.wo[...].dtype == jnp.float32  # parameters stay in param_dtype
    x = _x(seed=10)
    got = ffn(jnp.asarray(x, jnp.float32))
    assert got.dtype == jnp.bfloat16
    want = _naive(activation, _weights(ffn), x)
    err = np.abs(np.asarray(got.astype(jnp.float32)) - want)
    assert err.max() < 0.05 * np.abs(want).max()


@pytest.mark.parametrize(("d_model", "activation", "want"), [
    (768, "gelu", 3072), (768, "relu", 3072), (512, "gelu_tanh", 2048),
    (768, "swiglu", 2048),     # 8*768/3 = 2048 exactly
    (512, "geglu", 1368),      # 1365.33 -> 1365 -> up to 1368
    (4096, "swiglu", 10928),   # 10922.67 -> 10922 -> up to 10928
    (10, "geglu_tanh", 32),    # 26.67 -> 26 -> up to 32
])
def test_default_d_ff(d_model, activation, want):
    assert default_d_ff(d_model, activation) == want


def test_default_d_ff_gated_is_the_next_multiple_of_8():
    for d in range(1, 3000):
        f = default_d_ff(d, "swiglu")
        assert f % 8 == 0 and f >= int(8 * d / 3) and f - int(8 * d / 3) < 8


def test_unknown_activation_names_the_valid_ones():
    for make in (lambda: _ffn("silu", True), lambda: default_d_ff(8, "silu")):
        with pytest.raises(ValueError, match="'silu'") as err:
            make()
        for a in PLAIN + GATED:
            assert a in str(err.value)
