"""Admission: new payment requests enter the app a few per turn of the event loop;
repeats of a payment this process knows enter at once.

In the storm benchmark the API is a closed loop: 1,000 connections each send their
next request as soon as one is answered, so the API always has more to do than it can
do at once, and every request waited behind every request that had arrived before
it. A repeat, whose answer costs one indexed read, waited for hundreds of new
payments' validation, ledger reads and starts (p99 0.2-1.2 s, docs/scaling.md). Here
a POST whose key this process does not know parks on a future, which costs nothing
while it waits, and a few parked requests are let in each turn of the loop, so a turn
never holds more than a few new payments' work. A repeat skips the line.

A key is known from the moment a request with it is inside the app until the process
forgets it (``remembered_keys``, oldest first), once a request with it was answered
with a payment (201, 202) or a 409 (in progress, or the key reused). A key refused
with a 503 or a 429 is not: its retry is a new payment's work and waits its turn.

A repeat of a request still parked here is answered 409
``idempotency-request-in-progress`` (queued) at once, as a repeat of one queued at the
backlog gate is: nothing has started for it, and letting the repeat in first would
start the payment out of turn. It is authenticated and counted against its client's
rate limit like any other request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque

from fastapi import FastAPI
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.access_log import RequestLines
from api.admission_board import AdmissionBoard, BoardClaim, fingerprint
from api.arrival import arrived_at, note_arrival
from api.auth import ApiKeyAuthenticator
from api.dependencies import client_within_limit
from api.metrics import count_request
from api.problems import Problem, idempotency_request_in_progress, send_problem

PAYMENTS_PATH = "/v1/payments"
# Where a request that waited in line keeps how long it waited (the request's state).
_WAITED = "admission_wait_seconds"
# Where a request that took its key for new keeps its entry on the host's board.
_CLAIM = "admission_board_claim"
# What is left of a first request's wait after its time in line, at the least: enough
# to start its payment and open the row.
MIN_WAIT_AFTER_LINE_SECONDS = 1.0


def board_claim(scope: Scope) -> BoardClaim | None:
    """The request's entry on the host's board (api/admission_board.py), if it has one:
    its payment keeps the entry in step with what it does."""
    claim = scope.get("state", {}).get(_CLAIM)
    return claim if isinstance(claim, BoardClaim) else None


def wait_after_line(scope: Scope, wait_seconds: float) -> float:
    """The wait a request has left once its time in line is taken off: a client waits
    the wait it asked for (or the default) in all, not that plus its time in line."""
    waited = float(scope.get("state", {}).get(_WAITED, 0.0))
    return max(min(wait_seconds, MIN_WAIT_AFTER_LINE_SECONDS), wait_seconds - waited)


class AdmissionGate:
    """The line: ``admissions_per_turn`` parked requests are let in per loop turn
    (0: no line), and the keys that skip it."""

    def __init__(self, admissions_per_turn: int, remembered_keys: int) -> None:
        self._per_turn = admissions_per_turn
        self._remembered = remembered_keys
        self._budget = admissions_per_turn
        self._line: deque[asyncio.Future[None]] = deque()
        self._refill_scheduled = False
        # hash((authorization, idempotency key)) of keys answered with a payment or a
        # 409, oldest first: a hash, not the pair, so 50,000 of them take about 5 MB.
        self._known: dict[int, None] = {}
        # (authorization, key) of requests in the line, with the loop time by which
        # each will have its answer; of requests inside the app, how many.
        self.parked: dict[tuple[bytes, bytes], float] = {}
        self.inside: Counter[tuple[bytes, bytes]] = Counter()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def knows(self, ids: tuple[bytes, bytes]) -> bool:
        return ids in self.inside or hash(ids) in self._known

    def remember(self, ids: tuple[bytes, bytes]) -> None:
        digest = hash(ids)
        if digest in self._known or self._remembered <= 0:
            return
        self._known[digest] = None
        if len(self._known) > self._remembered:
            del self._known[next(iter(self._known))]

    async def wait_turn(self) -> None:
        if self._per_turn <= 0:
            return
        self._schedule_refill()
        if not self._line and self._budget > 0:
            self._budget -= 1
            return
        admitted = asyncio.get_running_loop().create_future()
        self._line.append(admitted)
        try:
            await admitted
        except asyncio.CancelledError:
            # Let in and cancelled in the same turn: the turn's place goes to the next.
            if admitted.done() and not admitted.cancelled():
                self._budget += 1
            raise

    def _schedule_refill(self) -> None:
        if not self._refill_scheduled:
            self._refill_scheduled = True
            asyncio.get_running_loop().call_soon(self._refill)

    def _refill(self) -> None:
        # call_soon runs this after everything already ready, once per turn while the
        # line is not empty: the turn's other work (the requests inside) goes first.
        self._refill_scheduled = False
        self._budget = self._per_turn
        while self._line and self._budget > 0:
            admitted = self._line.popleft()
            if not admitted.done():
                admitted.set_result(None)
                self._budget -= 1
        if self._line:
            self._schedule_refill()


def payment_request_ids(scope: Scope) -> tuple[bytes, bytes] | None:
    """(Authorization, Idempotency-Key) as sent, or None without both."""
    authorization = key = None
    # The first of each, as the app reads them (Starlette's Headers.get).
    for name, value in scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value
        elif name == b"idempotency-key" and key is None:
            key = value
    if authorization is None or key is None:
        return None
    return bytes(authorization), bytes(key)


class AdmissionMiddleware:
    """Outside every other layer (``install_admission``): a new payment parks here
    before the access log and the metrics begin its line, and a repeat of a parked one
    is answered here, each layer's part in it done inline. At a storm's start 1,000
    requests arrive within 20 ms and the 440 repeats among them are answered in the
    same turns: each layer's per-request work (a log context, a task's worth of
    wrappers) was 23 us of a parked request and 62 us of a repeat, most of it theirs.

    With a ``board`` (several API processes on one host), a key this process does not
    know is looked up there before it is taken for new: a repeat of a request another
    process is admitting is answered 409 here as if that request were here."""

    def __init__(
        self,
        app: ASGIApp,
        gate: AdmissionGate,
        wait_seconds: float,
        state: State,
        lines: RequestLines,
        board: AdmissionBoard | None = None,
    ) -> None:
        self.app = app
        self.gate = gate
        self.wait_seconds = wait_seconds
        self.state = state
        self.lines = lines
        self.board = board

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PAYMENTS_PATH:
            await self.app(scope, receive, send)
            return
        note_arrival(scope)
        ids = payment_request_ids(scope)
        if ids is None:  # refused inside (400 or 401), after its turn
            await self.gate.wait_turn()
            await self.app(scope, receive, send)
            return
        if (answer_by := self.gate.parked.get(ids)) is not None:
            retry_after = answer_by - asyncio.get_running_loop().time()
            await self._answer_in_progress(scope, send, ids, retry_after, starting=False)
            return
        known = self.gate.knows(ids)
        claim: BoardClaim | None = None
        if not known and self.board is not None:
            key = fingerprint(ids)
            if (held := self.board.held_elsewhere(key)) is not None:
                retry_after = held.answer_by - time.monotonic()
                await self._answer_in_progress(scope, send, ids, retry_after, held.starting)
                return
            claim = BoardClaim(self.board, key, time.monotonic() + self.wait_seconds)
            scope.setdefault("state", {})[_CLAIM] = claim
        try:
            if not known:
                await self._wait_turn(scope, ids)
            await self._inside(scope, receive, send, ids)
        finally:
            if claim is not None:
                claim.withdraw()

    async def _wait_turn(self, scope: Scope, ids: tuple[bytes, bytes]) -> None:
        """A new payment's place in the line; its key is looked up while it waits, not
        after: its repeats need it too."""
        authenticator: ApiKeyAuthenticator = self.state.authenticator
        authenticator.prefetch(ids[0].decode("latin-1"))
        loop = asyncio.get_running_loop()
        parked_at = loop.time()
        self.gate.parked[ids] = parked_at + self.wait_seconds
        try:
            await self.gate.wait_turn()
        finally:
            self.gate.parked.pop(ids, None)
        scope.setdefault("state", {})[_WAITED] = loop.time() - parked_at

    async def _inside(
        self, scope: Scope, receive: Receive, send: Send, ids: tuple[bytes, bytes]
    ) -> None:
        gate = self.gate

        async def send_noting_the_answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if 200 <= status < 300 or status == 409:
                    gate.remember(ids)
            await send(message)

        gate.inside[ids] += 1
        try:
            await self.app(scope, receive, send_noting_the_answer)
        finally:
            gate.inside[ids] -= 1
            if gate.inside[ids] <= 0:
                del gate.inside[ids]

    async def _answer_in_progress(
        self,
        scope: Scope,
        send: Send,
        ids: tuple[bytes, bytes],
        retry_after: float,
        starting: bool,
    ) -> None:
        """409: the first request with this key, here or in another process, is queued
        (or ``starting``) and will have its answer in ``retry_after`` seconds."""
        started = arrived_at(scope)
        request_id, fields = self.lines.begin(scope)
        try:
            # From the authenticator's cache, or the one lookup a key's requests share.
            _, headers = await client_within_limit(self.state, ids[0].decode("latin-1"))
            problem = idempotency_request_in_progress(
                max(1, math.ceil(retry_after)), starting=starting
            )
            problem.headers.update(headers)
        except Problem as refused:
            problem = refused
        problem.headers["X-Request-Id"] = request_id
        await send_problem(problem, scope["path"], send)
        count_request(scope["method"], PAYMENTS_PATH, problem.status, started)
        self.lines.write(scope, problem.status, fields, started)


def install_admission(
    app: FastAPI,
    gate: AdmissionGate,
    wait_seconds: float,
    lines: RequestLines,
    board: AdmissionBoard | None = None,
) -> None:
    """The admission line around the whole app, outside even the metrics' layer
    (``install_metrics``, to be called first)."""
    build_stack = app.build_middleware_stack

    def build_stack_behind_the_line() -> ASGIApp:
        return AdmissionMiddleware(build_stack(), gate, wait_seconds, app.state, lines, board)

    app.build_middleware_stack = build_stack_behind_the_line  # type: ignore[method-assign]
