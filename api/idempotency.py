"""The Idempotency-Key header, as the IETF draft and Stripe send it."""

from __future__ import annotations

from api.problems import idempotency_key_invalid, idempotency_key_missing

MAX_KEY_LENGTH = 255


def parse_idempotency_key(raw: str | None) -> str:
    """Accept a structured-field string (``"abc"``) or a bare token (``abc``)."""
    if raw is None or raw == "":
        raise idempotency_key_missing()
    key = raw
    if len(raw) >= 2 and raw.startswith('"') and raw.endswith('"'):
        key = raw[1:-1]
        if '"' in key or "\\" in key:
            raise idempotency_key_invalid("Quoted keys may not contain quotes or backslashes.")
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise idempotency_key_invalid(f"Keys are 1 to {MAX_KEY_LENGTH} characters long.")
    if not all(0x20 <= ord(char) <= 0x7E for char in key):
        raise idempotency_key_invalid("Keys are printable ASCII characters only.")
    return key
