"""Telemetry projection: `telemetry.valid` -> devices, telemetry_readings, device_latest.

A reading is stored once per identity `(device_id, ts)`; the first write wins. A repeat with
the same values (a client's retry, a producer's retry, a redrive, a replay) is dropped and
counted (`microgrid_readings_processed_total{outcome="duplicate"}`); one with other values is
not stored either, but dead-lettered to `telemetry.dlq` with reason `conflicting duplicate`
before the poll's transaction commits, so nothing is silently lost or silently changed. Such a
dead letter holds the one reading refused (not its record's batch); when the record was
redriven, the letter keeps its `x-redrive-count`.

The readings inserted are added to their 1-minute and 1-hour rollups in the same transaction
(`telemetry_store.upsert_rollups`). On start and then every `TELEMETRY_EXPIRY_INTERVAL_S` the
projection drops the day partitions older than their retention (`TELEMETRY_RAW_RETENTION_DAYS`,
`ROLLUP_1M_RETENTION_DAYS`) and the hourly rollups older than `ROLLUP_1H_RETENTION_DAYS`, in a
short transaction of its own; a failure is logged and tried again at the next interval.

Also announces each device's latest reading as a live `device.latest` event (to the lossy
latest stream, `runtime.events`), at most once per `DEVICE_LATEST_INTERVAL_S` per device. A
reading that comes sooner is held (the newest per device) and announced when the interval has
passed, so the last value a device sent always reaches live clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, date, datetime

import msgspec
import psycopg
from aiokafka import ConsumerRecord

from contracts import Events, Groups, Reading, ReadingBatch, Topics
from projections import telemetry_store as store
from projections.base import AfterCommit, Projection
from runtime.dlq import Letter, redrive_count
from runtime.events import EventStream
from runtime.metrics import READINGS
from runtime.settings import Settings

log = logging.getLogger("microgrid.projector")

CONFLICT_REASON = "conflicting duplicate"


class Source(msgspec.Struct, frozen=True):
    """The readings of one `telemetry.valid` record, with where the record is."""

    partition: int
    offset: int
    readings: list[Reading]
    redrive_count: bytes | None = None  # the record's x-redrive-count: its dead letters keep it


class TelemetryProjection(Projection[Source]):
    name = "telemetry"

    def __init__(self, s: Settings, events: EventStream, group: str | None = None) -> None:
        super().__init__(
            s,
            s.topic(Topics.TELEMETRY_VALID),
            group or s.group(Groups.TELEMETRY_PROJECTOR),
            s.projector_max_records,
            s.topic(Topics.TELEMETRY_DLQ),
        )
        self.decoder = msgspec.json.Decoder(ReadingBatch)
        self.days: set[date] = set()
        self.events = events
        self.announced: dict[str, float] = {}
        self.held: dict[str, Reading] = {}  # came within the interval: announced after it
        self.flusher: asyncio.Task[None] | None = None
        self._counts = {
            outcome: READINGS.labels(self.group, outcome)
            for outcome in ("stored", "duplicate", "conflict")
        }

    def decode(self, rec: ConsumerRecord[bytes, bytes]) -> Source:
        readings = self.decoder.decode(rec.value or b"").readings
        return Source(rec.partition, rec.offset, readings, redrive_count(rec.headers))

    async def apply(self, conn: psycopg.AsyncConnection, items: list[Source]) -> AfterCommit:
        fresh, repeats, conflicts = first_of_each_identity(items)
        new_days = {r.ts.astimezone(UTC).date() for r in fresh} - self.days
        if new_days:
            await store.ensure_partitions(conn, new_days)
        written = await store.write_readings(conn, fresh)
        await store.upsert_rollups(conn, written.readings)
        if written.conflicts:  # rare: look up the records of the readings refused
            refused = {id(r) for r in fresh if (r.device_id, r.ts) in written.conflicts}
            conflicts += [(src, r) for src in items for r in src.readings if id(r) in refused]
            fresh = [r for r in fresh if id(r) not in refused]
        if conflicts:
            await self.dead_letter(conflicts)  # acknowledged before the transaction commits
        latest = await store.upsert_devices(conn, fresh) if fresh else []
        self._counts["stored"].inc(written.inserted)
        self._counts["duplicate"].inc(repeats + written.repeats)
        self._counts["conflict"].inc(len(conflicts))

        async def announce() -> None:
            self.days |= new_days  # their partitions exist once the transaction committed
            await self._announce(latest)

        return announce

    async def run(self) -> None:
        expiry = asyncio.create_task(self._expire_periodically(), name="telemetry-expiry")
        try:
            await super().run()
        finally:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry

    async def _expire_periodically(self) -> None:
        while True:
            try:
                await self.expire()
            except Exception:  # a bug here must not end the checks, nor the projection
                log.exception("telemetry retention failed (tried again at the next interval)")
            await asyncio.sleep(self.s.telemetry_expiry_interval_s)

    async def expire(self) -> list[tuple[str, int | None]]:
        """Drop what is past its retention (`store.drop_expired`) and log it. A failure (a
        lock not granted in time, PostgreSQL away) is logged, and the next interval tries
        again."""
        s = self.s
        try:
            async with await psycopg.AsyncConnection.connect(
                s.database_url, autocommit=True, connect_timeout=10
            ) as conn:
                dropped = await store.drop_expired(
                    conn,
                    s.telemetry_raw_retention_days,
                    s.rollup_1m_retention_days,
                    s.rollup_1h_retention_days,
                )
        except (psycopg.Error, OSError) as exc:
            log.warning("telemetry retention failed (tried again at the next interval): %s", exc)
            return []
        # a reading of such a day (a replay) would make its partitions again
        self.days -= store.days_of(relation for relation, _ in dropped)
        for relation, rows in dropped:
            log.info(
                "telemetry retention: dropped %s%s",
                relation,
                "" if rows is None else f" ({rows} rows)",
            )
        return dropped

    def _due(self, readings: list[Reading], now: float) -> list[Reading]:
        """Of these readings, the ones whose device may be announced now (marked announced);
        the others are held, the newest per device."""
        interval = self.s.device_latest_interval_s
        due = []
        for r in readings:
            if now - self.announced.get(r.device_id, 0.0) >= interval:
                self.announced[r.device_id] = now
                self.held.pop(r.device_id, None)
                due.append(r)
            else:
                self.held[r.device_id] = r
        return due

    async def _announce(self, latest: list[Reading]) -> None:
        """Announce a batch's latest readings (work in proportion to the batch); a task
        announces the held ones once their interval has passed."""
        now = time.monotonic()
        if len(self.announced) > 200_000:  # devices gone quiet: forget them
            horizon = now - self.s.device_latest_interval_s
            self.announced = {d: t for d, t in self.announced.items() if t > horizon}
        await self.events.append([(Events.DEVICE_LATEST, r) for r in self._due(latest, now)])
        if self.held and (self.flusher is None or self.flusher.done()):
            self.flusher = asyncio.create_task(self._flush_held(), name="latest-held")

    async def _flush_held(self) -> None:
        while self.held:
            await asyncio.sleep(max(self.s.device_latest_interval_s / 2, 0.01))
            held, self.held = list(self.held.values()), {}
            due = self._due(held, time.monotonic())  # the ones not due yet are held again
            await self.events.append([(Events.DEVICE_LATEST, r) for r in due])

    async def dead_letter(self, conflicts: list[tuple[Source, Reading]]) -> None:
        await self.dead_letters.send_letters(
            [
                Letter(
                    msgspec.json.encode(r),
                    r.device_id.encode(),
                    CONFLICT_REASON,
                    self.topic,
                    src.partition,
                    src.offset,
                    src.redrive_count,
                )
                for src, r in conflicts
            ]
        )


def first_of_each_identity(
    items: list[Source],
) -> tuple[list[Reading], int, list[tuple[Source, Reading]]]:
    """The poll's readings with one per identity (the first in log order), how many later
    ones repeated it with the same values, and those with other values (and their record)."""
    first: dict[tuple[str, datetime], Reading] = {}
    fresh: list[Reading] = []
    repeats = 0
    conflicts: list[tuple[Source, Reading]] = []
    for src in items:
        for r in src.readings:
            key = (r.device_id, r.ts)
            seen = first.setdefault(key, r)
            if seen is r:
                fresh.append(r)
            elif store.values_of(seen) == store.values_of(r):
                repeats += 1
            else:
                conflicts.append((src, r))
    return fresh, repeats, conflicts
