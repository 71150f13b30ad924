"""What the query API's writes share: they go through the outbox (`runtime.outbox`), and the
read models change only when their projection applies the event. A handler then waits a little
for its event to be published (or for its change to show), so the answer usually comes once
the rest of the platform can see the change; past that wait the change is stored and will be
published."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from psycopg.rows import dict_row

from query_api.services import Services

VISIBLE_WAIT_S: Final = 5.0
POLL_S: Final = 0.02


async def once_projected(
    services: Services, sql: str, params: dict[str, Any], wait_s: float = VISIBLE_WAIT_S
) -> dict[str, Any] | None:
    """The first row `sql` returns within `wait_s`, None if none by then."""
    deadline = time.monotonic() + wait_s
    while True:
        async with services.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, params)
            row = await cur.fetchone()
        if row is not None or time.monotonic() >= deadline:
            return row
        await asyncio.sleep(POLL_S)


async def published(services: Services, outbox_id: int, wait_s: float = VISIBLE_WAIT_S) -> bool:
    """Wait up to `wait_s` for the relay to publish an outbox record; whether it did."""
    row = await once_projected(
        services,
        "SELECT 1 AS published WHERE NOT EXISTS (SELECT 1 FROM outbox WHERE id = %(id)s)",
        {"id": outbox_id},
        wait_s,
    )
    return row is not None
