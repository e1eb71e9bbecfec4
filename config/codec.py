"""The payload codec: every workflow and activity payload is AES-GCM encrypted before it
reaches Temporal, so card tokens and customer metadata never sit there in clear.

Each encrypted payload names the key that sealed it (metadata ``encryption-key-id``):
rotating is adding a new key, making it the active one, and keeping the old ones
for as long as histories they sealed are kept (the namespace's retention).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
_NONCE_BYTES = 12
_KEY_SIZES = (16, 24, 32)


class PayloadKeyError(ValueError):
    """The configured keys cannot be used (malformed, wrong size, unknown active id)."""


class PayloadDecryptionError(ValueError):
    """An encrypted payload could not be opened: unknown key id or tampered bytes."""


def parse_payload_keys(text: str) -> dict[str, bytes]:
    """Keys from settings: JSON ``{"id": "base64"}`` or ``id:base64,id:base64``."""
    text = text.strip()
    if not text:
        return {}
    raw: Mapping[str, object]
    if text.startswith("{"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PayloadKeyError("payload keys: not valid JSON") from exc
        if not isinstance(loaded, dict):
            raise PayloadKeyError("payload keys: expected a JSON object of id -> base64 key")
        raw = loaded
    else:
        pairs: dict[str, object] = {}
        for item in text.split(","):
            key_id, sep, encoded = item.strip().partition(":")
            if not sep:
                raise PayloadKeyError("payload keys: expected id:base64key, comma separated")
            pairs[key_id.strip()] = encoded.strip()
        raw = pairs
    keys: dict[str, bytes] = {}
    for key_id, value in raw.items():
        if not key_id or not isinstance(value, str):
            raise PayloadKeyError("payload keys: every key needs an id and a base64 string")
        try:
            key = base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            # The id is safe to name; the value never is.
            raise PayloadKeyError(f"payload key {key_id!r}: not valid base64") from exc
        if len(key) not in _KEY_SIZES:
            raise PayloadKeyError(
                f"payload key {key_id!r}: {len(key)} bytes; AES needs 16, 24 or 32 (32 advised)"
            )
        keys[key_id] = key
    return keys


def new_payload_key() -> str:
    """A fresh AES-256 key, base64, as settings expect it."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


class AesGcmCodec(PayloadCodec):
    """Seals with the active key; opens with whichever key the payload names."""

    def __init__(self, keys: Mapping[str, bytes], active_key_id: str) -> None:
        if active_key_id not in keys:
            raise PayloadKeyError(f"active payload key {active_key_id!r} is not among the keys")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._active_id = active_key_id
        self._active = self._ciphers[active_key_id]
        self._active_id_bytes = active_key_id.encode()

    @property
    def active_key_id(self) -> str:
        return self._active_id

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        nonce = os.urandom(_NONCE_BYTES)
        # The key id is authenticated too: relabelling a payload makes it fail to open.
        sealed = self._active.encrypt(nonce, payload.SerializeToString(), self._active_id_bytes)
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID_METADATA: self._active_id_bytes},
            data=nonce + sealed,
        )

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            # Written before encryption was switched on (or by a client without it).
            return payload
        key_id_bytes = payload.metadata.get(KEY_ID_METADATA, b"")
        key_id = key_id_bytes.decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise PayloadDecryptionError(f"payload sealed with unknown key id {key_id!r}")
        data = payload.data
        try:
            opened = cipher.decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], key_id_bytes)
        except InvalidTag as exc:
            raise PayloadDecryptionError(
                f"payload sealed with key {key_id!r} failed authentication (tampered?)"
            ) from exc
        return Payload.FromString(opened)
