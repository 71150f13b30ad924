"""Readiness: can this process reach Kafka, PostgreSQL and Redis right now?"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Response, get
from litestar.datastructures import State

from microgrid.http import problem

CHECK_TIMEOUT_S = 2.0


async def _postgres(state: State) -> None:
    async with state.pool.connection(timeout=CHECK_TIMEOUT_S) as conn:
        await conn.execute("SELECT 1")


async def _redis(state: State) -> None:
    await state.redis.ping()


async def _kafka(state: State) -> None:
    await state.kafka_probe()


@get("/readyz", opt={"public": True}, tags=["operations"])
async def readyz(state: State) -> Response[dict[str, Any]]:
    """200 when Kafka, PostgreSQL and Redis all answer; 503 naming the ones that did not."""
    checks = {"kafka": _kafka, "postgres": _postgres, "redis": _redis}
    results = await asyncio.gather(
        *(asyncio.wait_for(check(state), CHECK_TIMEOUT_S) for check in checks.values()),
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
