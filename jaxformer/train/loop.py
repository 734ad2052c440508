"""The training loop: data -> jitted step over a mesh -> metrics, evals, checkpoints, samples."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tqdm

from jaxformer.config import Config
from jaxformer.data.pipeline import DataPipeline
from jaxformer.data.synthetic import EOS_ID, PAD_ID, SyntheticTranslation
from jaxformer.data.tokenizer import save_tokenizer
from jaxformer.errors import UserError
from jaxformer.inference.sampling import Generator, SamplingParams
from jaxformer.inference.seq2seq import GreedyDecoder
from jaxformer.objectives.tasks import Task, build_task
from jaxformer.train import rundir
from jaxformer.train.checkpoint import Checkpointer
from jaxformer.train.flops import count_params, device_peak_flops, flops_per_token, mfu
from jaxformer.train.init_from import load_params, state_from_params
from jaxformer.train.reporting import Reporter, format_metrics
from jaxformer.train.runtime import build_runtime, format_memory
from jaxformer.train.state import looped

# Set to a step number, the process exits hard (no clean-up) right after that step, once any
# checkpoint save in flight is durable: a reproducible stand-in for a killed job.
CRASH_ENV = "JAXFORMER_CRASH_AFTER_STEP"
CRASH_EXIT_CODE = 75


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    final_step: int
    losses: dict[int, float]  # step (1-based, after the update) -> train loss of that step
    evals: dict[int, float]  # step -> validation loss
    unigram_baseline: float  # the task's baseline (a majority-class accuracy for classifiers)
    samples: list[str]
    eval_metrics: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)


def build_data(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> Task:
    tokenizer_path = Path(run_dir) / rundir.TOKENIZER_FILE
    init_tokenizer = Path(cfg.train.init_from) / rundir.TOKENIZER_FILE
    if not tokenizer_path.exists() and cfg.train.init_from and init_tokenizer.is_file():
        tokenizer_path = init_tokenizer  # fine-tuning keeps the tokenizer the weights know
    return build_task(cfg, tokenizer_path, log)


def train(cfg: Config, run_dir: Path | str | None = None, *, allow_config_change: bool = False,
          stop_at: int | None = None, echo: Callable[[str], None] = print,
          progress: bool = True, devices: list[jax.Device] | None = None) -> TrainResult:
    """Trains (or resumes) the run in ``run_dir``. ``stop_at`` ends this invocation early at
    that step, as an interruption would, saving a checkpoint first."""
    run_dir = Path(run_dir) if run_dir is not None else rundir.default_run_dir(cfg)
    saved = rundir.read_config(run_dir)
    if saved is not None:
        rundir.check_compatible(saved, cfg, run_dir, allow_config_change)
    rt = build_runtime(cfg, devices)
    mesh = rt.mesh
    lead = jax.process_index() == 0  # only the first process logs, prints and writes files
    if not lead:
        echo, progress = (lambda _: None), False

    # Everything that can fail on user input happens before the run dir is touched.
    task = build_data(cfg, run_dir, echo)
    if task.tokenizer is not None and task.tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {task.tokenizer.get_vocab_size()} tokens but "
                        f"model.vocab_size is {cfg.model.vocab_size}")
    has_checkpoint = Checkpointer.exists(run_dir / rundir.CHECKPOINT_DIR)
    init_params, init_note = (load_params(cfg.train.init_from, cfg.model, cfg.train.seed)
                              if cfg.train.init_from and not has_checkpoint else (None, ""))

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir / rundir.CHECKPOINT_DIR, cfg.checkpoint.keep)
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(rt.abstract_state())
        echo(f"resumed {run_dir} from step {int(state.step)}")
    elif init_params is not None:
        state = state_from_params(init_params, cfg.model, rt.tx, mesh, rt.rules)
        echo(f"initialized from {cfg.train.init_from}: {init_note}")
    else:
        state = rt.init_state()
    if lead:
        rundir.write_config(run_dir, cfg)
        if task.tokenizer is not None and not (run_dir / rundir.TOKENIZER_FILE).exists():
            save_tokenizer(task.tokenizer, run_dir / rundir.TOKENIZER_FILE)

    n_params = count_params(state.params)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = device_peak_flops(mesh.devices.flat[0], cfg.model.compute_dtype)
    baseline = task.baseline
    unit = "accuracy" if task.baseline_name == "majority class" else "nats/token"
    baseline_note = ("" if math.isnan(baseline) else
                     f" ({task.baseline_name} baseline {baseline:.3f})")
    mesh_note = ", ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "1 device"
    echo(f"model: {n_params:,} parameters, {fpt / 1e6:.1f} MFLOPs/token (6N + 6LTNH); "
         f"mesh {mesh_note} ({cfg.mesh.preset}) over {jax.process_count()} process(es) on "
         f"{jax.devices()[0].platform}; objective "
         f"{cfg.objective.kind}{baseline_note.replace(')', f' {unit})')}")

    share, n_shares = rt.batch_share()

    def train_batch(step: int) -> dict[str, jax.Array]:
        host = task.train_batch(step, cfg.train.batch_size, cfg.train.seed, share, n_shares)
        return rt.put_batch(host, local=n_shares > 1)

    # Compile once ahead of time: the same executable reports its memory and then trains.
    train_step = rt.train_step.lower(state, train_batch(int(state.step))).compile()
    echo(format_memory(rt.memory_report(state, train_step)))
    eval_step = rt.eval_step
    reporter = Reporter(run_dir, echo, enabled=lead)
    meta = {"config": rundir.config_lib.to_dict(cfg), "n_devices": mesh.size}

    def evaluate(params: Any) -> dict[str, float]:
        sums = np.zeros(3)
        for batch in task.val_batches(cfg.train.batch_size, cfg.eval.batches or None):
            out = eval_step(params, rt.put_batch(batch))
            sums += [float(out["nll_sum"]), float(out["weight_sum"]), float(out["correct_sum"])]
        loss = sums[0] / max(sums[1], 1.0)
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                  "accuracy": sums[2] / max(sums[1], 1.0)}
        if task.translation is not None:
            _, view, view_params = looped(cfg.model, host_params(params))
            result["exact_match"] = translation_exact_match(task.translation, view, view_params,
                                                            cfg.eval.batches or 16,
                                                            cfg.train.batch_size)
        return result

    start = int(jax.device_get(state.step))
    end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    losses: dict[int, float] = {}
    evals: dict[int, float] = {}
    eval_metrics: dict[int, dict[str, float]] = {}
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    bar = tqdm.tqdm(total=cfg.train.steps, initial=start, disable=not progress, unit="step",
                    dynamic_ncols=True, leave=True)
    say = bar.write if progress else echo  # tqdm.write keeps the bar below the lines
    last_time, last_step = time.perf_counter(), start
    step = start
    crash_after = int(os.environ.get(CRASH_ENV, "0"))
    try:
        for step in range(start + 1, end + 1):
            state, metrics = train_step(state, train_batch(step - 1))
            pending.append((step, metrics))
            bar.update(1)
            if step % cfg.log.every == 0 or step == end:
                fetched = jax.device_get(pending)
                pending.clear()
                now = time.perf_counter()
                elapsed = (now - last_time) / (step - last_step)
                last_time, last_step = now, step
                for s, m in fetched:
                    losses[s] = float(m["loss"])
                m = fetched[-1][1]
                tps = tokens_per_step / elapsed
                values = {"loss": float(np.mean([f[1]["loss"] for f in fetched])),
                          "accuracy": float(m["accuracy"]), "lr": float(m["lr"]),
                          "grad_norm": float(m["grad_norm"]), "param_norm": float(m["param_norm"]),
                          "tokens_per_sec": tps, "step_time_s": elapsed,
                          "mfu": mfu(fpt, tps, mesh.size, peak)}
                if cfg.objective.label_smoothing or cfg.objective.z_loss:
                    values["nll"] = float(np.mean([f[1]["nll"] for f in fetched]))
                    values["z_loss"] = float(np.mean([f[1]["z_loss"] for f in fetched]))
                if cfg.model.n_experts:
                    load = np.mean([f[1]["moe_expert_load"] for f in fetched], axis=0)
                    values.update(moe_values(fetched, load))
                    reporter.expert_load(step, load)
                reporter.scalars(step, values, "train")
                bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{tps:,.0f}")
                say(f"step {step:>6} | {format_metrics(values)}")
            if step % cfg.eval.every == 0 or step == cfg.train.steps:
                ev = evaluate(state.params)
                evals[step] = ev["loss"]
                eval_metrics[step] = ev
                reporter.scalars(step, ev, "eval")
                extra = (f" | exact match {ev['exact_match']:.3f}" if "exact_match" in ev
                         else "")
                say(f"step {step:>6} | eval loss {ev['loss']:.4f} | perplexity "
                    f"{ev['perplexity']:.2f} | accuracy {ev['accuracy']:.3f}{extra}"
                    f"{baseline_note}")
            if step % cfg.checkpoint.every == 0 or step == end:
                ckpt.save(state, meta)
            if step == crash_after:  # fault injection for tests of resuming (see docs)
                ckpt.wait()
                reporter.flush()  # what a crash loses is what was never flushed
                os._exit(CRASH_EXIT_CODE)
    except KeyboardInterrupt:
        bar.close()
        ckpt.save(state, meta)
        ckpt.close()
        reporter.close()
        raise UserError(f"interrupted at step {int(state.step)}; checkpoint saved in {run_dir}; "
                        "run the same command again to resume") from None
    bar.close()
    ckpt.close()

    samples: list[str] = []
    if step == cfg.train.steps and cfg.sample.prompts and cfg.objective.kind == "causal":
        _, view, view_params = looped(cfg.model, host_params(state.params))
        samples = generate_samples(cfg, view, view_params, task.pipeline) if lead else []
    if samples:
        text = "\n\n".join(f"--- prompt {p!r}\n{p}{s}" for p, s in
                           zip(cfg.sample.prompts, samples, strict=True))
        (run_dir / "samples.txt").write_text(text + "\n")
        reporter.text(step, "samples", text)
        echo(f"samples (temperature {cfg.sample.temperature}, top-k {cfg.sample.top_k}, "
             f"top-p {cfg.sample.top_p}):\n{text}")
    reporter.final_hparams(cfg, eval_metrics, losses)
    reporter.close()
    return TrainResult(run_dir=run_dir, start_step=start, final_step=step, losses=losses,
                       evals=evals, unigram_baseline=baseline, samples=samples,
                       eval_metrics=eval_metrics)


def moe_values(fetched: list[tuple[int, dict[str, Any]]], load: np.ndarray
               ) -> dict[str, float]:
    """Router statistics of the log interval: the auxiliary losses, the share of expert
    choices dropped by capacity, and the busiest expert's load relative to a balanced one."""
    def mean(key: str) -> float:
        return float(np.mean([f[1][key] for f in fetched]))

    return {"moe_balance_loss": mean("moe_load_balance_loss"),
            "moe_z_loss": mean("moe_router_z_loss"),
            "moe_dropped": mean("moe_dropped_fraction"),
            "moe_max_load": float(load.max() * len(load))}


def host_params(params: Any) -> Any:
    """The full parameters as host arrays on every process (a collective with several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def translation_exact_match(task: SyntheticTranslation, graphdef: Any, params: Any,
                            n_batches: int, batch_size: int) -> float:
    """Share of held-out sources whose greedy translation equals the reference exactly."""
    decoder = GreedyDecoder(graphdef)
    hits = total = 0
    for batch in task.val_batches(batch_size, n_batches):
        out = decoder(params, batch["enc_inputs"], batch["enc_segment_ids"],
                      batch["enc_positions"], task.seq_len, PAD_ID, EOS_ID)
        want = np.where(batch["loss_weights"] > 0, batch["targets"], EOS_ID)
        hits += int((out == want).all(axis=1).sum())
        total += len(out)
    return hits / max(total, 1)


def generate_samples(cfg: Config, graphdef: Any, params: Any, data: DataPipeline) -> list[str]:
    generator = Generator(graphdef, params, cfg.model.max_len)
    sampling = SamplingParams(cfg.sample.temperature, cfg.sample.top_k, cfg.sample.top_p)
    out = []
    for i, prompt in enumerate(cfg.sample.prompts):
        ids = [int(t) for t in data.encode(prompt)]
        new = generator.generate(ids, cfg.sample.max_new_tokens, sampling, seed=i,
                                 stop_token=data.eos_id)
        out.append(data.decode([t for t in new if t != data.eos_id]))
    return out
