"""The OpenAPI document: every route lists its problem types, headers and statuses.

Routes declare their errors by problem-type slug; this module turns them into
``responses=`` entries whose body is the ``Problem`` schema under
``application/problem+json``, and drops FastAPI's default 422 (our validation
errors are 400 problems; 422 means a reused Idempotency-Key).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from api.problems import PROBLEM_JSON, PROBLEM_TYPES
from api.schemas import ProblemOut

PROBLEM_REF = "#/components/schemas/Problem"

_RATE_HEADERS: dict[str, Any] = {
    "RateLimit-Policy": {
        "description": 'The client\'s quota, e.g. `"default";q=100;w=1` (100 requests per '
        "second; draft-ietf-httpapi-ratelimit-headers).",
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": 'What is left: `"default";r=<remaining>;t=<seconds until restored>`.',
        "schema": {"type": "string"},
    },
}
_RETRY_AFTER: dict[str, Any] = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}
_HEADERS_BY_STATUS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": 'Always `Bearer realm="payments"`.',
            "schema": {"type": "string"},
        }
    },
    429: {**_RETRY_AFTER, **_RATE_HEADERS},
    503: _RETRY_AFTER,
}
# Every authenticated route can answer these.
COMMON_PROBLEMS = ("unauthorized", "rate-limited", "internal-error", "service-unavailable")
# Every route with a JSON body can also answer these.
BODY_PROBLEMS = (
    "validation-error",
    "malformed-json",
    "payload-too-large",
    "unsupported-media-type",
)

RATE_LIMIT_HEADERS = _RATE_HEADERS


def problem_responses(*slugs: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these problem types, grouped by status."""
    by_status: dict[int, list[str]] = defaultdict(list)
    for slug in dict.fromkeys(slugs):
        by_status[PROBLEM_TYPES[slug].status].append(slug)
    responses: dict[int | str, dict[str, Any]] = {}
    for status, group in sorted(by_status.items()):
        lines = [f"`{PROBLEM_TYPES[s].uri}`: {PROBLEM_TYPES[s].meaning}" for s in group]
        response: dict[str, Any] = {
            "description": "Problem types:\n\n" + "\n".join(f"- {line}" for line in lines),
            "content": {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_REF}}},
        }
        if status in _HEADERS_BY_STATUS:
            response["headers"] = _HEADERS_BY_STATUS[status]
        responses[status] = response
    return responses


def _problem_table() -> str:
    rows = [f"| {t.status} | `{t.uri}` | {t.meaning} |" for t in PROBLEM_TYPES.values()]
    return (
        "\n\n## Errors\n\nEvery error is `application/problem+json` (RFC 9457) with a stable "
        "`type`:\n\n| status | type | meaning |\n| --- | --- | --- |\n" + "\n".join(rows)
    )


# 1-255 printable ASCII characters (api/idempotency.py), bare (no space at either end: HTTP
# drops it) or quoted without quotes or backslashes inside.
IDEMPOTENCY_KEY_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": r'^(?:"[ !#-\[\]-~]{1,255}"|[!#-~](?:[ -~]{0,253}[!-~])?)$',
}


def install_openapi(app: FastAPI) -> None:
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        problem = ProblemOut.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(problem.pop("$defs", {}))
        schemas["Problem"] = problem
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                for parameter in operation.get("parameters", []):
                    if parameter["in"] == "header" and parameter["name"] == "Idempotency-Key":
                        # Declared optional so that a missing key gets our own 400
                        # (idempotency-key-missing), never FastAPI's: the document says
                        # what the API does, required.
                        parameter["required"] = True
                        parameter["schema"] = IDEMPOTENCY_KEY_SCHEMA
                responses = operation.get("responses", {})
                if "HTTPValidationError" in str(responses.get("422", "")):
                    del responses["422"]
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        info = schema.setdefault("info", {})
        info["description"] = info.get("description", "") + _problem_table()
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
