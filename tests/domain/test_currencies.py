"""Amounts are shown in their currency's own minor unit (ISO 4217), never always /100."""

from __future__ import annotations

import pytest

from domain.currencies import (
    ACTIVE_CURRENCIES,
    MINOR_UNIT_EXPONENTS,
    format_amount,
    minor_unit_exponent,
)


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        (1250, "EUR", "12.50 EUR"),
        (5, "USD", "0.05 USD"),
        (100, "GBP", "1.00 GBP"),
        (1250, "JPY", "1250 JPY"),
        (1250, "KRW", "1250 KRW"),
        (150000, "CLP", "150000 CLP"),
        (1250, "KWD", "1.250 KWD"),
        (7, "BHD", "0.007 BHD"),
        (1250, "eur", "12.50 EUR"),
    ],
)
def test_an_amount_reads_in_its_currencys_minor_unit(
    amount: int, currency: str, shown: str
) -> None:
    assert format_amount(amount, currency) == shown


def test_zero_and_three_decimal_currencies_are_the_iso_4217_ones() -> None:
    zero = {code for code, exponent in MINOR_UNIT_EXPONENTS.items() if exponent == 0}
    three = {code for code, exponent in MINOR_UNIT_EXPONENTS.items() if exponent == 3}
    assert zero == {
        "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX",
        "VND", "VUV", "XAF", "XOF", "XPF",
    }  # fmt: skip
    assert three == {"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"}
    assert set(MINOR_UNIT_EXPONENTS) <= ACTIVE_CURRENCIES, "exponents only for accepted codes"
    assert minor_unit_exponent("usd") == 2
