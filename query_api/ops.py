"""Readiness: can this process reach Kafka, PostgreSQL and Redis right now?"""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.datastructures import State

from microgrid.http import postgres_check, readiness


@get("/readyz", opt={"public": True}, tags=["operations"])
async def readyz(state: State) -> Response[dict[str, Any]]:
    """200 when Kafka, PostgreSQL and Redis all answer; 503 naming the ones that did not."""

    async def redis() -> None:
        await state.redis.ping()

    checks = {"kafka": state.kafka_probe, "postgres": postgres_check(state.pool), "redis": redis}
    return await readiness(checks)
