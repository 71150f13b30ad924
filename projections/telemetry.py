"""Telemetry projector: `telemetry.valid` -> devices, telemetry_readings, device_latest.

Exactly once into PostgreSQL: each poll is one transaction holding the rows and the new
consumer positions (`projection_offsets`); on assignment the consumer seeks to the stored
positions, not Kafka's committed ones. Records the validator re-emitted after a crash carry a
source offset at or below the stored watermark and are skipped.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import date

import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from contracts import Groups, Headers, Reading, ReadingBatch, Topics
from microgrid.metrics import READINGS, RECORDS, report_lag, serve_metrics
from microgrid.settings import Settings
from projections import telemetry_store as store

log = logging.getLogger("microgrid.projector")

PROJECTION = "telemetry"


def _header(rec: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    for k, v in rec.headers:
        if k == name:
            return v.decode()
    return None


class TelemetryProjector:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.topic = s.topic(Topics.TELEMETRY_VALID)
        self.group = s.group(Groups.TELEMETRY_PROJECTOR)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1_048_576,
            client_id="microgrid-projector",
        )
        self.decoder = msgspec.json.Decoder(ReadingBatch)
        self.positions: dict[int, store.Position] = {}
        self.days: set[date] = set()
        self.lock = asyncio.Lock()
        self.conn: psycopg.AsyncConnection | None = None
        self.stopping = asyncio.Event()
        self.projected = 0

    async def run(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(self.s.database_url)
        serve_metrics(self.s, self.s.projector_metrics_port)
        lag = asyncio.create_task(report_lag(self.s, self.group, self.topic))
        listener = _StoredPositions(self)
        self.consumer.subscribe([self.topic], listener=listener)
        await self.consumer.start()
        log.info("projecting %s into PostgreSQL", self.topic)
        try:
            while not self.stopping.is_set():
                polled = await self.consumer.getmany(
                    timeout_ms=200, max_records=self.s.projector_max_records
                )
                if not polled:
                    continue
                try:
                    async with self.lock:
                        await self.project(polled)
                except _Fenced as exc:
                    log.warning("%s", exc)
                    await self.load_positions(list(self.consumer.assignment()))
        finally:
            lag.cancel()
            await self.consumer.stop()  # leaves the group
            await self.conn.close()

    async def load_positions(self, partitions: list[TopicPartition]) -> None:
        assert self.conn is not None
        async with self.lock, self.conn.transaction():
            stored = await store.load_positions(
                self.conn, PROJECTION, self.topic, [tp.partition for tp in partitions]
            )
        for tp in partitions:
            pos = stored[tp.partition]
            self.positions[tp.partition] = pos
            if pos.next_offset >= 0:
                self.consumer.seek(tp, pos.next_offset)
            else:
                await self.consumer.seek_to_beginning(tp)

    async def project(
        self, polled: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> None:
        assert self.conn is not None
        readings: list[Reading] = []
        moves: list[tuple[int, int, store.Position]] = []
        for tp, records in polled.items():
            pos = self.positions.get(tp.partition)
            if pos is None:  # revoked while polling
                continue
            marks = dict(pos.watermarks)
            for rec in records:
                if rec.offset < pos.next_offset:
                    continue  # fetched before a re-seek: already projected
                src_p = _header(rec, Headers.SOURCE_PARTITION)
                src_o = _header(rec, Headers.SOURCE_OFFSET)
                if src_p is not None and src_o is not None:
                    if int(src_o) <= marks.get(src_p, -1):
                        RECORDS.labels(self.group, "duplicate").inc()
                        continue  # re-emitted by the validator after a restart
                    marks[src_p] = int(src_o)
                RECORDS.labels(self.group, "stored").inc()
                readings.extend(self.decoder.decode(rec.value or b"").readings)
            end = store.Position(records[-1].offset + 1, marks)
            moves.append((tp.partition, pos.next_offset, end))
        if not moves:
            return
        new_days = {r.ts.date() for r in readings} - self.days
        async with self.conn.transaction():
            if new_days:
                await store.ensure_partitions(self.conn, new_days)
            if readings:
                await store.write_readings(self.conn, readings)
                await store.upsert_devices(self.conn, readings)
            for partition, expected, new in moves:
                if not await store.save_position(
                    self.conn, PROJECTION, self.topic, partition, expected, new
                ):
                    raise _Fenced(partition)
        self.days |= new_days
        for partition, _, new in moves:
            self.positions[partition] = new
        self.projected += len(readings)
        READINGS.labels(self.group, "stored").inc(len(readings))
        # Kafka's committed offsets are informational (lag monitoring); PostgreSQL is the truth.
        try:
            await self.consumer.commit(
                {TopicPartition(self.topic, p): n.next_offset for p, _, n in moves}
            )
        except KafkaError as exc:
            log.debug("informational offset commit failed: %r", exc)


class _Fenced(RuntimeError):
    def __init__(self, partition: int) -> None:
        super().__init__(f"partition {partition} was projected by another consumer; resyncing")


class _StoredPositions(ConsumerRebalanceListener):
    def __init__(self, projector: TelemetryProjector) -> None:
        self.p = projector

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.p.lock:  # let the poll in flight finish its transaction
            for tp in revoked:
                self.p.positions.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned:
            await self.p.load_positions(list(assigned))
            log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))
