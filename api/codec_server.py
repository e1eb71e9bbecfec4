"""The codec endpoint: lets the Temporal UI (and ``temporal --codec-endpoint``) show
encrypted payloads in clear to support staff, and nobody else.

Temporal's codec server protocol: ``POST …/encode`` and ``POST …/decode`` take and
return ``{"payloads": [...]}`` (the Payloads protobuf as JSON, bytes in base64),
with the namespace in ``X-Namespace``. Mounted at ``/codec`` on the API.

Staff authenticate with the token in ``PAYMENTS_CODEC_AUTH_TOKEN``, either as
``Authorization: Bearer …`` (CLI, scripts) or as a cookie set by ``/codec/login``,
which the UI sends only with *Include cross-origin credentials* on. A browser that
decodes without signing in (or after the cookie's 8 hours) gets, in place of each
payload, a line that leads to the sign-in page: the UI shows decoded payloads where
staff look, and its own error banner links to Temporal's docs. Only the UI's origin
may call the endpoint from a browser (CORS).
"""

from __future__ import annotations

import base64
import hmac
import html
import json
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route, request_response
from temporalio.api.common.v1 import Payloads
from temporalio.converter import PayloadCodec

from api.limits import BodyLimitMiddleware
from config.codec import AesGcmCodec, PayloadDecryptionError
from config.settings import Settings

COOKIE = "payments_codec"
PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://payments.example.com/problems/"
MAX_BODY_BYTES = 4 * 1024 * 1024
# The sign-in form holds one token.
MAX_LOGIN_BYTES = 4 * 1024
SESSION_SECONDS = 8 * 3600


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

    def credentials(request: Request) -> bool | None:
        """True for staff; False for a wrong bearer token; None when nothing valid was
        offered in a cookie (never signed in, or the 8 hours are over)."""
        if not token:
            return False
        scheme, _, offered = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return hmac.compare_digest(offered.strip().encode(), token.encode())
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and hmac.compare_digest(cookie.encode(), token.encode()):
            return True
        return None

    def transform(
        apply: Callable[[PayloadCodec, Payloads], Awaitable[None]], *, sign_in_hint: bool
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            staff = credentials(request)
            if staff is None and sign_in_hint:
                return await _sign_in_hints(request)
            if not staff:
                return _problem(401, "unauthenticated", "A valid codec token is required.")
            if codec is None:
                return _problem(503, "codec-off", "Payload encryption is not configured.")
            namespace = request.headers.get("x-namespace")
            if namespace and namespace != settings.temporal_namespace:
                return _problem(403, "wrong-namespace", "This codec serves another namespace.")
            payloads = Payloads()
            try:
                # Bounded by the route's BodyLimitMiddleware, chunked bodies included.
                json_format.Parse(await request.body(), payloads)
                await apply(codec, payloads)
            except (json_format.ParseError, DecodeError, UnicodeDecodeError):
                return _problem(400, "invalid-payloads", "Expected {'payloads': [...]}.")
            except PayloadDecryptionError as exc:
                return _problem(400, "undecryptable-payload", str(exc))
            return Response(json_format.MessageToJson(payloads), media_type="application/json")

        return endpoint

    async def _sign_in_hints(request: Request) -> Response:
        """As many payloads as were sent, each one the same line: where to sign in."""
        payloads = Payloads()
        try:
            json_format.Parse(await request.body(), payloads)
        except (json_format.ParseError, DecodeError, UnicodeDecodeError):
            return _problem(400, "invalid-payloads", "Expected {'payloads': [...]}.")
        hint = json.dumps(SIGN_IN_HINT.format(url=request.url_for("login_form"))).encode()
        plain = {"encoding": base64.b64encode(b"json/plain").decode()}
        data = base64.b64encode(hint).decode()
        body = {"payloads": [{"metadata": plain, "data": data} for _ in payloads.payloads]}
        return JSONResponse(body)

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
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=request.scope.get("root_path", "") or "/",
        )
        return response

    async def logged_in(request: Request) -> Response:
        ui = settings.codec_cors_origin
        ui_link = f'<a href="{html.escape(ui)}">the Temporal UI</a>' if ui else "the Temporal UI"
        endpoint = str(request.url_for("login_form")).removesuffix("/login")
        return HTMLResponse(_LOGGED_IN_PAGE.format(ui=ui_link, endpoint=html.escape(endpoint)))

    def bounded(
        endpoint: Callable[[Request], Awaitable[Response]], max_bytes: int, *, json_only: bool
    ) -> BodyLimitMiddleware:
        return BodyLimitMiddleware(
            request_response(endpoint),
            max_bytes=max_bytes,
            json_only_under="/" if json_only else None,
        )

    return Starlette(
        routes=[
            Route(
                "/encode",
                bounded(transform(encode, sign_in_hint=False), MAX_BODY_BYTES, json_only=True),
                methods=["POST"],
            ),
            Route(
                "/decode",
                bounded(transform(decode, sign_in_hint=True), MAX_BODY_BYTES, json_only=True),
                methods=["POST"],
            ),
            Route("/login", login_form, methods=["GET"], name="login_form"),
            Route("/login", bounded(login, MAX_LOGIN_BYTES, json_only=False), methods=["POST"]),
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


SIGN_IN_HINT = "Encrypted. To read it, sign in at {url} and reload this page."

_LOGIN_PAGE = """<!doctype html><title>Payments codec: staff sign-in</title>
<h1>Read payments in the Temporal UI</h1>{message}
<p>Sign in once per shift: the sign-in lasts 8 hours.</p>
<form method="post"><label>Codec token <input type="password" name="token" autofocus></label>
<button>Sign in</button></form>"""

# The steps name what the Temporal UI shows; tests/ui follows them as written here,
# each by its first word.
_LOGGED_IN_PAGE = """<!doctype html><title>Payments codec: signed in</title>
<h1>Signed in for 8 hours</h1>
<p>Payments show in clear in the Temporal UI once this browser sends the sign-in to the
codec endpoint. Set that up once per browser:</p>
<ol id="steps">
<li>Open {ui} and click the <strong>Codec Server is configured</strong> icon in its top bar.</li>
<li>Choose <strong>Use my browser setting and ignore Cluster-level setting.</strong></li>
<li>Enter <code>{endpoint}</code> in <strong>Codec Server browser endpoint</strong>.</li>
<li>Switch on <strong>Include cross-origin credentials</strong>.</li>
<li>Click <strong>Apply</strong>.</li>
</ol>
<p>The UI keeps that setting: next time, signing in here is all it takes. A page that
says "sign in" shows payments in clear once reloaded.</p>"""
