"""What an attacker tries on the running API: bodies without end, ids that are not ids,
keys made up by the thousand.

Bodies go over a raw socket, chunked, so the test sees when the API answers: a body
larger than its route's bound is refused with 413 problem+json before the client has
sent it all, and the API closes the connection instead of reading the rest.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from api.auth import NEWEST_KEYS_INTERVAL
from api.codec_server import MAX_BODY_BYTES, MAX_LOGIN_BYTES
from tests.helpers.e2e import E2EStack

pytestmark = pytest.mark.e2e

TYPES = "https://payments.example.com/problems/"
CHUNK = 16 * 1024


@dataclass
class ChunkedUpload:
    status: int
    content_type: str
    body: dict[str, object]
    sent_before_answer: int
    closed_by_server: bool


async def upload_chunked(
    url: str, headers: dict[str, str], *, offered: int, chunk: int = CHUNK
) -> ChunkedUpload:
    """POST ``offered`` bytes in chunks, never the final empty chunk, and stop sending as
    soon as an answer arrives: what the server read is at most what was sent by then."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Transfer-Encoding: chunked"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    sent = 0
    try:
        while sent < offered and not answer.done():
            try:
                writer.write(f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n")
                sent += chunk
                await asyncio.wait_for(writer.drain(), timeout=5)
            except (ConnectionError, TimeoutError):
                break  # the server stopped reading: its answer is on the way
            await asyncio.sleep(0)
        head_bytes = await asyncio.wait_for(answer, timeout=30)
        status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
        response_headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in header_lines if line)
        }
        length = int(response_headers["content-length"])
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), timeout=10))
        # Nothing more comes: the server closes the connection rather than read on.
        rest = await asyncio.wait_for(reader.read(), timeout=10)
        return ChunkedUpload(
            status=int(status_line.split()[1]),
            content_type=response_headers.get("content-type", ""),
            body=body,
            sent_before_answer=sent,
            closed_by_server=rest == b"",
        )
    finally:
        answer.cancel()
        writer.close()


@pytest.mark.parametrize(
    ("path", "content_type", "bound"),
    [
        ("/codec/login", "application/x-www-form-urlencoded", MAX_LOGIN_BYTES),
        ("/codec/decode", "application/json", MAX_BODY_BYTES),
        ("/v1/payments", "application/json", 64 * 1024),
        ("/no/such/route", "application/json", 64 * 1024),
    ],
)
async def test_a_chunked_body_past_the_bound_is_refused_before_it_is_all_sent(
    stack: E2EStack, path: str, content_type: str, bound: int
) -> None:
    # No credentials anywhere: the bound holds for everyone, before anything is checked.
    offered = 64 * 1024 * 1024
    upload = await upload_chunked(
        stack.api_url + path, {"Content-Type": content_type}, offered=offered
    )
    assert upload.status == 413
    assert upload.content_type == "application/problem+json"
    assert upload.body["type"] == TYPES + "payload-too-large"
    # Answered once the bound was passed, long before the body's end. (What the client
    # counts as sent includes both sockets' buffers, a few MiB on a busy machine.)
    assert bound < offered // 2
    assert upload.sent_before_answer < offered // 2
    assert upload.closed_by_server


async def test_a_declared_oversized_body_is_refused_on_every_route(stack: E2EStack) -> None:
    too_big = b"x" * (MAX_BODY_BYTES + 1)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        login = await http.post(
            "/codec/login",
            content=b"token=" + b"x" * MAX_LOGIN_BYTES,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        decode = await http.post(
            "/codec/decode", content=too_big, headers={"Content-Type": "application/json"}
        )
    for response in (login, decode):
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == TYPES + "payload-too-large"


async def test_refund_routes_answer_404_for_ids_that_cannot_be_ids(stack: E2EStack) -> None:
    auth = {"Authorization": f"Bearer {stack.client.api_key}"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        paid = await http.post(
            "/v1/payments",
            json={"amount": 1000, "currency": "EUR", "payment_method": "pm_card_visa"},
            headers={**auth, "Idempotency-Key": str(uuid.uuid4())},
        )
        assert paid.status_code == 201, paid.text
        payment_id = paid.json()["id"]
        answers = [
            await http.post(
                "/v1/payments/pay%00x/refunds",
                json={},
                headers={**auth, "Idempotency-Key": str(uuid.uuid4())},
            ),
            await http.get("/v1/payments/pay%00x/refunds/re%00f", headers=auth),
            await http.get(f"/v1/payments/{payment_id}/refunds/re%00f", headers=auth),
            await http.get(f"/v1/payments/{payment_id}/refunds/{'r' * 65}", headers=auth),
            await http.post(
                f"/v1/payments/{'p' * 65}/refunds",
                json={},
                headers={**auth, "Idempotency-Key": str(uuid.uuid4())},
            ),
        ]
    for response in answers:
        assert response.status_code == 404, (response.request.url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] in {TYPES + "payment-not-found", TYPES + "refund-not-found"}


def _key_reads(metrics: str) -> dict[str, float]:
    reads = {}
    for line in metrics.splitlines():
        if line.startswith("payments_api_key_reads_total{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            reads[kind] = float(line.rsplit(" ", 1)[1])
    return reads


async def test_a_flood_of_made_up_keys_costs_no_database_read_per_key(stack: E2EStack) -> None:
    """500 requests, each with its own made-up key, at 50 at once: all 401, none looked
    up by hash (the API holds every active key in memory), a few shared reads of the
    newest keys; and a key created meanwhile works on its first request."""
    made_up = [f"sk_{uuid.uuid4().hex}{uuid.uuid4().hex}" for _ in range(500)]
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, limits=limits) as http:
        before = _key_reads((await http.get("/metrics")).text)
        began = time.monotonic()
        flood = await asyncio.gather(
            *(http.get("/v1/payments", headers={"Authorization": f"Bearer {k}"}) for k in made_up)
        )
        created = await stack.stack.add_client(f"new-{uuid.uuid4().hex[:8]}")
        first = await http.get(
            "/v1/payments", headers={"Authorization": f"Bearer {created.api_key}"}
        )
        elapsed = time.monotonic() - began
        after = _key_reads((await http.get("/metrics")).text)

    assert {response.status_code for response in flood} == {401}
    assert first.status_code == 200, first.text
    assert after.get("by_hash", 0) == before.get("by_hash", 0), "a made-up key was looked up"
    newest = after["newest"] - before.get("newest", 0)
    # Bounded by time, not by keys: at most one read every NEWEST_KEYS_INTERVAL.
    assert 1 <= newest <= elapsed / NEWEST_KEYS_INTERVAL + 2, (newest, elapsed)
