"""Test payment methods, named like Stripe's test tokens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decline:
    code: str
    decline_code: str
    message: str


SUCCEEDING = frozenset({"pm_card_visa", "pm_card_mastercard"})

DECLINING: dict[str, Decline] = {
    "pm_card_chargeDeclined": Decline(
        "card_declined", "generic_decline", "Your card was declined."
    ),
    "pm_card_chargeDeclinedInsufficientFunds": Decline(
        "card_declined", "insufficient_funds", "Your card has insufficient funds."
    ),
    "pm_card_chargeDeclinedExpiredCard": Decline(
        "expired_card", "expired_card", "Your card has expired."
    ),
    "pm_card_chargeDeclinedProcessingError": Decline(
        "processing_error",
        "processing_error",
        "An error occurred while processing your card. Try again in a little bit.",
    ),
}


def is_known(payment_method: str) -> bool:
    return payment_method in SUCCEEDING or payment_method in DECLINING
