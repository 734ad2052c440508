"""scripts/bench_worker.py: the request/reply loop that interleaved benchmark scripts drive,
loaded from its file as the scripts load it (a sibling module, not a package import)."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxformer.train.flops import flops_per_token
from tests.train.helpers import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def _load_bench_worker():
    spec = importlib.util.spec_from_file_location("bench_worker", SCRIPTS / "bench_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_worker = _load_bench_worker()


def test_serves_one_timed_step_per_request():
    cfg = tiny_config("train.lr=1e-2", "train.warmup_steps=0")
    replies = io.StringIO()
    bench_worker.serve_steps(cfg, warmup=0, requests=io.StringIO("\n" * 4), replies=replies)
    facts, *steps = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert facts["params"] > 0 and facts["compile_s"] > 0
    assert facts["flops_per_token"] == flops_per_token(cfg.model, cfg.data.seq_len)
    assert len(steps) == 4                          # one reply per request, no more
    assert all(s["s"] > 0 and s["maxrss_mib"] > 0 and type(s["faults"]) is int for s in steps)
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
    assert bench_worker.read_reply(worker) == {"facts": 1}
    assert [bench_worker.request_step(worker) for _ in range(2)] == [{"s": 0}, {"s": 1}]
    with pytest.raises(RuntimeError, match="exited with 0"):
        bench_worker.request_step(worker)  # the worker has gone: a clear error


def test_package_does_not_import_the_worker_protocol():
    """The protocol serves scripts only: nothing under jaxformer/ names it."""
    names = ("serve_steps", "read_reply", "request_step", "BENCHMARK_GPT", "bench_worker")
    offenders = [f"{path.relative_to(ROOT)}: {name}"
                 for path in (ROOT / "jaxformer").rglob("*.py")
                 for name in names if name in path.read_text()]
    assert offenders == []


def test_bench_malloc_script_drives_a_worker_process(tmp_path):
    """``python scripts/bench_malloc.py`` as a user runs it: the script and its worker
    subprocesses both import bench_worker as a sibling, and the round trips of the protocol
    come back as the JSON line, for glibc's defaults and for the run-time ``mallopt``."""
    sets = [arg for override in TINY for arg in ("--set", override)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_malloc.py"), "", "runtime", "--rounds", "2",
         "--experiment", str(ROOT / "experiments" / "gpt_tiny.py"), *sets],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rounds"] == 2 and result["overrides"] == TINY
    assert set(result["variants"]) == {"", "runtime"}
    for row in result["variants"].values():
        assert 0 < row["min_s"] <= row["median_s"] and row["maxrss_mib"] > 0
