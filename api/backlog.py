"""Admission of new payments by the deployment's backlog.

Starting a run costs the API little, so under a storm the API used to start every
payment it was sent: in the 10,000-request benchmark 5,000 runs were open at once,
five times the worker's workflow cache, and each of their workflow tasks rebuilt
its run from history in a fresh sandbox (worker CPU per payment 99 ms, against
60 ms when the backlog fit). Payments are not made faster by starting more of them
than the workers can hold.

So a new payment is admitted only while the payments in flight (ledger rows still
``processing``, every API process's) are under a limit. A request that finds no room
waits, first come first served, for as long as it was going to wait for its outcome
anyway; if no room comes it is answered 503 with a ``Retry-After`` that grows with
the queue in front of it. Nothing has started for it then, so a retry with the same
key is safe. Duplicates, reads and refunds never queue here.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ledger.repositories import PaymentRepository

log = structlog.get_logger("api")

# How stale the count may be: a few reads a second per API process, each an index scan.
REFRESH_SECONDS = 0.25
# The admission rate that Retry-After divides the queue by is measured over this window.
RATE_WINDOW_SECONDS = 10.0
MAX_RETRY_AFTER_SECONDS = 60


class BacklogFull(Exception):
    """No room came within the request's wait; nothing was started for it."""

    def __init__(self, retry_after: int, queued: int) -> None:
        super().__init__(f"backlog full, {queued} waiting; retry after {retry_after} s")
        self.retry_after = retry_after
        self.queued = queued


class BacklogGate:
    """Per API process; the count it reads is the deployment's.

    ``limit`` 0 admits everything. Between two reads of the count, the requests this
    process admitted whose rows are not open yet are counted as in flight too, so a
    burst between reads cannot overshoot by more than the other processes' bursts.
    """

    def __init__(
        self,
        count_processing: Callable[[], Awaitable[int]],
        limit: int,
        *,
        refresh_seconds: float = REFRESH_SECONDS,
    ) -> None:
        self._count_processing = count_processing
        self._limit = limit
        self._refresh_seconds = refresh_seconds
        self._processing = 0
        self._read_at = -math.inf
        self._reading: asyncio.Task[None] | None = None
        self._admitted_not_open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Waiters neither admitted nor gone. Counted, not walked: a waiter that leaves
        # stays in the deque until it reaches the front, and when some 300 ran out of
        # wait in one turn, each 503 walked the whole deque to say how many were left.
        self._waiting = 0
        self._ticker: asyncio.Task[None] | None = None
        self._admissions: deque[float] = deque()

    @property
    def queued(self) -> int:
        return self._waiting

    @asynccontextmanager
    async def admission(
        self, wait_seconds: float, *, on_queued: Callable[[], None] | None = None
    ) -> AsyncIterator[None]:
        """Hold a place for one new payment until its row is open (the block's end).

        ``on_queued`` is called if the request has to queue for room. Raises
        ``BacklogFull`` if no place frees within ``wait_seconds``.
        """
        if self._limit <= 0:
            yield
            return
        await self._refresh(force=False)
        if not self._waiters and self._room() > 0:
            self._admit()
        else:
            if on_queued is not None:
                on_queued()
            await self._queue(wait_seconds)
        try:
            yield
        finally:
            self._admitted_not_open -= 1

    async def close(self) -> None:
        for task in (self._ticker, self._reading):
            if task is not None:
                task.cancel()
        for waiter in self._waiters:
            waiter.cancel()
        self._waiting = 0

    def _room(self) -> int:
        return self._limit - self._processing - self._admitted_not_open

    def _admit(self) -> None:
        self._admitted_not_open += 1
        self._admissions.append(time.monotonic())
        self._forget_old_admissions()  # bounded by the window's admissions

    def _forget_old_admissions(self) -> None:
        horizon = time.monotonic() - RATE_WINDOW_SECONDS
        while self._admissions and self._admissions[0] < horizon:
            self._admissions.popleft()

    def _admissions_per_second(self) -> float:
        """This process's admission rate over the last ``RATE_WINDOW_SECONDS``."""
        self._forget_old_admissions()
        return len(self._admissions) / RATE_WINDOW_SECONDS

    async def _queue(self, wait_seconds: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._waiting += 1
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._admit_waiters())
        try:
            await asyncio.wait({waiter}, timeout=max(wait_seconds, 0.0))
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._admitted_not_open -= 1  # admitted, but the request went away
            else:
                self._leave(waiter)
            raise
        if waiter.done():
            return  # _admit_waiters admitted it
        self._leave(waiter)
        queued = self.queued
        raise BacklogFull(self._retry_after(queued), queued)

    def _leave(self, waiter: asyncio.Future[None]) -> None:
        """A waiter gives up its place unadmitted."""
        if not waiter.done():
            self._waiting -= 1
        waiter.cancel()

    def _retry_after(self, queued: int) -> int:
        """The time the queue in front would take at this process's recent admission
        rate, spread by up to half again so the refused do not all come back at once."""
        per_second = self._admissions_per_second()
        estimate = (queued + 1) / per_second if per_second > 0 else MAX_RETRY_AFTER_SECONDS
        spread = estimate * random.uniform(1.0, 1.5)  # noqa: S311 — jitter, not a secret
        return max(1, min(MAX_RETRY_AFTER_SECONDS, math.ceil(spread)))

    async def _admit_waiters(self) -> None:
        while self._waiters:
            await asyncio.sleep(self._refresh_seconds)
            await self._refresh(force=True)
            room = self._room()
            while room > 0 and self._waiters:
                waiter = self._waiters.popleft()
                if waiter.done():
                    continue  # gave up or went away
                waiter.set_result(None)
                self._waiting -= 1
                self._admit()
                room -= 1
            while self._waiters and self._waiters[0].done():
                self._waiters.popleft()

    async def _refresh(self, *, force: bool) -> None:
        """Read the count unless it is fresh; concurrent callers share one read."""
        if not force and time.monotonic() - self._read_at < self._refresh_seconds:
            return
        if self._reading is None or self._reading.done():
            self._reading = asyncio.create_task(self._read())
        await asyncio.shield(self._reading)

    async def _read(self) -> None:
        try:
            self._processing = await self._count_processing()
        except Exception as exc:
            # Fail open: the request's own ledger reads answer 503 if the ledger is down.
            log.warning("backlog.count_failed", error=type(exc).__name__)
        # Rows opened since the last read are in the count now; only the ones still
        # being opened stay counted twice, which errs on the side of waiting.
        self._read_at = time.monotonic()


def processing_counter(sessions: async_sessionmaker[AsyncSession]) -> Callable[[], Awaitable[int]]:
    """The ledger's count of payments in flight, for ``BacklogGate``."""

    async def count() -> int:
        async with sessions() as session:
            return await PaymentRepository(session).count_processing()

    return count


class StartSlots:
    """At most ``limit`` starts of runs in flight at once in this process (0: no limit).

    The backlog gate admits in batches (every refresh frees room for many at once),
    and a batch of starts arriving together at a busy Temporal server takes seconds to
    be answered; a repeat of any of them waits that long for its payment's row. With
    the starts taken a few at a time each is answered quickly, and a request waiting
    for its slot has started nothing, so its repeats are answered 409 at once, as
    while it queues for room.
    """

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit) if limit > 0 else None
        self.waiting = 0

    @asynccontextmanager
    async def slot(
        self, wait_seconds: float, *, on_queued: Callable[[], None] | None = None
    ) -> AsyncIterator[None]:
        """Raises ``BacklogFull`` if no slot frees within ``wait_seconds``."""
        if self._slots is None:
            yield
            return
        if self._slots.locked() and on_queued is not None:
            on_queued()
        self.waiting += 1
        try:
            async with asyncio.timeout(max(wait_seconds, 0.0)):
                await self._slots.acquire()
        except TimeoutError:
            # A slot frees within one start's time: come back in a second.
            raise BacklogFull(1, self.waiting) from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()
