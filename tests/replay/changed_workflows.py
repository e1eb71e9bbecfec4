"""Deliberately changed copies of PaymentWorkflow, for the guard test of the replay suite.

Both ask the provider whether it already holds a charge for the payment before
charging it: a plausible change, and one that adds a command in the middle of
every history recorded before it.

- ``LookupBeforeChargeWorkflow`` makes the change as a developer might first write
  it: payments already running would fail with a non-determinism error.
- ``PatchedLookupBeforeChargeWorkflow`` puts the same change behind
  ``workflow.patched``: histories recorded without the patch marker take the old path.

Both keep the persisted name ``Payment`` so that they replay PaymentWorkflow's histories.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.payments import PaymentActivities
    from domain.payments import FindChargeInput, Payment, PaymentInput, RecordOutcomeInput
    from workflows.payment import LOOKUP_RETRY, LOOKUP_START_TO_CLOSE, PaymentWorkflow

LOOKUP_BEFORE_CHARGE_PATCH = "lookup-before-charge"


async def _look_up_first(input: PaymentInput) -> None:
    await workflow.execute_activity_method(
        PaymentActivities.find_charge,
        FindChargeInput(payment_id=input.payment_id),
        start_to_close_timeout=LOOKUP_START_TO_CLOSE,
        retry_policy=LOOKUP_RETRY,
        summary="Look for an earlier charge before charging",
    )


@workflow.defn(name="Payment")
class LookupBeforeChargeWorkflow(PaymentWorkflow):
    @workflow.run
    async def run(self, input: PaymentInput) -> Payment:
        return await super().run(input)

    async def _charge(self, input: PaymentInput) -> RecordOutcomeInput:
        await _look_up_first(input)
        return await super()._charge(input)


@workflow.defn(name="Payment")
class PatchedLookupBeforeChargeWorkflow(PaymentWorkflow):
    @workflow.run
    async def run(self, input: PaymentInput) -> Payment:
        return await super().run(input)

    async def _charge(self, input: PaymentInput) -> RecordOutcomeInput:
        if workflow.patched(LOOKUP_BEFORE_CHARGE_PATCH):
            await _look_up_first(input)
        return await super()._charge(input)
