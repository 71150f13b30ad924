"""SQL of the telemetry projection: readings (COPY), devices, device_latest.

The metric columns follow `contracts.METRICS`, so a new metric needs only its migration here.
"""

from __future__ import annotations

from datetime import date
from operator import attrgetter

import psycopg

from contracts import METRICS, Reading

COLUMNS = ("device_id", "ts", "seq", *METRICS)
READING_COLUMNS = ", ".join(COLUMNS)
_row = attrgetter(*COLUMNS)  # one C call per reading on the COPY path

UPSERT_DEVICES = """
INSERT INTO devices (device_id, site_id, device_type, first_seen, last_seen)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[])
ON CONFLICT (device_id) DO UPDATE SET
    site_id = EXCLUDED.site_id,
    device_type = EXCLUDED.device_type,
    first_seen = LEAST(devices.first_seen, EXCLUDED.first_seen),
    last_seen = GREATEST(devices.last_seen, EXCLUDED.last_seen)
"""

_ARRAYS = ", ".join(
    ["%s::text[]", "%s::text[]", "%s::text[]", "%s::timestamptz[]", "%s::bigint[]"]
    + ["%s::float8[]"] * len(METRICS)
)
_UPDATES = ",\n    ".join(f"{c} = EXCLUDED.{c}" for c in ("ts", "seq", *METRICS))
UPSERT_LATEST = f"""
INSERT INTO device_latest (site_id, device_type, {READING_COLUMNS})
SELECT * FROM unnest({_ARRAYS})
ON CONFLICT (device_id) DO UPDATE SET
    site_id = EXCLUDED.site_id, device_type = EXCLUDED.device_type,
    {_UPDATES},
    updated_at = now()
WHERE EXCLUDED.ts >= device_latest.ts
"""


async def ensure_partitions(conn: psycopg.AsyncConnection, days: set[date]) -> None:
    for day in sorted(days):
        await conn.execute("SELECT ensure_telemetry_partition(%s)", (day,))


async def write_readings(conn: psycopg.AsyncConnection, readings: list[Reading]) -> None:
    sql = f"COPY telemetry_readings ({READING_COLUMNS}) FROM STDIN"
    async with conn.cursor() as cur, cur.copy(sql) as copy:
        for r in readings:
            await copy.write_row(_row(r))


async def upsert_devices(conn: psycopg.AsyncConnection, readings: list[Reading]) -> list[Reading]:
    """Register or refresh the readings' devices and their latest values; return the latest
    reading of each device."""
    latest: dict[str, Reading] = {}
    first: dict[str, Reading] = {}
    for r in readings:
        cur = latest.get(r.device_id)
        if cur is None or r.ts >= cur.ts:
            latest[r.device_id] = r
        f = first.get(r.device_id)
        if f is None or r.ts < f.ts:
            first[r.device_id] = r
    ids = sorted(latest)  # a fixed lock order: no deadlocks between projector instances
    rows = [latest[d] for d in ids]
    await conn.execute(
        UPSERT_DEVICES,
        (
            ids,
            [r.site_id for r in rows],
            [r.device_type for r in rows],
            [first[d].ts for d in ids],
            [r.ts for r in rows],
        ),
    )
    await conn.execute(
        UPSERT_LATEST,
        (
            [r.site_id for r in rows],
            [r.device_type for r in rows],
            *([getattr(r, c) for r in rows] for c in COLUMNS),
        ),
    )
    return rows
