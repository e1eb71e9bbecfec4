"""The pieces ``make run`` is made of, each on free ports."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
from standardwebhooks import Webhook
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client

from admin.credentials import new_webhook_secret
from devstack.ports import free_port, port_in_use
from devstack.postgres import PostgresServer
from devstack.temporal_server import TemporalDevServer
from devstack.webhook_receiver import WebhookReceiver
from domain import search_attributes

REPO_ROOT = Path(__file__).resolve().parents[2]


def _dsn(server: PostgresServer) -> str:
    return f"host=127.0.0.1 port={server.port} user=postgres dbname=payments"


async def test_postgres_keeps_its_data_across_restarts_and_crashes(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path / "pg", free_port(), log_path=tmp_path / "pg.log")
    await server.start()
    try:
        async with await psycopg.AsyncConnection.connect(_dsn(server), autocommit=True) as conn:
            await conn.execute("CREATE TABLE kept (value text)")
            await conn.execute("INSERT INTO kept VALUES ('before restart')")
        await server.stop(mode="immediate")  # crash-like: recovery must replay the WAL
        assert not port_in_use("127.0.0.1", server.port)
        await server.start()
        async with await psycopg.AsyncConnection.connect(_dsn(server)) as conn:
            row = await (await conn.execute("SELECT value FROM kept")).fetchone()
        assert row == ("before restart",)
    finally:
        await server.stop()


async def test_temporal_restarts_on_its_file_with_our_search_attributes(tmp_path: Path) -> None:
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    for _ in range(2):  # the second start re-registers attributes that already exist
        server = TemporalDevServer(
            tmp_path / "temporal.db",
            port=port,
            ui_port=None,
            http_port=http_port,
            metrics_port=metrics_port,
            log_path=tmp_path / "t.log",
        )
        await server.start()
        try:
            client = await Client.connect(server.address)
            registered = await client.operator_service.list_search_attributes(
                ListSearchAttributesRequest(namespace="default")
            )
        finally:
            await server.stop()
        assert {key.name for key in search_attributes.ALL} <= set(registered.custom_attributes)
    assert (tmp_path / "temporal.db").exists()


async def test_webhook_receiver_tells_signed_from_forged() -> None:
    receiver = WebhookReceiver("127.0.0.1", free_port())
    secret = new_webhook_secret()
    receiver.secrets.append(secret)
    await receiver.start()
    body = json.dumps({"type": "payment.succeeded"})
    now = datetime.now(UTC)
    signed = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign("evt_1", now, body),
    }
    forged = {**signed, "webhook-signature": Webhook(new_webhook_secret()).sign("evt_1", now, body)}
    try:
        async with httpx.AsyncClient() as http:
            for headers in (signed, forged):
                response = await http.post(receiver.url, content=body, headers=headers)
                assert response.status_code == 204
    finally:
        await receiver.stop()
    assert [event.verified for event in receiver.received] == [True, False]


def test_make_run_refuses_a_taken_port_and_names_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        others = {flag: str(free_port()) for flag in (
            "--ui-port", "--temporal-port", "--provider-port", "--webhooks-port",
            "--postgres-port")}  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "devstack", "run", "--data-dir", str(tmp_path),
             "--api-port", str(port), *[x for pair in others.items() for x in pair]],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2
    assert f"api port {port}" in result.stderr
    assert not (tmp_path / "postgres").exists(), "nothing was started"


def test_free_ports_are_never_handed_out_twice() -> None:
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
