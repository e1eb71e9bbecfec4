"""Supervised processes: a lower CPU priority reaches every thread of the child, and
its session's too where the kernel shares CPU time between sessions (autogroup)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.__main__ import parse as bench_parse
from devstack.__main__ import _parse as devstack_parse
from devstack.processes import ManagedProcess

# Kernels built without autogroup have only the per-thread nice value.
AUTOGROUP = os.path.exists("/proc/self/autogroup")

# The child reports its own nice value, that of a thread it starts, and its session's.
_REPORT = """
import os, threading
seen = []
thread = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
thread.start(); thread.join()
try:
    group = open("/proc/self/autogroup").read().split()[-1]
except OSError:
    group = "none"
print(os.getpriority(os.PRIO_PROCESS, 0), seen[0], group, os.getsid(0) == os.getpid())
"""


async def _report(nice: int, tmp_path: Path) -> list[str]:
    log = tmp_path / f"nice-{nice}.log"
    child = ManagedProcess("reporter", [sys.executable, "-c", _REPORT], log_path=log, nice=nice)
    child.start()
    try:
        async with asyncio.timeout(30):
            while len(fields := log.read_text().split()) < 4:
                await asyncio.sleep(0.05)
    finally:
        await child.kill()
    return fields


async def test_a_child_runs_at_its_nice_value_and_its_session_too(tmp_path: Path) -> None:
    main, thread, group, own_session = await _report(7, tmp_path)
    assert (main, thread, own_session) == ("7", "7", "True")
    if AUTOGROUP:
        assert group == "7"


async def test_a_child_without_a_nice_value_runs_as_its_parent(tmp_path: Path) -> None:
    main, thread, group, _ = await _report(0, tmp_path)
    ours = str(os.getpriority(os.PRIO_PROCESS, 0))
    assert (main, thread) == (ours, ours)
    if AUTOGROUP:
        assert group == "0"


@pytest.mark.parametrize("parse", [devstack_parse, bench_parse], ids=["make run", "bench"])
def test_a_nice_value_out_of_range_is_refused_by_name(
    parse: Callable[[list[str]], argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["run"] if parse is devstack_parse else []
    assert parse([*command, "--background-nice", "4"]).background_nice == 4
    with pytest.raises(SystemExit) as refused:
        parse([*command, "--background-nice", "20"])
    assert refused.value.code == 2
    assert "20 is not a nice value from 0 to 19" in capsys.readouterr().err
