"""SQL of the telemetry projection: readings (COPY), devices, device_latest."""

from __future__ import annotations

from datetime import date

import psycopg

from contracts import Reading

READING_COLUMNS = (
    "device_id, ts, seq, voltage_v, current_a, frequency_hz, power_kw, soc_pct, temperature_c"
)

UPSERT_DEVICES = """
INSERT INTO devices (device_id, site_id, device_type, first_seen, last_seen)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[])
ON CONFLICT (device_id) DO UPDATE SET
    site_id = EXCLUDED.site_id,
    device_type = EXCLUDED.device_type,
    first_seen = LEAST(devices.first_seen, EXCLUDED.first_seen),
    last_seen = GREATEST(devices.last_seen, EXCLUDED.last_seen)
"""

UPSERT_LATEST = f"""
INSERT INTO device_latest (site_id, device_type, {READING_COLUMNS})
SELECT * FROM unnest(
    %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::bigint[],
    %s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::float8[])
ON CONFLICT (device_id) DO UPDATE SET
    site_id = EXCLUDED.site_id, device_type = EXCLUDED.device_type,
    ts = EXCLUDED.ts, seq = EXCLUDED.seq,
    voltage_v = EXCLUDED.voltage_v, current_a = EXCLUDED.current_a,
    frequency_hz = EXCLUDED.frequency_hz, power_kw = EXCLUDED.power_kw,
    soc_pct = EXCLUDED.soc_pct, temperature_c = EXCLUDED.temperature_c,
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
            await copy.write_row(
                (
                    r.device_id,
                    r.ts,
                    r.seq,
                    r.voltage_v,
                    r.current_a,
                    r.frequency_hz,
                    r.power_kw,
                    r.soc_pct,
                    r.temperature_c,
                )
            )


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
            ids,
            [r.ts for r in rows],
            [r.seq for r in rows],
            [r.voltage_v for r in rows],
            [r.current_a for r in rows],
            [r.frequency_hz for r in rows],
            [r.power_kw for r in rows],
            [r.soc_pct for r in rows],
            [r.temperature_c for r in rows],
        ),
    )
    return rows
