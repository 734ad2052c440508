"""Does pre-LN train without warmup while post-LN needs it (Xiong et al., 2020)?

Trains one architecture in four settings, post-LN or pre-LN, with or without linear warmup,
several seeds each, same budget and the same peak learning rate; prints the final losses as a
markdown table and draws the loss curves into a PNG. Two tasks:

    python scripts/warmup_study.py --task reverse --out docs/figures/warmup_study_reverse.png
    python scripts/warmup_study.py --task lm --lr 1e-2 --warmup 30 --seeds 2 \
        --out docs/figures/warmup_study_lm.png

``reverse``: the 2017 encoder-decoder on synthetic:reverse. ``lm``: a 4-layer GPT-2-layout
decoder on the stdlib corpus (sequences of 128).

Both settings use a constant learning rate after the warmup (so "no warmup" means the full
rate from the first step) and no gradient clipping, which would otherwise tame the first
steps of post-LN.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from jaxformer import config as config_lib
from jaxformer.config import Config
from jaxformer.models import presets
from jaxformer.train.loop import train


def study_config(task: str, norm_position: str, warmup: int, seed: int, steps: int,
                 lr: float) -> Config:
    # Post-LN normalizes every block's output already; pre-LN needs the final norm.
    if task == "reverse":
        model = presets.transformer_2017(n_layers=4, d_model=128, n_heads=4, d_ff=256,
                                         vocab_size=64, max_len=32, norm_position=norm_position,
                                         final_norm=norm_position == "pre")
        data = ["objective.kind=seq2seq", "data.source=synthetic:reverse", "data.seq_len=17",
                "train.batch_size=32"]
    else:
        model = presets.gpt2(n_layers=4, d_model=128, n_heads=4, vocab_size=4096, max_len=128,
                             norm_position=norm_position, final_norm=norm_position == "pre")
        data = ["data.source=stdlib", "data.seq_len=128", "train.batch_size=16"]
    cfg = dataclasses.replace(Config(name=f"{task}_{norm_position}_w{warmup}_s{seed}"),
                              model=model)
    return config_lib.apply_overrides(cfg, [
        *data, f"train.steps={steps}", f"train.lr={lr}",
        "train.schedule=constant", f"train.warmup_steps={warmup}", "train.grad_clip=0",
        f"train.seed={seed}", "train.weight_decay=0", "train.beta2=0.98", "log.every=10",
        f"eval.every={steps}", "eval.batches=4", "sample.prompts=[]",
        "checkpoint.every=100000"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["reverse", "lm"], default="reverse")
    p.add_argument("--out", type=Path, default=Path("docs/figures/warmup_study.png"))
    p.add_argument("--runs", type=Path, default=Path("runs/warmup_study"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()

    results = {}
    for norm in ("post", "pre"):
        for warmup in (0, args.warmup):
            for seed in range(args.seeds):
                cfg = study_config(args.task, norm, warmup, seed, args.steps, args.lr)
                start = time.perf_counter()
                r = train(cfg, args.runs / cfg.name, progress=False, echo=lambda s: None)
                ev = r.eval_metrics[args.steps]
                results[(norm, warmup, seed)] = {"curve": r.losses, "eval": ev}
                exact = f", exact match {ev['exact_match']:.3f}" if "exact_match" in ev else ""
                print(f"{norm}-LN warmup {warmup:>3} seed {seed}: train loss "
                      f"{r.losses[args.steps]:.3f}, eval loss {ev['loss']:.3f}{exact} "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)

    print("\n| placement | warmup | final eval loss (per seed) | exact match (per seed) |")
    print("|---|---|---|---|")  # exact match: reverse task only
    for norm in ("post", "pre"):
        for warmup in (0, args.warmup):
            evs = [results[(norm, warmup, s)]["eval"] for s in range(args.seeds)]
            losses = ", ".join(f"{e['loss']:.3f}" for e in evs)
            exact = ", ".join(f"{e['exact_match']:.2f}" for e in evs if "exact_match" in e)
            mean = statistics.mean(e["loss"] for e in evs)
            print(f"| {norm}-LN | {warmup} | {losses} (mean {mean:.3f}) | {exact} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {("post", 0): "tab:red", ("post", args.warmup): "tab:orange",
              ("pre", 0): "tab:blue", ("pre", args.warmup): "tab:cyan"}
    for (norm, warmup, seed), res in sorted(results.items()):
        steps = sorted(res["curve"])
        ax.plot(steps, [res["curve"][s] for s in steps], color=colors[(norm, warmup)],
                alpha=0.8, lw=1, label=f"{norm}-LN, warmup {warmup}" if seed == 0 else None)
    what = ("2017 Transformer, reverse task" if args.task == "reverse"
            else "4-layer decoder LM, stdlib")
    ax.set(xlabel="step", ylabel="train loss", yscale="log",
           title=f"{what}, constant lr {args.lr:g} after warmup")
    ax.legend()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    (args.runs / "results.json").write_text(json.dumps(
        {f"{n}-{w}-{s}": r["eval"] for (n, w, s), r in results.items()}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
