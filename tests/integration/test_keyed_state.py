"""The stateful shell against a real broker: states reach the changelog only after their
outputs, never for a batch whose outputs failed, and restore as they were written."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from runtime.kafka import delete_topics, read_table
from runtime.settings import Settings
from stream_processors.keyed_state import KeyedState, Output, StatefulShell, Unprocessable


class Counter(msgspec.Struct):
    n: int


def record(topic: str, partition: int, offset: int, key: str, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(
        topic, partition, offset, 0, 0, key.encode(), value, None, len(key), len(value), ()
    )


def test_states_are_written_after_their_outputs_and_never_for_a_failed_batch(
    stack: Settings,
) -> None:
    s = stack.model_copy(update={"kafka_namespace": f"shell-{uuid.uuid4().hex[:8]}."})
    source, out, changelog = s.topic("in"), s.topic("out"), s.topic("state")
    oversized = b"x" * (5 * 1_048_576)  # above the producer's 4 MiB request limit

    def step(rec: ConsumerRecord, state: KeyedState[Counter], now: datetime) -> list[Output]:
        if rec.value == b"junk":
            raise Unprocessable("not a count")
        key = (rec.key or b"").decode()
        current = state.get(key) or Counter(0)
        state.set(key, Counter(current.n + 1), rec.partition)
        value = oversized if rec.value == b"big" else f"{key}={current.n + 1}".encode()
        return [Output(out, rec.key or b"", value)]

    async def scenario() -> tuple[bool, list[bytes], dict[str, int], dict[str, int]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(t, 2, 1) for t in (out, changelog)])
        finally:
            await admin.close()
        shell: StatefulShell[Counter] = StatefulShell(
            s,
            name="shell-check",
            group=s.group("shell-check"),
            changelog=changelog,
            state_type=Counter,
            lag_topic=out,
            metrics_port=0,
        )
        await shell.producer.start()
        try:
            await shell.restore([0, 1])
            await shell.process(
                (record(source, 0, 0, "a", b"1"), record(source, 1, 0, "b", b"junk")), step
            )
            failed = False
            try:  # "c" counts, but its output cannot be sent
                await shell.process((record(source, 1, 1, "c", b"big"),), step)
            except KafkaError:
                failed = True
            await shell.process((record(source, 0, 1, "a", b"2"),), step)
        finally:
            await shell.producer.stop()
        consumer = AIOKafkaConsumer(
            out, bootstrap_servers=s.kafka_bootstrap_servers, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            got = await consumer.getmany(timeout_ms=5000)
        finally:
            await consumer.stop()
        sent = sorted(r.value or b"" for rs in got.values() for r in rs)
        table = await read_table(s, [TopicPartition(changelog, p) for p in (0, 1)])
        written = {
            key.decode(): msgspec.json.decode(rec.value or b"", type=Counter).n
            for (_, key), rec in table.items()
        }
        reborn: StatefulShell[Counter] = StatefulShell(
            s,
            name="shell-check",
            group=s.group("shell-check"),
            changelog=changelog,
            state_type=Counter,
            lag_topic=out,
            metrics_port=0,
        )
        await reborn.restore([0, 1])
        restored = {key: value.n for key, value in reborn.state.items()}
        await delete_topics(s, [out, changelog])
        return failed, sent, written, restored

    failed, sent, written, restored = asyncio.run(scenario())
    assert failed
    assert sent == [b"a=1", b"a=2"]  # "b" was unprocessable, "c" could not be sent
    assert written == {"a": 2}  # nothing of the failed batch reached the changelog
    assert restored == {"a": 2}
