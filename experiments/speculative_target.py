"""A target for speculative decoding on a CPU: gpt_tiny's recipe at d_model 512 (14.8M
parameters, 57 MiB of float32 weights), large enough that a decode step is bound by reading
the weights from memory, so that verifying several draft tokens in one call costs little more
than one step (docs/benchmarks.md, "Speculative decoding, CPU").

    jaxformer train experiments/speculative_target.py      # runs/speculative_target, ~15 min
    jaxformer train experiments/speculative_draft.py       # then its draft
    python scripts/bench_decode.py --target runs/speculative_target \\
        --draft runs/speculative_draft --k 16 --prompts 8 --prompt-len 32 --new 128 --reps 3
"""

import dataclasses
from pathlib import Path

from jaxformer.config import Config, load_experiment


def config() -> Config:
    base = load_experiment(Path(__file__).parent / "gpt_tiny.py")
    return dataclasses.replace(
        base,
        name="speculative_target",
        model=dataclasses.replace(base.model, d_model=512, n_heads=8),
        train=dataclasses.replace(base.train, batch_size=8, steps=400, lr=1e-3),
        checkpoint=dataclasses.replace(base.checkpoint, every=200),
        eval=dataclasses.replace(base.eval, every=200),
    )
