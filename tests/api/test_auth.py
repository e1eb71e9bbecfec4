"""API keys: one 401 for every failure, revocation, constant-time check, never logged."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.credentials import hash_api_key
from admin.keys import create_key_async, revoke_key_async
from api.auth import NEWEST_KEYS, NEWEST_KEYS_INTERVAL, ApiKeyAuthenticator
from api.problems import Problem
from ledger.reads import MIRROR_BATCH, SessionApiKeyReads
from ledger.repositories import ApiKeyRecord
from tests.api.conftest import ApiFactory, bearer, store_payment

REPO_ROOT = Path(__file__).resolve().parents[2]


class CountingKeys(SessionApiKeyReads):
    """The repository's key lookups, each one's hash noted in ``looked_up``."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        super().__init__(sessions)
        self.looked_up: list[str] = []

    async def key_for_hash(self, key_hash: str) -> Any:
        self.looked_up.append(key_hash)
        return await super().key_for_hash(key_hash)


async def test_missing_unknown_malformed_and_revoked_keys_get_the_same_401(
    make_api: ApiFactory, new_client: Callable[..., Any], database_url: str
) -> None:
    revoked = await new_client("revoked")
    await revoke_key_async(database_url, api_key=revoked.api_key)
    attempts: list[dict[str, str]] = [
        {},
        bearer("sk_" + "A" * 43),
        bearer("not-even-a-key"),
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        bearer(revoked.api_key),
    ]
    async with make_api(api_key_cache_seconds=0) as http:
        responses = [await http.get("/v1/payments", headers=headers) for headers in attempts]

    for response in responses:
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.headers["content-type"] == "application/problem+json"
    assert len({r.content for r in responses}) == 1, "the reason is never revealed"
    assert responses[0].json()["type"] == "https://payments.example.com/problems/unauthorized"


async def test_a_key_revoked_with_the_admin_command_is_refused_at_the_next_request(
    make_api: ApiFactory, new_client: Callable[..., Any], database_url: str
) -> None:
    client = await new_client("to-revoke")
    env = {**os.environ, "DATABASE_URL": database_url}
    async with make_api(api_key_cache_seconds=0) as http:
        before = await http.get("/v1/payments", headers=bearer(client.api_key))
        listed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "admin", "list-keys", "--client-id", client.client_id],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        key_id = listed.stdout.split()[0]
        revoke = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "admin", "revoke-key", key_id],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        after = await http.get("/v1/payments", headers=bearer(client.api_key))

    assert before.status_code == 200
    assert key_id.startswith("key_")
    assert client.api_key not in listed.stdout, "lists show the prefix only"
    assert "active" in listed.stdout
    assert f"revoked {key_id}" in revoke.stdout
    assert after.status_code == 401


async def test_a_cached_key_is_refused_once_the_cache_entry_expires(
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
    database_url: str,
) -> None:
    client = await new_client("cached")
    now = [1000.0]
    authenticator = ApiKeyAuthenticator(SessionApiKeyReads(sessions), 5.0, clock=lambda: now[0])
    header = f"Bearer {client.api_key}"
    assert (await authenticator.authenticate(header)).client_id == client.client_id
    await revoke_key_async(database_url, api_key=client.api_key)

    now[0] += 4.9  # within the documented window the cached answer may still stand
    assert (await authenticator.authenticate(header)).client_id == client.client_id
    now[0] += 0.2
    with pytest.raises(Problem) as refused:
        await authenticator.authenticate(header)
    assert refused.value.status == 401


async def test_a_key_in_use_is_looked_up_again_in_the_background_before_it_expires(
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
    database_url: str,
) -> None:
    """Past half its time an entry is refreshed while it is still served: no request
    waits on the database when a busy client's entry would have expired."""
    client = await new_client("refreshed")
    now = [1000.0]
    lookups_at: list[float] = []
    database_answers = asyncio.Event()
    database_answers.set()

    class HeldSession:
        async def __aenter__(self) -> AsyncSession:
            lookups_at.append(now[0])
            await database_answers.wait()
            self.session = sessions()
            return await self.session.__aenter__()

        async def __aexit__(self, *exc: object) -> None:
            await self.session.__aexit__(*exc)

    authenticator = ApiKeyAuthenticator(
        SessionApiKeyReads(cast(Any, HeldSession)), 5.0, clock=lambda: now[0]
    )
    header = f"Bearer {client.api_key}"
    assert (await authenticator.authenticate(header)).client_id == client.client_id
    now[0] += 2.0
    await authenticator.authenticate(header)
    assert lookups_at == [1000.0], "fresh: served from the cache alone"

    database_answers.clear()  # the refresh's query will hang until the test lets it go
    now[0] += 1.0
    identity = await asyncio.wait_for(authenticator.authenticate(header), timeout=2)
    assert identity.client_id == client.client_id, "answered without waiting on the query"
    assert lookups_at == [1000.0, 1003.0]

    await revoke_key_async(database_url, api_key=client.api_key)
    database_answers.set()
    now[0] += 1.0  # before the first entry's expiry, at 1005
    refused: Problem | None = None
    for _ in range(200):
        try:
            await authenticator.authenticate(header)
        except Problem as problem:
            refused = problem
            break
        await asyncio.sleep(0.01)
    assert refused is not None, "the refresh found the key revoked, and it was still accepted"
    assert refused.status == 401


async def test_requests_missing_the_cache_together_share_one_lookup(
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
) -> None:
    client = await new_client("storm")
    opened: list[int] = []

    def counting_sessions() -> AsyncSession:
        opened.append(1)
        return sessions()

    authenticator = ApiKeyAuthenticator(SessionApiKeyReads(cast(Any, counting_sessions)), 5.0)
    identities = await asyncio.gather(
        *(authenticator.authenticate(f"Bearer {client.api_key}") for _ in range(200))
    )
    assert {identity.client_id for identity in identities} == {client.client_id}
    assert len(opened) == 1, "200 requests at once, one query"

    unknown = await asyncio.gather(
        *(authenticator.authenticate("Bearer sk_not_a_key") for _ in range(50)),
        return_exceptions=True,
    )
    assert all(isinstance(answer, Problem) and answer.status == 401 for answer in unknown)
    assert len(opened) == 2, "an unknown key is looked up once too, and refused for all"


async def test_a_prefetched_key_is_looked_up_once_while_the_request_waits(
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
) -> None:
    """A request waiting in the admission line has its key looked up meanwhile: once
    let in it is served from the cache, and a malformed header starts nothing."""
    client = await new_client("prefetched")
    keys = CountingKeys(sessions)
    looked_up = keys.looked_up
    authenticator = ApiKeyAuthenticator(keys, 5.0)
    header = f"Bearer {client.api_key}"
    authenticator.prefetch(header)
    authenticator.prefetch(header)  # already under way: not a second lookup
    authenticator.prefetch("Basic dXNlcjpwYXNz")
    authenticator.prefetch(None)
    for _ in range(200):
        if looked_up:
            break
        await asyncio.sleep(0.01)
    identity = await authenticator.authenticate(header)
    assert identity.client_id == client.client_id
    assert len(looked_up) == 1, "the request let in found its key already looked up"
    authenticator.prefetch(header)  # cached: nothing to do
    await asyncio.sleep(0.05)
    assert len(looked_up) == 1


async def test_prefetches_at_once_are_bounded_so_made_up_keys_cannot_crowd_the_pool(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    started = 0
    release = asyncio.Event()

    class HeldKeys(SessionApiKeyReads):
        async def key_for_hash(self, key_hash: str) -> Any:
            nonlocal started
            started += 1
            await release.wait()
            return await super().key_for_hash(key_hash)

    authenticator = ApiKeyAuthenticator(HeldKeys(sessions), 5.0, max_lookups=3)
    for n in range(10):
        authenticator.prefetch(f"Bearer sk_made_up_{n}")
    await asyncio.sleep(0.05)
    assert started == 3
    release.set()
    await asyncio.sleep(0.05)
    authenticator.prefetch("Bearer sk_made_up_after")  # room again once they ended
    await asyncio.sleep(0.05)
    assert started == 4
    with pytest.raises(Problem) as refused:
        await authenticator.authenticate("Bearer sk_made_up_0")
    assert refused.value.status == 401, "an unknown key is still refused when let in"


async def test_mirrored_keys_are_known_without_a_lookup_and_a_revoked_one_leaves_in_time(
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
    database_url: str,
) -> None:
    """The mirror puts every active key in the cache, so a client's first request needs
    no lookup; a key revoked since is left out of the next reload and refused once its
    entry expires, within the cache period as before."""
    client = await new_client("mirrored")
    keys = CountingKeys(sessions)
    looked_up = keys.looked_up
    now = [1000.0]
    authenticator = ApiKeyAuthenticator(keys, 6.0, clock=lambda: now[0])
    header = f"Bearer {client.api_key}"
    await authenticator.mirror_active_keys(10_000)

    identity = await authenticator.authenticate(header)
    assert identity.client_id == client.client_id
    assert looked_up == [], "its first request found the key mirrored"

    await revoke_key_async(database_url, api_key=client.api_key)
    now[0] += 2.0  # the next reload, a third of the period later
    await authenticator.mirror_active_keys(10_000)
    now[0] += 2.9  # still within the period of the last reload that had it
    assert (await authenticator.authenticate(header)).client_id == client.client_id
    now[0] += 1.2  # past it
    with pytest.raises(Problem) as refused:
        await authenticator.authenticate(header)
    assert refused.value.status == 401
    assert looked_up == [], "the mirror holds every active key: no lookup of its own"


async def test_the_mirror_holds_at_most_its_size_newest_keys_first(
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
    database_url: str,
) -> None:
    older = await new_client("mirror-older")
    newer = await new_client("mirror-newer")
    _, newest_key = await create_key_async(database_url, newer.client_id)
    keys = SessionApiKeyReads(sessions)
    newest = await keys.active_keys(2)
    assert [k.client_id for k in newest] == [newer.client_id, newer.client_id]
    assert newest[0].key_hash == hash_api_key(newest_key)
    assert all(k.revoked_at is None for k in await keys.active_keys(10_000))

    keys = CountingKeys(sessions)
    looked_up = keys.looked_up
    authenticator = ApiKeyAuthenticator(keys, 5.0)
    await authenticator.mirror_active_keys(2)
    await authenticator.authenticate(f"Bearer {newest_key}")
    await authenticator.authenticate(f"Bearer {newer.api_key}")
    assert looked_up == []
    await authenticator.authenticate(f"Bearer {older.api_key}")
    assert looked_up == [hash_api_key(older.api_key)], "past the mirror's size: looked up"


async def test_a_large_mirror_leaves_the_loop_to_requests_while_it_loads() -> None:
    """10,000 keys cached in one go held the API's loop for 9 ms every reload (and
    mapping their rows 32 ms more): the mirror takes them a batch a turn."""
    records = [
        ApiKeyRecord(f"key_{n}", f"cli_{n}", "client", f"{n:064x}", "sk_", "2026", None)
        for n in range(5 * MIRROR_BATCH)
    ]

    class ManyKeys:
        async def key_for_hash(self, key_hash: str) -> ApiKeyRecord | None:
            raise AssertionError("every key is mirrored")

        async def active_keys(self, limit: int) -> list[ApiKeyRecord]:
            return records[:limit]

    authenticator = ApiKeyAuthenticator(ManyKeys(), 5.0)
    turns = 0

    async def a_request_meanwhile() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    meanwhile = asyncio.create_task(a_request_meanwhile())
    await asyncio.sleep(0)
    before = turns
    await authenticator.mirror_active_keys(len(records))
    meanwhile.cancel()
    assert turns - before >= 4, "the loop ran other work between the mirror's batches"


async def test_the_mirror_reloads_after_the_first_load_and_outlives_a_failed_reload() -> None:
    api_key = "sk_" + "m" * 43
    record = ApiKeyRecord("key_1", "cli_1", "client", hash_api_key(api_key), "sk_", "2026", None)
    asked = 0

    class FlakyKeys:
        async def key_for_hash(self, key_hash: str) -> ApiKeyRecord | None:
            raise AssertionError("not looked up")

        async def active_keys(self, limit: int) -> list[ApiKeyRecord]:
            nonlocal asked
            asked += 1
            if asked == 1:
                raise RuntimeError("a reload that fails in a way nobody foresaw")
            return [record]

    authenticator = ApiKeyAuthenticator(FlakyKeys(), 0.06)  # a reload every 20 ms
    mirror = asyncio.create_task(authenticator.keep_mirrored(10))
    await asyncio.sleep(0.01)
    assert asked == 0, "the first load is the app's, at start: not loaded twice"
    for _ in range(100):
        if asked >= 2:
            break
        await asyncio.sleep(0.01)
    assert not mirror.done(), "a failed reload did not end the mirror"
    mirror.cancel()
    assert asked >= 2
    identity = await authenticator.authenticate(f"Bearer {api_key}")
    assert identity.client_id == "cli_1", "served from the mirror, not looked up"


async def test_a_second_key_of_the_same_client_sees_the_same_payments(
    api: httpx.AsyncClient,
    new_client: Callable[..., Any],
    sessions: async_sessionmaker[AsyncSession],
    database_url: str,
) -> None:
    client = await new_client("rotating")
    payment_id = await store_payment(sessions, client.client_id)
    _, second_key = await create_key_async(database_url, client.client_id)
    await revoke_key_async(database_url, api_key=client.api_key)

    response = await api.get(f"/v1/payments/{payment_id}", headers=bearer(second_key))
    assert response.status_code == 200
    assert response.json()["id"] == payment_id


async def test_the_api_key_never_reaches_the_logs(
    api: httpx.AsyncClient,
    new_client: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await new_client("quiet")
    caplog.set_level(logging.DEBUG)
    await api.get("/v1/payments", headers=bearer(client.api_key))
    await api.get("/v1/payments/pay_x", headers=bearer(client.api_key))
    await api.get("/v1/payments", headers=bearer(client.api_key + "x"))

    assert caplog.records, "the access log did run"
    logged = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    assert "http.request" in logged
    assert client.api_key not in logged
    assert client.api_key[10:] not in logged


class CountingReads(SessionApiKeyReads):
    """Every read of keys, by kind, and how many by hash run at once at most."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        super().__init__(sessions)
        self.by_hash = 0
        self.newest = 0
        self.at_once = 0
        self.most_at_once = 0

    async def key_for_hash(self, key_hash: str) -> Any:
        self.by_hash += 1
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            await asyncio.sleep(0.01)
            return await super().key_for_hash(key_hash)
        finally:
            self.at_once -= 1

    async def active_keys(self, limit: int) -> list[ApiKeyRecord]:
        if limit <= NEWEST_KEYS:
            self.newest += 1
        return await super().active_keys(limit)


def made_up_keys(count: int) -> list[str]:
    return [f"Bearer sk_{os.urandom(32).hex()}" for _ in range(count)]


async def test_a_flood_of_made_up_keys_makes_no_lookup_per_key_and_a_new_key_still_works(
    sessions: async_sessionmaker[AsyncSession], new_client: Callable[..., Any]
) -> None:
    """While the mirror holds every active key, 2,000 distinct made-up keys cost a few
    reads of the newest keys, shared, and no lookup each; a key created after the last
    reload works on its first request."""
    await new_client("before-the-flood")
    keys = CountingReads(sessions)
    authenticator = ApiKeyAuthenticator(keys, 5.0)
    await authenticator.mirror_active_keys(10_000)
    newer = await new_client("after-the-mirror")

    async def refused(header: str) -> int:
        with pytest.raises(Problem) as problem:
            await authenticator.authenticate(header)
        return problem.value.status

    began = time.monotonic()
    statuses = await asyncio.gather(*(refused(header) for header in made_up_keys(2000)))
    identity = await authenticator.authenticate(f"Bearer {newer.api_key}")
    elapsed = time.monotonic() - began

    assert set(statuses) == {401}
    assert identity.client_id == newer.client_id
    assert keys.by_hash == 0, "no made-up key was looked up"
    assert 1 <= keys.newest <= elapsed / NEWEST_KEYS_INTERVAL + 2, (keys.newest, elapsed)


async def test_while_the_mirror_cannot_hold_every_key_lookups_at_once_are_bounded(
    sessions: async_sessionmaker[AsyncSession], new_client: Callable[..., Any]
) -> None:
    await new_client("one")
    await new_client("two")
    keys = CountingReads(sessions)
    authenticator = ApiKeyAuthenticator(keys, 5.0, max_lookups=2)
    await authenticator.mirror_active_keys(1)  # full: the other keys are looked up

    async def status(header: str) -> int:
        try:
            await authenticator.authenticate(header)
        except Problem as problem:
            return problem.status
        return 200

    statuses = await asyncio.gather(*(status(header) for header in made_up_keys(40)))
    assert set(statuses) == {401}
    assert keys.by_hash == 40
    assert keys.most_at_once == 2, "made-up keys never hold more than their share of the pool"
