"""Temporal test-environment helpers."""

from __future__ import annotations

from pydantic import SecretStr
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeIndexedValueType
from temporalio.converter import DataConverter

from config.codec import new_payload_key
from config.settings import Settings
from config.temporal import data_converter
from domain import search_attributes


async def register_search_attributes(client: Client) -> None:
    """The time-skipping server starts with none of ours; the workflow needs them all."""
    await client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=client.namespace,
            search_attributes={
                key.name: IndexedValueType.ValueType(
                    SearchAttributeIndexedValueType(key.indexed_value_type).value
                )
                for key in search_attributes.ALL
            },
        )
    )


def encrypting_data_converter() -> DataConverter:
    """What production clients use: payloads sealed by the AES-GCM codec (a fresh key)."""
    settings = Settings(payload_keys=SecretStr(f"test:{new_payload_key()}"))
    return data_converter(settings)
