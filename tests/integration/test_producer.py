"""The renewable producer: a failed replacement leaves a producer that can still be renewed."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from runtime.kafka import RenewableProducer, delete_topics
from runtime.settings import Settings


def test_a_producer_renewed_while_the_broker_is_away_is_renewed_once_it_is_back(
    stack: Settings,
) -> None:
    s = stack.model_copy(update={"kafka_namespace": f"renew-{uuid.uuid4().hex[:8]}."})
    topic = s.topic("renew.check")

    async def scenario() -> tuple[bool, bool, bool, bool, list[bytes]]:
        admin = AIOKafkaAdminClient(**s.kafka_client)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])
        finally:
            await admin.close()
        renewable = RenewableProducer(s, "renew-test")
        first = await renewable.start()
        first._sender._sender_task.cancel()  # its sender died
        await asyncio.sleep(0.1)
        broken_before = renewable.broken
        # The broker is unreachable while renewing: nothing half-started takes its place.
        renewable.s = s.model_copy(update={"kafka_bootstrap_servers": "127.0.0.1:9"})
        renewed_while_away = await renewable.renew_if_broken()
        still_broken = renewable.broken and renewable.producer is first
        renewable.s = s  # the broker is back: the next caller renews it
        renewed = await renewable.renew_if_broken()
        assert renewable.producer is not None
        await renewable.producer.send_and_wait(topic, b"after renewal")
        await renewable.stop()
        consumer = AIOKafkaConsumer(topic, **s.kafka_client, auto_offset_reset="earliest")
        await consumer.start()
        try:
            got = await consumer.getmany(timeout_ms=5000)
        finally:
            await consumer.stop()
            await delete_topics(s, [topic])
        values = [r.value or b"" for records in got.values() for r in records]
        return broken_before, renewed_while_away, still_broken, renewed, values

    broken_before, renewed_while_away, still_broken, renewed, values = asyncio.run(scenario())
    assert broken_before
    assert not renewed_while_away
    assert still_broken
    assert renewed
    assert values == [b"after renewal"]
