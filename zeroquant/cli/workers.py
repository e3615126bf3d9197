"""`--workers N`: the same command in N local processes joined over gloo on the CPU (see zeroquant/distributed.py for
how they share the work). This process only starts them, waits, and exits with the code they share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import typer

from zeroquant.errors import UsageError


def run_in_workers(ctx: typer.Context, workers: int, device: str) -> None:
    """--workers N: the same command (the invocation's arguments, cli.app.Session) in N local processes over gloo;
    this process waits and exits with their code. Does nothing in a process that already belongs to a job
    (torchrun's, or one --workers started)."""
    if workers < 1:
        raise UsageError("--workers must be positive")
    if workers == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    if device == "cuda":
        raise UsageError("--workers starts local processes on the CPU", "on GPUs use torchrun --nproc-per-node N "
                                                                        "-m zeroquant ...")
    argv, skip = [], False
    for arg in ctx.find_root().obj.argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            argv.append(arg)
    raise typer.Exit(launch_local(argv, workers))


def launch_local(argv: list[str], workers: int) -> int:
    """Run `python -m zeroquant ARGV` in `workers` local processes joined over gloo; returns the exit code they
    share. Process 0 speaks for the job; if another one fails alone (out of memory, say), the others are stopped and
    its error is shown instead."""
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // workers)
    processes, logs = [], []
    for rank in range(workers):
        env = os.environ | {"WORLD_SIZE": str(workers), "RANK": str(rank), "LOCAL_RANK": str(rank),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}
        logs.append(None if rank == 0 else tempfile.TemporaryFile())
        streams = {} if rank == 0 else {"stdout": subprocess.DEVNULL, "stderr": logs[-1]}
        processes.append(subprocess.Popen([sys.executable, "-m", "zeroquant", *argv, "--device", "cpu"], env=env,
                                          **streams))
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = next((rank for rank, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                _stop(processes)
                if failed > 0 and processes[0].returncode in (None, 0, -15):  # process 0 did not say why
                    logs[failed].seek(0)
                    sys.stderr.write(logs[failed].read().decode(errors="replace"))
                return codes[failed]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except BaseException:
        _stop(processes)
        raise
    finally:
        for log in logs[1:]:
            log.close()


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
