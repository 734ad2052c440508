"""Everything a config needs to run on a mesh: the mesh, the sharding rules, the jitted steps,
state creation and placing host batches on devices (one process or many).

``train``, ``bench`` and the tests build one ``Runtime`` and share its choices, so the layout
the trainer uses is the one that is benchmarked and tested.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxformer.config import Config
from jaxformer.errors import UserError
from jaxformer.models.build import abstract_model
from jaxformer.nn.attention_families import FeatureRedraw
from jaxformer.nn.attention_kernels import resolve_implementation
from jaxformer.objectives import get_objective
from jaxformer.parallel.mesh import check_batch_layout, make_mesh
from jaxformer.parallel.sharding import Rules, batch_sharding, replicated, rules_for
from jaxformer.parallel.target import target_platform
from jaxformer.train.flops import count_params, flops_per_token
from jaxformer.train.lora import Lora, lora_for
from jaxformer.train.optimizer import frozen_params, learning_rate_schedule, make_optimizer
from jaxformer.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    state_shardings,
)
from jaxformer.train.step import make_eval_step, make_train_step, uses_dropout
from jaxformer.train.teacher import Teacher, teacher_for

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Runtime:
    cfg: Config
    mesh: Mesh
    rules: Rules
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_sharding: TrainState  # a TrainState-shaped tree of NamedShardings
    batch_sharding: NamedSharding
    train_step: Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]
    eval_step: Callable[[Any, dict[str, jax.Array]], dict]
    # train.teacher: then train_step takes the teacher's weights as a third argument
    teacher: Teacher | None = None
    # lora.rank > 0: the state holds adapters, and train_step reads the base lora.load_base
    # loads (jaxformer.train.lora)
    lora: Lora | None = None

    # --- state ---------------------------------------------------------------------------

    def init_state(self) -> TrainState:
        """Fresh parameters and optimizer state, created directly in their shardings."""
        if self.lora is not None:
            return self.lora.init_state()
        return create_train_state(self.cfg.model, self.tx, self.cfg.train.seed, self.mesh,
                                  self.rules)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with this mesh's shardings: the checkpoint restore target."""
        if self.lora is not None:
            return self.lora.abstract_state()
        return abstract_train_state(self.cfg.model, self.tx, self.mesh, self.rules)

    def model_params(self, params: Any) -> Any:
        """The model's weights of a state's ``params``: themselves, or with LoRA the base
        with the adapters ``params`` merged in (what evaluation and sampling run)."""
        return params if self.lora is None else self.lora.merged(params)

    def flops_per_token(self) -> tuple[float, str]:
        """Training FLOPs per token and the formula they follow (``train.flops``): ``6N +
        6LTNH``, or a LoRA run's (``Lora.flops_per_token``: no weight gradients of the frozen
        weights)."""
        if self.lora is not None:
            return self.lora.flops_per_token()
        return flops_per_token(self.cfg.model, self.cfg.data.seq_len), "6N + 6LTNH"

    def n_params(self, state: TrainState) -> int:
        """The model's parameters (with LoRA the base's, not the adapters the state holds)."""
        return count_params(state.params if self.lora is None else self.lora.params_shape)

    # --- data ----------------------------------------------------------------------------

    def batch_share(self) -> tuple[int, int]:
        """(share, n_shares): this process needs share ``share`` of ``n_shares`` equal,
        consecutive blocks of each global batch's rows ((0, 1) on one process)."""
        b, t = self.cfg.train.batch_size, self.cfg.data.seq_len
        rows = {(idx[0].start or 0, b if idx[0].stop is None else idx[0].stop)
                for idx in self.batch_sharding.addressable_devices_indices_map((b, t)).values()}
        start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
        n_shares = b // (stop - start)
        if (stop - start) * n_shares != b or start % (stop - start):
            raise UserError(f"this process's devices hold batch rows {start}..{stop} of {b}, "
                            "not one of equal consecutive blocks; reorder the mesh axes")
        return start // (stop - start), n_shares

    def put_batch(self, host: Batch, local: bool = False) -> dict[str, jax.Array]:
        """Global arrays from a host batch: the whole batch (every process holds it), or with
        ``local`` only this process's share of rows (see ``batch_share``)."""
        if jax.process_count() == 1:
            return jax.device_put(host, self.batch_sharding)
        if local:
            return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                    for k, v in host.items()}
        return {k: jax.make_array_from_callback(v.shape, self.batch_sharding,
                                                lambda idx, v=v: v[idx])
                for k, v in host.items()}

    # --- memory ----------------------------------------------------------------------------

    def memory_report(self, state: TrainState, compiled: Any) -> dict[str, float]:
        """Bytes per device: parameters, optimizer state (from their shardings), and the
        compiled step's arguments, outputs and temporaries (XLA's memory analysis of
        ``compiled``, e.g. ``train_step.lower(state, batch).compile()``); plus the share of
        parameter bytes that every device holds in full (replicated)."""
        report = {"devices": float(self.mesh.size),
                  "params_bytes": per_device_bytes(state.params),
                  "opt_state_bytes": per_device_bytes(state.opt_state),
                  "replicated_param_fraction": replicated_fraction(state.params)}
        stats = compiled.memory_analysis()
        if stats is not None:
            report.update(argument_bytes=float(stats.argument_size_in_bytes),
                          output_bytes=float(stats.output_size_in_bytes),
                          temp_bytes=float(stats.temp_size_in_bytes))
        return report


def build_runtime(cfg: Config, devices: list[jax.Device] | None = None) -> Runtime:
    """The mesh, rules, shardings and jitted train/eval steps of ``cfg``."""
    mesh = make_mesh(cfg.mesh, devices)
    rules = rules_for(cfg.mesh)
    b_sharding = batch_sharding(mesh, rules)
    spec = b_sharding.spec
    row_axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
    check_batch_layout(cfg, math.prod(mesh.shape[a] for a in row_axes))
    if len(spec) > 1 and spec[1] is not None and cfg.model.audio_mels > 0:
        # Audio batches' dimension 1 is samples (and frames), not the encoder's length.
        raise UserError(f"the mesh splits the sequence axis ({spec[1]}), which audio batches "
                        f"do not have (model.audio_mels={cfg.model.audio_mels}); use a mesh "
                        "preset without sequence parallelism (data, fsdp, fsdp_tensor)")
    if len(spec) > 1 and spec[1] is not None and cfg.model.patch_size > 0:
        # The batch sharding splits dimension 1 of every batch array: the length of token
        # rows, but the pixel rows of an image batch [B, H, W, C].
        raise UserError(f"the mesh splits the sequence axis ({spec[1]}), which image batches "
                        f"do not have (model.patch_size={cfg.model.patch_size}); use a mesh "
                        "preset without sequence parallelism (data, fsdp, fsdp_tensor)")
    if len(spec) > 1 and spec[1] is not None and cfg.data.seq_len % mesh.shape["sequence"]:
        raise UserError(f"data.seq_len={cfg.data.seq_len} is not divisible by the "
                        f"{mesh.shape['sequence']} devices of the sequence axis")
    try:  # a kernel this backend lacks (cudnn on CPU) would fail only when the step compiles
        resolve_implementation(cfg.model.attention, target_platform())
    except ValueError as e:
        raise UserError(f"model.attention: {e}") from None
    if cfg.model.n_experts and cfg.model.n_experts % mesh.shape["expert"]:
        raise UserError(f"model.n_experts={cfg.model.n_experts} is not divisible by the "
                        f"{mesh.shape['expert']} devices of the expert axis")
    tx = make_optimizer(cfg.train, cfg.model.d_model, frozen_params(cfg.model))
    schedule = learning_rate_schedule(cfg.train, cfg.model.d_model)
    graphdef, _ = abstract_model(cfg.model)
    shardings = state_shardings(cfg.model, tx, mesh, rules)
    rep = replicated(mesh)
    forward = get_objective(cfg.objective.kind).logits
    teacher = teacher_for(cfg, mesh, rules)
    lora = lora_for(cfg, tx, mesh, rules)
    step_shardings = shardings if lora is None else lora.state_sharding
    train_step = make_train_step(
        graphdef, tx, schedule, cfg.train.grad_accum, step_shardings, b_sharding, rep,
        forward=forward, dropout=uses_dropout(cfg.model) or cfg.lora.dropout > 0,
        seed=cfg.train.seed,
        label_smoothing=cfg.objective.label_smoothing, z_loss=cfg.objective.z_loss,
        mesh=mesh, rules=rules, moe=moe_coefficients(cfg),
        mtp_weight=cfg.objective.mtp_weight, redraw=feature_redraw(cfg), teacher=teacher,
        lora=lora)
    if lora is not None:
        train_step = lora.bind(train_step)
    eval_step = make_eval_step(graphdef, shardings.params, b_sharding, rep, forward=forward,
                               mesh=mesh, rules=rules)
    return Runtime(cfg=cfg, mesh=mesh, rules=rules, graphdef=graphdef, tx=tx,
                   schedule=schedule, state_sharding=step_shardings, batch_sharding=b_sharding,
                   train_step=train_step, eval_step=eval_step, teacher=teacher, lora=lora)


def feature_redraw(cfg: Config) -> FeatureRedraw | None:
    """The periodic redraw of Performer/RFA random features (``model.feature_redraw``), keyed
    by the train seed; None when it is off."""
    m = cfg.model
    if m.feature_redraw <= 0:
        return None
    return FeatureRedraw(m.attention_type, m.feature_redraw, seed=cfg.train.seed)


def moe_coefficients(cfg: Config) -> tuple[float, float] | None:
    """(load-balancing, router z-loss) coefficients of an MoE model; None for a dense one."""
    m = cfg.model
    return (m.router_aux_loss, m.router_z_loss) if m.n_experts else None


def per_device_bytes(tree: Any) -> float:
    """Bytes that one device holds of the arrays in ``tree`` (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * x.dtype.itemsize
    return float(total)


def replicated_fraction(params: Any) -> float:
    """Share of parameter bytes held in full by every device of a mesh with > 1 device."""
    leaves = jax.tree.leaves(params)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    if not leaves or leaves[0].sharding.num_devices == 1:
        return 1.0
    full = sum(x.size * x.dtype.itemsize for x in leaves if x.sharding.is_fully_replicated)
    return full / max(total, 1)


def format_memory(report: dict[str, float]) -> str:
    mib = 2.0 ** 20
    parts = [f"params {report['params_bytes'] / mib:.1f} MiB",
             f"optimizer {report['opt_state_bytes'] / mib:.1f} MiB"]
    if "temp_bytes" in report:
        parts.append(f"step temporaries {report['temp_bytes'] / mib:.1f} MiB")
    if report.get("devices", 1) > 1:
        parts.append(f"replicated params {100 * report['replicated_param_fraction']:.1f}%")
    return "memory per device: " + ", ".join(parts)
