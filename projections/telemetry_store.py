"""SQL of the telemetry projection: readings (COPY), devices, device_latest, positions."""

from __future__ import annotations

from datetime import date

import psycopg
from psycopg.types.json import Jsonb

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


class Position:
    """Where a projection stands in one partition, as stored in `projection_offsets`."""

    __slots__ = ("next_offset", "watermarks")

    def __init__(self, next_offset: int, watermarks: dict[str, int]) -> None:
        self.next_offset = next_offset  # -1: nothing projected yet
        self.watermarks = watermarks


async def load_positions(
    conn: psycopg.AsyncConnection, projection: str, topic: str, partitions: list[int]
) -> dict[int, Position]:
    await conn.execute(
        "INSERT INTO projection_offsets (projection, topic, partition, next_offset)"
        " SELECT %s, %s, p, -1 FROM unnest(%s::int[]) AS p ON CONFLICT DO NOTHING",
        (projection, topic, partitions),
    )
    cur = await conn.execute(
        "SELECT partition, next_offset, source_watermarks FROM projection_offsets"
        " WHERE projection = %s AND topic = %s AND partition = ANY(%s)",
        (projection, topic, partitions),
    )
    return {p: Position(o, dict(w)) for p, o, w in await cur.fetchall()}


async def save_position(
    conn: psycopg.AsyncConnection,
    projection: str,
    topic: str,
    partition: int,
    expected: int,
    new: Position,
) -> bool:
    """Move the stored position; False when another consumer moved it first (fencing)."""
    cur = await conn.execute(
        "UPDATE projection_offsets SET next_offset = %s, source_watermarks = %s, updated_at = now()"
        " WHERE projection = %s AND topic = %s AND partition = %s AND next_offset = %s",
        (new.next_offset, Jsonb(new.watermarks), projection, topic, partition, expected),
    )
    return cur.rowcount == 1


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


async def upsert_devices(conn: psycopg.AsyncConnection, readings: list[Reading]) -> None:
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
