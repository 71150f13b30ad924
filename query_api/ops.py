"""Readiness: can this process reach Kafka, PostgreSQL and Redis right now?"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Response, get

from query_api.services import Services
from runtime.http import postgres_check, readiness


@get("/readyz", opt={"public": True}, tags=["operations"])
async def readyz(services: Services) -> Response[dict[str, Any]]:
    """200 when Kafka, PostgreSQL and Redis all answer; 503 naming the ones that did not."""

    async def redis() -> None:
        await services.redis.ping()

    checks: dict[str, Callable[[], Awaitable[None]]] = {
        "kafka": services.kafka_probe,
        "postgres": postgres_check(services.pool),
        "redis": redis,
    }
    return await readiness(checks)
