"""The API's idempotency reads: a payment by key or by id, as plain prepared SQL; and
the one read every request may wait on, its API key by hash.

Every request to ``POST /v1/payments`` reads the payment by key at least once (a
duplicate of a finished payment reads nothing else), and a waiting request re-reads
it on each change. Through an ORM session one such read cost the API 2.3-2.6 ms of
CPU (session, unit of work, statement caching, row-to-object mapping); the same
two statements on a pooled psycopg connection cost 0.55 ms (measured side by side,
50 at once, a succeeded payment with its refunds). Under the storm the API's CPU is
the scarce thing, so these reads skip the ORM (as the payment path's writes do:
``payment_sql``).

Reads by key are also batched: the keys asked for during one turn of the event loop
are read with one statement on one connection. Under the storm a read holds its
connection for a turn of a busy loop (60-125 ms measured), not for its time in
PostgreSQL, so one read per connection capped the API at about 200 reads a second
with 20 connections, and the rest queued (docs/scaling.md).

``SessionPaymentReads`` answers the same through the repositories, for callers that
only have a session factory (tests, tools); ``tests/ledger/test_reads.py`` holds the
two to the same answers.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Protocol

import psycopg
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.payments import Payment, PaymentStatus
from ledger.mapping import StoredPayment, payment_to_domain, refund_to_domain
from ledger.outcomes import libpq_url
from ledger.payment_sql import payment_with_refunds
from ledger.repositories import ApiKeyRecord, ClientRepository, PaymentRepository, key_record

# The columns ``Payment`` and ``StoredPayment`` need, and nothing else, for many keys
# at once. The two ANY conditions let the unique index on (client_id, idempotency_key)
# find the rows (a join with unnest() of the pairs was planned as a sequential scan);
# the pair condition keeps each key scoped to its own client (client ids have no space).
_BY_KEYS = (
    "SELECT id, client_id, idempotency_key, request_fingerprint, origin_request_id, amount, "
    "currency, description, metadata AS metadata_, status, failure_code, failure_message, "
    "provider_charge_id, created_at, updated_at, version "
    "FROM payments WHERE client_id = ANY(%s::text[]) AND idempotency_key = ANY(%s::text[]) "
    "AND client_id || ' ' || idempotency_key = ANY(%s::text[])"
)
_BY_ID = (
    "SELECT id, client_id, idempotency_key, request_fingerprint, origin_request_id, amount, "
    "currency, description, metadata AS metadata_, status, failure_code, failure_message, "
    "provider_charge_id, created_at, updated_at, version "
    "FROM payments WHERE id = %s AND client_id = %s"
)
_REFUNDS_OF = (
    "SELECT id, payment_id, idempotency_key, status, amount, currency, reason, failure_code, "
    "failure_message, provider_refund_id, created_at, updated_at "
    "FROM refunds WHERE payment_id = ANY(%s::text[]) ORDER BY payment_id, created_at, id"
)
_KEY_COLUMNS = (
    "SELECT k.id, k.client_id, c.name AS client_name, k.key_hash, k.display_prefix, k.created_at, "
    "k.revoked_at FROM api_keys k JOIN api_clients c ON c.id = k.client_id "
)
_KEY_BY_HASH = _KEY_COLUMNS + "WHERE k.key_hash = %s"
_ACTIVE_KEYS = _KEY_COLUMNS + "WHERE k.revoked_at IS NULL ORDER BY k.created_at DESC, k.id LIMIT %s"
# API keys read and mapped per turn of the loop (PooledApiKeyReads.active_keys).
MIRROR_BATCH = 256
# Keys read by one statement at most; more waiting start the next batch at once.
BATCH_LIMIT = 256
# (client id, key) asked for, each with the futures of the requests that asked.
_Askers = dict[tuple[str, str], list[asyncio.Future[StoredPayment | None]]]

# What a read raises when PostgreSQL is away or the pool has no connection in time
# (psycopg_pool.PoolTimeout is an OperationalError): the API answers 503.
DATABASE_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


class PaymentReads(Protocol):
    async def by_key(self, client_id: str, idempotency_key: str) -> StoredPayment | None: ...

    async def by_id(self, client_id: str, payment_id: str) -> Payment | None: ...


class PooledPaymentReads:
    """Autocommit connections of the API process's own small pool: one round trip
    per statement, no BEGIN/ROLLBACK (under READ COMMITTED each statement has its own
    snapshot anyway). No locking reads; the one write lent the pool is a single
    statement too (``pool``)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        *,
        batch_limit: int = BATCH_LIMIT,
    ) -> None:
        self._pool = pool
        self._batch_limit = batch_limit
        # Keys asked for and not yet taken by a batch.
        self._asked: _Askers = {}
        # The batch still waiting for a connection: new keys join it.
        self._gathering: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    @classmethod
    def create(
        cls,
        database_url: str,
        *,
        size: int,
        timeout: float,
        min_size: int = 1,
        batch_limit: int = BATCH_LIMIT,
    ) -> PooledPaymentReads:
        """Not connected yet: ``open`` in the app's lifespan, which opens ``min_size``
        connections in the background and grows to ``size`` on demand, so the API
        starts (and answers 503) while PostgreSQL is down."""
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            libpq_url(database_url),
            connection_class=psycopg.AsyncConnection[Any],
            kwargs={"autocommit": True, "row_factory": namedtuple_row},
            min_size=min(min_size, size),
            max_size=size,
            timeout=timeout,
            name="api-reads",
            open=False,
        )
        return cls(pool, batch_limit=batch_limit)

    async def open(self) -> None:
        await self._pool.open(wait=False)

    @property
    def pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        """Also lent to the API's one write on the idempotency path, opening a payment's
        row (``ledger.payment_sql``): a single autocommit statement, as a read is."""
        return self._pool

    async def close(self) -> None:
        for batch in list(self._batches):
            batch.cancel()
        await asyncio.gather(*self._batches, return_exceptions=True)
        await self._pool.close()

    def load(self) -> tuple[int, int]:
        """(connections lent out or being opened, batches or reads by id waiting for
        one)."""
        stats = self._pool.get_stats()
        in_use = stats.get("pool_size", 0) - stats.get("pool_available", 0)
        return in_use, stats.get("requests_waiting", 0)

    async def by_key(self, client_id: str, idempotency_key: str) -> StoredPayment | None:
        """Joins the batch being gathered (or starts one); raises what the batch's read
        raised, a ``DATABASE_ERRORS`` when PostgreSQL or a connection is not there."""
        answer: asyncio.Future[StoredPayment | None] = asyncio.get_running_loop().create_future()
        self._asked.setdefault((client_id, idempotency_key), []).append(answer)
        if self._gathering is None:
            self._start_batch()
        return await answer

    def _start_batch(self) -> None:
        batch = asyncio.create_task(self._read_batch(), name="api-reads-batch")
        self._gathering = batch
        self._batches.add(batch)
        batch.add_done_callback(self._batches.discard)

    def _take_asked(self) -> _Askers:
        """The keys for this batch; past the limit the rest start the next batch."""
        self._gathering = None
        if len(self._asked) <= self._batch_limit:
            taken, self._asked = self._asked, {}
            return taken
        keys = list(self._asked)[: self._batch_limit]
        taken = {key: self._asked.pop(key) for key in keys}
        self._start_batch()
        return taken

    async def _read_batch(self) -> None:
        taken: _Askers | None = None
        try:
            async with self._pool.connection() as conn:
                # Everything asked for while this batch waited for its connection.
                taken = self._take_asked()
                found = await self._read_keys(conn, list(taken))
        except BaseException as exc:
            # No connection in time, PostgreSQL away, or the API stopping: every asker
            # of this batch learns it.
            for answers in (self._take_asked() if taken is None else taken).values():
                for answer in answers:
                    if answer.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        answer.cancel()
                    else:
                        answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for key, answers in taken.items():
            for answer in answers:
                if not answer.done():  # an asker cancelled meanwhile
                    answer.set_result(found.get(key))

    async def _read_keys(
        self, conn: psycopg.AsyncConnection[Any], keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], StoredPayment]:
        clients = list({client_id for client_id, _ in keys})
        pairs = [f"{client_id} {key}" for client_id, key in keys]
        cursor = await conn.execute(
            _BY_KEYS, (clients, [key for _, key in keys], pairs), prepare=True
        )
        rows = await cursor.fetchall()
        # Only a succeeded payment takes refunds, as in PaymentRepository.
        succeeded = [row.id for row in rows if row.status == PaymentStatus.SUCCEEDED.value]
        refunds: defaultdict[str, list[Any]] = defaultdict(list)
        if succeeded:
            cursor = await conn.execute(_REFUNDS_OF, (succeeded,), prepare=True)
            for refund in await cursor.fetchall():
                refunds[refund.payment_id].append(refund_to_domain(refund))
        return {
            (row.client_id, row.idempotency_key): StoredPayment(
                payment_to_domain(row, refunds[row.id]),
                row.request_fingerprint,
                row.origin_request_id,
            )
            for row in rows
        }

    async def by_id(self, client_id: str, payment_id: str) -> Payment | None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_BY_ID, (payment_id, client_id), prepare=True)
            row = await cursor.fetchone()
            return None if row is None else await payment_with_refunds(conn, row)


class ApiKeyReads(Protocol):
    async def key_for_hash(self, key_hash: str) -> ApiKeyRecord | None: ...

    async def active_keys(self, limit: int) -> list[ApiKeyRecord]:
        """Keys not revoked, the newest ``limit``, with their clients' names."""
        ...


class PooledApiKeyReads:
    """An API key by its hash on the read pool, for the authenticator's cache misses:
    one round trip, and not prepared (a key is looked up once per cache period).

    Every request of a client waits for its key's lookup, repeats included. At a
    storm's start, when the loop takes 20-25 ms a turn to read 1,000 requests, the
    first lookups through a session (a pool checkout, the autocommit setting, then the
    query, each a turn) ended 58-85 ms after they began; on this pool the first ends
    after about 50 ms."""

    def __init__(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]]) -> None:
        self._pool = pool

    async def key_for_hash(self, key_hash: str) -> ApiKeyRecord | None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_KEY_BY_HASH, (key_hash,), prepare=False)
            row = await cursor.fetchone()
        return None if row is None else key_record(row, row.client_name)

    async def active_keys(self, limit: int) -> list[ApiKeyRecord]:
        """Read and mapped MIRROR_BATCH rows a turn: mapping 10,000 at once held the
        API's event loop for 32 ms."""
        records: list[ApiKeyRecord] = []
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_ACTIVE_KEYS, (limit,), prepare=False)
            while rows := await cursor.fetchmany(MIRROR_BATCH):
                records.extend(key_record(row, row.client_name) for row in rows)
                await asyncio.sleep(0)
        return records


class SessionApiKeyReads:
    """The same through ``ClientRepository`` and a session factory."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def key_for_hash(self, key_hash: str) -> ApiKeyRecord | None:
        async with self._sessions() as session:
            return await ClientRepository(session).key_for_hash(key_hash)

    async def active_keys(self, limit: int) -> list[ApiKeyRecord]:
        async with self._sessions() as session:
            return await ClientRepository(session).active_keys(limit)


class SessionPaymentReads:
    """The same reads through the repositories and a session factory."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def by_key(self, client_id: str, idempotency_key: str) -> StoredPayment | None:
        async with self._sessions() as session:
            return await PaymentRepository(session).get_by_key(client_id, idempotency_key)

    async def by_id(self, client_id: str, payment_id: str) -> Payment | None:
        async with self._sessions() as session:
            return await PaymentRepository(session).get(client_id, payment_id)
