"""The Temporal UI that ``make run`` starts is told to decode through our endpoint,
and the stack's settings let that UI (and only it) call the endpoint."""

from __future__ import annotations

from pathlib import Path

import httpx

from devstack.ports import free_port
from devstack.stack import Stack, StackConfig
from devstack.temporal_server import TemporalDevServer


async def test_the_dev_ui_reads_its_codec_endpoint_from_the_stack(tmp_path: Path) -> None:
    endpoint = "http://127.0.0.1:8000/codec"
    ui_port = free_port()
    server = TemporalDevServer(
        tmp_path / "temporal.db",
        port=free_port(),
        ui_port=ui_port,
        http_port=free_port(),
        metrics_port=free_port(),
        log_path=tmp_path / "temporal.log",
        ui_codec_endpoint=endpoint,
    )
    await server.start()
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            settings = (await http.get(f"http://127.0.0.1:{ui_port}/api/v1/settings")).json()
    finally:
        await server.stop()
    assert settings["Codec"]["Endpoint"] == endpoint


def test_the_stack_wires_key_token_and_ui_origin_and_keeps_them(tmp_path: Path) -> None:
    config = StackConfig.for_tests(tmp_path, ui=True)
    stack = Stack(config)
    env = stack.settings_env()
    assert stack.codec_url == f"{stack.api_url}/codec"
    assert env["PAYMENTS_CODEC_CORS_ORIGIN"] == stack.temporal.ui_url
    assert env["PAYMENTS_PAYLOAD_KEYS"].startswith("dev1:")
    assert len(env["PAYMENTS_CODEC_AUTH_TOKEN"]) >= 32
    secrets_file = tmp_path / "dev-secrets.json"
    assert secrets_file.stat().st_mode & 0o077 == 0
    # A second run on the same data dir reads what the first run's histories need.
    assert Stack(config).settings_env()["PAYMENTS_PAYLOAD_KEYS"] == env["PAYMENTS_PAYLOAD_KEYS"]
    assert stack.data_converter().payload_codec is not None
