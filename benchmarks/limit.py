"""The raw client limit: the same records through a plain aiokafka producer and consumer."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks.profiles import Profile
from runtime.kafka import reliable_producer
from runtime.settings import Settings


async def _leaders_elected(admin: AIOKafkaAdminClient, topic: str, timeout_s: float = 10.0) -> None:
    """Wait until every partition of a new topic has a leader, so the first sends are not
    refused (and retried, with a warning each) while the controller elects them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        [described] = await admin.describe_topics([topic])
        partitions = described.get("partitions") or []
        if partitions and all(p.get("leader", -1) >= 0 for p in partitions):
            return
        await asyncio.sleep(0.1)


async def kafka_roundtrip_per_min(s: Settings, p: Profile, seconds: float) -> float:
    """Readings/min that one producer and one consumer move through the broker, with records
    shaped like the run's (one record per device per request)."""
    per_record = 1 if p.mode == "single" else max(1, p.batch // max(1, p.devices_per_batch))
    reading = {
        "device_id": "bench-limit-0",
        "site_id": "bench-limit",
        "device_type": "meter",
        "ts": "2026-01-01T00:00:00+00:00",
        "seq": 0,
        "power_kw": 12.5,
        "voltage_v": 230.1,
        "frequency_hz": 50.0,
    }
    value = msgspec.json.encode({"readings": [reading] * per_record})
    topic = f"{s.kafka_namespace}bench.limit.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(**s.kafka_client)
    await admin.start()
    await admin.create_topics([NewTopic(topic, s.device_topic_partitions, 1)])
    await _leaders_elected(admin, topic)
    producer = reliable_producer(s, client_id="bench-limit")
    consumer = AIOKafkaConsumer(
        topic,
        **s.kafka_client,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await producer.start()
    await consumer.start()
    consumed = 0
    stop = time.monotonic() + seconds

    async def produce() -> None:
        i = 0
        while time.monotonic() < stop:
            futures = [
                await producer.send(topic, value, key=f"d{(i + j) % 1000}".encode())
                for j in range(500)
            ]
            i += 500
            await asyncio.gather(*futures)

    async def consume() -> None:
        nonlocal consumed
        while time.monotonic() < stop:
            for records in (await consumer.getmany(timeout_ms=200, max_records=5000)).values():
                consumed += len(records)

    started = time.monotonic()
    try:
        await asyncio.gather(produce(), consume())
    finally:
        await producer.stop()
        await consumer.stop()
        await admin.delete_topics([topic])
        await admin.close()
    return round(consumed * per_record / (time.monotonic() - started) * 60, 1)
