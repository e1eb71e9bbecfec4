"""API keys and webhook secrets: how they are made and how a key is recognised."""

from __future__ import annotations

import base64
import hashlib
import secrets

API_KEY_PREFIX = "sk_"


def new_api_key() -> str:
    # 256 random bits; the prefix makes a leaked key recognisable to secret scanners.
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def display_prefix(api_key: str) -> str:
    return api_key[:10]


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def new_client_id() -> str:
    return "cli_" + secrets.token_hex(8)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)
