"""The codec endpoint: lets the Temporal UI (and ``temporal --codec-endpoint``) show
encrypted payloads in clear to support staff, and nobody else.

Temporal's codec server protocol: ``POST …/encode`` and ``POST …/decode`` take and
return ``{"payloads": [...]}`` (the Payloads protobuf as JSON, bytes in base64),
with the namespace in ``X-Namespace``. Mounted at ``/codec`` on the API.

Staff authenticate with the token in ``PAYMENTS_CODEC_AUTH_TOKEN``, either as
``Authorization: Bearer …`` (CLI, scripts) or as a cookie set by ``/codec/login``:
the UI sends cookies only when "Include cross-origin credentials" is ticked in its
codec settings. Only the UI's origin may call it from a browser (CORS).
"""

from __future__ import annotations

import hmac
import html
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payloads
from temporalio.converter import PayloadCodec

from config.codec import AesGcmCodec, PayloadDecryptionError
from config.settings import Settings

COOKIE = "payments_codec"
PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://payments.example.com/problems/"
MAX_BODY_BYTES = 4 * 1024 * 1024


def _problem(status: int, slug: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"type": _TYPE_BASE + slug, "title": slug.replace("-", " "), "status": status,
         "detail": detail},
        status_code=status,
        media_type=PROBLEM_JSON,
        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None,
    )  # fmt: skip


def create_codec_app(settings: Settings) -> Starlette:
    keyring = settings.payload_keyring
    codec: PayloadCodec | None = None if keyring is None else AesGcmCodec(*keyring)
    token = settings.codec_auth_token.get_secret_value() if settings.codec_auth_token else None

    def authenticated(request: Request) -> bool:
        if not token:
            return False
        offered = request.cookies.get(COOKIE, "")
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            offered = credentials.strip()
        return hmac.compare_digest(offered.encode(), token.encode())

    def transform(
        apply: Callable[[PayloadCodec, Payloads], Awaitable[None]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not authenticated(request):
                return _problem(401, "unauthenticated", "A valid codec token is required.")
            if codec is None:
                return _problem(503, "codec-off", "Payload encryption is not configured.")
            namespace = request.headers.get("x-namespace")
            if namespace and namespace != settings.temporal_namespace:
                return _problem(403, "wrong-namespace", "This codec serves another namespace.")
            declared = request.headers.get("content-length", "0")
            if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
                return _problem(413, "too-large", "At most 4 MiB of payloads per request.")
            body = await request.body()
            if len(body) > MAX_BODY_BYTES:
                return _problem(413, "too-large", "At most 4 MiB of payloads per request.")
            payloads = Payloads()
            try:
                json_format.Parse(body, payloads)
                await apply(codec, payloads)
            except (json_format.ParseError, DecodeError, UnicodeDecodeError):
                return _problem(400, "invalid-payloads", "Expected {'payloads': [...]}.")
            except PayloadDecryptionError as exc:
                return _problem(400, "undecryptable-payload", str(exc))
            return Response(json_format.MessageToJson(payloads), media_type="application/json")

        return endpoint

    async def encode(codec: PayloadCodec, payloads: Payloads) -> None:
        await codec.encode_wrapper(payloads)

    async def decode(codec: PayloadCodec, payloads: Payloads) -> None:
        await codec.decode_wrapper(payloads)

    async def login_form(request: Request) -> Response:
        return HTMLResponse(_LOGIN_PAGE.format(message=""))

    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode(errors="replace"))
        offered = (form.get("token") or [""])[0]
        if not token or not hmac.compare_digest(offered.encode(), token.encode()):
            page = _LOGIN_PAGE.format(message="<p><strong>Wrong token.</strong></p>")
            return HTMLResponse(page, status_code=401)
        response = RedirectResponse(request.url_for("logged_in"), status_code=303)
        # SameSite=Strict still travels to the UI's fetches: 127.0.0.1:8233 and :8000 are
        # the same site (ports do not count), so no third-party cookie is needed.
        response.set_cookie(
            COOKIE,
            token,
            max_age=8 * 3600,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=request.scope.get("root_path", "") or "/",
        )
        return response

    async def logged_in(request: Request) -> Response:
        ui = html.escape(settings.codec_cors_origin or "the Temporal UI")
        return HTMLResponse(_LOGGED_IN_PAGE.format(ui=ui))

    return Starlette(
        routes=[
            Route("/encode", transform(encode), methods=["POST"]),
            Route("/decode", transform(decode), methods=["POST"]),
            Route("/login", login_form, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/logged-in", logged_in, methods=["GET"], name="logged_in"),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=[settings.codec_cors_origin] if settings.codec_cors_origin else [],
                allow_credentials=True,
                allow_methods=["POST"],
                allow_headers=["Authorization", "Content-Type", "X-Namespace"],
                max_age=600,
            )
        ],
    )


_LOGIN_PAGE = """<!doctype html><title>Payload codec: staff sign-in</title>
<h1>Decode payloads in the Temporal UI</h1>{message}
<form method="post"><label>Codec token <input type="password" name="token" autofocus></label>
<button>Sign in</button></form>"""

_LOGGED_IN_PAGE = """<!doctype html><title>Payload codec: signed in</title>
<h1>Signed in for 8 hours</h1>
<p>In {ui}, open the codec settings (the Data Encoder icon at the top), tick
<em>Include cross-origin credentials</em> and apply: payloads then show in clear.</p>"""
