"""LoRA training (``lora.rank > 0``; the math is ``jaxformer.models.lora``).

The train state holds the adapters only: ``TrainState.params`` is the adapter tree, so AdamW's
moments exist only for it, and checkpoints hold only it (with the config, whose
``train.init_from`` names the base, and ``lora_base.json``, the base's step). The base's
weights are loaded once per invocation, placed by the model's sharding rules, and reach the
jitted step as its argument ``lora_base`` (not donated, not differentiated): the step
merges ``W0 + (alpha/r) A @ B`` for the targeted kernels, runs the model on the merged weights
and pulls the gradient back to the adapters (``train.step``). The adapters are small and
replicated on every device.

A LoRA run without ``train.init_from`` adapts the seeded random init of its model (what an
experiment's one-step test runs; not useful otherwise, and said so at the start).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxformer.config import Config
from jaxformer.errors import UserError
from jaxformer.models import lora
from jaxformer.models.build import abstract_model, init_params
from jaxformer.parallel.sharding import Rules, param_shardings, replicated, with_shardings
from jaxformer.runs import rundir
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.runs.lora import base_record, write_base_record
from jaxformer.runs.restore import read_run_config
from jaxformer.train.flops import flops_per_token, matmul_params
from jaxformer.train.init_from import is_hf_dir, load_params
from jaxformer.train.state import TrainState


@dataclasses.dataclass
class Lora:
    """The adapters' shapes and shardings, and (after ``load_base``) the frozen base."""

    cfg: Config
    tx: optax.GradientTransformation
    factor: float  # alpha / r
    params_shape: Any  # the model's parameters as ShapeDtypeStructs (training layout)
    params_sharding: Any  # NamedShardings of the model's parameters (the base, merged ones)
    adapters_shape: Any
    state_sharding: TrainState  # of the adapter train state: replicated
    base: Any = None
    record: dict[str, Any] | None = None  # what lora_base.json says

    # --- the step's view ---------------------------------------------------------------------

    def merge(self, adapters: Any, base: Any) -> Any:
        """The model's weights: ``base`` with the adapters folded in (traced in the step)."""
        return lora.merge(base, adapters, self.factor)

    def merged(self, adapters: Any) -> Any:
        """The merged weights of the loaded base and ``adapters``, in the model's shardings
        (what evaluation and sampling read)."""
        fn = jax.jit(self.merge, out_shardings=self.params_sharding)
        return fn(adapters, self.base)

    @property
    def branches(self) -> bool:
        """Whether the step runs the adapters as branches (``lora.dropout > 0``) instead of
        merging them into the weights."""
        return self.cfg.lora.dropout > 0.0

    def attach(self, model: nnx.Module, adapters: Any, key: jax.Array) -> None:
        """Attaches ``adapters`` to ``model`` (the base's) as branches, dropping their inputs
        at ``lora.dropout`` with keys folded from ``key`` (traced in the step)."""
        lora.attach_branches(model, adapters, self.factor, self.cfg.lora.dropout, key)

    def abstract_base(self) -> Any:
        """The model's weights as ShapeDtypeStructs with their shardings (the base, or merged
        weights, for lowering a step without loading them: ``jaxformer compile``)."""
        return with_shardings(self.params_shape, self.params_sharding)

    def bind(self, step: Callable[..., Any]) -> _WithBase:
        """``step`` (or its AOT-compiled form) given the loaded base as ``lora_base``."""
        return _WithBase(step, self)

    # --- state -------------------------------------------------------------------------------

    def _init(self) -> TrainState:
        adapters = lora.init_adapters(self.params_shape, self.cfg.lora, self.cfg.train.seed)
        return TrainState(step=jnp.zeros((), jnp.int32), params=adapters,
                          opt_state=self.tx.init(adapters))

    def init_state(self) -> TrainState:
        """Fresh adapters (B = 0: the merged model is the base) and their optimizer state."""
        return jax.jit(self._init, out_shardings=self.state_sharding)()

    def abstract_state(self) -> TrainState:
        """The adapter train state's ShapeDtypeStructs with shardings (the restore target)."""
        return with_shardings(jax.eval_shape(self._init), self.state_sharding)

    # --- the base ----------------------------------------------------------------------------

    def load_base(self, run_dir: Path, echo: Callable[[str], None] = print) -> None:
        """Loads the frozen base into ``self.base``: ``train.init_from`` at the step that
        ``run_dir/lora_base.json`` recorded (a resumed run: the same weights as before), or
        its newest checkpoint (a new run); without ``init_from``, the seeded random init.
        Prints where it came from and the sizes (``describe``)."""
        cfg = self.cfg
        source = cfg.train.init_from
        recorded = base_record(run_dir)
        step = None if recorded is None else recorded.get("step")
        if not source:
            params = init_params(cfg.model, cfg.train.seed)
            echo(f"warning: lora.rank={cfg.lora.rank} without train.init_from adapts the "
                 f"random init of the model (seed {cfg.train.seed}); set train.init_from to the "
                 "run dir of a trained model")
        else:
            where = Path(source)
            if where.is_dir() and is_hf_dir(where):
                raise UserError(f"train.init_from: LoRA needs a jaxformer run dir as its base "
                                f"(its run dir names it); convert {where} first: jaxformer "
                                f"convert --from-hf {where} --out DIR")
            if step is None:
                step = _latest_step(where)
            params, note = load_params(
                where, cfg.model, cfg.train.seed, step=step,
                no_new_because="LoRA trains only adapters, so new parameters would stay at "
                               "their random init")
            echo(f"lora: base {where} (step {step}): {note}")
        self.base = jax.device_put(params, self.params_sharding)
        self.record = {"init_from": str(Path(source).absolute()) if source else "",
                       "step": step}
        echo(self.describe())

    def write_record(self, run_dir: Path) -> None:
        write_base_record(run_dir, self.record["init_from"], self.record["step"])

    def flops_per_token(self) -> tuple[float, str]:
        """Training FLOPs per token of a LoRA step and its formula. Of full training's
        ``6N + 6LTNH`` (``train.flops``; N the matmul weights) the frozen weights keep the
        forward (2N) and the backward to the activations (2N) but need no weight gradients:
        merged, only the targeted kernels' weight gradients are computed (2 N_t; their pullback
        to A and B is per step, not per token), so ``4N + 2N_t + 6LTNH``; as branches the base
        gets none and the adapters' matmuls cost 6 per entry (N_a), so ``4N + 6N_a + 6LTNH``."""
        cfg = self.cfg
        full = flops_per_token(cfg.model, cfg.data.seq_len)
        n = matmul_params(cfg.model)
        if self.branches:
            return full - 2.0 * n + 6.0 * lora.count(self.adapters_shape), "4N + 6N_a + 6LTNH"
        chosen = set(lora.select_targets(self.params_shape, cfg.lora.targets))
        targeted = sum(math.prod(shape) for name, (shape, _) in
                       lora.adaptable_kernels(self.params_shape).items() if name in chosen)
        return full - 2.0 * (n - targeted), "4N + 2N_t + 6LTNH"

    def describe(self) -> str:
        """Trainable parameters and the bytes of parameters and optimizer state, with LoRA and
        as full fine-tuning of the same model would hold them (whole model, all devices)."""
        n_adapters, n_base = lora.count(self.adapters_shape), lora.count(self.params_shape)
        base_bytes = _bytes(self.params_shape)
        lora_opt = _bytes(jax.eval_shape(self.tx.init, self.adapters_shape))
        full_opt = _bytes(jax.eval_shape(self.tx.init, self.params_shape))
        kernels = len(lora.select_targets(self.params_shape, self.cfg.lora.targets))
        mib = 2.0 ** 20
        return (f"lora: rank {self.cfg.lora.rank} on {kernels} kernels "
                f"({', '.join(self.cfg.lora.targets)}): {n_adapters:,} trainable parameters, "
                f"{100 * n_adapters / n_base:.2f}% of the base's {n_base:,}; "
                f"params + optimizer state {(base_bytes + _bytes(self.adapters_shape)) / mib:.2f}"
                f" + {lora_opt / mib:.2f} MiB (full fine-tuning: {base_bytes / mib:.2f} + "
                f"{full_opt / mib:.2f} MiB)")


def lora_for(cfg: Config, tx: optax.GradientTransformation, mesh: Mesh,
             rules: Rules) -> Lora | None:
    """The LoRA set-up of ``cfg`` (None when ``lora.rank`` is 0)."""
    if cfg.lora.rank <= 0:
        return None
    _, abstract = abstract_model(cfg.model)
    params_shape = nnx.to_pure_dict(abstract)
    adapters_shape = lora.adapter_shapes(params_shape, cfg.lora)
    rep = replicated(mesh)
    adapters_sharding = jax.tree.map(lambda _: rep, adapters_shape)
    opt_sharding = jax.tree.map(lambda _: rep, jax.eval_shape(tx.init, adapters_shape))
    return Lora(cfg=cfg, tx=tx, factor=lora.scale(cfg.lora), params_shape=params_shape,
                params_sharding=param_shardings(abstract, mesh, rules),
                adapters_shape=adapters_shape,
                state_sharding=TrainState(step=rep, params=adapters_sharding,
                                          opt_state=opt_sharding))


class _WithBase:
    """A train step (jitted, lowered or compiled) called as ``step(state, batch[,
    teacher_params])``: it passes the loaded base as the fourth argument (jit takes no keyword
    arguments with explicit shardings), and None for a missing teacher."""

    def __init__(self, fn: Any, owner: Lora):
        self.fn, self.owner = fn, owner

    def _args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        state, batch, *teacher = args
        if self.owner.base is None:  # bench and compile load no weights: the seeded init
            cfg = self.owner.cfg
            self.owner.base = jax.device_put(init_params(cfg.model, cfg.train.seed),
                                             self.owner.params_sharding)
        return (state, batch, teacher[0] if teacher else None, self.owner.base)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*self._args(args))

    def lower(self, *args: Any) -> _WithBase:
        """Lowers for the arguments' shapes: an unloaded base goes in as its abstract shapes
        (``jaxformer compile`` has no devices to hold weights on)."""
        state, batch, *teacher = args
        base = self.owner.abstract_base() if self.owner.base is None else self.owner.base
        return _WithBase(self.fn.lower(state, batch, teacher[0] if teacher else None, base),
                         self.owner)

    def compile(self) -> _WithBase:
        return _WithBase(self.fn.compile(), self.owner)

    def __getattr__(self, name: str) -> Any:  # memory_analysis(), as_text(), ...
        return getattr(self.fn, name)


def _latest_step(source: Path) -> int:
    directory = source / rundir.CHECKPOINT_DIR
    if not Checkpointer.exists(directory):
        raise UserError(f"train.init_from: {source} has no checkpoint yet")
    ckpt = Checkpointer(directory, read_run_config(source).checkpoint.keep, create=False)
    try:
        return int(ckpt.latest_step())
    finally:
        ckpt.close()


def _bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
