"""Engine and session factory, built once per process by its entry point."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from config.settings import Settings


def create_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        settings.sqlalchemy_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        pool_timeout=settings.database_pool_timeout_seconds,
        # No ping before every checkout: it is one more round trip per query, and in
        # the storm every round trip holds a connection through a turn of a busy event
        # loop. A connection found dead raises a disconnect error instead, after which
        # SQLAlchemy discards the whole pool: the requests in flight answer 503 (safe
        # to retry) and activities retry, as they do for any database outage.
        pool_pre_ping=False,
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def autocommit_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for the API's plain reads: no BEGIN before the first statement and no
    ROLLBACK after the last, so a one-statement read is one round trip instead of
    three. Under a storm each round trip is a turn of the API's busy event loop with
    the connection checked out, and those turns, not PostgreSQL, emptied the pool.
    Reads lose nothing: under READ COMMITTED, PostgreSQL's default, every statement
    of a transaction takes its own snapshot anyway. Never for writes or locking reads."""
    return async_sessionmaker(
        engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
    )
