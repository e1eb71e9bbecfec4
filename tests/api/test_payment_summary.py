"""The static summary support staff read in the Temporal UI states the amount as money."""

from __future__ import annotations

import pytest

from api.payments import summary_for
from domain.payments import PaymentRequest


@pytest.mark.parametrize(
    ("amount", "currency", "reads"),
    [(1250, "EUR", "12.50 EUR"), (1250, "JPY", "1250 JPY"), (1250, "KWD", "1.250 KWD")],
)
def test_summary_states_the_amount_in_the_currencys_minor_unit(
    amount: int, currency: str, reads: str
) -> None:
    request = PaymentRequest(amount=amount, currency=currency, payment_method="pm_card_visa")
    assert summary_for("acme", "order-1234", request) == (
        f"Charge {reads} for client acme, key order-1234"
    )
