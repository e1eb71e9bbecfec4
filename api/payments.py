"""Start-or-attach a payment and read it back.

The ledger answers what it already knows (a finished payment, a reused key);
everything else goes to the payment's workflow through update-with-start, which
either starts the run or attaches to the running one.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.problems import (
    Problem,
    database_unavailable,
    idempotency_key_reused,
    temporal_unavailable,
)
from domain import search_attributes
from domain.currencies import format_amount
from domain.payments import (
    AttachRequest,
    AttachResult,
    ErrorType,
    Payment,
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    payment_id_for,
    payment_workflow_id,
)
from ledger.outcomes import OutcomeListener
from ledger.repositories import PaymentPage, PaymentRepository, StoredPayment
from workflows.payment import AWAIT_OUTCOME_UPDATE, PaymentWorkflow

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
# A duplicate waiting on the ledger re-reads it this often even without a notification
# (one missed while the listener reconnects).
LEDGER_POLL_SECONDS = 1.0


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
    ) -> None:
        self._sessions = sessions
        self._temporal = temporal
        self._task_queue = task_queue
        self._outcomes = outcomes

    async def _stored(self, client_id: str, key: str) -> StoredPayment | None:
        try:
            async with self._sessions() as session:
                return await PaymentRepository(session).get_by_key(client_id, key)
        except (OperationalError, DBAPIError) as exc:
            raise database_unavailable() from exc

    async def get(self, client_id: str, payment_id: str) -> Payment | None:
        try:
            async with self._sessions() as session:
                return await PaymentRepository(session).get(client_id, payment_id)
        except (OperationalError, DBAPIError) as exc:
            raise database_unavailable() from exc

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
            async with self._sessions() as session:
                return await PaymentRepository(session).list_for_client(
                    client_id, limit=limit, starting_after=starting_after, status=status
                )
        except (OperationalError, DBAPIError) as exc:
            raise database_unavailable() from exc

    async def create(
        self,
        *,
        client_id: str,
        client_name: str,
        key: str,
        request: PaymentRequest,
        wait_seconds: float,
    ) -> PaymentAnswer:
        fingerprint = request.fingerprint()
        stored = await self._stored(client_id, key)
        if stored is not None:
            if stored.request_fingerprint != fingerprint:
                raise idempotency_key_reused()
            if stored.payment.status.is_terminal:
                # The ledger knows the answer: no need to involve Temporal at all.
                return PaymentAnswer(stored.payment, replayed=True)
            if self._outcomes is not None:
                # The row exists only once Temporal has the run: wait on the ledger,
                # so a duplicate adds nothing to the run's history.
                return await self._await_recorded(client_id, key, stored, wait_seconds)

        request_id = uuid.uuid4().hex
        workflow_id = payment_workflow_id(client_id, key)
        payment_input = PaymentInput(
            payment_id=payment_id_for(client_id, key),
            client_id=client_id,
            idempotency_key=key,
            request=request,
            request_fingerprint=fingerprint,
            origin_request_id=request_id,
        )
        start = WithStartWorkflowOperation(
            PaymentWorkflow.run,
            payment_input,
            id=workflow_id,
            task_queue=self._task_queue,
            # Both explicit: a duplicate attaches to a running payment, and a closed
            # one is never started again (the ledger then answers).
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
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
            memo={ORIGIN_REQUEST_MEMO: request_id, ORIGIN_FINGERPRINT_MEMO: fingerprint},
            static_summary=summary_for(client_name, key, request),
            static_details=(
                f"Payment {payment_input.payment_id}\n"
                f"Client: {client_name} ({client_id})\nIdempotency-Key: {key}\n"
                f"Amount: {request.amount} {request.currency} (minor units)"
            ),
        )
        try:
            async with asyncio.timeout(wait_seconds):
                result: AttachResult = await self._temporal.execute_update_with_start_workflow(
                    # By name: the SDK's typing of a named async update loses its result type.
                    AWAIT_OUTCOME_UPDATE,
                    AttachRequest(request_id=request_id, request_fingerprint=fingerprint),
                    start_workflow_operation=start,
                    result_type=AttachResult,
                )
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            # Out of patience (the SDK reports a cancelled call as the latter). A 202
            # promises the payment exists. A ledger row proves it (only a confirmed run
            # opens one) and names the original request: no need to ask Temporal, which
            # is busiest exactly when waits run out.
            opened = await self._stored(client_id, key)
            if opened is not None and opened.origin_request_id is not None:
                if opened.request_fingerprint != fingerprint:
                    raise idempotency_key_reused() from None
                return PaymentAnswer(
                    opened.payment, replayed=opened.origin_request_id != request_id
                )
            # Otherwise only Temporal can confirm the run; if it cannot, a retry with the
            # same key is the safe answer.
            origin = await self._run_origin(workflow_id)
            if origin is None:
                raise temporal_unavailable() from None
            if origin.request_fingerprint != fingerprint:
                # The validator never saw this request: the run's own memo judges.
                raise idempotency_key_reused() from None
            # Only the request whose start created the run is the original, even if the
            # payment finished while we were waiting.
            # The row names the run's original request, whichever request opens it.
            return await self._current_answer(
                replace(payment_input, origin_request_id=origin.request_id),
                replayed=origin.request_id != request_id,
            )
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            if (
                isinstance(cause, ApplicationError)
                and cause.type == ErrorType.IDEMPOTENCY_KEY_REUSED
            ):
                raise idempotency_key_reused() from exc
            raise
        except WorkflowAlreadyStartedError:
            return await self._closed_run_answer(client_id, key, fingerprint)
        except RPCError as exc:
            if exc.status == RPCStatusCode.ALREADY_EXISTS:
                return await self._closed_run_answer(client_id, key, fingerprint)
            if exc.status in _TRANSIENT_RPC:
                raise temporal_unavailable() from exc
            raise
        except RuntimeError as exc:
            # A lazy client that has never reached the server reports it this way.
            if "Failed client connect" in str(exc):
                raise temporal_unavailable() from exc
            raise
        return PaymentAnswer(result.payment, replayed=result.replayed or stored is not None)

    async def _await_recorded(
        self, client_id: str, key: str, stored: StoredPayment, wait_seconds: float
    ) -> PaymentAnswer:
        """A duplicate of a running payment: its outcome once recorded, or, when the
        wait runs out, the payment as it stands (202)."""
        assert self._outcomes is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        async with self._outcomes.subscription(stored.payment.id) as recorded:
            while True:
                # Read after subscribing: an outcome committed in between is not missed.
                current = await self._stored(client_id, key) or stored
                remaining = deadline - loop.time()
                if current.payment.status.is_terminal or remaining <= 0:
                    return PaymentAnswer(current.payment, replayed=True)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, LEDGER_POLL_SECONDS)):
                        await recorded.wait()
                recorded.clear()

    async def _run_origin(self, workflow_id: str) -> AttachRequest | None:
        """The request that started the run, or None if Temporal has no such run."""
        try:
            # The SDK retries an unreachable server for up to 10 s; we have waited enough.
            async with asyncio.timeout(DESCRIBE_TIMEOUT.total_seconds()):
                description = await self._temporal.get_workflow_handle(workflow_id).describe(
                    rpc_timeout=DESCRIBE_TIMEOUT
                )
        except TimeoutError as exc:
            raise temporal_unavailable() from exc
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise temporal_unavailable() from exc
        memo = await description.memo()
        return AttachRequest(
            request_id=str(memo.get(ORIGIN_REQUEST_MEMO, "")),
            request_fingerprint=str(memo.get(ORIGIN_FINGERPRINT_MEMO, "")),
        )

    async def _current_answer(
        self, payment_input: PaymentInput, *, replayed: bool
    ) -> PaymentAnswer:
        """The payment as the ledger has it, opening its row if no worker has yet.

        Called only once Temporal confirmed the run, so the row never outlives a run
        that does not exist; the workflow's own (idempotent) open finds it later, and
        ``GET /v1/payments/{id}`` works even while every worker is down.
        """
        try:
            async with self._sessions() as session, session.begin():
                stored = await PaymentRepository(session).open(payment_input)
        except (OperationalError, DBAPIError) as exc:
            raise database_unavailable() from exc
        return PaymentAnswer(stored.payment, replayed=replayed)

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
