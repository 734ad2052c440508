"""``jaxformer compile``: the experiment's real train step (and eval step) compiled ahead of
time for a TPU topology on any machine, against abstract sharded state and batch (nothing is
allocated), and a report of memory, FLOPs, collectives and an estimated step time and MFU.

The estimate is a roofline model, stated here and in docs/scaling.md:

* compute: the step's FLOPs per chip at the chip's dense bf16 peak. FLOPs = the matmuls (dots)
  of the unpartitioned program with loops at their trip counts (``aot.hlo.dot_flops``), divided
  by the chips, plus the causal attention term of ``train.flops`` when attention runs in a
  Pallas kernel (whose FLOPs the HLO does not show);
* memory: the compiled program's HBM traffic per chip (``aot.hlo.hbm_bytes``) at the chip's HBM
  bandwidth;
* collectives: the wire bytes per chip of every collective (``aot.hlo.collective_bytes``) at
  the chip's ICI bandwidth (``aot.chips``).

The estimated step time takes collectives as overlapped with compute (XLA issues them
asynchronously on TPU): ``max(compute, memory, collectives)``; the serial bound
``max(compute, memory) + collectives`` is reported beside it. MFU = model FLOPs per step (the
6·N + 6·L·T·N·H formula of ``train.flops``, per token) / (chips · peak · step time). Whichever
term is largest is named as what limits the step. XLA's own cost analysis is printed beside
ours; it counts a loop body once, and its ``optimal_seconds`` is shown only when it is
positive and the program has no loop that runs more than once.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxformer.aot.chips import GIB, Chip, chip_for, topology_devices
from jaxformer.aot.hlo import collective_bytes, dot_flops, hbm_bytes, parse_module
from jaxformer.config import Config, apply_overrides, validate
from jaxformer.data import images
from jaxformer.errors import UserError
from jaxformer.nn.attention_kernels import resolve_implementation
from jaxformer.parallel.target import compiling_for
from jaxformer.train.runtime import Runtime, build_runtime, per_device_bytes

DOES_NOT_FIT = 4  # exit status of `jaxformer compile` when the step does not fit the chip
SWEEP_PRESETS = ("fsdp", "fsdp_tensor", "data")
SWEEP_REMAT = ("none", "save_dots_no_batch", "save_dots", "full")
_BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")


def abstract_batch(rt: Runtime) -> dict[str, jax.ShapeDtypeStruct]:
    """The train batch as sharded ShapeDtypeStructs: [B, T] int32 (float32 loss weights), or
    an image encoder's pixels and labels (``data.images.batch_shapes``); an image-prefix
    decoder's text rows + pixels [B, S, S, C] float32."""
    cfg = rt.cfg
    if cfg.model.patch_size > 0 and cfg.model.arch != "image_prefix":
        shapes = images.batch_shapes(cfg.train.batch_size, cfg.model.image_size,
                                     cfg.model.image_channels)
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=rt.batch_sharding)
                for k, (shape, dtype) in shapes.items()}
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_weights" else jnp.int32,
                                     sharding=rt.batch_sharding) for k in _BATCH_KEYS}
    if cfg.model.arch == "xlnet":  # + the factorisation order of permutation_lm's rows
        batch["order"] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rt.batch_sharding)
    if cfg.model.arch == "image_prefix":  # + the images whose patches are the prefix
        m = cfg.model
        batch["pixels"] = jax.ShapeDtypeStruct(
            (cfg.train.batch_size, m.image_size, m.image_size, m.image_channels), jnp.float32,
            sharding=rt.batch_sharding)
    return batch


def compile_report(cfg: Config, topology: str, slices: int = 1, *, eval_step: bool = True,
                   echo: Callable[[str], None] = print, dump: Path | None = None
                   ) -> dict[str, Any]:
    """Compiles ``cfg``'s train step (and eval step) for ``topology`` -> the report's fields
    (see the module docstring); ``fits`` False when the program needs more than the HBM.
    ``dump``: a directory for the step's HLO text, before (train_step.hlo) and after
    (train_step.compiled.hlo) XLA's TPU passes."""
    chip = chip_for(topology)
    devices = topology_devices(topology, slices)
    n = len(devices)
    with compiling_for("tpu"):
        rt = build_runtime(cfg, devices)
        state = rt.abstract_state()
        batch = abstract_batch(rt)
        echo(f"compiling the train step for {topology} x{slices} ({n} chips, mesh "
             f"{_mesh_text(rt)}, remat {cfg.model.remat}, scan_layers "
             f"{cfg.model.scan_layers})...")
        start = time.perf_counter()
        # A teacher's weights (distillation) are the step's third argument, as shapes here.
        teacher = () if rt.teacher is None else (rt.teacher.abstract_params(),)
        lowered = rt.train_step.lower(state, batch, *teacher)
        global_hlo = lowered.as_text(dialect="hlo")
        compiled, oom = _compile(lowered)
        compile_s = time.perf_counter() - start
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / "train_step.hlo").write_text(global_hlo)
            if compiled is not None:
                (dump / "train_step.compiled.hlo").write_text(compiled.as_text())
        eval_oom = None
        if eval_step and compiled is not None:
            # LoRA: evaluation runs on the merged weights, the model's shapes, not the adapters.
            weights = state.params if rt.lora is None else rt.lora.abstract_base()
            _, eval_oom = _compile(rt.eval_step.lower(weights, batch))
    report = _base_report(cfg, topology, slices, chip, rt, state, compile_s)
    if compiled is None:
        needed, available = _oom_sizes(oom)
        report.update(fits=False, oom=oom, total_bytes=needed,
                      hbm_bytes=available or chip.hbm_bytes)
        return report
    report.update(_memory(compiled, chip))
    if eval_oom is not None:
        report.update(fits=False, oom=f"eval step: {eval_oom}")
    report.update(_costs(cfg, rt, chip, compiled, global_hlo, n))
    return report


def _compile(lowered: Any) -> tuple[Any, str | None]:
    """(compiled, None), or (None, XLA's out-of-memory message) when it does not fit."""
    try:
        return lowered.compile(), None
    except Exception as e:  # noqa: BLE001 - XLA raises XlaRuntimeError / JaxRuntimeError
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeded" in text:
            return None, " ".join(text.split())[:400]
        raise


def _oom_sizes(message: str | None) -> tuple[float | None, float | None]:
    """(bytes needed, bytes available) from XLA's out-of-memory message, e.g. "the total memory
    required for HLO temporaries (23.38G) exceeds available HBM (15.75G)" or "Used 40.52G of
    15.48G hbm"; None where the message does not say."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": GIB, "T": 2**40}
    sizes = [float(v) * units[u] for v, u in re.findall(r"\(?([\d.]+)([KMGT]?)\)?(?=\)| of| hbm)",
                                                      message or "")]
    return (sizes[0] if sizes else None, sizes[1] if len(sizes) > 1 else None)


def _mesh_text(rt: Runtime) -> str:
    return " x ".join(f"{a}={s}" for a, s in rt.mesh.shape.items() if s > 1) or "1 chip"


def _base_report(cfg: Config, topology: str, slices: int, chip: Chip, rt: Runtime,
                 state: Any, compile_s: float) -> dict[str, Any]:
    return {"experiment": cfg.name, "topology": topology, "slices": slices,
            "chips": int(rt.mesh.size), "chip": chip.name,
            "mesh": {a: int(s) for a, s in rt.mesh.shape.items()},
            "mesh_preset": cfg.mesh.preset, "remat": cfg.model.remat,
            "scan_layers": cfg.model.scan_layers, "compute_dtype": cfg.model.compute_dtype,
            "attention": resolve_implementation(cfg.model.attention, "tpu"),
            "params": rt.n_params(state), "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.seq_len, "compile_s": round(compile_s, 1),
            "params_bytes": per_device_bytes(state.params),
            "opt_state_bytes": per_device_bytes(state.opt_state)}


def _memory(compiled: Any, chip: Chip) -> dict[str, Any]:
    stats = compiled.memory_analysis()
    arg, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    code = stats.generated_code_size_in_bytes
    total = float(arg + out - alias + temp + code)
    return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias,
            "temp_bytes": temp, "code_bytes": code, "total_bytes": total,
            "hbm_bytes": chip.hbm_bytes, "fits": total <= chip.hbm_bytes,
            "headroom_bytes": chip.hbm_bytes - total}


def _costs(cfg: Config, rt: Runtime, chip: Chip, compiled: Any, global_hlo: str,
           n: int) -> dict[str, Any]:
    tokens = cfg.train.batch_size * cfg.data.seq_len
    model_flops = rt.flops_per_token()[0] * tokens / n
    hlo_flops, unknown = dot_flops(global_hlo)
    hlo_flops /= n
    kernel = resolve_implementation(cfg.model.attention, "tpu")
    if kernel == "splash" and cfg.data.seq_len % 128 == 0:
        m = cfg.model
        hlo_flops += 6.0 * (m.n_layers + m.mtp_heads) * cfg.data.seq_len * m.n_heads * (
            m.head_size) * tokens / n
    text = compiled.as_text()
    comms = collective_bytes(text, n)
    hbm = hbm_bytes(text)
    compute_s = hlo_flops / chip.peak_bf16
    memory_s = hbm / chip.hbm_bandwidth
    comm_s = sum(comms.values()) / chip.ici_bandwidth
    terms = {"compute": compute_s, "memory": memory_s, "collectives": comm_s}
    step_s = max(terms.values())
    serial_s = max(compute_s, memory_s) + comm_s
    xla = _xla_costs(compiled, text)
    return {"model_flops_per_chip": model_flops, "flops_formula": rt.flops_per_token()[1],
            "hlo_flops_per_chip": hlo_flops,
            "loops_without_trip_count": unknown, "hbm_traffic_bytes": hbm,
            "collective_bytes": comms, "compute_s": compute_s, "memory_s": memory_s,
            "collectives_s": comm_s, "step_s": step_s, "serial_step_s": serial_s,
            "limited_by": max(terms, key=terms.get),
            "mfu_percent": 100 * model_flops / (chip.peak_bf16 * step_s) if step_s else 0.0,
            "serial_mfu_percent": 100 * model_flops / (chip.peak_bf16 * serial_s)
            if serial_s else 0.0,
            "tokens_per_s_per_chip": tokens / n / step_s if step_s else 0.0,
            **xla}


def _xla_costs(compiled: Any, text: str) -> dict[str, Any]:
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, list) else (costs or {})
    loops = any(i.opcode == "while" for c in parse_module(text) for i in c.instructions)
    seconds = costs.get("optimal_seconds")
    meaningful = seconds is not None and seconds > 0 and not loops
    return {"xla_flops": float(costs.get("flops", 0.0)),
            "xla_bytes_accessed": float(costs.get("bytes accessed", 0.0)),
            "xla_optimal_seconds": float(seconds) if meaningful else None,
            "xla_counts_loops_once": loops}


# --- output ----------------------------------------------------------------------------------

def _gib(x: float | None) -> str:
    return "?" if x is None else f"{x / GIB:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report (the JSON line follows it)."""
    lines = [f"{r['experiment']} on {r['topology']} x{r['slices']} ({r['chips']} {r['chip']} "
             f"chips), mesh {_mesh_text_of(r['mesh'])}, remat {r['remat']}, attention "
             f"{r['attention']}; {r['params'] / 1e9:.3g}B parameters, batch "
             f"{r['batch_size']} x {r['seq_len']}; compiled in {r['compile_s']:.0f} s",
             f"memory per chip: params {_gib(r['params_bytes'])}, optimizer "
             f"{_gib(r['opt_state_bytes'])}"
             + (f", step temporaries {_gib(r['temp_bytes'])}" if "temp_bytes" in r else "")
             + f", total {_gib(r.get('total_bytes'))} of {_gib(r['hbm_bytes'])} HBM"]
    if not r["fits"]:
        over = (None if r.get("total_bytes") is None
                else r["total_bytes"] - r["hbm_bytes"])
        lines.append(f"DOES NOT FIT: over by {_gib(over)}"
                     + (f" ({r['oom']})" if r.get("oom") else ""))
    else:
        lines.append(f"fits, {_gib(r['headroom_bytes'])} to spare")
    if "step_s" in r:
        comm = ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in r["collective_bytes"].items()
                         if v)
        lines += [
            f"FLOPs per chip per step: {r['hlo_flops_per_chip']:.4g} in the program, "
            f"{r['model_flops_per_chip']:.4g} by the {r['flops_formula']} formula "
            f"(XLA's cost analysis: {r['xla_flops']:.4g}"
            + (", loop bodies counted once)" if r["xla_counts_loops_once"] else ")"),
            f"HBM traffic per chip: {_gib(r['hbm_traffic_bytes'])}; collectives per chip: "
            + (comm or "none"),
            f"roofline: compute {r['compute_s'] * 1e3:.1f} ms, memory "
            f"{r['memory_s'] * 1e3:.1f} ms, collectives {r['collectives_s'] * 1e3:.1f} ms -> "
            f"step {r['step_s'] * 1e3:.1f} ms overlapped ({r['serial_step_s'] * 1e3:.1f} ms "
            f"serial); limited by {r['limited_by']}",
            f"estimated MFU {r['mfu_percent']:.1f}% ({r['serial_mfu_percent']:.1f}% serial), "
            f"{r['tokens_per_s_per_chip']:,.0f} tokens/s per chip (an estimate, not a "
            "measurement)"]
        if r["xla_optimal_seconds"] is not None:
            lines.append(f"XLA's own estimate: {r['xla_optimal_seconds'] * 1e3:.1f} ms")
    return "\n".join(lines)


def _mesh_text_of(mesh: dict[str, int]) -> str:
    return " x ".join(f"{a}={s}" for a, s in mesh.items() if s > 1) or "1 chip"


def json_line(r: dict[str, Any]) -> str:
    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return float(f"{x:.4g}")
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return x

    return json.dumps(clean(r))


# --- sweep -------------------------------------------------------------------------------------

def sweep(cfg: Config, topology: str, slices: int = 1, *,
          presets: Sequence[str] = SWEEP_PRESETS, remats: Sequence[str] = SWEEP_REMAT,
          echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``compile_report`` for every mesh preset x remat policy (the eval step is skipped);
    a combination the mesh cannot take (a batch that does not split, ...) is a row with its
    error."""
    rows = []
    for preset, remat in itertools.product(presets, remats):
        variant = validate(apply_overrides(cfg, [f"mesh.preset={preset}",
                                                 f"model.remat={remat}"]))
        try:
            rows.append(compile_report(variant, topology, slices, eval_step=False, echo=echo))
        except UserError as e:
            rows.append({"mesh_preset": preset, "remat": remat, "error": str(e), "fits": False})
    return rows


def best(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The fitting row with the highest estimated MFU."""
    fitting = [r for r in rows if r.get("fits") and "mfu_percent" in r]
    return max(fitting, key=lambda r: r["mfu_percent"]) if fitting else None


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    out = ["| mesh preset | mesh | remat | per-chip GiB | fits | est. MFU | limited by |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['mesh_preset']} | - | {r['remat']} | - | no | - | {r['error']} |")
            continue
        mfu = f"{r['mfu_percent']:.1f}%" if "mfu_percent" in r else "-"
        out.append(f"| {r['mesh_preset']} | {_mesh_text_of(r['mesh'])} | {r['remat']} | "
                   f"{_gib(r.get('total_bytes')).removesuffix(' GiB')} | "
                   f"{'yes' if r['fits'] else 'no'} | {mfu} | {r.get('limited_by', '-')} |")
    top = best(rows)
    out.append("best: " + (f"mesh.preset={top['mesh_preset']} model.remat={top['remat']} "
                           f"({top['mfu_percent']:.1f}% estimated MFU)" if top
                           else "nothing fits"))
    return "\n".join(out)
