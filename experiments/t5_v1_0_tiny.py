"""T5 v1.0 instead of v1.1 in the t5_tiny recipe: ReLU feed-forward and a tied head (its input
scaled by d_model^-0.5), everything else equal.

    jaxformer train experiments/t5_v1_0_tiny.py
"""

import dataclasses
from pathlib import Path

from jaxformer.config import Config, load_experiment
from jaxformer.models import presets


def config() -> Config:
    base = load_experiment(Path(__file__).with_name("t5_tiny.py"))
    m = base.model
    model = presets.t5_v1_0(n_layers=m.n_layers, n_decoder_layers=m.n_decoder_layers,
                            d_model=m.d_model, n_heads=m.n_heads, vocab_size=m.vocab_size,
                            max_len=m.max_len)
    return dataclasses.replace(base, name="t5_v1_0_tiny", model=model)
