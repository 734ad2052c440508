"""What verifying T draft tokens costs against one decoding step: the bound on speculative
decoding's speed-up on this machine.

    python scripts/bench_verify_cost.py                          # gpt_tiny's shape
    python scripts/bench_verify_cost.py --layers 4 --width 1024   # 50M parameters, 200 MB

Speculative decoding pays when the target's step costs about the same for T = k + 1 tokens as
for one (a step bound by reading the weights). This times ``DecoderFamily.step`` of a random
GPT-2-shaped decoder (float32, batch 1) for T = 1, 2, 3, 5, 9 tokens per call, 100 calls inside
one jitted ``fori_loop`` over a cache of ``--context`` slots, best of ``--reps``, and prints a
markdown table: ms per call, its ratio to T = 1, and the speed-up over plain decoding that
speculative decoding would reach with a draft that costs nothing and is always accepted
(k + 1 tokens per target call of T = k + 1: T / ratio). A real draft costs k of its own steps
per round and is accepted a fraction of the time, so real speed-ups are below that column.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--context", type=int, default=320)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 5, 9])
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()

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
    assert 4 + calls + max(args.tokens) <= args.context, "--context too short for --calls"

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
    print("| tokens per call T | ms per call | ratio to T=1 | speculative bound T / ratio |")
    print("|---|---|---|---|")
    for t in args.tokens:
        print(f"| {t} | {ms[t]:.3f} | {ms[t] / base:.2f} | {t * base / ms[t]:.2f}x |")


if __name__ == "__main__":
    main()
