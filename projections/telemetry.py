"""Telemetry projector: `telemetry.valid` -> devices, telemetry_readings, device_latest.

Exactly once into PostgreSQL: each poll is one transaction holding the rows and the new
consumer positions (`projection_offsets`); on assignment the consumer seeks to the stored
positions, not Kafka's committed ones. Records the validator re-emitted after a crash carry a
source offset at or below the stored watermark and are skipped.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, date

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
        self.listener_error: BaseException | None = None
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
                if self.listener_error is not None:
                    # aiokafka only logs what a rebalance listener raises: fail loudly instead
                    raise RuntimeError("could not load stored positions") from self.listener_error
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
        """Seek to the positions stored in PostgreSQL, moved into the log's current bounds."""
        assert self.conn is not None
        begins = await self.consumer.beginning_offsets(partitions)
        ends = await self.consumer.end_offsets(partitions)
        async with self.lock:
            async with self.conn.transaction():
                stored = await store.load_positions(
                    self.conn, PROJECTION, self.topic, [tp.partition for tp in partitions]
                )
                for tp in partitions:
                    pos = stored[tp.partition]
                    fixed = _within_log(tp, pos, begins[tp], ends[tp])
                    if fixed is not pos:
                        ok = await store.save_position(
                            self.conn, PROJECTION, self.topic, tp.partition, pos.next_offset, fixed
                        )
                        if not ok:
                            raise _Fenced(tp.partition)
                        stored[tp.partition] = fixed
            for tp in partitions:  # under the lock: no poll runs between these seeks
                self.positions[tp.partition] = stored[tp.partition]
                self.consumer.seek(tp, stored[tp.partition].next_offset)

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
                readings.extend(self._new_readings(rec, marks))
            end = store.Position(max(pos.next_offset, records[-1].offset + 1), marks)
            moves.append((tp.partition, pos.next_offset, end))
        if not moves:
            return
        new_days = {r.ts.astimezone(UTC).date() for r in readings} - self.days
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
            await asyncio.wait_for(
                self.consumer.commit(
                    {TopicPartition(self.topic, p): n.next_offset for p, _, n in moves}
                ),
                timeout=2.0,
            )
        except (KafkaError, TimeoutError) as exc:
            log.debug("informational offset commit failed: %r", exc)

    def _new_readings(
        self, rec: ConsumerRecord[bytes, bytes], marks: dict[str, int]
    ) -> list[Reading]:
        """The record's readings, or none when it repeats a projected source offset or does
        not decode (logged and counted: a bad record must not stop the projection)."""
        try:
            src_p = _header(rec, Headers.SOURCE_PARTITION)
            src_o = _header(rec, Headers.SOURCE_OFFSET)
            source_offset = int(src_o) if src_o is not None else None
            readings = self.decoder.decode(rec.value or b"").readings
        except (ValueError, msgspec.MsgspecError) as exc:
            log.error(
                "skipped undecodable record %s[%d]@%d: %s",
                rec.topic,
                rec.partition,
                rec.offset,
                exc,
            )
            RECORDS.labels(self.group, "undecodable").inc()
            return []
        if src_p is not None and source_offset is not None:
            if source_offset <= marks.get(src_p, -1):
                RECORDS.labels(self.group, "duplicate").inc()
                return []  # re-emitted by the validator after a restart
            marks[src_p] = source_offset
        RECORDS.labels(self.group, "stored").inc()
        return readings


def _within_log(tp: TopicPartition, pos: store.Position, begin: int, end: int) -> store.Position:
    if pos.next_offset > end:
        log.error(
            "stored position %d of partition %d lies past the log end %d: the log was "
            "recreated; projecting it from its beginning",
            pos.next_offset,
            tp.partition,
            end,
        )
        return store.Position(begin, {})
    if pos.next_offset < begin:
        if pos.next_offset >= 0:
            log.warning(
                "partition %d: offsets %d..%d expired before they were projected",
                tp.partition,
                pos.next_offset,
                begin - 1,
            )
        return store.Position(begin, pos.watermarks)
    return pos


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
        if not assigned:
            return
        try:
            await self.p.load_positions(list(assigned))
        except BaseException as exc:
            self.p.listener_error = exc
            raise
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))
