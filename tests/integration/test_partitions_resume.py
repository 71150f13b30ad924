"""`microgrid kafka grow` stopped part way (the changelogs raised, some state copied, nothing
else), then run again: it finishes, and meanwhile the stateful processors refuse to start."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from rich.console import Console

from contracts import Groups, Topics
from microgrid.partitions import grow, partition_for
from runtime.kafka import (
    PartitionMismatch,
    check_device_partitions,
    delete_topics,
    device_topic_specs,
    ensure_topics,
    read_table,
    topic_specs,
)
from runtime.settings import Settings
from stream_processors.alerting import DeviceState

BEFORE, AFTER = 4, 6


async def scenario(s: Settings) -> None:
    state, valid = s.topic(Topics.ALERTER_STATE), s.topic(Topics.TELEMETRY_VALID)
    group = s.group(Groups.ALERTER)
    await ensure_topics(s)
    devices = [f"dev-{i:03d}" for i in range(40)]
    moving = [
        d for d in devices if partition_for(d.encode(), BEFORE) != partition_for(d.encode(), AFTER)
    ]
    producer = AIOKafkaProducer(**s.kafka_client, acks="all")
    await producer.start()
    try:
        for d in devices:
            value = msgspec.json.encode(DeviceState(d, "site-1", "battery", last_offset=7))
            await producer.send(
                state, value, key=d.encode(), partition=partition_for(d.encode(), BEFORE)
            )
        for _ in range(3):  # read by no one yet: the alerter would start there at the end
            await producer.send(valid, b"{}", key=b"x", partition=3)
        await producer.flush()
    finally:
        await producer.stop()
    committer = AIOKafkaConsumer(**s.kafka_client, group_id=group, enable_auto_commit=False)
    await committer.start()
    try:
        committed = {TopicPartition(valid, p): 0 for p in range(3)}
        committer.assign(list(committed))
        await committer.commit(committed)
    finally:
        await committer.stop()
    with psycopg.connect(s.database_url, autocommit=True) as db:
        db.execute(
            "INSERT INTO projection_offsets (projection, topic, partition, next_offset)"
            " SELECT 'telemetry', %s, p, CASE WHEN p = 3 THEN 3 ELSE 0 END"
            " FROM generate_series(0, 3) AS p",  # it projected partition 3's records
            (valid,),
        )

    # a run that stopped part way: the changelogs raised, half the moving state copied
    admin = AIOKafkaAdminClient(**s.kafka_client)
    await admin.start()
    try:
        await admin.create_partitions(
            {
                s.topic(t): NewPartitions(total_count=AFTER)
                for t in (Topics.ALERTER_STATE, Topics.CONTROLLER_STATE)
            }
        )
    finally:
        await admin.close()
    copied = moving[: len(moving) // 2]
    producer = AIOKafkaProducer(**s.kafka_client, acks="all")
    await producer.start()
    try:
        for d in copied:
            value = msgspec.json.encode(DeviceState(d, "site-1", "battery"))
            await producer.send_and_wait(
                state, value, key=d.encode(), partition=partition_for(d.encode(), AFTER)
            )
    finally:
        await producer.stop()
    with pytest.raises(PartitionMismatch, match="did not finish"):
        await check_device_partitions(
            s.model_copy(update={"device_topic_partitions": AFTER}), [valid, state]
        )

    report, _ = await grow(s, AFTER, Console(stderr=True, quiet=True))
    assert report.done and report.pending
    assert sorted(report.raised) == sorted(
        spec.name.removeprefix(s.kafka_namespace)
        for spec in device_topic_specs(s)
        if spec.name not in (state, s.topic(Topics.CONTROLLER_STATE))
    )
    assert report.state[Topics.ALERTER_STATE] == {
        "live": len(devices) + len(copied),
        "moved": len(moving) - len(copied),
        "tombstoned": len(moving),
    }
    await check_device_partitions(
        s.model_copy(update={"device_topic_partitions": AFTER}), [valid, state]
    )
    table = await read_table(s, [TopicPartition(state, p) for p in range(AFTER)])
    assert sorted(k.decode() for _, k in table) == devices  # each once
    for (p, key), rec in table.items():
        assert p == partition_for(key, AFTER)
        last = msgspec.json.decode(rec.value or b"", type=DeviceState).last_offset
        assert last == (-1 if key.decode() in moving else 7)
    admin = AIOKafkaAdminClient(**s.kafka_client)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    assert {tp.partition: m.offset for tp, m in offsets.items() if tp.topic == valid} == {
        0: 0,
        1: 0,
        2: 0,
        3: 3,  # never committed: its end, where "latest" would have started it
        4: 0,
        5: 0,
    }
    with psycopg.connect(s.database_url, autocommit=True) as db:
        rows = db.execute(
            "SELECT partition, next_offset FROM projection_offsets"
            " WHERE projection = 'telemetry' AND topic = %s ORDER BY 1",
            (valid,),
        ).fetchall()
    assert rows == [(p, 3 if p == 3 else 0) for p in range(AFTER)]

    again, _ = await grow(s, AFTER, Console(stderr=True, quiet=True))
    assert again.done and not again.pending


def test_a_grow_stopped_part_way_is_finished_by_running_it_again(stack: Settings) -> None:
    s = stack.model_copy(
        update={
            "kafka_namespace": f"resume-{uuid.uuid4().hex[:8]}.",
            "device_topic_partitions": BEFORE,
        }
    )
    try:
        asyncio.run(scenario(s))
    finally:
        asyncio.run(delete_topics(s, [t.name for t in topic_specs(s)]))
        with psycopg.connect(s.database_url, autocommit=True) as db:
            db.execute(
                "DELETE FROM projection_offsets WHERE topic LIKE %s", (f"{s.kafka_namespace}%",)
            )
