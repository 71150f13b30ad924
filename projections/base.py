"""What every projection shares: exactly-once application of a topic to PostgreSQL.

Each poll is one transaction holding the rows a subclass writes and the new consumer positions
(`projection_offsets`). On assignment the consumer seeks to the stored positions, not Kafka's
committed ones (those are only kept for lag monitoring). Position updates are conditional on
the previous value, so a consumer that lost its partition cannot overwrite its successor.
Records re-emitted upstream after a crash carry a source offset at or below the stored
watermark and are skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from contracts import Headers
from projections import positions as store
from runtime.metrics import RECORDS
from runtime.settings import Settings

log = logging.getLogger("microgrid.projector")

T = TypeVar("T")
AfterCommit = Callable[[], Awaitable[None]] | None


def _header(rec: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    for k, v in rec.headers:
        if k == name:
            return v.decode()
    return None


class Projection(Generic[T]):
    """Subclasses name the projection, decode a record, and write a poll's items."""

    name: str

    def __init__(self, s: Settings, topic: str, group: str, max_records: int) -> None:
        self.s = s
        self.topic = topic
        self.group = group
        self.max_records = max_records
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1_048_576,
            fetch_min_bytes=s.consumer_fetch_min_bytes,
            fetch_max_wait_ms=s.consumer_fetch_max_wait_ms,
            client_id=group,
        )
        self.positions: dict[int, store.Position] = {}
        self.lock = asyncio.Lock()
        self.conn: psycopg.AsyncConnection | None = None
        self.stopping = asyncio.Event()
        self.listener_error: BaseException | None = None

    def decode(self, rec: ConsumerRecord[bytes, bytes]) -> T:
        raise NotImplementedError

    async def apply(self, conn: psycopg.AsyncConnection, items: list[T]) -> AfterCommit:
        """Write the items inside the poll's transaction; optionally return what to do once it
        committed (side effects that must not happen for a rolled-back poll)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the subclass holds besides the consumer and the connection."""

    async def run(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(self.s.database_url)
        self.consumer.subscribe([self.topic], listener=_StoredPositions(self))
        await self.consumer.start()
        log.info("projecting %s into PostgreSQL (%s)", self.topic, self.name)
        try:
            while not self.stopping.is_set():
                polled = await self.consumer.getmany(timeout_ms=200, max_records=self.max_records)
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
            await self.consumer.stop()  # leaves the group
            await self.conn.close()
            await self.close()

    async def load_positions(self, partitions: list[TopicPartition]) -> None:
        """Seek to the positions stored in PostgreSQL, moved into the log's current bounds."""
        assert self.conn is not None
        begins = await self.consumer.beginning_offsets(partitions)
        ends = await self.consumer.end_offsets(partitions)
        async with self.lock:
            async with self.conn.transaction():
                stored = await store.load_positions(
                    self.conn, self.name, self.topic, [tp.partition for tp in partitions]
                )
                for tp in partitions:
                    pos = stored[tp.partition]
                    fixed = _within_log(tp, pos, begins[tp], ends[tp])
                    if fixed is not pos:
                        ok = await store.save_position(
                            self.conn, self.name, self.topic, tp.partition, pos.next_offset, fixed
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
        items: list[T] = []
        moves: list[tuple[int, int, store.Position]] = []
        for tp, records in polled.items():
            pos = self.positions.get(tp.partition)
            if pos is None:  # fetched before this partition's positions were loaded
                continue
            marks = dict(pos.watermarks)
            for rec in records:
                if rec.offset < pos.next_offset:
                    continue  # fetched before a re-seek: already projected
                items.extend(self._new_items(rec, marks))
            end = store.Position(max(pos.next_offset, records[-1].offset + 1), marks)
            moves.append((tp.partition, pos.next_offset, end))
        if not moves:
            return
        async with self.conn.transaction():
            after = await self.apply(self.conn, items) if items else None
            for partition, expected, new in moves:
                if not await store.save_position(
                    self.conn, self.name, self.topic, partition, expected, new
                ):
                    raise _Fenced(partition)
        for partition, _, new in moves:
            self.positions[partition] = new
        if after is not None:
            await after()
        await self._commit_informational(moves)

    async def _commit_informational(self, moves: list[tuple[int, int, store.Position]]) -> None:
        offsets = {TopicPartition(self.topic, p): n.next_offset for p, _, n in moves}
        try:
            await asyncio.wait_for(self.consumer.commit(offsets), timeout=2.0)
        except (KafkaError, TimeoutError) as exc:
            log.debug("informational offset commit failed: %r", exc)

    def _new_items(self, rec: ConsumerRecord[bytes, bytes], marks: dict[str, int]) -> list[T]:
        """The record's item, or none when it repeats a projected source offset or does not
        decode (logged and counted: a bad record must not stop the projection)."""
        try:
            src_p = _header(rec, Headers.SOURCE_PARTITION)
            src_o = _header(rec, Headers.SOURCE_OFFSET)
            source_offset = int(src_o) if src_o is not None else None
            item = self.decode(rec)
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
                return []  # re-emitted upstream after a restart
            marks[src_p] = source_offset
        RECORDS.labels(self.group, "stored").inc()
        return [item]


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
    def __init__(self, projection: Projection[Any]) -> None:
        self.p = projection

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
        log.info("%s: assigned partitions %s", self.p.name, sorted(tp.partition for tp in assigned))
