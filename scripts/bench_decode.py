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

    python scripts/bench_decode.py --target runs/speculative_target \
        --draft runs/speculative_draft --k 8 --prompts 8 --prompt-len 32 --new 128 --reps 3

Speculative decoding instead: a trained target run and a smaller draft run trained on the same
data (same tokenizer), greedy, batch 1, on ``--prompts`` held-out prompts (the first
``--prompt-len`` tokens of the target's first validation rows that begin with that many tokens
of one document): for each, the target alone (``Generator``) against ``speculative_generate``,
each compiled by a first untimed call, then the median of ``--reps`` timed calls alternating
the two. A row per prompt and one for all (total new tokens / total median time): whether the
outputs are identical, the acceptance rate and the tokens per target call.

    python scripts/bench_decode.py --verify-cost --context 320        # gpt_tiny's shape
    python scripts/bench_decode.py --verify-cost --width 1024 --heads 8 --calls 40 --reps 3 \
        --context 64                                                  # 55M parameters

What verifying T draft tokens costs against one step, the bound on speculative decoding's
speed-up: ``DecoderFamily.step`` of the random GPT-2-shaped decoder (float32, batch 1) for each
of ``--tokens`` tokens per call, ``--calls`` calls inside one jitted ``fori_loop`` over a cache
of ``--context`` slots, best of ``--reps``. The table: ms per call, its ratio to the first
(T = 1), and the speed-up speculative decoding would reach with a draft that costs nothing and
is always accepted (T tokens per target call of T: T / ratio). A real draft costs k of its own
steps per round and is rejected at times, so real speed-ups are below that column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
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
    p.add_argument("--prompts", type=int, default=8,
                   help="with --draft: held-out prompts (the target's first validation rows)")
    p.add_argument("--pause", type=float, default=1.0,
                   help="seconds idle before each timed call, so that the other side's worker "
                        "threads, which spin for a while after their work, have gone to sleep")
    p.add_argument("--verify-cost", action="store_true",
                   help="time the target's step for --tokens tokens per call instead")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 5, 9],
                   help="with --verify-cost: tokens per call (the first is the baseline)")
    p.add_argument("--calls", type=int, default=100, help="with --verify-cost: calls per loop")
    args = p.parse_args()
    if args.verify_cost:
        bench_verify_cost(args)
        return
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
        tj, th = alternate((run_jax, run_hf), args.reps, args.pause)
        rows.append((b, b * args.new / tj, b * args.new / th, th / tj, same, compile_s))
    print("| batch | jaxformer tokens/s | transformers tokens/s | speed-up | same tokens | "
          "jaxformer first call (compile + run) s |")
    print("|---|---|---|---|---|---|")
    for b, tj, th, ratio, same, comp in rows:
        print(f"| {b} | {tj:,.0f} | {th:,.0f} | {ratio:.2f}x | {same:.1%} | {comp:.1f} |")


def alternate(sides: Sequence[Callable[[], object]], reps: int, pause: float) -> list[float]:
    """Times each side ``reps`` times, the sides alternating (each after ``pause`` idle
    seconds) -> each side's median seconds per call."""
    times: list[list[float]] = [[] for _ in sides]
    for _ in range(reps):
        for side, fn in zip(times, sides, strict=True):
            time.sleep(pause)
            start = time.perf_counter()
            fn()
            side.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bench_verify_cost(args: argparse.Namespace) -> None:
    """Prints ms per ``step`` call for each of --tokens tokens per call (see the docstring)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxformer.inference.families import DecoderFamily
    from jaxformer.models import build_model, presets

    cfg = presets.gpt2(n_layers=args.layers, d_model=args.width, n_heads=args.heads,
                       vocab_size=args.vocab, max_len=args.context)
    model = build_model(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    family = DecoderFamily(model.cfg, graphdef)
    prompt = jnp.zeros((1, 4), jnp.int32)
    calls = args.calls
    if 4 + calls + max(args.tokens) > args.context:
        raise SystemExit(f"error: --context {args.context} holds fewer than the 4 prompt slots "
                         f"+ --calls {calls} + {max(args.tokens)} tokens")

    def timed(t: int) -> float:
        @jax.jit
        def loop(params, prompt):
            _, state, _ = family.prefill(params, prompt, jnp.array([4]), args.context)

            def body(i, carry):
                state, acc = carry
                tokens = jnp.full((1, t), i % 7, jnp.int32)
                logits, state = family.step(params, tokens, state, 4 + i)
                return state, acc + logits[0, -1, 0]  # the logits are used: nothing is elided

            return jax.lax.fori_loop(0, calls, body, (state, jnp.zeros(())))[1]

        loop(params, prompt).block_until_ready()  # compile
        best = float("inf")
        for _ in range(args.reps):
            start = time.perf_counter()
            loop(params, prompt).block_until_ready()
            best = min(best, time.perf_counter() - start)
        return best / calls * 1e3

    ms = {t: timed(t) for t in args.tokens}
    base = ms[args.tokens[0]]
    print(f"# {args.layers} layers, d_model {args.width}, vocabulary {args.vocab}: "
          f"{n_params / 1e6:.1f}M parameters, {n_params * 4 / 2**20:.0f} MiB float32")
    print(f"| tokens per call T | ms per call | ratio to T={args.tokens[0]} | "
          "speculative bound T / ratio |")
    print("|---|---|---|---|")
    for t in args.tokens:
        print(f"| {t} | {ms[t]:.3f} | {ms[t] / base:.2f} | {t * base / ms[t]:.2f}x |")


def heldout_prompts(run: Path, n: int, length: int) -> list[list[int]]:
    """The first ``length`` tokens of the first ``n`` validation rows of a text run (rows that
    begin a document shorter than that are passed over): prompts the models never trained on."""
    from jaxformer.objectives.tasks import build_task
    from jaxformer.runs.restore import read_run_config
    from jaxformer.runs.rundir import TOKENIZER_FILE

    cfg = read_run_config(run)
    task = build_task(cfg, run / TOKENIZER_FILE, lambda _line: None)
    prompts: list[list[int]] = []
    for batch in task.val_batches(64, None):
        for ids, seg in zip(batch["inputs"], batch["segment_ids"], strict=True):
            if len(prompts) < n and np.all(seg[:length] == seg[0]):
                prompts.append([int(t) for t in ids[:length]])
        if len(prompts) == n:
            return prompts
    raise SystemExit(f"error: {run} has fewer than {n} validation rows whose first "
                     f"{length} tokens are one document")


def bench_speculative(args: argparse.Namespace) -> None:
    """Target alone vs target + draft on held-out prompts (see the docstring)."""
    from jaxformer.inference.generate import Generator
    from jaxformer.inference.restore import load_for_generation
    from jaxformer.inference.speculative import speculative_generate

    target, draft = load_for_generation(args.target), load_for_generation(args.draft)
    prompts = heldout_prompts(args.target, args.prompts, args.prompt_len)
    gen = Generator(target.family, target.params)
    print(f"# target {args.target}, draft {args.draft}, k {args.k}, {len(prompts)} held-out "
          f"prompts of {args.prompt_len} tokens, {args.new} new tokens, greedy, "
          f"threads {args.threads}")
    print("| prompt | target alone tokens/s | speculative tokens/s | speed-up | "
          "identical output | acceptance | tokens per target call |")
    print("|---|---|---|---|---|---|---|")
    total = {"plain": 0.0, "spec": 0.0}
    n_tokens = rounds = accepted = proposed = 0
    all_same = True
    for i, prompt in enumerate(prompts):
        def plain(prompt=prompt) -> list[int]:
            return gen.generate([prompt], args.new)[0].tokens

        def spec(prompt=prompt) -> tuple[list[int], object]:
            return speculative_generate(target.family, target.params, draft.family,
                                        draft.params, prompt, max_new_tokens=args.new, k=args.k)

        want, (got, stats) = plain(), spec()  # also compiles both (once: one prompt length)
        tp, ts = alternate((plain, spec), args.reps, args.pause)
        total["plain"] += tp
        total["spec"] += ts
        n_tokens += len(want)
        rounds, accepted = rounds + stats.rounds, accepted + stats.accepted
        proposed += stats.proposed
        all_same &= got == want
        print(f"| {i} | {len(want) / tp:,.0f} | {len(got) / ts:,.0f} | {tp / ts:.2f}x | "
              f"{got == want} | {stats.acceptance_rate:.0%} | "
              f"{stats.tokens_per_target_call:.2f} |")
    print(f"| all {len(prompts)} | {n_tokens / total['plain']:,.0f} | "
          f"{n_tokens / total['spec']:,.0f} | {total['plain'] / total['spec']:.2f}x | "
          f"{all_same} | {accepted / max(proposed, 1):.0%} | "
          f"{(accepted + rounds) / max(rounds, 1):.2f} |")


if __name__ == "__main__":
    main()
