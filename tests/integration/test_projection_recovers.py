"""A projection keeps projecting, losing and repeating nothing, when its Kafka consumer dies and
when its rebalance listener seeks while a poll is in flight.

A projection whose Kafka consumer dies keeps projecting with a new one. aiokafka's group
coordination can die for good when a broker restart closes a connection under it (uvloop raises
RuntimeError on the closed transport); the consumer then re-raises that error on every poll, and
the projector process used to end with it (the CI broker-kill test then found 1,600 readings
answered 202 but never stored)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
import psycopg
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from contracts import Topics
from projections.telemetry import TelemetryProjection
from runtime.db import migrate
from runtime.events import EventStream
from runtime.settings import Settings
from tests.conftest import wait_for
from tests.support import drop_database, new_device, reading, stored_count

COORDINATION_DIED = KafkaError(
    "Unexpected error during coordination RuntimeError('unable to perform operation on "
    "<TCPTransport closed=True>; the handler is closed')"
)


def test_a_projection_replaces_a_consumer_whose_coordination_died(stack: Settings) -> None:
    group = stack.group(f"recovery-{uuid.uuid4().hex[:8]}")
    device = new_device()
    before = [reading(device, "site-recovery", seq=i) for i in range(5)]
    after = [reading(device, "site-recovery", seq=100 + i) for i in range(5)]

    async def produce(readings: list[dict[str, Any]]) -> None:
        producer = AIOKafkaProducer(**stack.kafka_client, acks="all")
        await producer.start()
        try:
            body = msgspec.json.encode({"readings": readings})
            topic = stack.topic(Topics.TELEMETRY_VALID)
            await producer.send_and_wait(topic, body, key=device.encode())
        finally:
            await producer.stop()

    def count() -> tuple[int, int]:
        with psycopg.connect(stack.database_url) as db:
            return stored_count(db, [device])

    async def until(what: str, done: Any, within_s: float = 60) -> None:
        await asyncio.to_thread(wait_for, done, within_s, what)

    async def scenario() -> tuple[tuple[int, int], bool]:
        events = EventStream(stack)
        projection = TelemetryProjection(stack, events, group=group)
        task = asyncio.create_task(projection.run())
        try:
            await produce(before)
            await until("the first readings", lambda: count() == (5, 5))
            broken = projection.consumer

            async def dead(*args: Any, **kwargs: Any) -> Any:
                raise COORDINATION_DIED  # on every poll, as aiokafka does once it happened

            broken.getmany = dead
            await until("a new consumer", lambda: projection.consumer is not broken)
            await produce(after)
            await until("the readings sent after the failure", lambda: count()[1] >= 10)
            assert not task.done(), "the projection ended"
            return count(), projection.consumer is not broken
        finally:
            projection.stopping.set()
            await asyncio.wait_for(task, timeout=30)
            await events.close()

    stored, replaced = asyncio.run(scenario())
    assert replaced
    assert stored == (10, 10)  # each reading once, none lost


def test_records_fetched_before_the_listeners_seek_are_read_again_not_projected(
    stack: Settings,
) -> None:
    """A partition given to a member is fetched from Kafka's committed offset while the rebalance
    listener still loads the stored position: a poll in that time is dropped (no position
    yet), and the one after it can come back just as the listener seeks. Projecting that one
    from the stored position moved the position over the records of the poll dropped before:
    under a slow broker a second projector member lost 1,000 readings of each device of a
    partition this way. Such records are read again from the seek instead."""
    device = new_device()
    readings = [reading(device, "site-seek", seq=i) for i in range(10)]
    topic = stack.topic(Topics.TELEMETRY_VALID)
    fresh = f"{stack.database_url.rsplit('/', 1)[1]}_seek_{uuid.uuid4().hex[:6]}"
    url = stack.database_url.rsplit("/", 1)[0] + f"/{fresh}"
    admin = psycopg.connect(stack.database_url, autocommit=True)
    admin.execute(f'CREATE DATABASE "{fresh}"')
    s = Settings(database_url=url)

    async def produce() -> tuple[int, list[int]]:
        producer = AIOKafkaProducer(**stack.kafka_client, acks="all")
        await producer.start()
        try:
            sent = [
                await producer.send_and_wait(
                    topic, msgspec.json.encode({"readings": [r]}), key=device.encode()
                )
                for r in readings
            ]
        finally:
            await producer.stop()
        assert len({m.partition for m in sent}) == 1
        return sent[0].partition, [m.offset for m in sent]

    async def poll(projection: TelemetryProjection, tp: TopicPartition) -> Any:
        for _ in range(100):
            polled = await projection.consumer.getmany(tp, timeout_ms=200, max_records=5)
            if polled:
                return polled
        raise AssertionError("nothing fetched")

    async def scenario() -> tuple[int, int]:
        partition, offsets = await produce()
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(
                "INSERT INTO projection_offsets (projection, topic, partition, next_offset)"
                " VALUES ('telemetry', %s, %s, %s)",
                (topic, partition, offsets[0]),
            )
        events = EventStream(s)
        projection = TelemetryProjection(s, events, group=s.group(f"seek-{uuid.uuid4().hex[:8]}"))
        projection.conn = await psycopg.AsyncConnection.connect(url)
        tp = TopicPartition(topic, partition)
        projection.consumer.assign([tp])
        await projection.consumer.start()
        try:
            projection.consumer.seek(tp, offsets[0])  # as from Kafka's committed offset
            # a poll while the listener loads the stored position: dropped, no position yet
            dropped = await poll(projection, tp)
            await projection.project(dropped, dict(projection.seeks))
            # the next poll, and the listener's seek landing before it is projected
            early = await poll(projection, tp)
            seeks = dict(projection.seeks)
            await projection.load_positions([tp])
            await projection.project(early, seeks)
            # then polls as usual, until the partition is projected to its end
            with psycopg.connect(url, autocommit=True) as db:

                def position() -> int:
                    row = db.execute(
                        "SELECT next_offset FROM projection_offsets"
                        " WHERE projection = 'telemetry' AND topic = %s AND partition = %s",
                        (topic, partition),
                    ).fetchone()
                    assert row is not None
                    return int(row[0])

                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while position() <= offsets[-1]:
                    assert loop.time() < deadline, "the partition was not projected to its end"
                    polled = await projection.consumer.getmany(tp, timeout_ms=200)
                    if polled:
                        await projection.project(polled, dict(projection.seeks))
                return stored_count(db, [device])
        finally:
            await projection.consumer.stop()
            await projection.conn.close()
            await events.close()

    try:
        migrate(s)
        assert asyncio.run(scenario()) == (10, 10)  # each reading once, none skipped
    finally:
        drop_database(admin, fresh)
        admin.close()
