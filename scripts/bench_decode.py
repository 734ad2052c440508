"""Decoding speed: jaxformer's ``Generator`` vs transformers' ``generate`` on the same weights.

    python scripts/bench_decode.py                       # gpt_tiny's shape, batch 1 and 16
    python scripts/bench_decode.py --batches 1 --reps 5 --prompt-len 64 --new 128

Both sides decode a GPT-2-shaped model (``--layers/--width/--heads/--vocab``, default gpt_tiny's:
4 layers, d_model 192, 4 heads, vocabulary 4096, context 256) with the same random weights (a
``transformers.GPT2LMHeadModel`` saved with ``save_pretrained`` and read by
``jaxformer.hf.from_pretrained``), float32, greedy, ``--prompt-len`` random prompt tokens and
exactly ``--new`` new tokens (no end token), on ``--threads`` CPU threads (PyTorch:
``torch.set_num_threads``; XLA uses every core it sees: run on a machine, or under ``taskset``,
with that many). Each side is compiled / warmed up once, then the two sides alternate ``--reps``
times (so a machine whose speed drifts slows both alike); the median time of each is reported.
tokens/s counts new tokens only (batch × new / time); the prefill is inside the timed call on
both sides. The outputs are compared token for token (greedy on the same float32 weights: equal
unless two logits tie within rounding).

Prints a markdown table for docs/benchmarks.md.

    python scripts/bench_decode.py --target runs/gpt_tiny --draft runs/gpt_draft --k 4

Speculative decoding instead: a trained target run and a smaller draft run trained on the same
data (same tokenizer), greedy: the target alone (``Generator``) against
``speculative_generate``, each compiled by a first untimed call, then the median of ``--reps``
timed calls alternating the two; checks that the outputs are identical and reports the
acceptance rate and the tokens per target call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--target", type=Path, help="with --draft: a trained target run dir")
    p.add_argument("--draft", type=Path, help="a smaller run dir with the same tokenizer")
    p.add_argument("--k", type=int, default=4, help="draft tokens per round")
    p.add_argument("--pause", type=float, default=1.0,
                   help="seconds idle before each timed call, so that the other side's worker "
                        "threads, which spin for a while after their work, have gone to sleep")
    args = p.parse_args()
    if args.draft is not None:
        bench_speculative(args)
        return

    import jax
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from jaxformer.hf.api import from_pretrained
    from jaxformer.inference.families import model_family
    from jaxformer.inference.generate import Generator

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads,
                        vocab_size=args.vocab, n_positions=args.context, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = from_pretrained(Path(tmp))
    gen = Generator(model_family(model.config), model.params)
    print(f"# jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"threads {args.threads}, cpus {os.cpu_count()}; GPT-2 shape L={args.layers} "
          f"d={args.width} heads={args.heads} V={args.vocab}; prompt {args.prompt_len}, "
          f"new {args.new}, greedy, float32")
    rows = []
    for b in args.batches:
        prompts = np.random.default_rng(b).integers(0, args.vocab, (b, args.prompt_len))

        def run_jax(prompts=prompts):
            return [g.tokens for g in gen.generate(prompts.tolist(), args.new)]

        def run_hf(ids=torch.as_tensor(prompts)):  # noqa: B008 - bound per batch size
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=args.new, min_new_tokens=args.new,
                                  pad_token_id=0, eos_token_id=None)
            return out[:, args.prompt_len:].tolist()

        t0 = time.perf_counter()
        jax_out = run_jax()
        compile_s = time.perf_counter() - t0
        hf_out = run_hf()
        same = np.mean([a == h for ra, rh in zip(jax_out, hf_out, strict=True)
                        for a, h in zip(ra, rh, strict=True)])
        times = {"jax": [], "hf": []}
        for _ in range(args.reps):
            for name, fn in (("jax", run_jax), ("hf", run_hf)):
                time.sleep(args.pause)
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        tj, th = statistics.median(times["jax"]), statistics.median(times["hf"])
        rows.append((b, b * args.new / tj, b * args.new / th, th / tj, same, compile_s))
    print("| batch | jaxformer tokens/s | transformers tokens/s | speed-up | same tokens | "
          "jaxformer first call (compile + run) s |")
    print("|---|---|---|---|---|---|")
    for b, tj, th, ratio, same, comp in rows:
        print(f"| {b} | {tj:,.0f} | {th:,.0f} | {ratio:.2f}x | {same:.1%} | {comp:.1f} |")


def bench_speculative(args: argparse.Namespace) -> None:
    from jaxformer.inference.generate import Generator
    from jaxformer.inference.restore import load_for_generation
    from jaxformer.inference.speculative import speculative_generate

    target, draft = load_for_generation(args.target), load_for_generation(args.draft)
    prompt = target.encode("def ")
    gen = Generator(target.family, target.params)

    def plain() -> list[int]:
        return gen.generate([prompt], args.new)[0].tokens

    def spec() -> tuple[list[int], object]:
        return speculative_generate(target.family, target.params, draft.family, draft.params,
                                    prompt, max_new_tokens=args.new, k=args.k)

    want, (got, stats) = plain(), spec()  # also compiles both
    times: dict[str, list[float]] = {"plain": [], "spec": []}
    for _ in range(args.reps):
        for name, fn in (("plain", plain), ("spec", spec)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tp, ts = statistics.median(times["plain"]), statistics.median(times["spec"])
    print(f"# target {args.target}, draft {args.draft}, k {args.k}, {args.new} new tokens, "
          f"greedy, threads {args.threads}")
    print("| target alone tokens/s | speculative tokens/s | speed-up | identical output | "
          "acceptance | tokens per target call |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(want) / tp:,.0f} | {len(got) / ts:,.0f} | {tp / ts:.2f}x | {got == want} | "
          f"{stats.acceptance_rate:.0%} | {stats.tokens_per_target_call:.2f} |")


if __name__ == "__main__":
    main()
