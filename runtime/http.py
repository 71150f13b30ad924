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

import psycopg
from litestar import Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.exceptions import ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
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


def openapi_config(title: str, description: str) -> OpenAPIConfig:
    return OpenAPIConfig(
        title=title,
        version="1",
        description=description,
        path="/docs",
        render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
    )


def cors_config(origin: str) -> CORSConfig:
    return CORSConfig(
        allow_origins=[origin],
        allow_credentials=False,
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
    )
