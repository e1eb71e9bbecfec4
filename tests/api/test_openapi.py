"""/openapi.json documents every route, header, status and problem type; /docs renders it."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx

from api.problems import PROBLEM_JSON, PROBLEM_TYPES

# What each route can answer: the contract the README and the clients rely on.
EXPECTED: dict[tuple[str, str], set[str]] = {
    ("post", "/v1/payments"): {
        "201", "202", "400", "401", "409", "413", "415", "422", "429", "500", "503",
    },
    ("get", "/v1/payments"): {"200", "400", "401", "429", "500", "503"},
    ("get", "/v1/payments/{payment_id}"): {"200", "401", "404", "429", "500", "503"},
}  # fmt: skip


async def _document(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


async def test_every_route_lists_its_statuses_with_problem_json_errors(
    api: httpx.AsyncClient,
) -> None:
    document = await _document(api)
    for (method, path), statuses in EXPECTED.items():
        responses = document["paths"][path][method]["responses"]
        assert set(responses) == statuses, (method, path)
        for status, response in responses.items():
            if int(status) >= 400:
                schema = response["content"][PROBLEM_JSON]["schema"]
                assert schema == {"$ref": "#/components/schemas/Problem"}, (path, status)
                assert "application/json" not in response["content"]
                named = {t for t in PROBLEM_TYPES.values() if t.uri in response["description"]}
                assert named, f"{method} {path} {status} names its problem types"
                assert {t.status for t in named} == {int(status)}
    assert {"type", "title", "status", "detail"} <= set(
        document["components"]["schemas"]["Problem"]["required"]
    )


async def test_every_documented_problem_type_is_listed_with_its_uri(
    api: httpx.AsyncClient,
) -> None:
    document = await _document(api)
    description = document["info"]["description"]
    for problem_type in PROBLEM_TYPES.values():
        assert problem_type.uri in description


async def test_headers_are_documented(api: httpx.AsyncClient) -> None:
    document = await _document(api)
    create = document["paths"]["/v1/payments"]["post"]
    parameters = {p["name"]: p for p in create["parameters"] if p["in"] == "header"}
    assert {"Idempotency-Key", "Prefer"} <= set(parameters)
    assert create["security"] == [{"HTTPBearer": []}]
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    created = create["responses"]["201"]["headers"]
    assert {"Location", "Idempotent-Replayed", "Preference-Applied", "RateLimit"} <= set(created)
    assert {"Retry-After", "RateLimit-Policy", "RateLimit"} <= set(
        create["responses"]["429"]["headers"]
    )
    assert "Retry-After" in create["responses"]["503"]["headers"]
    assert "WWW-Authenticate" in create["responses"]["401"]["headers"]
    for path in ("/v1/payments", "/v1/payments/{payment_id}"):
        assert document["paths"][path]["get"]["security"] == [{"HTTPBearer": []}]


async def test_docs_render_the_document(api: httpx.AsyncClient) -> None:
    docs = await api.get("/docs")
    assert docs.status_code == 200
    assert "/openapi.json" in docs.text
    assert "swagger-ui" in docs.text.lower()


async def test_every_v1_operation_documents_its_errors_as_problems(
    api: httpx.AsyncClient,
) -> None:
    """Also for routes added later: declare them with ``api.openapi.problem_responses``."""
    document = await _document(api)
    operations = [
        (method, path, operation)
        for path, methods in document["paths"].items()
        if path.startswith("/v1/")
        for method, operation in methods.items()
    ]
    assert len(operations) >= len(EXPECTED)
    for method, path, operation in operations:
        responses = operation["responses"]
        assert {"401", "429", "503"} <= set(responses), (method, path)
        assert "422" not in responses or method == "post", (method, path)
        for status, response in responses.items():
            if int(status) >= 400:
                assert set(response["content"]) == {PROBLEM_JSON}, (method, path, status)


async def test_every_post_documents_the_idempotency_key_as_required(
    api: httpx.AsyncClient,
) -> None:
    """A POST without the key is a 400: the document says the key is required, and
    which keys are valid (schemathesis found it documented as optional)."""
    document = await _document(api)
    posts = [
        (path, operations["post"])
        for path, operations in document["paths"].items()
        if "post" in operations and path.startswith("/v1/")
    ]
    assert {path for path, _ in posts} == {"/v1/payments", "/v1/payments/{payment_id}/refunds"}
    for path, operation in posts:
        [key] = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
        assert key["in"] == "header"
        assert key["required"] is True, path
        pattern = re.compile(key["schema"]["pattern"])
        assert pattern.match(str(uuid.uuid4()))
        assert pattern.match('"order-1234"')
        for invalid in ("", "k" * 256, '"a"b"', '"a\\b"', " padded "):
            assert not pattern.match(invalid), invalid
