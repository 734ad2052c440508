"""``serve_steps``: the request/reply loop that interleaved benchmark scripts drive."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest

from jaxformer.train.bench import read_reply, request_step, serve_steps
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


# A stand-in worker speaking serve_steps' protocol: a facts line, then one numbered reply per
# request line, and it exits after two.
_FAKE_WORKER = """
import json, sys
print(json.dumps({"facts": 1}), flush=True)
for i, _ in zip(range(2), sys.stdin):
    print(json.dumps({"s": i}), flush=True)
"""


def test_client_reads_facts_then_one_reply_per_request():
    worker = subprocess.Popen([sys.executable, "-c", _FAKE_WORKER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert read_reply(worker) == {"facts": 1}
    assert [request_step(worker) for _ in range(2)] == [{"s": 0}, {"s": 1}]
    with pytest.raises(RuntimeError, match="exited with 0"):
        request_step(worker)  # the worker has gone: a clear error, not a JSON decode error
