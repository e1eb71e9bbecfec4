"""The Idempotency-Key header as the IETF draft (quoted) and Stripe (bare) send it."""

from __future__ import annotations

import pytest

from api.idempotency import parse_idempotency_key
from api.problems import Problem


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ("order 1234/attempt:1", "order 1234/attempt:1"),
        ("k" * 255, "k" * 255),
    ],
)
def test_valid_keys_are_accepted_quoted_or_bare(raw: str, key: str) -> None:
    assert parse_idempotency_key(raw) == key


def test_a_missing_key_is_its_own_problem() -> None:
    for raw in (None, ""):
        with pytest.raises(Problem) as missing:
            parse_idempotency_key(raw)
        assert (missing.value.status, missing.value.slug) == (400, "idempotency-key-missing")


@pytest.mark.parametrize(
    "raw",
    ["k" * 256, '""', "caf\u00e9", "tab\there", "new\nline", '"a"b"', '"back\\slash"'],
)
def test_invalid_keys_are_refused(raw: str) -> None:
    with pytest.raises(Problem) as invalid:
        parse_idempotency_key(raw)
    assert (invalid.value.status, invalid.value.slug) == (400, "idempotency-key-invalid")
