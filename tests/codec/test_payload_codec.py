"""The AES-GCM payload codec: what goes to Temporal is sealed, names its key, and opens
only with that key, untampered."""

from __future__ import annotations

import base64
import json

import pytest
from pydantic import SecretStr, ValidationError
from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter

from config.codec import (
    ENCODING,
    KEY_ID_METADATA,
    AesGcmCodec,
    PayloadDecryptionError,
    PayloadKeyError,
    new_payload_key,
    parse_payload_keys,
)
from config.settings import Settings
from config.temporal import data_converter
from domain.payments import PaymentRequest

REQUEST = PaymentRequest(
    amount=1250,
    currency="EUR",
    payment_method="pm_card_visa",
    metadata={"customer_email": "ada@example.com"},
)


def _key() -> bytes:
    return base64.b64decode(new_payload_key())


def _converter(keys: dict[str, bytes], active: str) -> DataConverter:
    return DataConverter(payload_codec=AesGcmCodec(keys, active))


async def test_a_payload_round_trips_and_nothing_readable_is_stored() -> None:
    converter = _converter({"k1": _key()}, "k1")
    [stored] = await converter.encode([REQUEST])

    assert stored.metadata["encoding"] == ENCODING
    assert stored.metadata[KEY_ID_METADATA] == b"k1"
    raw = stored.SerializeToString()
    for secret in (b"pm_card_visa", b"ada@example.com", b"1250", b"json/plain"):
        assert secret not in raw
    assert await converter.decode([stored], [PaymentRequest]) == [REQUEST]


async def test_the_same_value_seals_differently_each_time() -> None:
    converter = _converter({"k1": _key()}, "k1")
    [a] = await converter.encode([REQUEST])
    [b] = await converter.encode([REQUEST])
    assert a.data != b.data


async def test_after_rotation_old_payloads_open_and_new_ones_use_the_new_key() -> None:
    old, new = _key(), _key()
    before = _converter({"2026-01": old}, "2026-01")
    [sealed_before] = await before.encode([REQUEST])

    rotated = _converter({"2026-01": old, "2026-06": new}, "2026-06")
    [sealed_after] = await rotated.encode([REQUEST])

    assert sealed_after.metadata[KEY_ID_METADATA] == b"2026-06"
    assert await rotated.decode([sealed_before], [PaymentRequest]) == [REQUEST]
    assert await rotated.decode([sealed_after], [PaymentRequest]) == [REQUEST]
    # A deployment that only has the old key cannot read what the new key sealed.
    with pytest.raises(PayloadDecryptionError, match="unknown key id '2026-06'"):
        await before.decode([sealed_after], [PaymentRequest])


async def test_a_tampered_ciphertext_does_not_open() -> None:
    converter = _converter({"k1": _key()}, "k1")
    [stored] = await converter.encode([REQUEST])
    flipped = bytearray(stored.data)
    flipped[-1] ^= 0x01
    tampered = Payload(metadata=dict(stored.metadata), data=bytes(flipped))
    with pytest.raises(PayloadDecryptionError, match="failed authentication"):
        await converter.decode([tampered], [PaymentRequest])


async def test_a_payload_relabelled_with_another_key_id_does_not_open() -> None:
    key = _key()
    # Same key under two ids: the id is authenticated data, so relabelling is caught.
    converter = _converter({"a": key, "b": key}, "a")
    [stored] = await converter.encode([REQUEST])
    relabelled = Payload(metadata={**stored.metadata, KEY_ID_METADATA: b"b"}, data=stored.data)
    with pytest.raises(PayloadDecryptionError):
        await converter.decode([relabelled], [PaymentRequest])


async def test_payloads_written_before_encryption_still_decode() -> None:
    [plain] = await DataConverter.default.encode([REQUEST])
    converter = _converter({"k1": _key()}, "k1")
    assert await converter.decode([plain], [PaymentRequest]) == [REQUEST]


def test_keys_parse_from_a_list_or_json() -> None:
    k1, k2 = new_payload_key(), new_payload_key()
    as_list = parse_payload_keys(f"k1:{k1}, k2:{k2}")
    as_json = parse_payload_keys(json.dumps({"k1": k1, "k2": k2}))
    assert as_list == as_json == {"k1": base64.b64decode(k1), "k2": base64.b64decode(k2)}


@pytest.mark.parametrize(
    "text",
    ["k1", "k1:not-base64!", f"k1:{base64.b64encode(b'short').decode()}", "[1, 2]"],
)
def test_unusable_keys_are_refused(text: str) -> None:
    with pytest.raises(PayloadKeyError):
        parse_payload_keys(text)


def test_settings_pick_the_active_key_and_refuse_an_unknown_one() -> None:
    k1, k2 = new_payload_key(), new_payload_key()
    one = Settings(payload_keys=SecretStr(f"k1:{k1}"))
    assert one.payload_keyring == ({"k1": base64.b64decode(k1)}, "k1")
    two = Settings(payload_keys=SecretStr(f"k1:{k1},k2:{k2}"), payload_key_id="k2")
    assert two.payload_keyring is not None
    assert two.payload_keyring[1] == "k2"
    with pytest.raises(ValidationError, match="must name the active key"):
        Settings(payload_keys=SecretStr(f"k1:{k1},k2:{k2}"))
    with pytest.raises(ValidationError, match="'k3' is not in the keys"):
        Settings(payload_keys=SecretStr(f"k1:{k1}"), payload_key_id="k3")


def test_a_malformed_key_error_never_echoes_the_key() -> None:
    secret = base64.b64encode(b"sixteen-byte-key" * 3)[:-3].decode() + "!!!"
    with pytest.raises(ValidationError) as raised:
        Settings(payload_keys=SecretStr(f"k1:{secret}"))
    assert secret not in str(raised.value)


def test_production_requires_payload_keys() -> None:
    with pytest.raises(ValidationError, match="PAYMENTS_PAYLOAD_KEYS must be set"):
        Settings(environment="production", provider_api_key=SecretStr("sk_live_real"))
    Settings(
        environment="production",
        provider_api_key=SecretStr("sk_live_real"),
        payload_keys=SecretStr(f"k1:{new_payload_key()}"),
    )


def test_production_refuses_a_short_codec_token() -> None:
    production = {
        "environment": "production",
        "provider_api_key": SecretStr("sk_live_real"),
        "payload_keys": SecretStr(f"k1:{new_payload_key()}"),
    }
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(**production, codec_auth_token=SecretStr("short"))  # type: ignore[arg-type]
    Settings(**production, codec_auth_token=SecretStr("x" * 32))  # type: ignore[arg-type]


async def test_the_configured_converter_encrypts() -> None:
    settings = Settings(payload_keys=SecretStr(f"k1:{new_payload_key()}"))
    [stored] = await data_converter(settings).encode([REQUEST])
    assert stored.metadata["encoding"] == ENCODING
    assert data_converter(Settings()) is DataConverter.default
