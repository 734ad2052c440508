"""Runs one command as N cooperating JAX processes on this machine (jax.distributed).

    python scripts/launch_local.py --num-processes 2 --devices-per-process 2 -- \
        jaxformer train experiments/gpt_tiny.py --set mesh.preset=fsdp

Each process gets ``--coordinator localhost:PORT --num-processes N --process-id I`` appended
and, on CPU, ``--devices-per-process`` fake devices (XLA's host-platform device count), so a
laptop can rehearse a multi-host job: the processes exchange data through gloo exactly as
hosts of a cluster would through the network. Process 0's output is shown; the others' go to
``--log-dir`` (default: a temporary directory). The exit status is the first non-zero one.

Signals go to the launcher, as a scheduler's would to a job: SIGTERM, SIGINT (Ctrl-C) and
SIGUSR1 are passed on to every process once (the processes run in their own session, so a
terminal's Ctrl-C does not reach them twice), and they save and stop (status 75) or save and go
on together. When a process fails any other way, the others are killed: they could not finish
a collective step without it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREEMPTED = 75  # a process that saved and stopped on a signal: the others do the same


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(command: list[str], num_processes: int, devices_per_process: int,
           log_dir: Path, port: int | None = None) -> int:
    """Starts the processes, waits for all, returns the job's exit status."""
    if command and command[0] == "jaxformer" and shutil.which("jaxformer") is None:
        command = [sys.executable, "-m", "jaxformer.cli", *command[1:]]
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i in range(num_processes):
        env = dict(os.environ)
        if devices_per_process:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_"
                                f"count={devices_per_process}").strip()
        args = [*command, "--coordinator", f"localhost:{port}",
                "--num-processes", str(num_processes), "--process-id", str(i)]
        out = None if i == 0 else open(log_dir / f"process_{i}.log", "a")  # noqa: SIM115
        logs.append(out)
        procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT
                                      if out else None, start_new_session=True))

    def forward(signum, frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0, PREEMPTED)]
            if failed:
                status = failed[0]
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.2)
        for p in procs:
            p.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for f in logs:
            if f is not None:
                f.close()
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="fake CPU devices per process (0: leave XLA_FLAGS alone)")
    parser.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    parser.add_argument("--log-dir", type=Path, help="where processes 1.. write their output")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the command, e.g. jaxformer train EXPERIMENT ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.num_processes < 1:
        parser.error("need --num-processes >= 1 and a command after --")
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="jaxformer_launch_"))
    status = launch(command, args.num_processes, args.devices_per_process, log_dir, args.port)
    if status and args.num_processes > 1:
        print(f"launch_local: exit status {status}; logs of processes 1.. in {log_dir}",
              file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
