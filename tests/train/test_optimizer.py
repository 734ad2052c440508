from __future__ import annotations

import math

import numpy as np

from jaxformer.config import TrainConfig
from jaxformer.train.optimizer import learning_rate_schedule


def test_warmup_then_cosine_matches_formula():
    cfg = TrainConfig(lr=1e-3, steps=100, warmup_steps=10, min_lr_ratio=0.1)
    sched = learning_rate_schedule(cfg)
    for step in [0, 1, 5, 10, 11, 50, 99, 100]:
        if step < 10:
            want = 1e-3 * step / 10
        else:
            frac = (step - 10) / 90
            want = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5, atol=1e-9)
