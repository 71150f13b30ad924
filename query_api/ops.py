"""Readiness: can this process reach Kafka, PostgreSQL and Redis right now?"""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.datastructures import State

from microgrid.http import READY_CHECK_TIMEOUT_S, readiness


@get("/readyz", opt={"public": True}, tags=["operations"])
async def readyz(state: State) -> Response[dict[str, Any]]:
    """200 when Kafka, PostgreSQL and Redis all answer; 503 naming the ones that did not."""

    async def postgres() -> None:
        async with state.pool.connection(timeout=READY_CHECK_TIMEOUT_S) as conn:
            await conn.execute("SELECT 1")

    async def redis() -> None:
        await state.redis.ping()

    return await readiness({"kafka": state.kafka_probe, "postgres": postgres, "redis": redis})
