"""The host's board of keys being admitted: each API process writes its own, every
process reads the others', and a repeat of a request another process holds is 409 at
once instead of being taken for a new payment."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.admission import AdmissionGate, payment_request_ids
from api.admission_board import (
    REGION_BYTES,
    AdmissionBoard,
    Holding,
    create_board,
    fingerprint,
    remove_board,
)
from api.app import create_app
from tests.api.conftest import api_settings, bearer, held_line, running_api
from tests.api.test_admission import TYPES, VISA, assert_queued_409, post, until
from tests.api.test_repeat_during_start import unresponsive_server

KEY = fingerprint((b"Bearer sk_test_a", b"order-1"))


def board_file(tmp_path: Path, processes: int = 2) -> Path:
    path = tmp_path / "board"
    create_board(path, processes)
    return path


@pytest.fixture
def two_boards(tmp_path: Path) -> Iterator[tuple[AdmissionBoard, AdmissionBoard]]:
    """Two processes' views of one board, each with its region."""
    path = board_file(tmp_path)
    first, second = AdmissionBoard.attach(path), AdmissionBoard.attach(path)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def test_a_key_one_process_publishes_is_seen_by_the_others_and_not_by_itself(
    two_boards: tuple[AdmissionBoard, AdmissionBoard],
) -> None:
    first, second = two_boards
    assert {first.region, second.region} == {0, 1}
    answer_by = time.monotonic() + 5
    assert first.publish(KEY, answer_by, Holding.QUEUED)

    held = second.held_elsewhere(KEY)
    assert held is not None
    assert held.answer_by == answer_by
    assert not held.starting
    assert first.held_elsewhere(KEY) is None  # its own keys it knows in memory
    assert second.held_elsewhere(fingerprint((b"Bearer sk_test_a", b"order-2"))) is None
    assert second.held_elsewhere(fingerprint((b"Bearer sk_test_b", b"order-1"))) is None

    first.publish(KEY, answer_by, Holding.STARTING)
    assert (held := second.held_elsewhere(KEY)) is not None
    assert held.starting

    first.withdraw(KEY)
    assert second.held_elsewhere(KEY) is None


def test_an_entry_past_its_time_counts_for_nothing_and_its_slot_is_reused(
    two_boards: tuple[AdmissionBoard, AdmissionBoard],
) -> None:
    first, second = two_boards
    assert first.publish(KEY, time.monotonic() - 0.001, Holding.QUEUED)
    assert second.held_elsewhere(KEY) is None
    # Keys whose home slot is the same: the expired entry's slot is taken again.
    first.withdraw(KEY)
    for n in range(200):
        other = (KEY[0], KEY[1] + n + 1)
        assert first.publish(other, time.monotonic() + 5, Holding.QUEUED) == (n < 8)
        if n >= 8:
            assert second.held_elsewhere(other) is None  # not published: no room
    assert second.held_elsewhere((KEY[0], KEY[1] + 8)) is not None


def test_a_region_is_held_for_the_life_of_its_process_and_cleared_for_the_next(
    tmp_path: Path,
) -> None:
    path = board_file(tmp_path)
    first, second = AdmissionBoard.attach(path), AdmissionBoard.attach(path)
    third = AdmissionBoard.attach(path)
    try:
        # More processes than regions: the last reads the board but writes nothing.
        assert third.region is None
        assert not third.publish(KEY, time.monotonic() + 5, Holding.QUEUED)
        first.publish(KEY, time.monotonic() + 5, Holding.QUEUED)
        assert third.held_elsewhere(KEY) is not None

        first.close()  # a process that ended: its region is free, its entries gone
        assert third.held_elsewhere(KEY) is None
        replacement = AdmissionBoard.attach(path)
        assert replacement.region == first.region
        replacement.close()
    finally:
        second.close()
        third.close()


def test_the_board_holds_no_key_or_credential_and_is_removed_with_its_locks(
    tmp_path: Path,
) -> None:
    path = board_file(tmp_path)
    assert path.stat().st_size == 2 * REGION_BYTES
    assert path.stat().st_mode & 0o777 == 0o600
    board = AdmissionBoard.attach(path)
    ids = (b"Bearer sk_live_secret", b"order-secret")
    board.publish(fingerprint(ids), time.monotonic() + 5, Holding.QUEUED)
    content = path.read_bytes()
    assert b"sk_live_secret" not in content
    assert b"order-secret" not in content
    board.close()
    remove_board(path)
    assert list(tmp_path.iterdir()) == []


def test_a_board_a_killed_api_left_under_the_same_name_is_replaced(tmp_path: Path) -> None:
    path = board_file(tmp_path, processes=1)
    # Its process killed: the file, its lock file and the entry stay behind.
    left = AdmissionBoard.attach(path)
    left.publish(KEY, time.monotonic() + 60, Holding.QUEUED)

    create_board(path, 2)

    assert path.stat().st_size == 2 * REGION_BYTES
    assert path.read_bytes() == bytes(2 * REGION_BYTES)
    first, second = AdmissionBoard.attach(path), AdmissionBoard.attach(path)
    try:
        assert {first.region, second.region} == {0, 1}  # the old lock went with its file
    finally:
        first.close()
        second.close()
        left.close()  # (the old file's mapping, gone from the directory)


@asynccontextmanager
async def two_processes(
    database_url: str, board: Path, **overrides: Any
) -> AsyncIterator[list[tuple[httpx.AsyncClient, AdmissionGate, asyncio.Event]]]:
    """Two apps on one board, as two API processes of one host, each with its line held
    until its event is set."""
    async with AsyncExitStack() as stack:
        processes = []
        for _ in range(2):
            app = create_app(api_settings(database_url, api_admission_board=board, **overrides))
            api = await stack.enter_async_context(running_api(app))
            gate: AdmissionGate = app.state.admission
            line = await stack.enter_async_context(held_line(gate))
            processes.append((api, gate, line))
        yield processes


async def test_a_repeat_of_a_request_queued_in_another_process_is_409_at_once(
    database_url: str, new_client: Callable[..., Any], tmp_path: Path
) -> None:
    client = await new_client()
    key = str(uuid.uuid4())
    headers = {**bearer(client.api_key), "Idempotency-Key": key}
    other = {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())}
    board = board_file(tmp_path)
    async with two_processes(database_url, board, api_wait_seconds=3) as processes:
        (api_a, gate_a, line_a), (api_b, gate_b, _) = processes
        first = post(api_a, headers)
        await until(lambda: len(gate_a.parked) == 1)

        repeat = await asyncio.wait_for(api_b.post("/v1/payments", json=VISA, headers=headers), 5)
        another_payment = post(api_b, other)
        await until(lambda: len(gate_b.parked) == 1)  # a key no one holds waits its turn

        assert_queued_409(repeat, retry_after_at_most=3)
        assert not first.done()
        assert payment_request_ids_of(headers) not in gate_b.parked

        line_a.set()
        # Let in, it goes on to Temporal, which these apps cannot reach: 503, and its
        # entry goes with it, so the key's retry is a new payment's work again.
        assert (await first).status_code == 503
        retry = post(api_b, headers)
        await until(lambda: payment_request_ids_of(headers) in gate_b.parked)
        assert not retry.done()
        retry.cancel()
        another_payment.cancel()


def payment_request_ids_of(headers: dict[str, str]) -> tuple[bytes, bytes] | None:
    scope = {"headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return payment_request_ids(scope)


async def test_a_repeat_of_a_request_starting_in_another_process_is_409_starting(
    database_url: str, new_client: Callable[..., Any], tmp_path: Path
) -> None:
    client = await new_client()
    headers = {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())}
    board = board_file(tmp_path)
    async with unresponsive_server() as temporal_address, AsyncExitStack() as stack:
        apps, apis = [], []
        for _ in range(2):
            settings = api_settings(database_url, api_wait_seconds=2, api_admission_board=board)
            settings = settings.model_copy(update={"temporal_address": temporal_address})
            apps.append(create_app(settings))
            apis.append(await stack.enter_async_context(running_api(apps[-1])))
        api_a, api_b = apis
        first = post(api_a, headers)
        # (/metrics is the process's: its gauge would show the app created last.)
        await until(lambda: apps[0].state.payments.starts_in_flight == 1)

        repeat = await asyncio.wait_for(api_b.post("/v1/payments", json=VISA, headers=headers), 5)

        assert repeat.status_code == 409, repeat.text
        assert repeat.json()["type"] == TYPES + "idempotency-request-in-progress"
        assert "still starting its payment" in repeat.json()["detail"]
        assert 1 <= int(repeat.headers["Retry-After"]) <= 2
        assert not first.done()
        assert (await first).status_code == 503  # the start was never confirmed
        reader = AdmissionBoard.attach(board)  # no region left: reads only
        try:
            assert reader.region is None
            ids = payment_request_ids_of(headers)
            assert ids is not None
            assert reader.held_elsewhere(fingerprint(ids)) is None
        finally:
            reader.close()
