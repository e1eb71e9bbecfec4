"""One way to reach Temporal, from settings: the dev server locally, a cluster or
Temporal Cloud (TLS, API key) in production. Every client gets the same data
converter, so payloads, and the messages and stack traces of failures, are encrypted
on the way in and readable on the way out."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes

from config.codec import AesGcmCodec
from config.settings import Settings
from config.temporal_tls import temporal_tls


def data_converter(settings: Settings) -> DataConverter:
    """The converter every client, worker and replayer of this deployment must use."""
    keyring = settings.payload_keyring
    if keyring is None:
        return DataConverter.default
    keys, active = keyring
    return DataConverter(
        payload_codec=AesGcmCodec(keys, active),
        # A failure's message and stack trace move into a payload the codec seals (the
        # message left in clear reads "Encoded failure"): a provider's words and our
        # servers' file paths are for signed-in staff only.
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


async def connect_temporal(settings: Settings, *, lazy: bool = False) -> Client:
    api_key = settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        tls=temporal_tls(settings, api_key=api_key is not None),
        api_key=api_key,
        lazy=lazy,
        data_converter=data_converter(settings),
    )
