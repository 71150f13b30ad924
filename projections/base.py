"""What every projection shares: exactly-once application of a topic to PostgreSQL.

Each poll is one transaction holding the rows a subclass writes and the new consumer positions
(`projection_offsets`). On assignment the consumer seeks to the stored positions, not Kafka's
committed ones (those are only kept for lag monitoring). Position updates are conditional on
the previous value, so a consumer that lost its partition cannot overwrite its successor.
Records re-emitted upstream (a validator that died before committing, or a poll published again
after part of its output failed) are repeats of what a projection has stored, in any order:
each projection recognises them by their content's identity (a reading's device and time, an
event's id), never by their position, since a retried publish can land after records that
followed it upstream.

One record never stops a projection: a record that does not decode, or whose rows PostgreSQL
refuses (a data or integrity error), goes to the projection's dead-letter topic with the reason,
acknowledged before the poll's transaction commits. The poll is first applied whole; only when
PostgreSQL refuses it is it applied again record by record, each in a savepoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeAlias, TypeVar

import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from projections import positions as store
from runtime.dlq import DeadLetters
from runtime.metrics import RECORDS
from runtime.settings import Settings

log = logging.getLogger("microgrid.projector")

T = TypeVar("T")
AfterCommit = Callable[[], Awaitable[None]] | None
Record: TypeAlias = ConsumerRecord[bytes, bytes]
# What PostgreSQL refuses because of a record's content, as opposed to an outage or a bug.
REFUSED = (psycopg.DataError, psycopg.IntegrityError)


class Projection(Generic[T]):
    """Subclasses name the projection, decode a record, and write a poll's items."""

    name: str

    def __init__(
        self, s: Settings, topic: str, group: str, max_records: int, dlq_topic: str
    ) -> None:
        self.s = s
        self.topic = topic
        self.group = group
        self.max_records = max_records
        self.consumer = self._new_consumer()
        self.positions: dict[int, store.Position] = {}
        # how many times each partition was sought to its stored position (`load_positions`):
        # a poll's records of a partition sought since the poll returned are not projected
        self.seeks: dict[int, int] = {}
        self.lock = asyncio.Lock()
        self.conn: psycopg.AsyncConnection | None = None
        self.stopping = asyncio.Event()
        self.listener_error: BaseException | None = None
        self.dead_letters = DeadLetters(s, dlq_topic, group)

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            **self.s.kafka_client,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # the alerter's and controller's transactions
            max_partition_fetch_bytes=4 * 1_048_576,
            fetch_min_bytes=self.s.consumer_fetch_min_bytes,
            fetch_max_wait_ms=self.s.consumer_fetch_max_wait_ms,
            client_id=self.group,
        )

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
                try:
                    polled = await self.consumer.getmany(
                        timeout_ms=200, max_records=self.max_records
                    )
                except KafkaError as exc:
                    await self._replace_consumer(exc)
                    continue
                if self.listener_error is not None:
                    # aiokafka only logs what a rebalance listener raises: fail loudly instead
                    raise RuntimeError("could not load stored positions") from self.listener_error
                if not polled:
                    continue
                # a seek during the poll is no matter: aiokafka returns no record fetched
                # before it; one after it, before the poll is projected, makes its records stale
                seeks = dict(self.seeks)
                consumed = await self._consumed_to(polled)  # not under the lock: see there
                try:
                    async with self.lock:
                        await self.project(polled, seeks, consumed)
                except _Fenced as exc:
                    log.warning("%s", exc)
                    try:
                        await self.load_positions(list(self.consumer.assignment()), reload=True)
                    except (_Fenced, KafkaError) as again:
                        # moved again, or a rebalance took partitions meanwhile (its listener
                        # loads the new ones): the next poll's compare-and-set finds out
                        log.warning("%s: reloading positions: %r", self.name, again)
        finally:
            # leaves the group; bounded, since a LeaveGroup the coordinator does not answer
            # waited out aiokafka's 40 s request timeout (after PostgreSQL was killed) and held
            # back the supervisor's restart
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer.stop(), timeout=5)
            await self.conn.close()
            await self.dead_letters.close()
            await self.close()

    async def _replace_consumer(self, exc: KafkaError) -> None:
        """A consumer whose group coordination died stays dead (aiokafka re-raises the error
        on every poll; seen when a broker restart closed a connection under its coordinator):
        leave the group and join again with a new consumer. Nothing is lost or repeated: the
        new assignment seeks to the positions stored in PostgreSQL."""
        log.warning("%s: Kafka consumer failed (%r); replacing it", self.name, exc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.consumer.stop(), timeout=10)
        async with self.lock:
            self.positions.clear()
        # a listener the stop cancelled is no error of the new consumer's
        self.listener_error = None
        delay = 1.0
        while not self.stopping.is_set():
            consumer = self._new_consumer()
            consumer.subscribe([self.topic], listener=_StoredPositions(self))
            try:
                await consumer.start()
            except KafkaError as again:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                log.warning("%s: cannot start a Kafka consumer yet: %r", self.name, again)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self.consumer = consumer
            log.info("%s: Kafka consumer replaced", self.name)
            return

    async def load_positions(self, partitions: list[TopicPartition], reload: bool = False) -> None:
        """Seek to the positions stored in PostgreSQL, moved into the log's current bounds.
        The rebalance listener loads the partitions assigned; a `reload` (after a refused
        compare-and-set) only those this member still holds: a partition revoked meanwhile is
        left to the listener of its next assignment, which seeks before it is projected."""
        assert self.conn is not None
        begins = await self.consumer.beginning_offsets(partitions)
        ends = await self.consumer.end_offsets(partitions)
        async with self.lock:
            async with self.conn.transaction():
                stored = await store.load_positions(
                    self.conn, self.name, self.topic, [tp.partition for tp in partitions]
                )
                past = [tp for tp in partitions if stored[tp.partition].next_offset > ends[tp]]
                if past:  # or another member stored positions since the ends were asked
                    ends.update(await self.consumer.end_offsets(past))
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
            assigned = self.consumer.assignment()
            for tp in partitions:  # under the lock: no poll runs between these seeks
                if tp not in assigned or (reload and tp.partition not in self.positions):
                    continue
                self.positions[tp.partition] = stored[tp.partition]
                self.consumer.seek(tp, stored[tp.partition].next_offset)
                self.seeks[tp.partition] = self.seeks.get(tp.partition, 0) + 1

    async def _consumed_to(self, polled: dict[TopicPartition, list[Record]]) -> dict[int, int]:
        """The consumer's position in each polled partition: past the poll's records and the
        transaction markers (or aborted records) it skipped right behind them. The alerter and
        the controller write in transactions, and a stored position left before a marker would
        count as lag forever on a quiet partition.

        Asked before the projection's lock is taken, and for a second at most: during a
        rebalance `position()` waits for the new assignment's position, which the rebalance
        listener sets under that lock. A partition without an answer keeps the offset after
        its last record."""
        consumed: dict[int, int] = {}
        for tp in polled:
            try:
                async with asyncio.timeout(1.0):  # no task: a valid position returns at once
                    consumed[tp.partition] = await self.consumer.position(tp)
            except (KafkaError, AssertionError, ValueError, TimeoutError) as exc:
                log.debug("%s: no position for %s: %r", self.name, tp, exc)
        return consumed

    async def project(
        self,
        polled: dict[TopicPartition, list[Record]],
        seeks: dict[int, int],
        consumed: dict[int, int] | None = None,
    ) -> None:
        """Apply a poll and move the stored positions, in one transaction. `seeks` is
        `self.seeks` as it was when the poll returned; `consumed`, the consumer's positions
        after the poll (see `_consumed_to`)."""
        assert self.conn is not None
        items: list[tuple[Record, T]] = []
        refused: list[tuple[Record, str]] = []
        moves: list[tuple[int, int, store.Position]] = []
        for tp, records in polled.items():
            pos = self.positions.get(tp.partition)
            if pos is None:  # fetched before this partition's positions were loaded
                continue
            if self.seeks.get(tp.partition, 0) != seeks.get(tp.partition, 0):
                # the rebalance listener sought this partition after the poll returned (while
                # this waited for the lock): its records may lie anywhere, even past records a
                # poll before dropped for want of a position. The consumer reads again from
                # the seek.
                continue
            for rec in records:
                if rec.offset < pos.next_offset:
                    continue  # fetched before a re-seek: already projected
                self._admit(rec, items, refused)
            after = records[-1].offset + 1
            end = store.Position(max(pos.next_offset, after, (consumed or {}).get(tp.partition, 0)))
            moves.append((tp.partition, pos.next_offset, end))
        if not moves:
            return
        try:
            after = await self._transaction(moves, [i for _, i in items], refused)
        except REFUSED as exc:
            log.warning(
                "%s: PostgreSQL refused a poll of %d records (%s); applying them one by one",
                self.name,
                len(items),
                exc,
            )
            after = await self._one_by_one(moves, items, refused)
        for partition, _, new in moves:
            self.positions[partition] = new
        for announce in after:
            await announce()
        await self._commit_informational(moves)

    async def _transaction(
        self,
        moves: list[tuple[int, int, store.Position]],
        items: list[T],
        refused: list[tuple[Record, str]],
    ) -> list[Callable[[], Awaitable[None]]]:
        """Apply the items and move the positions in one transaction."""
        assert self.conn is not None
        async with self.conn.transaction():
            after = await self.apply(self.conn, items) if items else None
            await self._finish(moves, refused)
        return [after] if after is not None else []

    async def _one_by_one(
        self,
        moves: list[tuple[int, int, store.Position]],
        items: list[tuple[Record, T]],
        refused: list[tuple[Record, str]],
    ) -> list[Callable[[], Awaitable[None]]]:
        """Apply each item in a savepoint; dead-letter those PostgreSQL refuses."""
        assert self.conn is not None
        announcements = []
        async with self.conn.transaction():
            for rec, item in items:
                try:
                    async with self.conn.transaction():  # a savepoint
                        after = await self.apply(self.conn, [item])
                except REFUSED as exc:
                    refused.append((rec, f"refused by PostgreSQL: {exc}"))
                    continue
                if after is not None:
                    announcements.append(after)
            await self._finish(moves, refused)
        return announcements

    async def _finish(
        self, moves: list[tuple[int, int, store.Position]], refused: list[tuple[Record, str]]
    ) -> None:
        """Inside the poll's transaction: dead-letter what was refused (acknowledged before the
        commit), then move the stored positions, conditionally."""
        assert self.conn is not None
        await self.dead_letters.send(refused)
        for partition, expected, new in moves:
            if not await store.save_position(
                self.conn, self.name, self.topic, partition, expected, new
            ):
                raise _Fenced(partition)

    async def _commit_informational(self, moves: list[tuple[int, int, store.Position]]) -> None:
        offsets = {TopicPartition(self.topic, p): n.next_offset for p, _, n in moves}
        try:
            await asyncio.wait_for(self.consumer.commit(offsets), timeout=2.0)
        except (KafkaError, TimeoutError) as exc:
            log.debug("informational offset commit failed: %r", exc)

    def _admit(
        self, rec: Record, items: list[tuple[Record, T]], refused: list[tuple[Record, str]]
    ) -> None:
        """Add the record's item; a record that does not decode is refused (dead-lettered),
        never a reason to stop."""
        try:
            item = self.decode(rec)
        except (ValueError, msgspec.MsgspecError) as exc:
            RECORDS.labels(self.group, "undecodable").inc()
            refused.append((rec, f"undecodable: {exc}"))
            return
        RECORDS.labels(self.group, "stored").inc()
        items.append((rec, item))


def _within_log(tp: TopicPartition, pos: store.Position, begin: int, end: int) -> store.Position:
    if pos.next_offset > end:
        log.error(
            "stored position %d of partition %d lies past the log end %d: the log was "
            "recreated; projecting it from its beginning",
            pos.next_offset,
            tp.partition,
            end,
        )
        return store.Position(begin)
    if pos.next_offset < begin:
        if pos.next_offset >= 0:
            log.warning(
                "partition %d: offsets %d..%d expired before they were projected",
                tp.partition,
                pos.next_offset,
                begin - 1,
            )
        return store.Position(begin)
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
