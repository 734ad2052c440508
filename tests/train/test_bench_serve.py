"""``serve_steps``: the request/reply loop that interleaved benchmark scripts drive."""

from __future__ import annotations

import io
import json
import math

from jaxformer.train.bench import serve_steps
from jaxformer.train.flops import flops_per_token
from tests.train.helpers import tiny_config


def test_serves_one_timed_step_per_request():
    cfg = tiny_config("train.lr=1e-2", "train.warmup_steps=0")
    replies = io.StringIO()
    serve_steps(cfg, warmup=0, requests=io.StringIO("\n" * 4), replies=replies)
    facts, *steps = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert facts["params"] > 0 and facts["compile_s"] > 0
    assert facts["flops_per_token"] == flops_per_token(cfg.model, cfg.data.seq_len)
    assert len(steps) == 4                          # one reply per request, no more
    assert all(s["s"] > 0 and s["maxrss_mib"] > 0 and s["faults"] >= 0 for s in steps)
    losses = [s["loss"] for s in steps]
    # the same synthetic batch every step: the first loss is ~ln(vocab) and training on it
    # brings the loss down
    assert math.isclose(losses[0], math.log(cfg.model.vocab_size), rel_tol=0.1)
    assert losses[-1] < losses[0] - 0.05
