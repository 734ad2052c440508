"""The ``jaxformer`` command: train | sample | serve | quantize | bench | compile | convert |
plot | attention | sweep | runs.

Errors a user can cause end with one ``error: ...`` line on stderr and exit status 2; a run
stopped by SIGTERM/SIGINT after saving exits 75, one that diverged 3 (docs/usage.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from jaxformer.errors import EXIT_USER_ERROR, UserError  # noqa: F401 - cli.EXIT_USER_ERROR
from jaxformer.malloc_tuning import tune_for_cpu_steps
from jaxformer.sweep.commands import COMMANDS as SWEEP_COMMANDS
from jaxformer.sweep.commands import add_parsers as add_sweep_parsers

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended


def _parser() -> argparse.ArgumentParser:
    # Plain text: argparse prints the description as it is (no reST), and lists the commands.
    parser = argparse.ArgumentParser(
        prog="jaxformer", description="Train, sample, convert, compare and sweep Transformer "
        "runs (JAX + Flax).", epilog="jaxformer COMMAND --help shows the options of a command.")
    sub = parser.add_subparsers(dest="command", required=True, title="commands",
                                metavar="COMMAND")

    def experiment_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
        p.add_argument("experiment", nargs="?" if optional else None,
                       help="experiment file, e.g. experiments/gpt_tiny.py")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config value (repeatable)")

    p = sub.add_parser("train", help="train (or resume) a run")
    experiment_args(p)
    p.add_argument("--run-dir", type=Path, help="default: runs/<config name>")
    p.add_argument("--allow-config-change", action="store_true",
                   help="continue a run dir whose saved config differs")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although the data source changed since the run began")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    multi = p.add_argument_group(
        "multi-process", "join a jax.distributed job (found automatically under SLURM and on "
        "multi-host TPU slices)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    multi.add_argument("--num-processes", type=int, metavar="N")
    multi.add_argument("--process-id", type=int, metavar="I")

    p = sub.add_parser("sample", help="generate text from a run (any family that generates)",
                       description="Continue prompts with a decoder or prefix-LM, or translate "
                       "sources with an encoder-decoder: sampling, greedy (--temperature 0), "
                       "beam search or speculative decoding. See docs/inference.md.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompt", dest="prompts", action="append", default=[],
                   help="text to continue, or an encoder-decoder's source (repeatable: one "
                   "batch; default: none, a new document)")
    p.add_argument("--audio", action="append", default=[], metavar="WAV|heldout:K",
                   help="a speech run's input (repeatable: one batch): a 16-bit PCM WAV file "
                   "at the model's sample rate, or clip K of the run's held-out set; the "
                   "transcript is printed (docs/speech.md)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a row at this text (repeatable; not printed)")
    p.add_argument("--stop-token", dest="stop_tokens", action="append", default=[],
                   metavar="TOKEN", help="stop a row at this token of the tokenizer, or id "
                   "(repeatable; the run's end tokens always stop)")
    s = p.add_argument_group("sampling", "transformers' logits processors, in its order")
    s.add_argument("--temperature", type=float, help="0 means greedy (default 0.8)")
    s.add_argument("--top-k", type=int, help="0 disables (default 40)")
    s.add_argument("--top-p", type=float, help="1 disables (default 0.95)")
    s.add_argument("--min-p", type=float, help="0 disables (default 0)")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="1 disables")
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--no-repeat-ngram-size", type=int, default=0, help="0 disables")
    b = p.add_argument_group("beam search")
    b.add_argument("--num-beams", type=int, default=1, help="1: no beam search")
    b.add_argument("--length-penalty", type=float, default=1.0,
                   help="score = log-probability / length ** this")
    b.add_argument("--early-stopping", choices=("true", "false", "never"), default="false")
    b.add_argument("--num-return-sequences", type=int, default=1)
    d = p.add_argument_group("speculative decoding")
    d.add_argument("--draft", type=Path, metavar="RUN_DIR",
                   help="a smaller run with the same vocabulary proposes tokens")
    d.add_argument("--draft-k", type=int, default=4, help="tokens proposed per round")
    d.add_argument("--mtp", action="store_true", help="greedy, the run's own multi-token "
                   "prediction modules proposing tokens (model.mtp_heads > 0; no draft)")
    c = p.add_argument_group("prompt cache", "the keys and values of a shared prompt prefix, "
                             "computed once")
    c.add_argument("--save-prompt-cache", type=Path, metavar="FILE",
                   help="compute the --prompt's cache, write it to FILE and stop")
    c.add_argument("--prompt-cache", type=Path, metavar="FILE",
                   help="continue the cached prefix in FILE with --prompt")

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a decoder-only run",
                       description="Serve /v1/completions, /v1/chat/completions (when the "
                       "run's tokenizer has a chat template) and /v1/models as OpenAI's API "
                       "does, streaming included, with continuous batching over a paged KV "
                       "cache. Ctrl-C stops it. See docs/inference.md.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together; more wait for a free row (default 8)")
    p.add_argument("--block-size", type=int, default=16,
                   help="KV-cache slots per block of the paged cache (default 16)")

    p = sub.add_parser("quantize", help="a weight-only INT8/INT4 copy of a run (sample and "
                                        "serve read it)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--bits", type=int, required=True, help="8 (per output channel) or 4 "
                                                           "(group-wise)")
    p.add_argument("--group-size", type=int, default=128,
                   help="--bits 4: contraction values per scale (default 128)")
    p.add_argument("--out", type=Path, required=True,
                   help="the new run dir (must not exist, or be empty)")

    p = sub.add_parser("convert", help="Hugging Face directory <-> jaxformer run dir")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", type=Path, metavar="HF_DIR",
                           help="a transformers save_pretrained directory")
    direction.add_argument("--to-hf", type=Path, metavar="RUN_DIR", help="a jaxformer run dir")
    p.add_argument("--out", type=Path, required=True, help="the directory to create")
    p.add_argument("--step", type=int, help="with --to-hf: checkpoint step (default latest)")

    p = sub.add_parser("plot", help="curves of runs, or the LR schedule of an experiment, as PNG")
    p.add_argument("run_dirs", type=Path, nargs="*", metavar="RUN_DIR")
    p.add_argument("--metric", default="eval/loss", help="TensorBoard tag (default eval/loss)")
    p.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    p.add_argument("--schedule", metavar="EXPERIMENT", help="plot this experiment's LR schedule")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --schedule: override a config value (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="the PNG file to write")

    p = sub.add_parser("bench", help="time train steps on synthetic tokens")
    experiment_args(p, optional=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--measure-peak", action="store_true",
                   help="measure this machine's CPU peak FLOP/s (the MFU denominator, cached "
                        "per machine) again; without EXPERIMENT, only that")
    p = sub.add_parser("compile", help="compile the train step for a TPU topology on this "
                       "machine: memory, FLOPs, collectives, estimated MFU",
                       description="Compile the experiment's train and eval steps ahead of "
                       "time for a TPU topology (needs libtpu: pip install \"jax[tpu]\"; no TPU "
                       "needed) and report per-chip memory against HBM, FLOPs, collective bytes "
                       "and a roofline estimate of step time and MFU. Exit status 4: it does "
                       "not fit. See docs/scaling.md.")
    experiment_args(p)
    p.add_argument("--topology", required=True, metavar="NAME",
                   help="CHIP:SHAPE, e.g. v5e:16x16, v5p:4x4x8, v6e:16x16, v4:4x4x8")
    p.add_argument("--slices", type=int, default=1, help="multi-slice: this many slices")
    p.add_argument("--dump", type=Path, metavar="DIR",
                   help="write the train step's HLO there, before and after XLA's passes")
    p.add_argument("--sweep", action="store_true",
                   help="compile every mesh preset x remat policy and print what fits and "
                        "the best estimated MFU")
    p.add_argument("--presets", default=",".join(("fsdp", "fsdp_tensor", "data")),
                   help="with --sweep: mesh presets, comma-separated")
    p.add_argument("--remats", default="none,save_dots_no_batch,save_dots,full",
                   help="with --sweep: remat policies, comma-separated")
    p = sub.add_parser("attention", help="per-layer, per-head attention heat maps of a prompt "
                       "(an image run: the [CLS] attention over a held-out image)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--text", help="the prompt (encoder-decoder: the source); text runs only")
    p.add_argument("--image", type=int, metavar="I",
                   help="image runs: the index of the held-out image to draw (default 0)")
    p.add_argument("--out", type=Path, required=True, help="directory for the PNGs and npz")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--layers", nargs="+", metavar="I",
                   help="layer indices, e.g. 0 -1 or 0,2 (default: all; an image run: the "
                        "last)")
    p.add_argument("--target", help="encoder-decoder: decoder text (default: greedy output)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="encoder-decoder: length limit of the greedy output")
    add_sweep_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # orbax logs every failed background write as several absl ERROR tracebacks; the
    # command reports the failure itself, in one line.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # its leftover write tasks
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        # The line above says what failed; the tasks of a failed background write that Python
        # finds unfinished at exit would add a page of "Exception ignored" noise.
        sys.unraisablehook = lambda _: None
        return e.exit_status
    except KeyboardInterrupt:  # before training started or after it ended: nothing to save
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _load(args: argparse.Namespace):
    import jaxformer.objectives  # noqa: F401 - registers objective.kind and its checks
    from jaxformer import config as config_lib

    cfg = config_lib.load_experiment(args.experiment)
    return config_lib.apply_overrides(cfg, args.overrides)


def check_run_dir_target(run_dir: Path) -> None:
    """A run dir to create or continue must be a directory or not exist yet, under a directory
    (checked before anything is written, so a wrong path leaves nothing behind)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a run directory")
    for parent in run_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--run-dir {run_dir}: {parent} is a file, not a directory")
            break


def cmd_train(args: argparse.Namespace) -> int:
    from jaxformer.runs import rundir
    from jaxformer.train.init_from import explicit_keys, model_from_source

    cfg = _load(args)
    # Before anything starts JAX's backend: its threads keep the malloc arena they start with.
    tune_for_cpu_steps()
    # With train.init_from, the model's architecture comes from the source unless --set names
    # a model key (every invocation, so a resumed run's config stays what was saved).
    run_dir = args.run_dir or rundir.default_run_dir(cfg)
    check_run_dir_target(run_dir)
    cfg, init_note = model_from_source(cfg, explicit_keys(args.overrides), run_dir)
    from jaxformer.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    from jaxformer.train.loop import train

    if init_note and jax.process_index() == 0:
        print(init_note)
    # A bar only on a terminal: in a log file its redraws would be one snapshot per update.
    result = train(cfg, run_dir, allow_config_change=args.allow_config_change,
                   allow_data_change=args.allow_data_change,
                   progress=not args.no_progress and sys.stderr.isatty())
    if result.evals and jax.process_index() == 0:
        last = max(result.evals)
        accuracy = result.eval_metrics.get(last, {}).get("accuracy")
        if result.baseline_name == "unigram":  # a loss in nats per token, like the baseline
            against = f"unigram baseline {result.unigram_baseline:.4f}"
        else:  # a classifier: its accuracy against the majority class's
            against = (f"accuracy {accuracy:.3f}, " if accuracy is not None else "") + (
                f"{result.baseline_name} baseline {result.unigram_baseline:.3f}")
        print(f"done: step {result.final_step}, validation loss {result.evals[last]:.4f} "
              f"({against}); run dir {result.run_dir}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from jaxformer.inference.sample_command import SampleOptions, sample

    fields = {f.name for f in dataclasses.fields(SampleOptions)}
    opts = SampleOptions(**{k: v for k, v in vars(args).items() if k in fields})
    for text in sample(opts, note=lambda line: print(line, file=sys.stderr)):
        print(text, end="", flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.experiment is None:
        if not args.measure_peak:
            raise UserError("bench needs an EXPERIMENT file (or --measure-peak alone)")
        from jaxformer.train.bench import measure_peak

        print(measure_peak().describe())
        return 0
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    cfg = _load(args)
    tune_for_cpu_steps()  # as in cmd_train: before JAX's backend starts
    from jaxformer.train.bench import bench, print_result

    print_result(bench(cfg, args.steps, args.warmup, remeasure_peak=args.measure_peak))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from jaxformer.aot.report import (
        DOES_NOT_FIT,
        best,
        compile_report,
        format_report,
        format_sweep,
        json_line,
        sweep,
    )

    if args.sweep:
        rows = sweep(cfg, args.topology, args.slices, presets=_csv(args.presets),
                     remats=_csv(args.remats), echo=lambda line: print(line, file=sys.stderr))
        print(format_sweep(rows))
        for row in rows:
            print(json_line(row))
        return 0 if best(rows) is not None else DOES_NOT_FIT
    report = compile_report(cfg, args.topology, args.slices, dump=args.dump)
    print(format_report(report))
    print(json_line(report))
    return 0 if report["fits"] else DOES_NOT_FIT


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_convert(args: argparse.Namespace) -> int:
    from jaxformer.hf.run_dir import hf_to_run_dir, run_dir_to_hf

    if args.from_hf is not None:
        cfg = hf_to_run_dir(args.from_hf, args.out)
        m = cfg.model
        inputs = (f"{m.image_size}x{m.image_size}x{m.image_channels} images in "
                  f"{m.patch_size}x{m.patch_size} patches, {m.num_labels} classes"
                  if m.patch_size > 0 else f"vocab {m.vocab_size}")
        print(f"wrote run dir {args.out}: {m.n_layers} layers, d_model {m.d_model}, {inputs}; "
              f"fine-tune with --set train.init_from={args.out}")
    else:
        run_dir_to_hf(args.to_hf, args.out, args.step)
        print(f"wrote {args.out} ({', '.join(sorted(p.name for p in args.out.iterdir()))})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from jaxformer.analysis.plots import plot_runs, plot_schedule

    if args.schedule:
        if args.run_dirs:
            raise UserError("plot either RUN_DIRs or --schedule EXPERIMENT, not both")
        args.experiment = args.schedule
        cfg = _load(args)
        lrs = plot_schedule(cfg, args.out)
        print(f"wrote {args.out}: {cfg.train.schedule} schedule, peak {lrs.max():.3g}, "
              f"last {lrs[-1]:.3g}")
        return 0
    if not args.run_dirs:
        raise UserError("plot needs RUN_DIRs (or --schedule EXPERIMENT)")
    for run_dir in args.run_dirs:
        if not run_dir.is_dir():
            raise UserError(f"run dir {run_dir} does not exist")
    plot_runs(args.run_dirs, args.metric, args.out, log_y=args.log_y)
    print(f"wrote {args.out}: {args.metric} of {len(args.run_dirs)} run(s)")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "bench": cmd_bench, "compile": cmd_compile,
            "convert": cmd_convert, "plot": cmd_plot}

def cmd_attention(args: argparse.Namespace) -> int:
    from jaxformer.analysis.attention_maps import write_attention_maps
    from jaxformer.runs import rundir

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    layers = None
    if args.layers:
        try:
            layers = [int(x) for arg in args.layers for x in arg.split(",") if x.strip()]
        except ValueError as e:
            raise UserError(f"--layers takes integers, e.g. 0 -1 or 0,2: {e}") from None
    saved = rundir.read_config(args.run_dir) if args.run_dir.is_dir() else None
    if saved is not None and saved.model.patch_size > 0:
        from jaxformer.analysis.image_attention import write_image_attention

        if args.text is not None or args.target is not None:
            raise UserError(f"{args.run_dir} holds an image encoder: it draws a held-out "
                            "image (--image I), not --text/--target")
        written = write_image_attention(args.run_dir, args.out, index=args.image or 0,
                                        step=args.step, layers=layers)
    else:
        if args.text is None:
            raise UserError("attention on a text run needs --text, the prompt to draw")
        if args.image is not None:
            raise UserError(f"--image is for image runs; {args.run_dir} reads text")
        written = write_attention_maps(args.run_dir, args.text, args.out, step=args.step,
                                       layers=layers, target=args.target,
                                       max_new_tokens=args.max_new_tokens)
    for path in written:
        print(f"wrote {path}")
    return 0


COMMANDS["attention"] = cmd_attention


def cmd_quantize(args: argparse.Namespace) -> int:
    from jaxformer.inference.quantize import quantize_command

    print(quantize_command(args.run_dir, args.out, args.bits, args.group_size))
    return 0


COMMANDS["quantize"] = cmd_quantize


def cmd_serve(args: argparse.Namespace) -> int:
    from jaxformer.inference.server import serve

    serve(args.run_dir, args.host, args.port, step=args.step, max_batch=args.max_batch,
          block_size=args.block_size)
    return 0


COMMANDS["serve"] = cmd_serve

COMMANDS.update(SWEEP_COMMANDS)


def run() -> None:
    """The ``jaxformer`` command (the console-script entry point)."""
    try:
        code = main()
        sys.stdout.flush()  # a reader gone before the end shows here, not at interpreter exit
    except BrokenPipeError:
        # The reader of stdout went away (`jaxformer runs DIR | head`): stop quietly, as Unix
        # tools do, instead of a traceback; stdout goes to /dev/null so that the interpreter's
        # final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code)


if __name__ == "__main__":
    run()
