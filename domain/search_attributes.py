"""Search attributes that make a payment findable in the Temporal UI.

Registered by the dev stack (``temporal server start-dev --search-attribute``) and,
in production, once per namespace with ``temporal operator search-attribute create``.
None is called ``Status``: the UI already has a column of that name.
"""

from temporalio.common import SearchAttributeKey

PAYMENT_STATUS = SearchAttributeKey.for_keyword("PaymentStatus")
CLIENT_ID = SearchAttributeKey.for_keyword("ClientId")
IDEMPOTENCY_KEY = SearchAttributeKey.for_keyword("IdempotencyKey")
AMOUNT_MINOR = SearchAttributeKey.for_int("AmountMinor")
CURRENCY = SearchAttributeKey.for_keyword("Currency")
PROVIDER_CHARGE_ID = SearchAttributeKey.for_keyword("ProviderChargeId")
FAILURE_CODE = SearchAttributeKey.for_keyword("FailureCode")

ALL = (
    PAYMENT_STATUS,
    CLIENT_ID,
    IDEMPOTENCY_KEY,
    AMOUNT_MINOR,
    CURRENCY,
    PROVIDER_CHARGE_ID,
    FAILURE_CODE,
)


def cli_registrations() -> list[str]:
    """``NAME=Type`` strings as ``temporal ... --search-attribute`` takes them."""
    kinds = {"KEYWORD": "Keyword", "INT": "Int"}
    return [f"{key.name}={kinds[key.indexed_value_type.name]}" for key in ALL]
