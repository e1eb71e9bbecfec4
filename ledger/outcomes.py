"""Outcome notifications: the ledger tells waiting API requests that a payment ended.

A duplicate of a payment that is still running has nothing to ask Temporal: the
ledger row proves the run exists, and the row's next change is the answer. So the
transactions that open a payment's row and record its outcome also send ``NOTIFY
payment_outcomes`` (delivered at commit, never for a rolled-back write), and each
API process keeps one
``LISTEN`` connection that wakes the requests waiting for that payment. Duplicates
then add no update, no workflow task and no history event to the run.

Notifications are a shortcut, not the source of truth: a waiter re-reads the row
when woken. A notification sent while the listener is away is lost, so every
(re)connection wakes every waiter to re-read, and waiters poll on their own only
while the listener is disconnected: in a storm of 1,000 waiting requests a 1 s
safety poll was 1,000 queries a second against the API's connection pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator

import psycopg
import structlog

OUTCOME_CHANNEL = "payment_outcomes"
# The payload is the payment id, followed by this word when the row was just opened
# (without it: the outcome was recorded).
ROW_OPENED = "opened"


def row_opened_payload(payment_id: str) -> str:
    return f"{payment_id} {ROW_OPENED}"


class PaymentChanges:
    """One waiting request's view of a payment: ``changed`` is set when the payment's
    outcome is recorded, and when its row is opened while the waiter has no row yet."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.row_known = False


log = structlog.get_logger(__name__)


def libpq_url(database_url: str) -> str:
    """The URL psycopg itself takes (SQLAlchemy's driver suffix removed)."""
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql://" + database_url[len(prefix) :]
    return database_url


class OutcomeListener:
    """One LISTEN connection per process, fanned out to the requests that wait."""

    def __init__(self, database_url: str, *, reconnect_delay: float = 1.0) -> None:
        self._conninfo = libpq_url(database_url)
        self._reconnect_delay = reconnect_delay
        self._waiters: defaultdict[str, set[PaymentChanges]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="outcome-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.asynccontextmanager
    async def subscription(self, payment_id: str) -> AsyncIterator[PaymentChanges]:
        """``payment_id``'s changes as they are committed.

        Subscribe *before* reading the row, so a change committed in between is
        not missed.
        """
        changes = PaymentChanges()
        self._waiters[payment_id].add(changes)
        try:
            yield changes
        finally:
            waiting = self._waiters.get(payment_id)
            if waiting is not None:
                waiting.discard(changes)
                if not waiting:
                    del self._waiters[payment_id]

    def _wake_everyone(self) -> None:
        for waiting in self._waiters.values():
            for changes in waiting:
                changes.changed.set()

    async def _listen_forever(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as connection:
                    await connection.execute(f"LISTEN {OUTCOME_CHANNEL}")
                    self.connected.set()
                    # Whatever was committed while we were away was never announced.
                    self._wake_everyone()
                    async for notification in connection.notifies():
                        payment_id, _, kind = notification.payload.partition(" ")
                        for changes in self._waiters.get(payment_id, ()):
                            # A waiter that has the row already only waits for the outcome.
                            if kind != ROW_OPENED or not changes.row_known:
                                changes.changed.set()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                log.warning("outcome_listener.disconnected", error=str(exc))
            self.connected.clear()
            # Whoever waits while we are away relies on its own polling.
            await asyncio.sleep(self._reconnect_delay)
