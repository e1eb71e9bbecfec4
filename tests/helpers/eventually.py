"""Wait for something that becomes true eventually (as sdk-python's tests/helpers do)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")


@overload
async def wait_until(
    probe: Callable[[], Awaitable[T]], *, within: float = ..., interval: float = ...
) -> T: ...


@overload
async def wait_until(
    probe: Callable[[], T], *, within: float = ..., interval: float = ...
) -> T: ...


async def wait_until(
    probe: Callable[[], object], *, within: float = 10.0, interval: float = 0.1
) -> object:
    """Return the probe's first truthy result; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s (last: {result!r})")
        await asyncio.sleep(interval)
