"""Records produced straight to `telemetry.raw`, dead letters, and crash recovery."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence

import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from contracts import Headers, Topics
from runtime.settings import Settings
from tests.conftest import Components, wait_for
from tests.support import new_device, reading, stored_count


async def produce(s: Settings, records: Sequence[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(**s.kafka_client, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        futures = [
            await producer.send(s.topic(Topics.TELEMETRY_RAW), value, key=key)
            for key, value in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def dead_letters(
    s: Settings,
    key: bytes | None,
    want: int,
    wait_s: float = 30,
    value: bytes | None = None,
    topic: str = Topics.TELEMETRY_DLQ,
    source: str | None = None,
) -> list[ConsumerRecord[bytes, bytes]]:
    """The first `want` dead letters on `topic` with this key (and value; from the topic
    `source`, when given)."""
    origin = None if source is None else s.topic(source).encode()
    consumer = AIOKafkaConsumer(
        s.topic(topic),
        **s.kafka_client,
        auto_offset_reset="earliest",
        group_id=f"test-dlq-{uuid.uuid4().hex[:6]}",
    )
    await consumer.start()
    found: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + wait_s
        while len(found) < want and time.monotonic() < deadline:
            polled = await consumer.getmany(timeout_ms=500)
            found += [
                r
                for recs in polled.values()
                for r in recs
                if r.key == key
                and (value is None or r.value == value)
                and (origin is None or dict(r.headers).get(Headers.DLQ_SOURCE_TOPIC) == origin)
            ]
    finally:
        await consumer.stop()
    return found


def test_plain_kafka_producer_records_are_stored(
    platform: Components, db: psycopg.Connection, stack: Settings
) -> None:
    single, batched = new_device(), new_device()
    batch = {"readings": [reading(batched, "site-k", seq=i) for i in range(25)]}
    asyncio.run(
        produce(
            stack,
            [
                (single.encode(), json.dumps(reading(single, "site-k")).encode()),
                (batched.encode(), json.dumps(batch).encode()),
                (single.encode(), json.dumps(reading(single, "site-k", seq=1)).encode()),
            ],
        )
    )
    wait_for(lambda: stored_count(db, [single, batched]) == (27, 27), what="direct records")


def test_garbage_goes_to_dlq_with_reason_and_partition_keeps_flowing(
    platform: Components, db: psycopg.Connection, stack: Settings
) -> None:
    device = new_device()
    key = device.encode()
    garbage = [
        b"\x00\xff\x13garbage",
        b'{"device_id": "' + key + b'", "site_id": "s", "device_type": "toaster"}',
        json.dumps(reading("someone-else", "s")).encode(),  # key says another device
        json.dumps(reading(device, "s", ts="1999-01-01T00:00:00Z")).encode(),
    ]
    # a record without a key would skip the key check: refused too (found by its value)
    unkeyed = json.dumps(reading(device, "s", seq=7)).encode()
    asyncio.run(
        produce(
            stack,
            [(key, g) for g in garbage]
            + [(None, unkeyed), (key, json.dumps(reading(device, "s")).encode())],
        )
    )
    wait_for(lambda: stored_count(db, [device]) == (1, 1), what="good record after garbage")
    letters = asyncio.run(dead_letters(stack, key, want=4))
    assert [r.value for r in letters] == garbage
    loose = asyncio.run(dead_letters(stack, None, want=1, value=unkeyed))
    assert "without a key" in dict(loose[0].headers)[Headers.DLQ_REASON].decode()
    reasons = []
    for r in letters:
        headers = {k: v.decode() for k, v in r.headers}
        assert headers[Headers.DLQ_SOURCE_TOPIC] == stack.topic(Topics.TELEMETRY_RAW)
        assert int(headers[Headers.DLQ_SOURCE_PARTITION]) >= 0
        assert int(headers[Headers.DLQ_SOURCE_OFFSET]) >= 0
        reasons.append(headers[Headers.DLQ_REASON])
    assert "malformed JSON" in reasons[0]
    assert "device_type" in reasons[1]
    assert "not the readings' device id" in reasons[2]
    assert "older than" in reasons[3]


def _stream(s: Settings, devices: list[str], records_per_device: int, per_record: int) -> int:
    """Produce batches round-robin over devices for a few seconds; return readings sent."""

    async def run() -> int:
        sent = 0
        for i in range(records_per_device):
            records = []
            for d in devices:
                batch = [
                    reading(d, "site-crash", seq=i * per_record + j) for j in range(per_record)
                ]
                records.append((d.encode(), msgspec.json.encode({"readings": batch})))
                sent += per_record
            await produce(s, records)
            await asyncio.sleep(0.05)
        return sent

    return asyncio.run(run())


def _crash_mid_stream(
    platform: Components, db: psycopg.Connection, stack: Settings, victim: str
) -> None:
    devices = [new_device() for _ in range(8)]
    import threading

    result: dict[str, int] = {}
    producer = threading.Thread(
        target=lambda: result.setdefault("sent", _stream(stack, devices, 60, 20))
    )
    producer.start()
    wait_for(lambda: stored_count(db, devices)[0] > 500, what="projection to start")
    platform.kill(victim)  # SIGKILL: no flush, no commit, no goodbye
    time.sleep(1.0)
    platform.start(victim)
    producer.join()
    sent = result["sent"]
    wait_for(lambda: stored_count(db, devices)[0] >= sent, 60, what="all readings projected")
    time.sleep(1.5)  # anything re-delivered after the restart would land by now
    assert stored_count(db, devices) == (sent, sent)


def test_projector_killed_mid_stream_loses_and_duplicates_nothing(
    platform: Components, db: psycopg.Connection, stack: Settings
) -> None:
    _crash_mid_stream(platform, db, stack, "projector")


def test_validator_killed_mid_stream_loses_and_duplicates_nothing(
    platform: Components, db: psycopg.Connection, stack: Settings
) -> None:
    _crash_mid_stream(platform, db, stack, "validator")


def test_records_re_emitted_by_a_restarted_validator_are_stored_once(
    platform: Components, db: psycopg.Connection, stack: Settings
) -> None:
    """A validator that dies after publishing but before committing publishes again on restart;
    a poll whose output failed in part is published again while the rest of the first attempt
    may still land after the retry. The projection keeps one copy of each reading, whatever
    the order in which the copies arrive."""
    device = new_device()
    source_partition = str(1000 + uuid.uuid4().int % 1000)  # not a real partition: no side effects

    def batch_for(offset: int) -> bytes:
        seqs = range(offset * 10, offset * 10 + 3)
        return msgspec.json.encode({"readings": [reading(device, "site-r", seq=q) for q in seqs]})

    batches = {offset: batch_for(offset) for offset in (5, 6, 7, 8)}  # a copy is the same bytes

    async def emit() -> None:
        producer = AIOKafkaProducer(**stack.kafka_client, acks="all")
        await producer.start()
        try:
            # 6 lands before 5 (5's first send failed, 6's did not), then 5 and 6 again as
            # after a crash before commit; 8 marks the end
            for offset in (6, 5, 5, 6, 7, 8):
                await producer.send_and_wait(
                    stack.topic(Topics.TELEMETRY_VALID),
                    batches[offset],
                    key=device.encode(),
                    headers=[
                        (Headers.SOURCE_PARTITION, source_partition.encode()),
                        (Headers.SOURCE_OFFSET, str(offset).encode()),
                    ],
                )
        finally:
            await producer.stop()

    asyncio.run(emit())
    # the marker's record comes last in the same partition: once it is stored, all were seen
    wait_for(lambda: stored_count(db, [device])[1] >= 12, what="records up to the marker")
    assert stored_count(db, [device]) == (12, 12)


def test_undecodable_record_on_the_valid_topic_does_not_stop_the_projection(
    platform: Components, db: psycopg.Connection, stack: Settings
) -> None:
    device = new_device()

    async def emit() -> None:
        producer = AIOKafkaProducer(**stack.kafka_client, acks="all")
        await producer.start()
        try:
            topic = stack.topic(Topics.TELEMETRY_VALID)
            await producer.send_and_wait(topic, b"\xffnot json", key=device.encode())
            good = msgspec.json.encode({"readings": [reading(device, "site-v")]})
            await producer.send_and_wait(topic, good, key=device.encode())
        finally:
            await producer.stop()

    asyncio.run(emit())
    wait_for(lambda: stored_count(db, [device]) == (1, 1), what="record after the bad one")
