"""API key → client.

Keys are 256 random bits behind a readable ``sk_`` prefix (admin/credentials.py)
and stored as their SHA-256 only. A request's key is hashed and looked up by hash,
so the database index never sees the key itself; the stored hash is then compared
in constant time. Missing, unknown and revoked keys get the same 401.

Every active key lives in memory (the mirror, reloaded every third of
``cache_seconds``, PAYMENTS_API_KEY_CACHE_SECONDS): a revoked key is refused by every
API process within ``cache_seconds``. While the mirror holds every active key, a key
it does not know costs no lookup of its own: it is either made up or newer than the
last reload, so the requests with such keys share one read of the newest keys, at
most one every ``NEWEST_KEYS_INTERVAL`` seconds. A flood of made-up keys is then a few
reads a second on one connection, and a key created a moment ago works on its first
request, which waits at most that interval plus the read. Only while the mirror
cannot hold every key (more than PAYMENTS_API_KEY_MIRROR_SIZE, or its last reload
failed) is a missing key looked up by hash, ``max_lookups`` at once at most, so the
read pool's other connections stay with the idempotency reads.

Requests that miss together share one lookup; an entry is looked up again in the
background once half its time has passed, and served meanwhile. The key is never
logged, nor is its hash.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable

import structlog
from sqlalchemy.exc import DBAPIError, OperationalError

from admin.credentials import API_KEY_PREFIX, hash_api_key
from api.metrics import API_KEY_READS
from api.problems import database_unavailable, unauthorized
from ledger.reads import DATABASE_ERRORS, MIRROR_BATCH, ApiKeyReads
from ledger.repositories import ApiKeyRecord, ClientIdentity

log = structlog.get_logger("api")

# Longer than any key we issue; anything longer is refused without hashing it.
MAX_KEY_LENGTH = 200
# Lookups by hash at once (prefetches included), by default; the app passes a share of
# its read pool.
MAX_LOOKUPS = 8
# A key the complete mirror does not know waits for a read of the newest keys; reads
# start at most this often, whatever the number of unknown keys.
NEWEST_KEYS_INTERVAL = 0.1
# How many of the newest keys that read brings. When all of them are new to memory,
# more may be missing, and the whole mirror is reloaded.
NEWEST_KEYS = 64


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
        max_lookups: int = MAX_LOOKUPS,
    ) -> None:
        self._keys = keys
        self._max_lookups = max_lookups
        self._lookup_slots = asyncio.Semaphore(max_lookups)
        self._cache_seconds = cache_seconds
        self._clock = clock
        # key hash -> (expires at, refresh from, identity)
        self._cache: dict[str, tuple[float, float, ClientIdentity]] = {}
        self._lookups: dict[str, asyncio.Future[ClientIdentity | None]] = {}
        self._prefetching = 0
        self._mirror_full_logged = False
        self._mirror_size = 0
        # Until then the mirror holds every active key (its last load was complete).
        self._complete_until = float("-inf")
        self._newest_read: asyncio.Future[None] | None = None
        self._newest_reads_begun = 0
        self._newest_reads_ended = 0
        self._newest_read_at = float("-inf")

    async def authenticate(self, authorization: str | None) -> ClientIdentity:
        key_hash = _key_hash(authorization)
        if key_hash is None:
            raise unauthorized()
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            _, refresh_from, identity = cached
            if refresh_from <= now and key_hash not in self._lookups and not self._complete(now):
                self._start_lookup(key_hash, now)  # not awaited: the entry still stands
            return identity
        if self._complete(now):
            await self._newest_keys_read()
            cached = self._cache.get(key_hash)
            if cached is None or cached[0] <= self._clock():
                raise unauthorized()
            return cached[2]
        lookup = self._lookups.get(key_hash)
        if lookup is None:
            lookup = self._start_lookup(key_hash, now)
        # Shielded: one waiting request giving up must not cancel the others' lookup.
        found = await asyncio.shield(lookup)
        if found is None:
            raise unauthorized()
        return found

    def _complete(self, now: float) -> bool:
        return self._complete_until > now

    async def _newest_keys_read(self) -> None:
        """Returns once a read of the newest keys that began after this call has ended:
        one read for every request waiting, started at most every NEWEST_KEYS_INTERVAL."""
        wanted = self._newest_reads_begun + 1
        while self._newest_reads_ended < wanted:
            if self._newest_read is None:
                self._newest_read = asyncio.ensure_future(self._read_newest_keys())
            # Shielded: the read is every waiting request's, not this one's to cancel.
            await asyncio.shield(self._newest_read)

    async def _read_newest_keys(self) -> None:
        try:
            wait = self._newest_read_at + NEWEST_KEYS_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._newest_read_at = time.monotonic()
            self._newest_reads_begun += 1
            this_read = self._newest_reads_begun
            now = self._clock()
            API_KEY_READS.labels("newest").inc()
            try:
                records = await self._keys.active_keys(NEWEST_KEYS)
            except (OperationalError, DBAPIError, *DATABASE_ERRORS) as exc:
                raise database_unavailable(exc) from exc
            unknown = sum(record.key_hash not in self._cache for record in records)
            for record in records:
                self._remember(record, now)
            if unknown >= NEWEST_KEYS:
                await self.mirror_active_keys(self._mirror_size)
            self._newest_reads_ended = this_read
        finally:
            self._newest_read = None

    async def mirror_active_keys(self, max_keys: int) -> None:
        """Every active key (the newest ``max_keys``) into the cache, as a lookup of each
        would put it there; entries past their time leave it. A database error is logged
        and the cache left as it is: its entries still expire on time."""
        if self._cache_seconds <= 0 or max_keys <= 0:
            return
        self._mirror_size = max_keys
        began = self._clock()
        API_KEY_READS.labels("mirror").inc()
        try:
            records = await self._keys.active_keys(max_keys)
        except (OperationalError, DBAPIError, *DATABASE_ERRORS) as exc:
            log.warning("api.key_mirror_failed", error=type(exc).__name__)
            return
        # Every active key as of ``began``; the newest keys' reads add those created since.
        self._complete_until = began + self._cache_seconds if len(records) < max_keys else 0.0
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
        request came, up to 50 ms in, and its repeats' 409s waited for it. Nothing to
        start while the mirror holds every key; otherwise at most ``max_lookups`` run at
        once, so made-up keys cannot crowd the read pool."""
        key_hash = _key_hash(authorization)
        if key_hash is None or key_hash in self._lookups:
            return
        now = self._clock()
        cached = self._cache.get(key_hash)
        if (
            (cached is not None and cached[0] > now)
            or self._complete(now)
            or self._prefetching >= self._max_lookups
        ):
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
            async with self._lookup_slots:
                API_KEY_READS.labels("by_hash").inc()
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
