"""API key → client. Keys are looked up by their SHA-256; a short in-process cache
keeps the hot path off the database."""

from __future__ import annotations

import time

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.credentials import hash_api_key
from api.problems import database_unavailable, unauthorized
from ledger.repositories import ClientIdentity, ClientRepository


class ApiKeyAuthenticator:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], cache_seconds: float) -> None:
        self._sessions = sessions
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, ClientIdentity]] = {}

    async def authenticate(self, authorization: str | None) -> ClientIdentity:
        scheme, _, api_key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not api_key.strip():
            raise unauthorized()
        key_hash = hash_api_key(api_key.strip())
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            async with self._sessions() as session:
                identity = await ClientRepository(session).identity_for_key_hash(key_hash)
        except (OperationalError, DBAPIError) as exc:
            raise database_unavailable() from exc
        if identity is None:
            raise unauthorized()
        self._cache[key_hash] = (now + self._cache_seconds, identity)
        return identity
