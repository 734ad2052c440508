"""A learning-rate sweep of gpt_tiny: 3 learning rates x 2 seeds, 150 steps each.

    jaxformer sweep experiments/gpt_tiny_sweep.py --dry-run     # the 6 points and run dirs
    jaxformer sweep experiments/gpt_tiny_sweep.py               # run them, one after another
    jaxformer runs runs/gpt_tiny_sweep                          # the table again
    tensorboard --logdir runs/gpt_tiny_sweep                    # curves and the HPARAMS tab

See docs/sweeps.md.
"""

import dataclasses
from pathlib import Path

from jaxformer.config import Config, load_experiment
from jaxformer.sweep.space import grid, product, seeds


def config() -> Config:
    base = load_experiment(Path(__file__).parent / "gpt_tiny.py")
    return dataclasses.replace(
        base,
        name="gpt_tiny",  # the sweep dir is runs/gpt_tiny_sweep
        train=dataclasses.replace(base.train, steps=150, warmup_steps=10),
        checkpoint=dataclasses.replace(base.checkpoint, every=50),
        eval=dataclasses.replace(base.eval, every=50),
    )


def sweep() -> list[dict[str, object]]:
    return product(grid(**{"train.lr": [1e-3, 3e-3, 1e-2]}), seeds(0, 1))
