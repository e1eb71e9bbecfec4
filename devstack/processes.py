"""A supervised child process: its own process group, killed with us, output
prefixed in the terminal or kept in a log file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1
MAX_NICE = 19


class ServiceFailed(RuntimeError):
    """A service exited or never became ready; the message carries its last output."""


def die_with_parent() -> None:
    # The kernel sends SIGKILL to the child if the thread that spawned it dies, so
    # nothing outlives a crashed `make run`, test session or benchmark.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def lower_priority(nice: int) -> None:
    """Run the calling process's threads, and the ones it starts, at ``nice``.

    Called in a child that has just started its own session: where the kernel groups
    CPU time by session (autogroup, the default of most Linux distributions), a nice
    value weighs only against the session's own threads, so the session's is set too.
    """
    if nice <= 0:
        return
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as autogroup:
        autogroup.write(str(nice))


def nice_value(text: str) -> int:
    """``--background-nice``'s type: the range Linux takes, said at once, not clamped."""
    value = int(text)
    if not 0 <= value <= MAX_NICE:
        raise argparse.ArgumentTypeError(f"{value} is not a nice value from 0 to {MAX_NICE}")
    return value


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
        user: str | None = None,
        echo: bool = False,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.nice = nice
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = log_path
        self.user = user
        self.echo = echo
        self._process: subprocess.Popen[bytes] | None = None
        self._recent: deque[str] = deque(maxlen=60)
        self._log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self.log_path.open("ab")
        self._recent.clear()
        # Called from the event-loop thread, which lives as long as the stack: the
        # parent-death signal fires when the spawning *thread* exits.
        self._process = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self._prepare_child,
            user=self.user,
        )
        threading.Thread(
            target=self._pump, args=(self._process,), name=f"pump-{self.name}", daemon=True
        ).start()

    def _prepare_child(self) -> None:
        # In the child, after its new session began (subprocess calls setsid first).
        die_with_parent()
        lower_priority(self.nice)

    def _pump(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        prefix = f"{self.name:>9} | ".encode()
        for line in iter(process.stdout.readline, b""):
            self._recent.append(line.decode(errors="replace").rstrip())
            if self._log_file is not None:
                self._log_file.write(line)
                self._log_file.flush()
            if self.echo:
                sys.stdout.buffer.write(prefix + line)
                sys.stdout.buffer.flush()

    def tail(self, lines: int = 30) -> str:
        return "\n".join(list(self._recent)[-lines:])

    async def wait_ready(
        self, check: Callable[[], Awaitable[bool]], *, within: float, what: str
    ) -> float:
        """Poll ``check`` until it passes; fail fast if the process exits. Returns seconds."""
        started = time.monotonic()
        while True:
            if not self.running:
                raise ServiceFailed(
                    f"{self.name} exited with code {self.returncode} before {what}.\n"
                    f"Last output:\n{self.tail()}"
                )
            try:
                if await check():
                    return time.monotonic() - started
            except Exception:  # noqa: S110 - not ready yet; the deadline decides
                pass
            if time.monotonic() - started > within:
                raise ServiceFailed(
                    f"{self.name} did not become ready ({what}) within {within:.0f} s.\n"
                    f"Last output:\n{self.tail()}"
                )
            await asyncio.sleep(0.1)

    def send_signal(self, signum: int) -> None:
        if self._process is not None and self.running:
            os.killpg(self._process.pid, signum)

    async def terminate(self, grace: float = 15.0, signum: int = signal.SIGTERM) -> None:
        """Ask politely (SIGTERM by default), then SIGKILL after ``grace`` seconds."""
        if self._process is None:
            return
        if self.running:
            self.send_signal(signum)
            deadline = time.monotonic() + grace
            while self.running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        await self.kill()

    async def kill(self) -> None:
        if self._process is None:
            return
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        while self._process.poll() is None:
            await asyncio.sleep(0.02)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
