"""A projection whose Kafka consumer dies keeps projecting with a new one, losing and repeating
nothing. aiokafka's group coordination can die for good when a broker restart closes a
connection under it (uvloop raises RuntimeError on the closed transport); the consumer then
re-raises that error on every poll, and the projector process used to end with it (the CI
broker-kill test then found 1,600 readings answered 202 but never stored)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from contracts import Topics
from projections.telemetry import TelemetryProjection
from runtime.events import EventStream
from runtime.settings import Settings
from tests.conftest import wait_for
from tests.support import new_device, reading, stored_count

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
