"""The gateway's Litestar app: every route, the lifespan and the OpenAPI contract.

The core (`ingest_gateway.gateway.Gateway`) is made here once per process and given to the
handlers through dependency injection; the ingest routes are served by the fast path in front
(`serve_app`), which calls the same core.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.di import Provide
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.spec import SecurityScheme

from contracts import Reading, ReadingBatch
from ingest_gateway.commands import DeviceCommands, command_result, next_command
from ingest_gateway.fastpath import IngestFront, RouteMetrics, body_too_large
from ingest_gateway.gateway import Accepted, Gateway
from runtime.http import (
    MetricsController,
    before_request,
    exception_handlers,
    healthz,
    openapi_config,
    problem_details_plugin,
    prometheus_config,
    readiness,
)
from runtime.openapi import StructSchemas, document_routes, inline_schema, problems
from runtime.settings import Settings, get_settings

APP_NAME = "ingest_gateway"


@get("/readyz", opt={"public": True}, tags=["operations"])
async def readyz(gateway: Gateway) -> Response[dict[str, Any]]:
    """200 when the broker and PostgreSQL (device keys) answer and this worker's producer is
    alive; 503 naming what is not."""
    return await readiness(gateway.readiness_checks())


# These two handlers define the routes' contract (OpenAPI) and serve any request that the
# fast path in front of the app (ingest_gateway.fastpath) passes on to Litestar.
# Statuses of both: 400 malformed JSON, 401 no or bad key, 403 a device or site not of the key's
# site, 408 body too slow, 413 body too large, 422 invalid readings, 429 rate limits, 503
# broker, registry or in-flight limit.
INGEST_PROBLEMS = problems(403, 408, 413, 422, 429)


@post(
    "/api/v1/telemetry",
    status_code=202,
    tags=["telemetry"],
    opt={"body": Reading, **INGEST_PROBLEMS},
)
async def ingest_reading(request: Request[Any, Any, Any], gateway: Gateway) -> Accepted:
    key = await gateway.authenticate(request.headers.get("authorization", ""))
    body = await gateway.read_body(request.body())
    assert body is not None
    return Accepted(accepted=await gateway.ingest(key, body, batch=False))


@post(
    "/api/v1/telemetry/batch",
    status_code=202,
    tags=["telemetry"],
    opt={"body": ReadingBatch, **INGEST_PROBLEMS},
)
async def ingest_batch(request: Request[Any, Any, Any], gateway: Gateway) -> Accepted:
    key = await gateway.authenticate(request.headers.get("authorization", ""))
    body = await gateway.read_body(request.body())
    assert body is not None
    return Accepted(accepted=await gateway.ingest(key, body, batch=True))


def create_app(settings: Settings | None = None, gateway: Gateway | None = None) -> Litestar:
    """The Litestar app alone: every route, the lifespan, the OpenAPI contract."""
    s = settings or get_settings()
    gw = gateway or Gateway(s)
    commands = DeviceCommands(gw)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    def too_large(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        return body_too_large(s.ingest_max_body_bytes).to_response(request)

    app = Litestar(
        logging_config=None,  # the process's logging (runtime.logs), not Litestar's own
        route_handlers=[
            ingest_reading,
            ingest_batch,
            next_command,
            command_result,
            healthz,
            readyz,
            MetricsController,
        ],
        dependencies={
            "gateway": Provide(lambda: gw, use_cache=True, sync_to_thread=False),
            "commands": Provide(lambda: commands, use_cache=True, sync_to_thread=False),
        },
        lifespan=[lifespan],
        middleware=[prometheus_config(APP_NAME).middleware],
        plugins=[problem_details_plugin(), StructSchemas()],
        before_request=before_request,
        exception_handlers={
            **exception_handlers,  # type: ignore[dict-item]
            RequestEntityTooLarge: too_large,
        },
        request_max_body_size=s.ingest_max_body_bytes,
        openapi_config=openapi_config(
            "Microgrid ingest gateway",
            "Devices send readings here with `Authorization: Bearer <device key>`. "
            "202 means the readings are durably in the log; 429 and 503 that nothing was "
            "stored. A retry is always safe: a reading is stored once per (device_id, ts).",
            security_schemes={
                "DeviceKey": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description="A device key of one site (`microgrid keys create --site S`).",
                )
            },
        ),
    )
    document_routes(app, {ReadingBatch: batch_schema(s.ingest_max_batch)})
    return app


def batch_schema(max_readings: int) -> dict[str, Any]:
    """A batch as the gateway takes it: one to INGEST_MAX_BATCH readings."""
    schema = inline_schema(ReadingBatch)
    schema["properties"]["readings"]["maxItems"] = max_readings
    return schema


def serve_app(settings: Settings | None = None) -> IngestFront:
    """What the gateway serves: the ingest routes' fast path in front of the Litestar app."""
    s = settings or get_settings()
    gw = Gateway(s)
    return IngestFront(
        create_app(s, gw),
        gw,
        max_body_bytes=s.ingest_max_body_bytes,
        metrics=RouteMetrics(prometheus_config(APP_NAME)),
    )
