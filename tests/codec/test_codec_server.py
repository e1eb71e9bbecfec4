"""The codec endpoint as the Temporal UI calls it: mounted on the API at /codec,
staff-only, callable from the UI's origin and no other."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from api.app import create_app
from api.codec_server import COOKIE
from config.codec import new_payload_key
from config.settings import Settings
from config.temporal import data_converter
from domain.payments import PaymentRequest

TOKEN = "staff-token-" + "x" * 32
UI = "http://127.0.0.1:8233"
REQUEST = PaymentRequest(amount=1250, currency="EUR", payment_method="pm_card_visa")


@pytest.fixture
def settings() -> Settings:
    return Settings(
        payload_keys=SecretStr(f"k1:{new_payload_key()}"),
        codec_auth_token=SecretStr(TOKEN),
        codec_cors_origin=UI,
    )


@pytest.fixture
async def http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    # No lifespan: the codec needs neither the database nor Temporal.
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client


async def _sealed_body(settings: Settings) -> dict[str, object]:
    [payload] = await data_converter(settings).encode([REQUEST])
    return {
        "payloads": [
            {
                "metadata": {k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
                "data": base64.b64encode(payload.data).decode(),
            }
        ]
    }


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "X-Namespace": "default"}


async def test_a_wrong_token_is_401(http: httpx.AsyncClient, settings: Settings) -> None:
    body = await _sealed_body(settings)
    wrong = await http.post("/codec/decode", json=body, headers=_auth("nope"))
    # A cookie from another token (rotated since): not staff either.
    cookie = await http.post(
        "/codec/encode", json=body, headers={"X-Namespace": "default", "Cookie": f"{COOKIE}=nope"}
    )
    assert wrong.status_code == cookie.status_code == 401
    assert wrong.headers["content-type"].startswith("application/problem+json")
    assert b"pm_card_visa" not in wrong.content + cookie.content


async def test_decoding_without_signing_in_leads_to_the_sign_in_page(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    """What the UI shows in place of each payload to staff not signed in (or whose
    8 hours are over): where to sign in, never the payload."""
    body = await _sealed_body(settings)
    sealed: list[object] = body["payloads"]  # type: ignore[assignment]
    body["payloads"] = sealed * 2
    response = await http.post("/codec/decode", json=body, headers={"Origin": UI})
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == UI
    payloads = response.json()["payloads"]
    assert len(payloads) == 2
    for payload in payloads:
        assert base64.b64decode(payload["metadata"]["encoding"]) == b"json/plain"
        hint = json.loads(base64.b64decode(payload["data"]))
        assert (
            hint == "Encrypted. To read it, sign in at http://api/codec/login and reload this page."
        )
    login = await http.get("/codec/login")
    assert login.status_code == 200
    assert "Codec token" in login.text


async def test_decode_gives_staff_the_payload_in_clear(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    response = await http.post("/codec/decode", json=await _sealed_body(settings), headers=_auth())
    assert response.status_code == 200, response.text
    [payload] = response.json()["payloads"]
    assert base64.b64decode(payload["metadata"]["encoding"]) == b"json/plain"
    assert b'"payment_method":"pm_card_visa"' in base64.b64decode(payload["data"])


async def test_encode_then_decode_round_trips(http: httpx.AsyncClient) -> None:
    plain = {
        "payloads": [
            {
                "metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                "data": base64.b64encode(b'"pm_card_visa"').decode(),
            }
        ]
    }
    encoded = await http.post("/codec/encode", json=plain, headers=_auth())
    assert encoded.status_code == 200
    assert b"pm_card_visa" not in base64.b64decode(encoded.json()["payloads"][0]["data"])
    decoded = await http.post("/codec/decode", json=encoded.json(), headers=_auth())
    assert decoded.json() == plain


async def test_a_tampered_payload_is_a_400(http: httpx.AsyncClient, settings: Settings) -> None:
    body = await _sealed_body(settings)
    payload = body["payloads"][0]  # type: ignore[index]
    data = bytearray(base64.b64decode(payload["data"]))
    data[-1] ^= 1
    payload["data"] = base64.b64encode(bytes(data)).decode()
    response = await http.post("/codec/decode", json=body, headers=_auth())
    assert response.status_code == 400
    assert response.json()["type"].endswith("/undecryptable-payload")


async def test_another_namespace_is_refused(http: httpx.AsyncClient, settings: Settings) -> None:
    response = await http.post(
        "/codec/decode",
        json=await _sealed_body(settings),
        headers={**_auth(), "X-Namespace": "someone-else"},
    )
    assert response.status_code == 403


async def test_cors_answers_the_ui_origin_only(http: httpx.AsyncClient) -> None:
    def preflight(origin: str) -> dict[str, str]:
        return {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-namespace",
        }

    from_ui = await http.options("/codec/decode", headers=preflight(UI))
    assert from_ui.status_code == 200
    assert from_ui.headers["access-control-allow-origin"] == UI
    assert from_ui.headers["access-control-allow-credentials"] == "true"

    elsewhere = await http.options("/codec/decode", headers=preflight("https://evil.example"))
    assert "access-control-allow-origin" not in elsewhere.headers

    simple = await http.post("/codec/decode", json={"payloads": []}, headers={"Origin": UI})
    assert simple.headers["access-control-allow-origin"] == UI
    foreign = await http.post(
        "/codec/decode", json={"payloads": []}, headers={"Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in foreign.headers


async def test_the_ui_decodes_with_the_sign_in_cookie(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    refused = await http.post("/codec/login", content="token=wrong", headers=form)
    assert refused.status_code == 401
    signed_in = await http.post(
        "/codec/login",
        content=f"token={TOKEN}",
        headers=form,
    )
    assert signed_in.status_code == 303
    cookie = signed_in.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/codec" in cookie

    response = await http.post(
        "/codec/decode",
        json=await _sealed_body(settings),
        headers={"Origin": UI, "X-Namespace": "default"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == UI


async def test_without_a_configured_token_nobody_gets_in(settings: Settings) -> None:
    open_settings = settings.model_copy(update={"codec_auth_token": None})
    transport = httpx.ASGITransport(app=create_app(open_settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        response = await http.post(
            "/codec/decode", json=await _sealed_body(settings), headers=_auth()
        )
    assert response.status_code == 401


async def test_an_oversized_body_is_refused_before_it_is_read(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/codec/decode", content=b"x" * (4 * 1024 * 1024 + 1), headers=_auth()
    )
    assert response.status_code == 413
