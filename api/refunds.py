"""Reserve-then-start a refund, and read it back.

The ledger reserves the amount first, under the payment's row lock: a refund of a
payment that has not succeeded, or for more than remains, is refused right here
and nothing is created, so the key stays free. A reserved refund then runs as a
RefundWorkflow through update-with-start, with the same rules as payments.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
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

from api.payments import _TRANSIENT_RPC, DESCRIBE_TIMEOUT
from api.problems import (
    Problem,
    database_unavailable,
    idempotency_key_reused,
    payment_not_found,
    temporal_unavailable,
)
from domain import search_attributes
from domain.payments import ErrorType
from domain.refunds import (
    REFUND_REFUSED_ERROR,
    Refund,
    RefundAttachRequest,
    RefundAttachResult,
    RefundInput,
    RefundRefusal,
    RefundRequest,
    Reservation,
    refund_workflow_id,
)
from ledger.repositories import RefundRepository
from workflows.refund import AWAIT_REFUND_UPDATE, RefundWorkflow


def payment_not_refundable(payment_id: str, status: str | None) -> Problem:
    return Problem(
        409,
        "payment-not-refundable",
        "Payment cannot be refunded",
        f"Payment {payment_id} is {status}; only a succeeded payment can be refunded. "
        "Nothing was changed.",
        extra={"payment_status": status},
    )


def refund_exceeds_refundable(payment_id: str, remaining: int) -> Problem:
    return Problem(
        409,
        "refund-exceeds-refundable",
        "Refund amount exceeds what remains refundable",
        f"Payment {payment_id} has {remaining} (minor units) left to refund. Nothing was changed.",
        extra={"amount_refundable": remaining},
    )


def refusal_problem(
    payment_id: str,
    refusal: RefundRefusal,
    payment_status: str | None,
    amount_refundable: int | None,
) -> Problem:
    if refusal is RefundRefusal.PAYMENT_NOT_FOUND:
        return payment_not_found()
    if refusal is RefundRefusal.IDEMPOTENCY_KEY_REUSED:
        return idempotency_key_reused()
    if refusal is RefundRefusal.PAYMENT_NOT_REFUNDABLE:
        return payment_not_refundable(payment_id, payment_status)
    return refund_exceeds_refundable(payment_id, amount_refundable or 0)


# Payment and refund ids are short printable ASCII; a path segment that is not one (a NUL
# would make PostgreSQL refuse the query, read as an outage) names nothing: 404.
MAX_ID_LENGTH = 64


def could_be_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_LENGTH and all(0x21 <= ord(c) <= 0x7E for c in value)


@dataclass(frozen=True)
class RefundAnswer:
    refund: Refund
    replayed: bool


def summary_for(client_name: str, key: str, refund: Refund) -> str:
    major, minor = divmod(refund.amount, 100)
    return (
        f"Refund {major}.{minor:02d} {refund.currency} of payment {refund.payment_id} "
        f"for client {client_name}, key {key}"
    )


class RefundService:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], temporal: Client, task_queue: str
    ) -> None:
        self._sessions = sessions
        self._temporal = temporal
        self._task_queue = task_queue

    async def get(self, client_id: str, payment_id: str, refund_id: str) -> Refund | None:
        if not (could_be_id(payment_id) and could_be_id(refund_id)):
            return None
        try:
            async with self._sessions() as session:
                return await RefundRepository(session).get(client_id, payment_id, refund_id)
        except (OperationalError, DBAPIError) as exc:
            raise database_unavailable(exc) from exc

    async def _reserve(self, refund_input: RefundInput) -> Reservation:
        try:
            async with self._sessions() as session, session.begin():
                return await RefundRepository(session).reserve(refund_input)
        except (OperationalError, DBAPIError) as exc:
            raise database_unavailable(exc) from exc

    async def _stored(self, client_id: str, key: str) -> Refund:
        try:
            async with self._sessions() as session:
                stored = await RefundRepository(session).get_by_key(client_id, key)
        except (OperationalError, DBAPIError) as exc:
            raise database_unavailable(exc) from exc
        if stored is None:  # pragma: no cover - reserved before the workflow started
            raise RuntimeError(f"refund for key {key!r} vanished")
        return stored.refund

    async def create(
        self,
        *,
        client_id: str,
        client_name: str,
        key: str,
        request: RefundRequest,
        wait_seconds: float,
    ) -> RefundAnswer:
        if not could_be_id(request.payment_id):
            raise payment_not_found()
        request_id = uuid.uuid4().hex
        fingerprint = request.fingerprint()
        refund_input = RefundInput.for_request(client_id, key, request, request_id)
        reservation = await self._reserve(refund_input)
        if reservation.refusal is not None or reservation.refund is None:
            assert reservation.refusal is not None
            raise refusal_problem(
                request.payment_id,
                reservation.refusal,
                reservation.payment_status,
                reservation.amount_refundable,
            )
        refund = reservation.refund
        # The ledger decides who is first: the request whose reservation it inserted.
        replayed = not reservation.created
        if refund.status.is_terminal:
            return RefundAnswer(refund, replayed=True)

        workflow_id = refund_workflow_id(client_id, key)
        start = WithStartWorkflowOperation(
            RefundWorkflow.run,
            refund_input,
            id=workflow_id,
            task_queue=self._task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(search_attributes.CLIENT_ID, client_id),
                    SearchAttributePair(search_attributes.IDEMPOTENCY_KEY, key),
                    SearchAttributePair(search_attributes.AMOUNT_MINOR, refund.amount),
                    SearchAttributePair(search_attributes.CURRENCY, refund.currency),
                    *(
                        [
                            SearchAttributePair(
                                search_attributes.PROVIDER_CHARGE_ID,
                                reservation.provider_charge_id,
                            )
                        ]
                        if reservation.provider_charge_id
                        else []
                    ),
                ]
            ),
            static_summary=summary_for(client_name, key, refund),
            static_details=(
                f"Refund {refund.id} of payment {refund.payment_id}\n"
                f"Client: {client_name} ({client_id})\nIdempotency-Key: {key}\n"
                f"Amount: {refund.amount} {refund.currency} (minor units)\n"
                f"Reason: {refund.reason or '-'}"
            ),
        )
        try:
            async with asyncio.timeout(wait_seconds):
                result: RefundAttachResult = (
                    await self._temporal.execute_update_with_start_workflow(
                        AWAIT_REFUND_UPDATE,
                        RefundAttachRequest(request_id=request_id, request_fingerprint=fingerprint),
                        start_workflow_operation=start,
                        result_type=RefundAttachResult,
                    )
                )
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            # A 202 promises the refund is on its way: say it only once Temporal has the run.
            if not await self._run_exists(workflow_id):
                raise temporal_unavailable("no run found after the wait") from None
            return RefundAnswer(await self._stored(client_id, key), replayed=replayed)
        except WorkflowUpdateFailedError as exc:
            raise self._update_failure(request.payment_id, exc) from exc
        except WorkflowAlreadyStartedError:
            return RefundAnswer(await self._stored(client_id, key), replayed=True)
        except RPCError as exc:
            if exc.status == RPCStatusCode.ALREADY_EXISTS:
                return RefundAnswer(await self._stored(client_id, key), replayed=True)
            if exc.status in _TRANSIENT_RPC:
                raise temporal_unavailable(exc) from exc
            raise
        except RuntimeError as exc:
            if "Failed client connect" in str(exc):
                raise temporal_unavailable(exc) from exc
            raise
        return RefundAnswer(result.refund, replayed=replayed)

    @staticmethod
    def _update_failure(payment_id: str, exc: WorkflowUpdateFailedError) -> Exception:
        cause = exc.cause
        if isinstance(cause, ApplicationError):
            if cause.type == ErrorType.IDEMPOTENCY_KEY_REUSED:
                return idempotency_key_reused()
            if cause.type == REFUND_REFUSED_ERROR:
                details: Any = cause.details[0] if cause.details else {}
                details = details if isinstance(details, dict) else {}
                return refusal_problem(
                    payment_id,
                    RefundRefusal(details.get("refusal", RefundRefusal.PAYMENT_NOT_REFUNDABLE)),
                    details.get("payment_status"),
                    details.get("amount_refundable"),
                )
        return exc

    async def _run_exists(self, workflow_id: str) -> bool:
        try:
            async with asyncio.timeout(DESCRIBE_TIMEOUT.total_seconds()):
                await self._temporal.get_workflow_handle(workflow_id).describe(
                    rpc_timeout=DESCRIBE_TIMEOUT
                )
        except TimeoutError as exc:
            raise temporal_unavailable(exc) from exc
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise temporal_unavailable(exc) from exc
        return True


async def _refund_service(request: Request) -> RefundService:  # async: see api/dependencies
    service: RefundService = request.app.state.refunds
    return service


RefundServiceDep = Annotated[RefundService, Depends(_refund_service)]
