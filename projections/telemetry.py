"""Telemetry projection: `telemetry.valid` -> devices, telemetry_readings, device_latest.

Also announces each device's latest reading on the live event stream, at most once per
`DEVICE_LATEST_INTERVAL_S` per device.
"""

from __future__ import annotations

import time
from datetime import UTC, date

import msgspec
import psycopg
from aiokafka import ConsumerRecord

from contracts import Events, Groups, Reading, ReadingBatch, Topics
from projections import telemetry_store as store
from projections.base import AfterCommit, Projection
from runtime.events import EventStream
from runtime.metrics import READINGS
from runtime.settings import Settings


class TelemetryProjection(Projection[list[Reading]]):
    name = "telemetry"

    def __init__(self, s: Settings, events: EventStream) -> None:
        super().__init__(
            s,
            s.topic(Topics.TELEMETRY_VALID),
            s.group(Groups.TELEMETRY_PROJECTOR),
            s.projector_max_records,
        )
        self.decoder = msgspec.json.Decoder(ReadingBatch)
        self.days: set[date] = set()
        self.events = events
        self.announced: dict[str, float] = {}

    def decode(self, rec: ConsumerRecord[bytes, bytes]) -> list[Reading]:
        return self.decoder.decode(rec.value or b"").readings

    async def apply(self, conn: psycopg.AsyncConnection, items: list[list[Reading]]) -> AfterCommit:
        readings = [r for batch in items for r in batch]
        new_days = {r.ts.astimezone(UTC).date() for r in readings} - self.days
        if new_days:
            await store.ensure_partitions(conn, new_days)
        await store.write_readings(conn, readings)
        latest = await store.upsert_devices(conn, readings)
        self.days |= new_days
        READINGS.labels(self.group, "stored").inc(len(readings))

        async def announce() -> None:
            now = time.monotonic()
            due = [
                r
                for r in latest
                if now - self.announced.get(r.device_id, 0.0) >= self.s.device_latest_interval_s
            ]
            for r in due:
                self.announced[r.device_id] = now
            await self.events.append([(Events.DEVICE_LATEST, r) for r in due])

        return announce
