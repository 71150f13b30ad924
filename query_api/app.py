"""Query API: health, the device list with latest metrics, and the dashboard page."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, get
from litestar.datastructures import State
from litestar.static_files import create_static_files_router
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from microgrid.http import exception_handlers, healthz, problem_details_plugin
from microgrid.settings import Settings, get_settings
from ui import STATIC_DIR

DEVICES_SQL = """
SELECT d.device_id, d.site_id, d.device_type, d.first_seen, d.last_seen,
       l.ts AS latest_ts, l.voltage_v, l.current_a, l.frequency_hz, l.power_kw, l.soc_pct,
       l.temperature_c
FROM devices d LEFT JOIN device_latest l USING (device_id)
ORDER BY d.device_id
LIMIT 1000
"""


@get("/api/v1/devices")
async def list_devices(state: State) -> dict[str, Any]:
    pool: AsyncConnectionPool = state.pool
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(DEVICES_SQL)
        items = await cur.fetchall()
    return {"items": items, "next_cursor": None}


def create_app(settings: Settings | None = None) -> Litestar:
    s = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = AsyncConnectionPool(s.database_url, min_size=1, max_size=8, open=False)
        await pool.open()
        app.state.pool = pool
        try:
            yield
        finally:
            await pool.close()

    return Litestar(
        route_handlers=[
            list_devices,
            healthz,
            create_static_files_router(path="/", directories=[STATIC_DIR], html_mode=True),
        ],
        lifespan=[lifespan],
        plugins=[problem_details_plugin()],
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
    )
