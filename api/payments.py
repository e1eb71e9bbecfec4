"""Start-or-attach a payment and read it back.

The ledger answers what it already knows (a finished payment, a reused key).
Otherwise the request starts the payment's workflow (the workflow ID is the client's
key, so there is at most one run per key); the request whose start created the run
opens its ledger row at once and waits on the ledger for the outcome (LISTEN/NOTIFY),
never on the run.

A repeat answers the payment's current state at once (DESIGN.md's contract; it waits
only if it asks to, with ``Prefer: wait``): a client retrying a request that is still
running learns in milliseconds that it is, instead of holding a connection for the
whole wait, and the repeats add nothing to the run's history. A repeat of a request
still queued for room in this process (``BacklogGate``), before any payment exists,
is answered 409 ``idempotency-request-in-progress`` at once, as the IETF draft's
concurrent-request rule says, rather than queueing a second time behind it.

Why not update-with-start: its answer, the start's included, arrives only once a
worker has accepted the update. In the storm benchmark (1,000 requests in flight,
workers far behind) most requests ran out of patience before that, could not even
confirm the run existed, and answered 503: 4,355 of them in a 2,000-request run.
A plain start is confirmed by the server alone, so a request that waits too long
still answers 202 from the row it opened, and the run's history carries no update.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import uuid
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.admission_board import BoardClaim
from api.backlog import BacklogFull, BacklogGate, StartSlots
from api.metrics import record_backlog_refused
from api.problems import (
    Problem,
    backlog_full,
    database_unavailable,
    idempotency_key_reused,
    idempotency_request_in_progress,
    temporal_unavailable,
)
from domain import search_attributes
from domain.currencies import format_amount
from domain.payments import (
    Payment,
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    payment_id_for,
    payment_workflow_id,
)
from ledger.mapping import StoredPayment
from ledger.outcomes import OutcomeListener, PaymentChanges
from ledger.payment_sql import PooledPaymentLedger
from ledger.reads import DATABASE_ERRORS, PaymentReads, SessionPaymentReads
from ledger.repositories import PaymentPage, PaymentRepository
from workflows.payment import PaymentWorkflow

_TRANSIENT_RPC = {
    RPCStatusCode.UNAVAILABLE,
    RPCStatusCode.DEADLINE_EXCEEDED,
    RPCStatusCode.RESOURCE_EXHAUSTED,
    RPCStatusCode.CANCELLED,
    RPCStatusCode.UNKNOWN,
}


# The request that started a run, readable with one describe() and no worker.
ORIGIN_REQUEST_MEMO = "origin_request_id"
ORIGIN_FINGERPRINT_MEMO = "request_fingerprint"
# Asked after the wait ran out: a server that does not answer this fast is down for us.
DESCRIBE_TIMEOUT = timedelta(seconds=2)
# How long a repeat waits for its first request's start to be confirmed (the row
# opened) before it is told the first is in progress (409). Unloaded a start takes
# milliseconds; in the storm benchmark the server took seconds to confirm a batch, and
# a repeat held that long was the slowest answer the API gave to any duplicate. Within
# the 50 ms a duplicate's answer is meant to take: at 0.1 s, the repeats held the whole
# wait were most of the storm's slowest in its first second.
REPEAT_WAITS_FOR_START_SECONDS = 0.03
# While the ledger's listener is disconnected, a waiting duplicate re-reads the row
# this often on its own (the listener wakes every waiter when it is back).
LEDGER_POLL_SECONDS = 1.0


class _Start(enum.Enum):
    CREATED = "created"  # this request's start created the run
    EXISTS = "exists"  # a run with this key was started before (by a duplicate)
    UNCONFIRMED = "unconfirmed"  # the server did not answer within the wait


async def _no_count() -> int:
    return 0


class TurnLine(Protocol):
    """A line that lets a few waiters through per turn of the event loop
    (``api.admission.AdmissionGate``)."""

    async def wait_turn(self) -> None: ...


class _NoLine:
    async def wait_turn(self) -> None:
        return None


@dataclass(frozen=True)
class _RunOrigin:
    """What a run's memo says about the request that started it."""

    request_id: str
    request_fingerprint: str
    running: bool


@dataclass
class _Admitting:
    """A first request of this process that is queued for room or starting its run."""

    deadline: float  # loop time at which it will have its own answer
    queued: bool = False  # waiting at the backlog gate for room
    # Set when it queues, and when it is done (its row open, or it failed).
    moved: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class PaymentAnswer:
    payment: Payment
    replayed: bool


def summary_for(client_name: str, key: str, request: PaymentRequest) -> str:
    """The workflow's static summary in the Temporal UI; the amount in the currency's
    own minor unit (12.50 EUR, 1250 JPY, 1.250 KWD)."""
    amount = format_amount(request.amount, request.currency)
    return f"Charge {amount} for client {client_name}, key {key}"


class PaymentService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        temporal: Client,
        task_queue: str,
        *,
        outcomes: OutcomeListener | None = None,
        backlog: BacklogGate | None = None,
        reads: async_sessionmaker[AsyncSession] | None = None,
        lookups: PaymentReads | None = None,
        ledger: PooledPaymentLedger | None = None,
        start_slots: StartSlots | None = None,
        expired_waits: TurnLine | None = None,
    ) -> None:
        """``expired_waits``: the line a request whose wait ran out (for room, or for
        its payment's outcome) goes through before it reads the ledger again and is
        answered, 503 or 202."""
        self._sessions = sessions
        self._reads = reads or sessions
        # The idempotency path's reads by key and by id (ledger/reads.py says why
        # they are not ORM reads in the API process).
        self._lookups = lookups or SessionPaymentReads(self._reads)
        # Opens a payment's row in one autocommit statement; without it, in a session.
        self._ledger = ledger
        self._backlog = backlog or BacklogGate(_no_count, 0)
        self._start_slots = start_slots or StartSlots(0)
        self._expired_waits = expired_waits or _NoLine()
        self._temporal = temporal
        self._task_queue = task_queue
        self._outcomes = outcomes
        # (client id, key) of the requests between "no row yet" and "row open".
        self._admitting: dict[tuple[str, str], _Admitting] = {}
        # Starts of runs sent to Temporal and not yet answered (a gauge on /metrics).
        self.starts_in_flight = 0

    async def _stored(self, client_id: str, key: str) -> StoredPayment | None:
        try:
            return await self._lookups.by_key(client_id, key)
        except (OperationalError, DBAPIError, *DATABASE_ERRORS) as exc:
            raise database_unavailable(exc) from exc

    async def get(self, client_id: str, payment_id: str) -> Payment | None:
        try:
            return await self._lookups.by_id(client_id, payment_id)
        except (OperationalError, DBAPIError, *DATABASE_ERRORS) as exc:
            raise database_unavailable(exc) from exc

    async def list_page(
        self,
        client_id: str,
        *,
        limit: int,
        starting_after: str | None,
        status: PaymentStatus | None,
    ) -> PaymentPage:
        """A page of the client's payments, from the ledger (never Temporal visibility,
        which is eventually consistent). Raises ``UnknownCursor``."""
        try:
            async with self._reads() as session:
                return await PaymentRepository(session).list_for_client(
                    client_id, limit=limit, starting_after=starting_after, status=status
                )
        except (OperationalError, DBAPIError) as exc:
            raise database_unavailable(exc) from exc

    async def create(
        self,
        *,
        client_id: str,
        client_name: str,
        key: str,
        request: PaymentRequest,
        wait_seconds: float,
        replay_wait_seconds: float = 0.0,
        arrived_seconds: float = 0.0,
        claim: BoardClaim | None = None,
    ) -> PaymentAnswer:
        """Start or attach. A first request waits up to ``wait_seconds`` for the
        outcome; a repeat answers the payment as it stands after ``replay_wait_seconds``
        (at once by default), or as soon as it is final. ``arrived_seconds``: how long
        ago the request reached this process. ``claim``: the request's entry on the
        host's board (api/admission_board.py), which tells the other API processes
        what this one is doing with the key until its row is open."""
        async with self._changes(payment_id_for(client_id, key)) as changes:
            return await self._create(
                changes,
                client_id=client_id,
                client_name=client_name,
                key=key,
                request=request,
                wait_seconds=wait_seconds,
                replay_wait_seconds=min(replay_wait_seconds, wait_seconds),
                arrived_seconds=arrived_seconds,
                claim=claim,
            )

    def _changes(self, payment_id: str) -> AbstractAsyncContextManager[PaymentChanges]:
        if self._outcomes is None:
            return contextlib.nullcontext(PaymentChanges())  # never set: waiters poll
        return self._outcomes.subscription(payment_id)

    async def _create(
        self,
        changes: PaymentChanges,
        *,
        client_id: str,
        client_name: str,
        key: str,
        request: PaymentRequest,
        wait_seconds: float,
        replay_wait_seconds: float,
        arrived_seconds: float,
        claim: BoardClaim | None,
    ) -> PaymentAnswer:
        """``create`` once subscribed to the payment's changes: every ledger read below
        comes after subscribing, so no change committed in between is missed."""
        fingerprint = request.fingerprint()
        now = asyncio.get_running_loop().time()
        deadline = now + wait_seconds
        replay_deadline = now + replay_wait_seconds
        ids = (client_id, key)
        # A repeat that asked to wait (Prefer: wait) waits for its first request's start
        # too; otherwise its patience counts from its arrival, not from when the loop got
        # to it.
        patience = max(
            replay_deadline, now + max(0.0, REPEAT_WAITS_FOR_START_SECONDS - arrived_seconds)
        )
        if (ahead := self._admitting.get(ids)) is not None:
            # Its first request is being admitted here: its row is not open before that
            # one moves on, so there is nothing to read yet. (At a storm's start the read
            # was a round trip behind the loop's busiest turns, 30-50 ms.)
            stored = await self._behind(ahead, ids, min(patience, deadline))
        else:
            stored = await self._stored(client_id, key)
            if stored is None and (ahead := self._admitting.get(ids)) is not None:
                # Its first request got here while this one read: behind it, not beside.
                stored = await self._behind(ahead, ids, min(patience, deadline))
        if stored is not None:
            if stored.request_fingerprint != fingerprint:
                raise idempotency_key_reused()
            if stored.payment.status.is_terminal:
                # The ledger knows the answer: no need to involve Temporal at all.
                return PaymentAnswer(stored.payment, replayed=True)
            # The row exists only once Temporal has the run: a repeat reads the ledger,
            # so it adds nothing to the run's history.
            return await self._await_outcome(
                changes, ids, request, None, (replay_deadline, deadline), stored
            )

        request_id = uuid.uuid4().hex
        payment_input = PaymentInput.for_request(client_id, key, request, request_id)
        opened: StoredPayment | None = None
        admitting = _Admitting(deadline)
        first_here = self._admitting.setdefault(ids, admitting) is admitting

        def queued() -> None:
            admitting.queued = True
            admitting.moved.set()
            if claim is not None:
                claim.queued()

        try:
            # A place in the backlog is held until this request's row is open, and only
            # by a request that may start a run: waiting for the outcome takes none.
            async with (
                self._backlog.admission(
                    deadline - asyncio.get_running_loop().time(), on_queued=queued
                ),
                self._start_slots.slot(
                    deadline - asyncio.get_running_loop().time(), on_queued=queued
                ),
            ):
                admitting.queued = False
                admitting.moved.clear()  # set again when its row is open
                if claim is not None:
                    claim.starting()
                self.starts_in_flight += 1
                try:
                    start = await self._start_run(payment_input, client_name, wait_seconds)
                finally:
                    self.starts_in_flight -= 1
                if start is _Start.CREATED:
                    # This request's start created the run: open its row now rather than
                    # when a worker gets to it, so duplicates, GET and a 202 need nothing
                    # from Temporal however far behind the workers are. The run's own
                    # open finds the row.
                    opened = await self._open_row(payment_input)
        except BacklogFull as full:
            # Requests that queued together time out together: in the storm benchmark
            # some 300 in one turn of the loop, each a ledger read and an answer, and
            # every request behind them, repeats included, waited 150-190 ms. Taken a
            # few per turn, a repeat arriving among them waits for a short turn only.
            await self._expired_waits.wait_turn()
            # Another request with this key may have got in meanwhile.
            stored = await self._stored(client_id, key)
            if stored is None:
                record_backlog_refused()
                raise backlog_full(full.retry_after, full.queued) from full
            if stored.request_fingerprint != fingerprint:
                raise idempotency_key_reused() from full
            return PaymentAnswer(stored.payment, replayed=True)
        finally:
            admitting.queued = False
            if first_here:
                del self._admitting[ids]
                admitting.moved.set()
                if claim is not None:
                    claim.withdraw()  # row open or start failed: repeats read the ledger
        if start is _Start.UNCONFIRMED:
            return await self._answer_without_outcome(client_id, key, request, request_id)
        created = start is _Start.CREATED
        return await self._await_outcome(
            changes,
            ids,
            request,
            request_id if created else None,
            (deadline if created else replay_deadline, deadline),
            opened,
        )

    async def _behind(
        self, ahead: _Admitting, ids: tuple[str, str], deadline: float
    ) -> StoredPayment | None:
        """A request with the key of one this process is already admitting: the row, once
        that one has opened it (waiting for that until ``deadline``); 409 while it is
        still queued for room (no payment exists yet, and queueing behind it would only
        hold a second place in the line) or still starting its run past ``deadline``."""
        loop = asyncio.get_running_loop()
        if not ahead.queued and deadline > loop.time():
            # Admitted and starting the run, or about to learn whether it must queue.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await ahead.moved.wait()
        if ahead.queued or not ahead.moved.is_set():
            raise idempotency_request_in_progress(
                max(1, math.ceil(ahead.deadline - loop.time())), starting=not ahead.queued
            )
        # None if it failed (Temporal down, the database): this request tries itself.
        return await self._stored(*ids)

    async def _start_run(
        self, payment_input: PaymentInput, client_name: str, wait_seconds: float
    ) -> _Start:
        request = payment_input.request
        client_id, key = payment_input.client_id, payment_input.idempotency_key
        try:
            async with asyncio.timeout(wait_seconds):
                await self._temporal.start_workflow(
                    PaymentWorkflow.run,
                    payment_input,
                    id=payment_workflow_id(client_id, key),
                    task_queue=self._task_queue,
                    # Both explicit. FAIL tells this request whether its start created the
                    # run; a request that finds one running (or closed: never started
                    # again) is a duplicate and waits for that run's outcome on the ledger.
                    id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    search_attributes=TypedSearchAttributes(
                        [
                            SearchAttributePair(
                                search_attributes.PAYMENT_STATUS, PaymentStatus.PROCESSING.value
                            ),
                            SearchAttributePair(search_attributes.CLIENT_ID, client_id),
                            SearchAttributePair(search_attributes.IDEMPOTENCY_KEY, key),
                            SearchAttributePair(search_attributes.AMOUNT_MINOR, request.amount),
                            SearchAttributePair(search_attributes.CURRENCY, request.currency),
                        ]
                    ),
                    memo={
                        ORIGIN_REQUEST_MEMO: payment_input.origin_request_id,
                        ORIGIN_FINGERPRINT_MEMO: payment_input.request_fingerprint,
                    },
                    static_summary=summary_for(client_name, key, request),
                    static_details=(
                        f"Payment {payment_input.payment_id}\n"
                        f"Client: {client_name} ({client_id})\nIdempotency-Key: {key}\n"
                        f"Amount: {request.amount} {request.currency} (minor units)"
                    ),
                )
        except TimeoutError:
            # Out of patience before the server answered: the run may or may not exist.
            return _Start.UNCONFIRMED
        except WorkflowAlreadyStartedError:
            return _Start.EXISTS
        except RPCError as exc:
            if exc.status == RPCStatusCode.ALREADY_EXISTS:
                return _Start.EXISTS
            if exc.status in _TRANSIENT_RPC:
                raise temporal_unavailable(exc) from exc
            raise
        except RuntimeError as exc:
            # A lazy client that has never reached the server reports it this way.
            if "Failed client connect" in str(exc):
                raise temporal_unavailable(exc) from exc
            raise
        return _Start.CREATED

    async def _await_outcome(
        self,
        changes: PaymentChanges,
        ids: tuple[str, str],
        request: PaymentRequest,
        request_id: str | None,
        deadlines: tuple[float, float],
        known: StoredPayment | None,
    ) -> PaymentAnswer:
        """Wait on the ledger for the run's outcome: the outcome once recorded, or,
        when the wait runs out, the payment as it stands (202).

        ``ids`` is (client id, key). ``request_id`` is set for the request whose start
        created the run; any other request attached to a run someone else started and
        is a replay. ``deadlines``: until when to wait for the outcome once the row is
        there (a replay's is now, unless it asked to wait), and for the row itself.
        ``known`` is the row as read since subscribing, if it was.
        """
        client_id, key = ids
        loop = asyncio.get_running_loop()
        fingerprint = request.fingerprint()
        outcome_deadline, deadline = deadlines
        current = known if known is not None else await self._stored(client_id, key)
        while True:
            remaining = deadline - loop.time()
            if current is not None:
                changes.row_known = True
                if current.request_fingerprint != fingerprint:
                    raise idempotency_key_reused()
                remaining = outcome_deadline - loop.time()
                if current.payment.status.is_terminal or remaining <= 0:
                    replayed = request_id is None or current.origin_request_id != request_id
                    return PaymentAnswer(current.payment, replayed=replayed)
            elif remaining <= 0:
                # The run exists but neither its starter nor a worker opened its row
                # (the starter gave up or died in between): only Temporal can say more.
                return await self._answer_without_outcome(client_id, key, request, request_id)
            if self._outcomes is None or not self._outcomes.connected.is_set():
                remaining = min(remaining, LEDGER_POLL_SECONDS)
            try:
                async with asyncio.timeout(remaining):
                    await changes.changed.wait()
            except TimeoutError:
                # As the refused above: first requests admitted together run out of
                # wait together (100 answered 202 in one turn, 5 s into the storm).
                await self._expired_waits.wait_turn()
            changes.changed.clear()
            current = await self._stored(client_id, key)

    async def _answer_without_outcome(
        self, client_id: str, key: str, request: PaymentRequest, request_id: str | None
    ) -> PaymentAnswer:
        """A 202 promises the payment exists. A ledger row proves it (only a confirmed
        run opens one) and names the original request; without one, the run's memo
        does, and if Temporal cannot answer, a retry with the same key is the safe answer.
        """
        fingerprint = request.fingerprint()
        opened = await self._stored(client_id, key)
        if opened is not None and opened.origin_request_id is not None:
            if opened.request_fingerprint != fingerprint:
                raise idempotency_key_reused()
            return PaymentAnswer(opened.payment, replayed=opened.origin_request_id != request_id)
        origin = await self._run_origin(payment_workflow_id(client_id, key))
        if origin is None:
            raise temporal_unavailable("no run found after the wait")
        if origin.request_fingerprint != fingerprint:
            raise idempotency_key_reused()
        if not origin.running:
            # A closed run that never opened its row (failed or terminated before it).
            return await self._closed_run_answer(client_id, key, fingerprint)
        # The same fingerprint: this request's body is the run's.
        stored = await self._open_row(
            PaymentInput.for_request(client_id, key, request, origin.request_id)
        )
        return PaymentAnswer(stored.payment, replayed=origin.request_id != request_id)

    async def _run_origin(self, workflow_id: str) -> _RunOrigin | None:
        """The request that started the run, or None if Temporal has no such run."""
        try:
            # The SDK retries an unreachable server for up to 10 s; we have waited enough.
            async with asyncio.timeout(DESCRIBE_TIMEOUT.total_seconds()):
                description = await self._temporal.get_workflow_handle(workflow_id).describe(
                    rpc_timeout=DESCRIBE_TIMEOUT
                )
        except TimeoutError as exc:
            raise temporal_unavailable(exc) from exc
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise temporal_unavailable(exc) from exc
        memo = await description.memo()
        return _RunOrigin(
            request_id=str(memo.get(ORIGIN_REQUEST_MEMO, "")),
            request_fingerprint=str(memo.get(ORIGIN_FINGERPRINT_MEMO, "")),
            running=description.status == WorkflowExecutionStatus.RUNNING,
        )

    async def _open_row(self, payment_input: PaymentInput) -> StoredPayment:
        """The payment's ledger row, opened now if no one has yet.

        Called only once Temporal confirmed the run, so the row never outlives a run
        that does not exist; the workflow's own (idempotent) open finds it later, and
        ``GET /v1/payments/{id}`` works even while every worker is down.
        """
        try:
            if self._ledger is not None:
                return await self._ledger.open_payment(payment_input)
            async with self._sessions() as session, session.begin():
                return await PaymentRepository(session).open(payment_input)
        except (OperationalError, DBAPIError, *DATABASE_ERRORS) as exc:
            raise database_unavailable(exc) from exc

    async def _closed_run_answer(self, client_id: str, key: str, fingerprint: str) -> PaymentAnswer:
        """The run for this key has closed: the ledger row is the durable answer."""
        stored = await self._stored(client_id, key)
        if stored is None:
            raise Problem(
                409,
                "idempotency-key-unusable",
                "Idempotency-Key cannot be used",
                "A payment with this key was started but never recorded. Use a new key.",
            )
        if stored.request_fingerprint != fingerprint:
            raise idempotency_key_reused()
        return PaymentAnswer(stored.payment, replayed=True)
