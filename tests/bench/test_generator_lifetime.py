"""A load generator never outlives the benchmark that spawned it: one left behind
would go on loading the machine and skew the next run's figures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

_BENCH = """
import multiprocessing, sys, time
from tests.bench.test_generator_lifetime import generator

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=generator)
    child.start()
    print(child.pid, flush=True)
    time.sleep(120)
"""


def generator() -> None:
    """Stands for a generator's entry point: binds itself, then keeps loading."""
    from bench.loadgen import bind_to_bench

    bind_to_bench()
    print("bound", flush=True)  # the benchmark's stdout, inherited
    time.sleep(120)


def _ends(process: psutil.Process, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by init
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_generator_dies_when_the_benchmark_is_terminated() -> None:
    root = Path(__file__).resolve().parents[2]
    bench = subprocess.Popen(
        [sys.executable, "-c", _BENCH], cwd=root, stdout=subprocess.PIPE, text=True
    )
    generator_pid = 0
    try:
        assert bench.stdout is not None
        generator_pid = int(bench.stdout.readline())
        generator_process = psutil.Process(generator_pid)
        assert bench.stdout.readline() == "bound\n"
        bench.send_signal(signal.SIGTERM)  # what `kill` or a CI timeout sends
        bench.wait(timeout=10)
        assert _ends(generator_process, within=10)
    finally:
        bench.kill()
        bench.wait()
        if generator_pid and psutil.pid_exists(generator_pid):
            os.kill(generator_pid, signal.SIGKILL)
