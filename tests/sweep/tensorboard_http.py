"""A real ``tensorboard`` server on a log dir, queried through its HTTP API (as its web page
does), for tests of what the HPARAMS tab shows."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tensorboard(logdir: Path) -> Iterator[str]:
    """``tensorboard --logdir logdir`` on 127.0.0.1 -> its base URL; stopped afterwards."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def poll(url: str, body: dict, ready: Callable[[dict], bool], tries: int = 60) -> dict:
    """``post`` until ``ready(answer)`` (the server starts, then loads the event files): at
    most ``tries`` attempts half a second apart; the last answer either way."""
    answer: dict = {}
    for _ in range(tries):
        try:
            answer = post(url, body)
            if ready(answer):
                return answer
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet
        time.sleep(0.5)
    return answer


def hparams_view(base_url: str, n_sessions: int) -> tuple[dict, dict]:
    """(the HPARAMS tab's experiment, its session groups) once ``n_sessions`` runs are in."""
    groups = poll(f"{base_url}/data/plugin/hparams/session_groups",
                  {"experimentName": "", "allowedStatuses": ALL_STATUSES, "colParams": [],
                   "startIndex": 0, "sliceSize": 100},
                  lambda a: a.get("totalSize", 0) >= n_sessions)
    experiment = poll(f"{base_url}/data/plugin/hparams/experiment", {"experimentName": ""},
                      lambda a: bool(a.get("hparamInfos")))
    return experiment, groups
