"""Continuation loss of a prefix-LM against a causal LM on the very same tokens.

Both runs must share the tokenizer's data and the model shapes (prefixlm_tiny and llama_tiny
do). The prefix-LM validation batches (document split points drawn as in training) are scored
twice: by the prefix-LM with its bidirectional prefix, and by the causal model with plain
causal attention; the loss counts only the continuation tokens in both.

    python scripts/prefix_vs_causal.py runs/prefixlm_tiny runs/llama_tiny
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import numpy as np

from jaxformer.models.build import abstract_model
from jaxformer.objectives import get_objective
from jaxformer.objectives.tasks import build_task
from jaxformer.runs import rundir
from jaxformer.runs.restore import load_run
from jaxformer.train.step import make_loss_sums


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prefix_run", type=Path)
    p.add_argument("causal_run", type=Path)
    p.add_argument("--batches", type=int, default=16)
    args = p.parse_args()

    prefix_cfg, prefix_params = load_run(args.prefix_run)
    causal_cfg, causal_params = load_run(args.causal_run)
    task = build_task(prefix_cfg, args.prefix_run / rundir.TOKENIZER_FILE, log=lambda s: None)
    scores = {}
    for name, cfg, params, keep_prefix in (("prefix-LM", prefix_cfg, prefix_params, True),
                                           ("causal", causal_cfg, causal_params, False)):
        # Both runs are scored with the prefix-LM call; the causal one sees no prefix marks.
        forward = get_objective("prefix_lm" if keep_prefix else "causal").logits
        loss_sums = jax.jit(make_loss_sums(abstract_model(cfg.model)[0], forward))
        total = np.zeros(2)
        for batch in task.val_batches(prefix_cfg.train.batch_size, args.batches):
            if not keep_prefix:
                batch = {k: v for k, v in batch.items() if k != "prefix"}
            out = loss_sums(params, batch)
            total += [float(out["nll_sum"]), float(out["weight_sum"])]
        scores[name] = total[0] / total[1]
        print(f"{name:>9}: continuation loss {scores[name]:.4f} nats/token "
              f"(perplexity {math.exp(scores[name]):.2f}) over {int(total[1])} tokens")
    print(f"difference (causal - prefix-LM): {scores['causal'] - scores['prefix-LM']:+.4f}")


if __name__ == "__main__":
    main()
