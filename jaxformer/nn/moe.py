"""Mixture-of-experts feed-forward block: top-k routing, capacity or dropless dispatch, shared
experts, and the auxiliary routing losses.

Letters: B batch, T length, D model width, F hidden width of one expert, E experts, K experts per
token (top-k), N = B*T tokens, G dispatch groups, S tokens per group (N padded to G*S),
C capacity (slots per expert per group).

Routing (Shazeer et al. 2017, "Outrageously Large Neural Networks"; deterministic: no noise or
jitter, so the call needs no rng):

    logits = x @ router                       [N, E], in ``router_dtype`` (float32)
    p      = softmax(logits)                   [N, E], float32 (float64 for a float64 router)
    e_1..e_K = top_k(p)                        the K largest; ties go to the lower expert index
    g_k    = p[e_k]                            Switch (K = 1, Fedus et al. 2021) and
    g_k    = p[e_k] / sum_j p[e_j]             with ``normalize_top_k`` and K > 1 (Mixtral,
                                               Jiang et al. 2024). With K = 1 the raw softmax
                                               probability is always used: renormalizing would
                                               make g = 1 and cut the router's gradient.
    y      = sum_k g_k * expert_{e_k}(x)  +  shared(x)

An expert is the ``FeedForward`` MLP without biases: plain ``wo[e] act(x wi[e])`` or gated
``wo[e] (act(x wi_gate[e]) * (x wi_up[e]))`` (see ``jaxformer.nn.feedforward``). Shared experts
(DeepSeekMoE, Dai et al. 2024) are always on and unweighted; ``n_shared_experts`` of them, each
of width F, equal one dense ``FeedForward`` of width ``n_shared_experts * F`` (the sum of their
outputs), which is how they are stored.

Dispatch, chosen by ``capacity_factor``:

* capacity (``capacity_factor > 0``; GShard, Lepikhin et al. 2020; Switch Transformer): tokens
  are cut into G groups of S tokens (S <= ``group_size``; the last group padded with masked
  tokens), and each expert takes at most C = ceil(capacity_factor * S * K / E) (capped at S)
  token-choices per group. Priority: all first choices of the group, in token order, before any
  second choice, and so on. Choices beyond C are dropped: they add nothing to y (the token keeps
  its other choices, its shared-expert output and, in the model, the residual). Dispatch and
  combine are one-hot tensors [G, S, E, C] and every product is a dense einsum that keeps E as
  an explicit dimension ('gsec,gsd->gecd', 'gecd,edf->gecf', 'gecf,efd->gecd',
  'gsec,gecd->gsd'), so the expert dimension can be sharded on an expert mesh axis.
* dropless (``capacity_factor <= 0``): every choice is computed, with ``dropless_impl``:
  "ragged": the N*K token-choices are sorted by expert and the experts run as grouped matmuls,
  ``jax.lax.ragged_dot``. On GPU and TPU this lowers to a native grouped matmul. On CPU, JAX
  lowers ragged_dot to a masked dense product over all E groups of all N*K rows (E times the
  routed FLOPs, and an [E, N*K, D] temporary). "dense": every expert on every token
  ('nd,edf->enf'), then a weighted sum with the [N, E] gate matrix (zero off the top-k): E/K
  times the routed FLOPs but plain einsums with E explicit (shardable), and on CPU cheaper than
  "ragged". "auto" (default) picks "ragged" on GPU/TPU and "dense" on CPU.

Padding tokens (``mask`` 0 or False; any nonzero value marks a valid token) are routed to no
expert: they consume no capacity, add nothing to the statistics below, and get zero routed
output (the shared experts still run on them).

Statistics, over the valid (mask 1) tokens, n of them, all float32 scalars except expert_load:

    expert_load[e]    = f_e = #{(token, k): e_k = e} / (n K)   (pre-capacity routing decisions;
                        sums to 1)
    P_e               = (1/n) sum_tokens p_e
    load_balance_loss = E * sum_e f_e P_e   (Switch eq. 4. For K > 1 all top-k assignments are
                        counted and divided by K, so f sums to 1 and the loss is 1 under uniform
                        routing for every K; GShard counts the first choice only, and
                        conventions that do not divide by K, e.g. Hugging Face Mixtral, give K
                        times this value.)
    router_z_loss     = (1/n) sum_tokens logsumexp(logits)^2   (ST-MoE, Zoph et al. 2022, eq. 5)
    dropped_fraction  = dropped token-choices / (n K)           (0 in the dropless path)

The losses are returned unweighted; the caller scales them (Switch: 1e-2 for the balance loss,
ST-MoE: 1e-3 for the z-loss) and adds them to the training objective.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.feedforward import GATED_ACTIVATIONS, FeedForward, activation_fn
from jaxformer.nn.params import normal_param
from jaxformer.parallel.target import target_platform

DROPLESS_IMPLS = ("auto", "ragged", "dense")


class MoEFeedForward(nnx.Module):
    """Top-k routed mixture of expert MLPs, with optional shared experts (module docstring).

    Params, by logical axes:
      ``router`` [D, E] (embed, None), no bias;
      plain: ``wi`` [E, D, F] (experts, embed, mlp), ``wo`` [E, F, D] (experts, mlp, embed);
      gated: ``wi_gate``, ``wi_up`` [E, D, F] (experts, embed, mlp), ``wo`` [E, F, D];
      with ``n_shared_experts`` > 0: ``shared``, a bias-free ``FeedForward`` of width
      ``n_shared_experts * d_ff`` (``shared/wi`` or ``shared/wi_gate``, ``shared/wi_up`` [D, Fs]
      (embed, mlp), ``shared/wo`` [Fs, D] (mlp, embed)).
    Router and input projections are drawn from N(0, init_std^2) (the router from
    N(0, router_init_std^2) when that is given), output projections from N(0, out_std^2).
    """

    def __init__(self, d_model: int, d_ff: int, *, n_experts: int, top_k: int,
                 capacity_factor: float, n_shared_experts: int = 0, activation: str,
                 init_std: float, out_std: float, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs, router_dtype: jnp.dtype = jnp.float32,
                 normalize_top_k: bool = True, group_size: int = 1024,
                 dropless_impl: str = "auto", router_init_std: float | None = None):
        activation_fn(activation)  # validates the name
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        if n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {n_shared_experts}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if dropless_impl not in DROPLESS_IMPLS:
            raise ValueError(f"unknown dropless_impl {dropless_impl!r}; valid: "
                             f"{', '.join(DROPLESS_IMPLS)}")
        self.d_model, self.d_ff = d_model, d_ff
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor = float(capacity_factor)
        self.n_shared_experts = n_shared_experts
        self.activation = activation
        self.gated = activation in GATED_ACTIVATIONS
        self.dtype, self.router_dtype = dtype, router_dtype
        self.normalize_top_k = normalize_top_k
        self.group_size = group_size
        self.dropless_impl = dropless_impl

        std = init_std if router_init_std is None else router_init_std
        self.router = normal_param(rngs, (d_model, n_experts), ("embed", None), std, param_dtype)

        def w_in() -> nnx.Param:
            return normal_param(rngs, (n_experts, d_model, d_ff), ("experts", "embed", "mlp"),
                                init_std, param_dtype)

        if self.gated:
            self.wi_gate, self.wi_up = w_in(), w_in()
        else:
            self.wi = w_in()
        self.wo = normal_param(rngs, (n_experts, d_ff, d_model), ("experts", "mlp", "embed"),
                               out_std, param_dtype)
        self.shared = (FeedForward(d_model, n_shared_experts * d_ff, activation=activation,
                                   use_bias=False, init_std=init_std, out_std=out_std,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                       if n_shared_experts > 0 else None)

    # ---------------------------------------------------------------------------------------
    # Experts: one function for every layout; `matmul(h, w)` applies per-expert weights w.

    def _experts(self, h: jnp.ndarray, matmul) -> jnp.ndarray:
        act = activation_fn(self.activation)

        def w(p: nnx.Param) -> jnp.ndarray:
            return p[...].astype(self.dtype)

        if self.gated:
            hidden = act(matmul(h, w(self.wi_gate), "in")) * matmul(h, w(self.wi_up), "in")
        else:
            hidden = act(matmul(h, w(self.wi), "in"))
        return matmul(hidden, w(self.wo), "out")

    # ---------------------------------------------------------------------------------------

    def _route(self, x2: jnp.ndarray, valid: jnp.ndarray):
        """x2: [N, D], valid: [N] float32 -> (probs [N, E], logits [N, E], experts [N, K] int,
        gates [N, K] float32; padding tokens' gates are 0)."""
        logits = x2.astype(self.router_dtype) @ self.router[...].astype(self.router_dtype)
        # Softmax in float32 at least (float64 when the router runs in float64).
        logits = logits.astype(jnp.promote_types(self.router_dtype, jnp.float32))
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, experts = jax.lax.top_k(probs, self.top_k)
        if self.normalize_top_k and self.top_k > 1:
            top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
        return probs, logits, experts, top_p * valid[:, None]

    def _stats(self, probs, logits, experts, valid) -> dict[str, jnp.ndarray]:
        E, K = self.n_experts, self.top_k
        n = jnp.maximum(jnp.sum(valid), 1.0)
        counts = jnp.sum(jax.nn.one_hot(experts, E, dtype=jnp.float32) * valid[:, None, None],
                         axis=(0, 1))
        f = counts / (n * K)
        P = jnp.sum(probs * valid[:, None], axis=0) / n
        z = jax.nn.logsumexp(logits, axis=-1)
        return {"load_balance_loss": E * jnp.sum(f * P),
                "router_z_loss": jnp.sum(z * z * valid) / n,
                "expert_load": f}

    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """x: [B, T, D]; mask: [B, T] (bool or 0/1 float; None: all tokens valid).

        -> (y [B, T, D] in the compute dtype, stats) with stats ``load_balance_loss``,
        ``router_z_loss``, ``dropped_fraction`` (float32 scalars) and ``expert_load`` [E].
        """
        *lead, D = x.shape
        x2 = x.reshape(-1, D)
        N = x2.shape[0]
        valid = (jnp.ones((N,), jnp.float32) if mask is None
                 else (mask.reshape(N) != 0).astype(jnp.float32))
        probs, logits, experts, gates = self._route(x2, valid)
        stats = self._stats(probs, logits, experts, valid)
        xc = x2.astype(self.dtype)
        if self.capacity_factor > 0:
            y, kept = self._capacity(xc, experts, gates, valid)
            n_assign = jnp.sum(valid) * self.top_k
            stats["dropped_fraction"] = (n_assign - kept) / jnp.maximum(n_assign, 1.0)
        else:
            y = self._dropless(xc, experts, gates)
            stats["dropped_fraction"] = jnp.zeros((), jnp.float32)
        if self.shared is not None:
            y = y + self.shared(xc)
        return y.reshape(*lead, D), stats

    # ---------------------------------------------------------------------------------------

    def _dropless_kind(self) -> str:
        if self.dropless_impl != "auto":
            return self.dropless_impl
        return "dense" if target_platform() == "cpu" else "ragged"

    def _dropless(self, xc: jnp.ndarray, experts: jnp.ndarray, gates: jnp.ndarray) -> jnp.ndarray:
        """Every token-choice computed. xc: [N, D] -> [N, D]."""
        N, D = xc.shape
        E, K = self.n_experts, self.top_k
        if self._dropless_kind() == "dense":
            # Gate matrix [N, E]: g_k at column e_k, 0 elsewhere (the top-k experts are distinct).
            gate_mat = jnp.einsum("nk,nke->ne", gates,
                                  jax.nn.one_hot(experts, E, dtype=gates.dtype))

            def matmul(h, w, stage):
                return jnp.einsum("nd,edf->enf" if stage == "in" else "enf,efd->end", h, w)

            out = self._experts(xc, matmul)  # [E, N, D]
            return jnp.einsum("end,ne->nd", out, gate_mat.astype(self.dtype))

        flat = experts.reshape(N * K)
        order = jnp.argsort(flat, stable=True)  # token-choices sorted by expert
        rows = xc[order // K]  # [N*K, D]; order // K is the token of each sorted choice
        group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)

        def matmul(h, w, stage):
            del stage
            return jax.lax.ragged_dot(h, w, group_sizes)

        out = self._experts(rows, matmul)  # [N*K, D], sorted order
        inverse = jnp.zeros((N * K,), order.dtype).at[order].set(jnp.arange(N * K,
                                                                            dtype=order.dtype))
        out = out[inverse].reshape(N, K, D)
        return jnp.einsum("nkd,nk->nd", out, gates.astype(self.dtype))

    # ---------------------------------------------------------------------------------------

    def groups_and_capacity(self, n_tokens: int) -> tuple[int, int, int]:
        """Capacity path: (G groups, S tokens per group, C capacity) for ``n_tokens`` tokens."""
        G = -(-n_tokens // self.group_size)
        S = -(-n_tokens // G)
        C = math.ceil(self.capacity_factor * S * self.top_k / self.n_experts)
        return G, S, max(1, min(C, S))

    def _capacity(self, xc, experts, gates, valid):
        """GShard/Switch dispatch. -> (y [N, D], number of kept token-choices)."""
        N, D = xc.shape
        E, K = self.n_experts, self.top_k
        G, S, C = self.groups_and_capacity(N)
        pad = G * S - N
        if pad:
            xc = jnp.pad(xc, ((0, pad), (0, 0)))
            experts = jnp.pad(experts, ((0, pad), (0, 0)))
            gates = jnp.pad(gates, ((0, pad), (0, 0)))
            valid = jnp.pad(valid, (0, pad))
        xg = xc.reshape(G, S, D)
        # Choices in priority order: [G, K, S, E], k-major, so every first choice of the group
        # comes before any second choice, and token order within a choice rank.
        choice = (jax.nn.one_hot(experts.reshape(G, S, K), E, dtype=jnp.int32)
                  * valid.reshape(G, S, 1, 1).astype(jnp.int32)).transpose(0, 2, 1, 3)
        position = jnp.cumsum(choice.reshape(G, K * S, E), axis=1).reshape(G, K, S, E) - 1
        keep = choice * (position < C)  # [G, K, S, E] 0/1, at most one e per (k, s)
        # Slot of each choice in its expert's buffer, one-hot [G, K, S, C] (all zero once it
        # is past C). The [G, K, S, E, C] product is never formed: dispatch and combine
        # contract k in one einsum; the top-k experts of a token are distinct, so dispatch
        # stays 0/1.
        slot = jax.nn.one_hot(jnp.sum(position * choice, axis=-1), C, dtype=self.dtype)
        keep = keep.astype(self.dtype)
        dispatch = jnp.einsum("gkse,gksc->gsec", keep, slot)  # [G, S, E, C]
        gk = gates.reshape(G, S, K).transpose(0, 2, 1).astype(self.dtype)  # [G, K, S]
        combine = jnp.einsum("gkse,gksc->gsec", keep * gk[..., None], slot)

        expert_in = jnp.einsum("gsec,gsd->gecd", dispatch, xg)  # [G, E, C, D]

        def matmul(h, w, stage):
            return jnp.einsum("gecd,edf->gecf" if stage == "in" else "gecf,efd->gecd", h, w)

        expert_out = self._experts(expert_in, matmul)  # [G, E, C, D]
        y = jnp.einsum("gsec,gecd->gsd", combine, expert_out).reshape(G * S, D)[:N]
        return y, jnp.sum(keep, dtype=jnp.float32)
