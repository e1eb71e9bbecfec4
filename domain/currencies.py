"""ISO 4217 currencies a payment may be made in.

The active tender currencies of ISO 4217 (list one), as of 2026: withdrawn codes
(HRK 2023, ANG 2025, ZWL 2024, SLL, CUC, BGN 2026) are refused, their successors
(XCG, ZWG) accepted. Fund codes (BOV, CHE, USN, ...), precious metals (XAU, ...),
bond units, XDR and the testing codes (XTS, XXX) are not money a card is charged in.
Static on purpose: pure, sandbox-safe, reviewed when ISO publishes an amendment.

Amounts are integers in minor units; how many digits of them are the fraction is
the currency's ISO 4217 minor unit (its exponent): 2 for most, 0 for JPY (1250 JPY
is 1250 yen), 3 for the dinars of Bahrain, Iraq, Jordan, Kuwait, Libya, Tunisia
and the Omani rial (1250 KWD is 1.250 dinars).
"""

from __future__ import annotations

ACTIVE_CURRENCIES: frozenset[str] = frozenset(
    {
        "AED",
        "AFN",
        "ALL",
        "AMD",
        "AOA",
        "ARS",
        "AUD",
        "AWG",
        "AZN",
        "BAM",
        "BBD",
        "BDT",
        "BHD",
        "BIF",
        "BMD",
        "BND",
        "BOB",
        "BRL",
        "BSD",
        "BTN",
        "BWP",
        "BYN",
        "BZD",
        "CAD",
        "CDF",
        "CHF",
        "CLP",
        "CNY",
        "COP",
        "CRC",
        "CUP",
        "CVE",
        "CZK",
        "DJF",
        "DKK",
        "DOP",
        "DZD",
        "EGP",
        "ERN",
        "ETB",
        "EUR",
        "FJD",
        "FKP",
        "GBP",
        "GEL",
        "GHS",
        "GIP",
        "GMD",
        "GNF",
        "GTQ",
        "GYD",
        "HKD",
        "HNL",
        "HTG",
        "HUF",
        "IDR",
        "ILS",
        "INR",
        "IQD",
        "IRR",
        "ISK",
        "JMD",
        "JOD",
        "JPY",
        "KES",
        "KGS",
        "KHR",
        "KMF",
        "KPW",
        "KRW",
        "KWD",
        "KYD",
        "KZT",
        "LAK",
        "LBP",
        "LKR",
        "LRD",
        "LSL",
        "LYD",
        "MAD",
        "MDL",
        "MGA",
        "MKD",
        "MMK",
        "MNT",
        "MOP",
        "MRU",
        "MUR",
        "MVR",
        "MWK",
        "MXN",
        "MYR",
        "MZN",
        "NAD",
        "NGN",
        "NIO",
        "NOK",
        "NPR",
        "NZD",
        "OMR",
        "PAB",
        "PEN",
        "PGK",
        "PHP",
        "PKR",
        "PLN",
        "PYG",
        "QAR",
        "RON",
        "RSD",
        "RUB",
        "RWF",
        "SAR",
        "SBD",
        "SCR",
        "SDG",
        "SEK",
        "SGD",
        "SHP",
        "SLE",
        "SOS",
        "SRD",
        "SSP",
        "STN",
        "SVC",
        "SYP",
        "SZL",
        "THB",
        "TJS",
        "TMT",
        "TND",
        "TOP",
        "TRY",
        "TTD",
        "TWD",
        "TZS",
        "UAH",
        "UGX",
        "USD",
        "UYU",
        "UZS",
        "VED",
        "VES",
        "VND",
        "VUV",
        "WST",
        "XAF",
        "XCD",
        "XCG",
        "XOF",
        "XPF",
        "YER",
        "ZAR",
        "ZMW",
        "ZWG",
    }
)


# ISO 4217 list one, "Minor unit" column, for the active currencies above whose minor
# unit is not 2. Every other active currency has 2.
MINOR_UNIT_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(
        ("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX",
         "VND", "VUV", "XAF", "XOF", "XPF"),
        0,
    ),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
}  # fmt: skip
DEFAULT_MINOR_UNIT_EXPONENT = 2


def minor_unit_exponent(code: str) -> int:
    """Digits of a minor-unit amount that are the fraction: 0 (JPY), 2 (EUR) or 3 (KWD)."""
    return MINOR_UNIT_EXPONENTS.get(code.upper(), DEFAULT_MINOR_UNIT_EXPONENT)


def format_amount(amount: int, currency: str) -> str:
    """A minor-unit amount as people read it: ``1250 EUR`` -> ``12.50 EUR``,
    ``1250 JPY`` -> ``1250 JPY``, ``1250 KWD`` -> ``1.250 KWD``."""
    code = currency.upper()
    exponent = minor_unit_exponent(code)
    sign = "-" if amount < 0 else ""
    if exponent == 0:
        return f"{sign}{abs(amount)} {code}"
    major, minor = divmod(abs(amount), 10**exponent)
    return f"{sign}{major}.{minor:0{exponent}d} {code}"


def is_active_currency(code: str) -> bool:
    """``code`` in upper case is an active ISO 4217 tender currency."""
    return code.upper() in ACTIVE_CURRENCIES
