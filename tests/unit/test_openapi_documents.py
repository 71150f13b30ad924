"""The committed OpenAPI documents against the code that serves them: the gateway's fast path
serves exactly the routes the document gives raw-byte bodies, with the schemas it decodes and
every status its code can answer; every error is problem+json; public routes say so."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from contracts import Reading
from contracts.control import CommandReply
from ingest_gateway import fastpath
from ingest_gateway.app import batch_schema
from microgrid.specs import CONTRACTS_DIR, clean_descriptions
from runtime.openapi import PROBLEM_JSON, inline_schema
from runtime.settings import PROJECT_ROOT, Settings


def document(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((CONTRACTS_DIR / "openapi" / f"{name}.json").read_text())
    return doc


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), p, op) for p, ops in doc["paths"].items() for m, op in ops.items()]


def raised_statuses(*modules: str) -> set[int]:
    """The statuses of the problems these modules raise (`problem(413, ...)`)."""
    found = set()
    for module in modules:
        text = (PROJECT_ROOT / module).read_text()
        found |= {int(code) for code in re.findall(r"problem\(\s*(\d{3})", text)}
    return found


def test_the_fast_path_serves_the_routes_the_document_gives_raw_bodies() -> None:
    doc = document("ingest-gateway")
    with_bodies = {p for m, p, op in operations(doc) if m == "POST" and "requestBody" in op}
    assert set(fastpath.ROUTES) <= with_bodies
    default_batch = Settings.model_construct().ingest_max_batch
    for path, batch in fastpath.ROUTES.items():
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        schema = body["content"]["application/json"]["schema"]
        want = batch_schema(default_batch) if batch else inline_schema(Reading)
        assert schema == clean_descriptions(json.loads(json.dumps(want)))


def test_every_status_the_ingest_code_answers_is_documented_on_the_ingest_routes() -> None:
    doc = document("ingest-gateway")
    statuses = raised_statuses(
        "ingest_gateway/gateway.py", "ingest_gateway/fastpath.py", "ingest_gateway/rate_limits.py"
    )
    statuses.discard(500)  # a bug, never a documented answer
    assert {400, 401, 403, 408, 413, 422, 429, 503} <= statuses
    for path in fastpath.ROUTES:
        responses = doc["paths"][path]["post"]["responses"]
        assert statuses | {202} == {int(code) for code in responses}, path


def test_the_command_result_route_documents_the_reply_it_decodes() -> None:
    op = document("ingest-gateway")["paths"]["/api/v1/control/commands/{command_id}/result"]
    schema = op["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema == clean_descriptions(json.loads(json.dumps(inline_schema(CommandReply))))
    assert schema["additionalProperties"] is False
    statuses = raised_statuses("ingest_gateway/commands.py")
    assert statuses <= {int(code) for code in op["post"]["responses"]}


@pytest.mark.parametrize("name", ["ingest-gateway", "query-api"])
def test_every_error_answer_is_problem_json(name: str) -> None:
    doc = document(name)
    problem = doc["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"status", "title"}
    for method, path, op in operations(doc):
        for code, response in op["responses"].items():
            if int(code) >= 400:
                content = response["content"]
                assert list(content) == [PROBLEM_JSON], (method, path, code)
                assert content[PROBLEM_JSON]["schema"] == {"$ref": "#/components/schemas/Problem"}


@pytest.mark.parametrize(
    ("name", "public"),
    [
        ("ingest-gateway", {("GET", "/readyz")}),
        ("query-api", {("GET", "/readyz"), ("POST", "/api/v1/auth/login")}),
    ],
)
def test_routes_without_credentials_say_so_and_the_others_need_them(
    name: str, public: set[tuple[str, str]]
) -> None:
    doc = document(name)
    assert doc["security"], "credentials by default"
    for method, path, op in operations(doc):
        if (method, path) in public:
            assert op["security"] == [], (method, path)
            assert "401" not in op["responses"] or path.endswith("/login")
        else:
            assert op.get("security", doc["security"]), (method, path)
            assert {"401", "403"} <= set(op["responses"]), (method, path)


def test_the_dashboard_calls_the_api_only_through_the_generated_client() -> None:
    """The dashboard cannot drift from the API: none of its modules names a route itself, and
    every function of the client it calls is an operation of the document (`contracts check`
    keeps the client generated from the document)."""
    static = PROJECT_ROOT / "ui" / "static"
    client = (static / "api.js").read_text()
    modules = {p.name: p.read_text() for p in [*static.glob("*.js"), *static.glob("*.html")]}
    del modules["api.js"]
    assert set(modules) >= {"index.html", "app.js", "charts.js"}
    for name, text in modules.items():
        assert "/api/v1" not in text and "fetch(" not in text, name
    app = modules["app.js"]
    assert 'import * as client from "./api.js"' in app
    ids = {op["operationId"] for _, _, op in operations(document("query-api"))}
    called = set(re.findall(r"client\.(\w+)\(", app)) - {"configure"}
    assert len(called) >= 10, "the dashboard uses the client"
    for name in called:
        assert name in ids or (name.endswith("Url") and name[:-3] in ids), name
        assert f"export const {name} =" in client
