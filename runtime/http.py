"""HTTP plumbing shared by the gateway and the query API: the one error shape (RFC 9457
problem+json), health, Prometheus metrics, OpenAPI docs and CORS.

A request that meets a PostgreSQL or Redis outage is answered 503 with `Retry-After` (the
same request may succeed later), not 500."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import psycopg
from litestar import Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.exceptions import ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, Reference, SecurityScheme
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from litestar.routes import HTTPRoute
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("microgrid.http")


def problem(
    status: int,
    title: str,
    detail: str = "",
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=status,
        title=title,
        detail=detail,
        headers=headers,
        extra=extra or None,
    )


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "Internal server error").to_response(request)


def _invalid_value(request: Request[Any, Any, Any], exc: psycopg.DataError) -> Response[Any]:
    # e.g. a NUL character, which PostgreSQL text cannot hold
    return problem(400, "Invalid value", str(exc).splitlines()[0]).to_response(request)


OUTAGE_RETRY_AFTER_S = 5


def _postgres_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # a server restarting or gone (psycopg.OperationalError: AdminShutdown, connection
    # refused...) or every pooled connection busy past the wait (PoolTimeout)
    log.warning("PostgreSQL unavailable on %s %s: %r", request.method, request.url.path, exc)
    return problem(
        503,
        "Database unavailable",
        "PostgreSQL cannot be reached right now: retry later",
        headers={"Retry-After": str(OUTAGE_RETRY_AFTER_S)},
    ).to_response(request)


def _redis_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.warning("Redis unavailable on %s %s: %r", request.method, request.url.path, exc)
    return problem(
        503,
        "Redis unavailable",
        "Redis cannot be reached right now: retry later",
        headers={"Retry-After": str(OUTAGE_RETRY_AFTER_S)},
    ).to_response(request)


# msgspec names a missing or unknown field in its message, not in the error's path
_NAMED_FIELD = re.compile(r"(?:missing required|contains unknown) field `([^`]+)`")


def _field_of(error: dict[str, Any]) -> Any:
    key, named = error.get("key"), _NAMED_FIELD.search(str(error.get("message", "")))
    if named is None or error.get("source") != "body":
        return key
    return named.group(1) if key in (None, "", "data") else f"{key}.{named.group(1)}"


def _invalid_request(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Body errors are 422 with `errors[].field`, like the gateway's; bad parameters 400."""
    found = exc.extra if isinstance(exc.extra, list) else []
    errors = [
        {"field": _field_of(e), "message": e.get("message"), "source": e.get("source")}
        for e in found
        if isinstance(e, dict)
    ]
    in_body = bool(errors) and all(e["source"] == "body" for e in errors)
    status = 422 if in_body else 400
    title = "Invalid request body" if in_body else "Invalid request"
    detail = errors[0]["message"] if errors else exc.detail
    return problem(status, title, str(detail), errors=errors).to_response(request)


READY_CHECK_TIMEOUT_S = 2.0


def postgres_check(pool: AsyncConnectionPool) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        async with pool.connection(timeout=READY_CHECK_TIMEOUT_S) as conn:
            await conn.execute("SELECT 1")

    return check


async def readiness(checks: dict[str, Callable[[], Awaitable[None]]]) -> Response[dict[str, Any]]:
    """200 with each check "ok"; 503 problem naming the checks that failed or took over 2 s."""
    results = await asyncio.gather(
        *(asyncio.wait_for(check(), READY_CHECK_TIMEOUT_S) for check in checks.values()),
        return_exceptions=True,
    )
    status = {
        name: "ok" if not isinstance(r, BaseException) else f"unreachable: {r!r}"[:200]
        for name, r in zip(checks, results, strict=True)
    }
    failed = [name for name, v in status.items() if v != "ok"]
    if failed:
        raise problem(
            503,
            "Not ready",
            f"unreachable: {', '.join(failed)}",
            checks=status,
            headers={"Retry-After": "5"},
        )
    return Response({"status": "ready", "checks": status})


def problem_details_plugin() -> ProblemDetailsPlugin:
    return ProblemDetailsPlugin(ProblemDetailsConfig(enable_for_all_http_exceptions=True))


exception_handlers = {
    Exception: _unexpected,
    psycopg.DataError: _invalid_value,
    psycopg.OperationalError: _postgres_unavailable,
    PoolTimeout: _postgres_unavailable,
    RedisConnectionError: _redis_unavailable,
    RedisTimeoutError: _redis_unavailable,
    ValidationException: _invalid_request,
}


async def before_request(request: Request[Any, Any, Any]) -> Response[None] | None:
    """Answer `OPTIONS`; check a JSON body strictly before the handler is called."""
    if request.method == "OPTIONS":
        return _options(request)
    kind = _body_type(request.route_handler)
    if kind is not None:
        _check_body(kind, await request.body())  # read once: the handler gets it cached
    return None


def _options(request: Request[Any, Any, Any]) -> Response[None]:
    """`OPTIONS` lists every method of the path. Litestar 2 lists only the methods the path
    had when its first handler was registered (litestar#4169, fixed in Litestar 3); CORS
    preflights are answered before this, by the CORS middleware."""
    paths = request.route_handler.paths
    methods = {
        method
        for route in request.app.routes
        if isinstance(route, HTTPRoute) and route.path in paths
        for method in route.methods
    }
    allow = ", ".join(sorted(methods))
    return Response(None, status_code=204, headers={"Allow": allow}, media_type="text/plain")


def _body_type(handler: Any) -> Any:
    """The type of the handler's `data`, if it has one (Litestar keeps the parsed signature).
    Litestar converts a body to its type leniently (`0` is taken for `false`, `"1"` for `1`),
    which its document does not say; `_check_body` refuses what the document refuses."""
    data = handler.parsed_fn_signature.parameters.get("data")
    return data.annotation if data is not None else None


def _integral(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer; msgspec's strict conversion does not."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


_AT = re.compile(r" - at `\$\.?(.*)`$")


def _check_body(kind: Any, body: bytes) -> None:
    try:
        msgspec.convert(_integral(msgspec.json.decode(body)), type=kind, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        at = _AT.search(message)
        named = _NAMED_FIELD.search(message)
        field = at.group(1) if at else ""
        if named is not None:
            field = f"{field}.{named.group(1)}" if field else named.group(1)
        errors = [{"field": field or None, "message": message, "source": "body"}]
        raise problem(422, "Invalid request body", message, errors=errors) from exc
    except msgspec.DecodeError as exc:
        raise problem(400, "Malformed JSON", str(exc)) from exc


@get("/healthz", sync_to_thread=False, include_in_schema=False, opt={"public": True})
def healthz() -> dict[str, str]:
    """The process is alive and serving."""
    return {"status": "ok"}


class MetricsController(PrometheusController):
    """Prometheus text format: request counts and latency by route (Litestar's middleware)."""

    opt = {"public": True}
    include_in_schema = False


def prometheus_config(app_name: str) -> PrometheusConfig:
    return PrometheusConfig(
        app_name=app_name, prefix="microgrid", group_path=True, exclude=["^/metrics$"]
    )


def operation_id(handler: Any, method: Any, path: Any) -> str:
    """An operation's id is its handler's name in camelCase (`listAlerts`): the generated
    clients' function names."""
    head, *rest = handler.handler_name.split("_")
    return head + "".join(word.title() for word in rest)


def openapi_config(
    title: str,
    description: str,
    security_schemes: dict[str, SecurityScheme | Reference] | None = None,
) -> OpenAPIConfig:
    """Docs at /docs (Scalar), /docs/swagger and /docs/openapi.json. `security_schemes`: the
    app's own credentials, required by every route unless it is public (runtime.openapi);
    the query API's come from its JWT authentication."""
    return OpenAPIConfig(
        title=title,
        version="1",
        description=description,
        components=Components(security_schemes=security_schemes),
        operation_id_creator=operation_id,
        security=[{name: []} for name in security_schemes or {}] or None,
        path="/docs",
        render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
    )


def cors_config(origin: str) -> CORSConfig:
    return CORSConfig(
        allow_origins=[origin],
        allow_credentials=False,
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
    )
