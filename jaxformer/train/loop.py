"""The training loop, in three parts: ``setup`` (run dir, data, state, compiled step),
``run_steps`` (the steps, with periodic work as hooks) and ``finish`` (samples, hparams).

Periodic work is a ``Hook``: ``after_step(run, step, metrics)`` is called after every step with
the step's metrics still on the device. The built-in hooks log metrics, evaluate and save
checkpoints (``jaxformer.train.hooks``); callers add their own through ``train(hooks=...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import tqdm

from jaxformer import inference
from jaxformer.config import Config
from jaxformer.data.tokenizer import save_tokenizer
from jaxformer.errors import PreemptedError, UserError
from jaxformer.models.build import looped
from jaxformer.objectives import Objective, Task, get_objective
from jaxformer.objectives.tasks import build_task
from jaxformer.runs import rundir
from jaxformer.runs.checkpoint import Checkpointer
from jaxformer.runs.lock import RunLock
from jaxformer.runs.specials import copy_tokenizer_files
from jaxformer.train.flops import PeakFlops, peak_flops
from jaxformer.train.hooks import CheckpointSaver, Evaluator, Hook, MetricsLogger, host_params
from jaxformer.train.init_from import load_params, state_from_params
from jaxformer.train.reporting import Reporter
from jaxformer.train.runtime import Runtime, build_runtime, format_memory
from jaxformer.train.schedule_change import check_schedule_change
from jaxformer.train.signals import SignalRequests
from jaxformer.train.teacher import bind, check_tokenizer


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
    baseline_name: str = "unigram"  # what unigram_baseline is: "unigram" or "majority class"


@dataclasses.dataclass
class Run:
    """Everything set up for one invocation of ``train``; hooks read it and ``state``."""

    cfg: Config
    run_dir: Path
    rt: Runtime
    task: Task
    objective: Objective
    ckpt: Checkpointer
    reporter: Reporter
    state: Any  # the TrainState, replaced after every step
    train_step: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]
    say: Callable[[str], None]  # a line to the console (above the progress bar)
    echo: Callable[[str], None]
    lead: bool  # process 0: the one that logs, prints and writes files
    start: int
    baseline_note: str
    peak: PeakFlops  # what MFU is relative to, per device
    losses: dict[int, float] = dataclasses.field(default_factory=dict)
    evals: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    bar: Any = None
    lock: RunLock | None = None  # process 0's lock on the run dir

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        """The global batch of optimizer step ``step`` (0-based), this process's share of it
        placed on the mesh."""
        share, n_shares = self.rt.batch_share()
        host = self.task.train_batch(step, self.cfg.train.batch_size, self.cfg.train.seed,
                                     share, n_shares)
        return self.rt.put_batch(host, local=n_shares > 1)

    def save(self) -> None:
        self.ckpt.save(self.state, {"config": rundir.config_lib.to_dict(self.cfg),
                                    "n_devices": self.rt.mesh.size})


def train(cfg: Config, run_dir: Path | str | None = None, *, allow_config_change: bool = False,
          allow_data_change: bool = False, stop_at: int | None = None,
          echo: Callable[[str], None] = print, progress: bool = True,
          devices: list[jax.Device] | None = None, hooks: Sequence[Hook] = ()) -> TrainResult:
    """Trains (or resumes) the run in ``run_dir``. ``stop_at`` ends this invocation early at
    that step, as an interruption would, saving a checkpoint first. ``hooks`` run after every
    step, after the built-in ones (metrics, evaluation, checkpoints).

    Raises ``errors.PreemptedError`` after SIGTERM/SIGINT (checkpoint saved),
    ``errors.DivergedError`` after ``train.max_bad_steps`` non-finite steps in a row,
    ``CheckpointSaveError`` when a save fails; the run dir's lock is released whatever
    happens."""
    run = setup(cfg, run_dir, allow_config_change=allow_config_change,
                allow_data_change=allow_data_change, echo=echo, progress=progress,
                devices=devices)
    end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    all_hooks = [MetricsLogger(run, end), Evaluator(run), CheckpointSaver(end), *hooks]
    try:
        run_steps(run, end, all_hooks)
        return finish(run)
    except BaseException:
        run.bar.close()
        with contextlib.suppress(Exception):  # the error on its way out says what failed
            run.ckpt.close()
        raise
    finally:
        run.reporter.close()
        if run.lock is not None:
            run.lock.release()


def setup(cfg: Config, run_dir: Path | str | None = None, *, allow_config_change: bool = False,
          allow_data_change: bool = False, echo: Callable[[str], None] = print,
          progress: bool = True, devices: list[jax.Device] | None = None) -> Run:
    """Checks, data, state and the compiled step. Everything that can fail on user input
    happens before the run dir is touched."""
    run_dir = Path(run_dir) if run_dir is not None else rundir.default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} is a file, not a directory")
    saved = rundir.read_config(run_dir)
    has_checkpoint = Checkpointer.exists(run_dir / rundir.CHECKPOINT_DIR)
    if saved is not None:
        rundir.check_compatible(saved, cfg, run_dir, allow_config_change)
        if has_checkpoint:
            echo_change = check_schedule_change(saved, cfg, run_dir)
            if echo_change:
                echo(echo_change)
    rt = build_runtime(cfg, devices)
    # A bad $JAXFORMER_PEAK_FLOPS is a user error: raise it before the run dir is written (on
    # CPU the first run on a machine measures the peak and caches it).
    peak = peak_flops(rt.mesh.devices.flat[0], cfg.model.compute_dtype)
    lead = jax.process_index() == 0
    if not lead:
        echo, progress = (lambda _: None), False
    # One training process per run dir (process 0 of a job holds it). An existing dir is
    # locked at once; a new one when it is created, once the input has passed every check.
    locks = [RunLock.acquire(run_dir, echo)] if lead and run_dir.is_dir() else []
    try:
        run = _setup_locked(cfg, run_dir, rt, peak, lead, has_checkpoint, echo, progress,
                            locks, allow_data_change)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    run.lock = locks[0] if locks else None
    return run


def _setup_locked(cfg: Config, run_dir: Path, rt: Runtime, peak: PeakFlops, lead: bool,
                  has_checkpoint: bool, echo: Callable[[str], None], progress: bool,
                  locks: list[RunLock], allow_data_change: bool) -> Run:
    task = _build_data(cfg, run_dir, echo)
    if has_checkpoint and task.data_manifest is not None:
        note = rundir.check_data(run_dir, task.data_manifest, allow_data_change)
        if note:
            echo(note)
    if task.tokenizer is not None and task.tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {task.tokenizer.get_vocab_size()} tokens but "
                        f"model.vocab_size is {cfg.model.vocab_size}")
    init_params, init_note = (load_params(cfg.train.init_from, cfg.model, cfg.train.seed)
                              if cfg.train.init_from and not has_checkpoint and rt.lora is None
                              else (None, ""))
    teacher_args = ()  # distillation: the teacher's weights, the train step's third argument
    if rt.teacher is not None:
        check_tokenizer(rt.teacher, task.tokenizer)
        teacher_args = (rt.teacher.load_params(echo),)
    if rt.lora is not None:  # LoRA: the frozen base (train.init_from), outside the state
        rt.lora.load_base(run_dir, echo)

    run_dir.mkdir(parents=True, exist_ok=True)
    if lead and not locks:
        locks.append(RunLock.acquire(run_dir, echo))
    ckpt = Checkpointer(run_dir / rundir.CHECKPOINT_DIR, cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    if ckpt.latest_step() is not None:
        # The newest checkpoint that reads back whole; unreadable newer ones are moved aside.
        state, _ = ckpt.restore(rt.abstract_state(), warn=echo)
        echo(f"resumed {run_dir} from step {int(state.step)}")
    elif init_params is not None:
        state = state_from_params(init_params, cfg.model, rt.tx, rt.mesh, rt.rules)
        echo(f"initialized from {cfg.train.init_from}: {init_note}")
    else:
        state = rt.init_state()
    if lead:
        rundir.write_config(run_dir, cfg)
        if rt.lora is not None:  # lora_base.json: the base's dir and step
            rt.lora.write_record(run_dir)
        if task.data_manifest is not None:
            rundir.write_data_manifest(run_dir, task.data_manifest)
        if task.tokenizer is not None and not (run_dir / rundir.TOKENIZER_FILE).exists():
            source = _init_tokenizer(cfg, run_dir)
            if source is not None:  # its special tokens (a converted model's) come with it
                copy_tokenizer_files(source.parent, run_dir)
            save_tokenizer(task.tokenizer, run_dir / rundir.TOKENIZER_FILE)

    baseline_note = _describe_model(cfg, rt, task, state, peak, echo)
    start = int(jax.device_get(state.step))
    run = Run(cfg=cfg, run_dir=run_dir, rt=rt, task=task,
              objective=get_objective(cfg.objective.kind), ckpt=ckpt,
              reporter=Reporter(run_dir, echo, enabled=lead), state=state, train_step=rt.train_step,
              say=echo, echo=echo, lead=lead, start=start, baseline_note=baseline_note,
              peak=peak)
    # Compile once ahead of time: the same executable reports its memory and then trains.
    compiled = rt.train_step.lower(state, run.train_batch(start), *teacher_args).compile()
    echo(format_memory(rt.memory_report(state, compiled)))
    run.train_step = bind(compiled, *teacher_args)
    run.bar = tqdm.tqdm(total=cfg.train.steps, initial=start, disable=not progress, unit="step",
                        dynamic_ncols=True, leave=True)
    run.say = run.bar.write if progress else echo  # tqdm.write keeps the bar below the lines
    return run


def run_steps(run: Run, end: int, hooks: Sequence[Hook]) -> None:
    """Steps ``run.start + 1 .. end``; after each, every hook in order, then the requests of
    signals (``jaxformer.train.signals``): SIGUSR1 saves, SIGTERM/SIGINT save and stop."""
    with SignalRequests(run.cfg.checkpoint.grace_period) as signals:
        for step in range(run.start + 1, end + 1):
            run.state, metrics = run.train_step(run.state, run.train_batch(step - 1))
            run.bar.update(1)
            for hook in hooks:
                hook.after_step(run, step, metrics)
            stop, save = signals.agree(step, run.cfg.log.every)
            if save or stop is not None:
                run.save()
                run.ckpt.wait()
            if save:
                signals.save = False
                run.say(f"step {step:>6} | checkpoint saved (SIGUSR1)")
            if stop is not None:
                raise PreemptedError(f"stopped by {signal.Signals(stop).name} at step {step}; "
                                f"checkpoint saved in {run.run_dir}; run the same command "
                                "again to resume")
    run.bar.close()
    run.ckpt.close()


def finish(run: Run) -> TrainResult:
    """End-of-run samples (when the run reached ``train.steps``), the hparams record."""
    cfg, step = run.cfg, run.step
    samples: list[str] = []
    # A classifier's objective samples nothing: no note about a family that cannot decode.
    wanted = bool(run.objective.sampling) and (bool(cfg.sample.prompts) or cfg.sample.count > 0)
    if wanted and not inference.decodes(cfg.model):
        run.echo(f"samples skipped: model.attention_type={cfg.model.attention_type!r} trains "
                 "and evaluates but does not decode")
        wanted = False
    if step == cfg.train.steps and wanted:
        # Every process takes part in gathering the parameters; only the first decodes.
        _, view, view_params = looped(cfg.model, host_params(run.rt.model_params(
            run.state.params)))
        pairs = (inference.SAMPLERS[run.objective.sampling](cfg, view, view_params, run.task)
                 if run.lead else [])
        samples = [completion for _, completion in pairs]
        if pairs:
            text = "\n\n".join(f"--- prompt {p!r}\n{p}{s}" for p, s in pairs)
            (run.run_dir / "samples.txt").write_text(text + "\n")
            run.reporter.text(step, "samples", text)
            run.echo(f"samples (temperature {cfg.sample.temperature}, top-k {cfg.sample.top_k}, "
                     f"top-p {cfg.sample.top_p}):\n{text}")
    run.reporter.final_hparams(cfg, run.evals, run.losses)
    run.reporter.close()
    return TrainResult(run_dir=run.run_dir, start_step=run.start, final_step=step,
                       losses=run.losses, evals={s: m["loss"] for s, m in run.evals.items()},
                       unigram_baseline=run.task.baseline,
                       baseline_name=run.task.baseline_name, samples=samples,
                       eval_metrics=run.evals)


def _init_tokenizer(cfg: Config, run_dir: Path) -> Path | None:
    """The tokenizer of ``train.init_from`` when the run has none yet: fine-tuning keeps the
    tokenizer the weights know (the embedding rows belong to its ids), with the
    ``special_tokens.json`` beside it when it came with a Hugging Face model."""
    init_tokenizer = Path(cfg.train.init_from) / rundir.TOKENIZER_FILE
    if (not (Path(run_dir) / rundir.TOKENIZER_FILE).exists() and cfg.train.init_from
            and init_tokenizer.is_file()):
        return init_tokenizer
    return None


def _build_data(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> Task:
    tokenizer_path = _init_tokenizer(cfg, run_dir) or Path(run_dir) / rundir.TOKENIZER_FILE
    return build_task(cfg, tokenizer_path, log)


def _describe_model(cfg: Config, rt: Runtime, task: Task, state: Any, peak: PeakFlops,
                    echo: Callable[[str], None]) -> str:
    """Prints the model line and the MFU peak; -> the baseline note for eval lines."""
    mesh = rt.mesh
    baseline = task.baseline
    unit = "accuracy" if task.baseline_name == "majority class" else "nats/token"
    baseline_note = ("" if math.isnan(baseline) else
                     f" ({task.baseline_name} baseline {baseline:.3f})")
    mesh_note = ", ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "1 device"
    fpt, formula = rt.flops_per_token()
    echo(f"model: {rt.n_params(state):,} parameters, {fpt / 1e6:.1f} MFLOPs/token "
         f"({formula}); mesh {mesh_note} ({cfg.mesh.preset}) over {jax.process_count()} "
         f"process(es) on {jax.devices()[0].platform}; objective "
         f"{cfg.objective.kind}{baseline_note.replace(')', f' {unit})')}")
    echo(f"MFU: {peak.describe()}")
    return baseline_note
