"""The draft for ``speculative_target``: 2 layers of gpt_tiny's width (1.7M parameters, 6.6
MiB; a decode step of about 0.2 ms on 2 CPU cores, the target's about 4 ms), trained on the same
data and tokenizer, from the labels and, mostly, from the target's own predictions
(knowledge distillation, weight 0.9 at temperature 1), so that its greedy tokens agree with
the target's as often as possible: a draft only ever changes the speed of speculative
decoding, and every token it proposes that the target would not have chosen is wasted.

    jaxformer train experiments/speculative_target.py      # first: the target
    jaxformer train experiments/speculative_draft.py       # runs/speculative_draft, ~15 min
    jaxformer train experiments/speculative_draft.py --set train.teacher= \\
        --run-dir runs/speculative_draft_alone             # the same draft from labels only
"""

import dataclasses
from pathlib import Path

from jaxformer.config import Config, load_experiment


def config() -> Config:
    base = load_experiment(Path(__file__).parent / "gpt_tiny.py")
    return dataclasses.replace(
        base,
        name="speculative_draft",
        model=dataclasses.replace(base.model, n_layers=2),
        train=dataclasses.replace(base.train, batch_size=8, steps=1000,
                                  teacher="runs/speculative_target", distill_alpha=0.1,
                                  distill_temperature=1.0),
        checkpoint=dataclasses.replace(base.checkpoint, every=500),
        eval=dataclasses.replace(base.eval, every=500),
    )
