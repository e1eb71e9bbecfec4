"""API key → client.

Keys are 256 random bits behind a readable ``sk_`` prefix (admin/credentials.py)
and stored as their SHA-256 only. A request's key is hashed and looked up by hash,
so the database index never sees the key itself; the stored hash is then compared
in constant time. Missing, unknown and revoked keys get the same 401. A short
in-process cache keeps the hot path off the database: a revoked key is refused by
every API process within ``cache_seconds`` (PAYMENTS_API_KEY_CACHE_SECONDS).
A lookup is one statement on the API's read pool (``ledger.reads.PooledApiKeyReads``).
Requests that miss the cache together share one lookup: at the start of a storm
1,000 requests with the same key were 1,000 queries waiting for the connection pool.
An entry is looked up again in the background once half its time has passed, and
served meanwhile, so a busy client's requests never all wait on the database at once
when it expires; a key revoked meanwhile is still refused within ``cache_seconds``.
The key is never logged, nor is its hash.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable

import structlog
from sqlalchemy.exc import DBAPIError, OperationalError

from admin.credentials import API_KEY_PREFIX, hash_api_key
from api.problems import database_unavailable, unauthorized
from ledger.reads import DATABASE_ERRORS, MIRROR_BATCH, ApiKeyReads
from ledger.repositories import ApiKeyRecord, ClientIdentity

log = structlog.get_logger("api")

# Longer than any key we issue; anything longer is refused without hashing it.
MAX_KEY_LENGTH = 200
# Lookups started ahead of a request's admission, at once, by default; the app passes
# the connections its read pool keeps open (PAYMENTS_DATABASE_READ_POOL_MIN_SIZE).
MAX_PREFETCHES = 8


def _key_hash(authorization: str | None) -> str | None:
    """The hash of the bearer key, or None for a header that cannot hold one of ours."""
    scheme, _, api_key = (authorization or "").partition(" ")
    api_key = api_key.strip()
    if (
        scheme.lower() != "bearer"
        or not api_key.startswith(API_KEY_PREFIX)
        or len(api_key) > MAX_KEY_LENGTH
    ):
        return None
    return hash_api_key(api_key)


class ApiKeyAuthenticator:
    def __init__(
        self,
        keys: ApiKeyReads,
        cache_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_prefetches: int = MAX_PREFETCHES,
    ) -> None:
        self._keys = keys
        self._max_prefetches = max_prefetches
        self._cache_seconds = cache_seconds
        self._clock = clock
        # key hash -> (expires at, refresh from, identity)
        self._cache: dict[str, tuple[float, float, ClientIdentity]] = {}
        self._lookups: dict[str, asyncio.Future[ClientIdentity | None]] = {}
        self._prefetching = 0
        self._mirror_full_logged = False

    async def authenticate(self, authorization: str | None) -> ClientIdentity:
        key_hash = _key_hash(authorization)
        if key_hash is None:
            raise unauthorized()
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            _, refresh_from, identity = cached
            if refresh_from <= now and key_hash not in self._lookups:
                self._start_lookup(key_hash, now)  # not awaited: the entry still stands
            return identity
        lookup = self._lookups.get(key_hash)
        if lookup is None:
            lookup = self._start_lookup(key_hash, now)
        # Shielded: one waiting request giving up must not cancel the others' lookup.
        found = await asyncio.shield(lookup)
        if found is None:
            raise unauthorized()
        return found

    async def mirror_active_keys(self, max_keys: int) -> None:
        """Every active key (the newest ``max_keys``) into the cache, as a lookup of each
        would put it there; entries past their time leave it. A database error is logged
        and the cache left as it is: its entries still expire on time."""
        if self._cache_seconds <= 0 or max_keys <= 0:
            return
        try:
            records = await self._keys.active_keys(max_keys)
        except (OperationalError, DBAPIError, *DATABASE_ERRORS) as exc:
            log.warning("api.key_mirror_failed", error=type(exc).__name__)
            return
        now = self._clock()
        for key_hash in [h for h, (expires, _, _) in self._cache.items() if expires <= now]:
            del self._cache[key_hash]
        for done, record in enumerate(records, 1):
            if record.revoked_at is None:
                self._remember(record, now)
            if done % MIRROR_BATCH == 0:
                # The requests waiting on the loop go first: caching 10,000 keys at once
                # held it for 9 ms every reload.
                await asyncio.sleep(0)
        if len(records) >= max_keys and not self._mirror_full_logged:
            self._mirror_full_logged = True
            log.warning("api.key_mirror_full", max_keys=max_keys)

    async def keep_mirrored(self, max_keys: int) -> None:
        """Runs for the app's lifetime: ``mirror_active_keys`` every third of the cache
        period, so a client's requests find its key in memory from the first, even in a
        process that has just started (at a storm's start, 1,000 requests waited for
        their clients' first lookups, answered only after the loop's 50 ms turns). A
        revoked key leaves the next reload, and is refused once its entry expires:
        within ``cache_seconds``, as before. A key newer than the last reload is looked
        up on its first request. The first load is the caller's (the app awaits one at
        start, before its first request); a reload that fails in a way nobody foresaw
        is logged and the next one tried, so the mirror never stops for good."""
        while self._cache_seconds > 0 and max_keys > 0:
            await asyncio.sleep(self._cache_seconds / 3)
            try:
                await self.mirror_active_keys(max_keys)
            except Exception:
                log.exception("api.key_mirror_reload_failed")

    def prefetch(self, authorization: str | None) -> None:
        """Start the lookup a request will need, without waiting for it: for a request
        that waits in the admission line before it is authenticated. At a storm's start
        a client's first lookup otherwise began only when its first repeat or admitted
        request came, up to 50 ms in, and its repeats' 409s waited for it. At most
        ``max_prefetches`` run at once, so made-up keys cannot crowd the read pool."""
        key_hash = _key_hash(authorization)
        if key_hash is None or key_hash in self._lookups:
            return
        now = self._clock()
        cached = self._cache.get(key_hash)
        if (cached is not None and cached[0] > now) or self._prefetching >= self._max_prefetches:
            return
        self._prefetching += 1
        self._start_lookup(key_hash, now).add_done_callback(self._prefetch_finished)

    def _prefetch_finished(self, _: asyncio.Future[ClientIdentity | None]) -> None:
        self._prefetching -= 1

    def _start_lookup(self, key_hash: str, now: float) -> asyncio.Future[ClientIdentity | None]:
        lookup = asyncio.ensure_future(self._lookup(key_hash, now))
        self._lookups[key_hash] = lookup
        lookup.add_done_callback(lambda done: self._lookup_finished(key_hash, done))
        return lookup

    def _lookup_finished(self, key_hash: str, done: asyncio.Future[ClientIdentity | None]) -> None:
        self._lookups.pop(key_hash, None)
        if not done.cancelled():
            done.exception()  # read here too: every waiter may have gone

    async def _lookup(self, key_hash: str, now: float) -> ClientIdentity | None:
        try:
            record = await self._keys.key_for_hash(key_hash)
        except (OperationalError, DBAPIError, *DATABASE_ERRORS) as exc:
            raise database_unavailable(exc) from exc
        if (
            record is None
            or record.revoked_at is not None
            or not hmac.compare_digest(record.key_hash, key_hash)
        ):
            self._cache.pop(key_hash, None)
            return None
        return self._remember(record, now)

    def _remember(self, record: ApiKeyRecord, now: float) -> ClientIdentity:
        identity = ClientIdentity(client_id=record.client_id, name=record.client_name)
        if self._cache_seconds > 0:
            self._cache[record.key_hash] = (
                now + self._cache_seconds,
                now + self._cache_seconds / 2,
                identity,
            )
        return identity
