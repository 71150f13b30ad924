"""State changelogs: kept compact by their topic configs, and read back as tables."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from contracts import Topics
from runtime.kafka import delete_topics, ensure_topics, read_table, topic_specs
from runtime.settings import Settings


async def _topic_config(s: Settings, topic: str) -> dict[str, str]:
    """The topic's configs, once the broker describes them (a topic just created may still
    be unknown to the broker's metadata for a moment: error code 3, no entries)."""
    admin = AIOKafkaAdminClient(**s.kafka_client)
    await admin.start()
    try:
        deadline = time.monotonic() + 15
        while True:
            resource = ConfigResource(ConfigResourceType.TOPIC, topic)
            [response] = await admin.describe_configs([resource])
            error_code, _, _, _, entries = response.resources[0]
            if error_code == 0 or time.monotonic() > deadline:
                assert error_code == 0, f"describing {topic}: error code {error_code}"
                return {entry[0]: entry[1] for entry in entries}
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def test_an_existing_changelog_gets_small_segments_and_an_eager_cleaner(stack: Settings) -> None:
    """A changelog made by an older release (one 1 GiB segment, never compacted while
    active) is brought to the current configs by `ensure_topics`."""
    s = stack.model_copy(update={"kafka_namespace": f"cfg-{uuid.uuid4().hex[:8]}."})
    state = s.topic(Topics.ALERTER_STATE)

    async def scenario() -> dict[str, str]:
        admin = AIOKafkaAdminClient(**s.kafka_client)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(
                        state,
                        1,
                        1,
                        topic_configs={"cleanup.policy": "compact", "max.message.bytes": "2000000"},
                    )
                ]
            )
        finally:
            await admin.close()
        assert (await _topic_config(s, state))["segment.bytes"] == str(1024**3)
        created = await ensure_topics(s)
        assert state not in created
        return await _topic_config(s, state)

    try:
        config = asyncio.run(scenario())
    finally:
        asyncio.run(delete_topics(s, [t.name for t in topic_specs(s)]))
    assert config["cleanup.policy"] == "compact"
    assert int(config["segment.bytes"]) <= 16 * 1_048_576
    assert float(config["min.cleanable.dirty.ratio"]) < 0.5
    assert config["max.message.bytes"] == "2000000"  # what an operator set there stays


def test_read_table_gives_the_latest_value_of_each_key_without_deleted_keys(
    stack: Settings,
) -> None:
    topic = f"table-{uuid.uuid4().hex[:8]}"

    async def scenario() -> dict[tuple[int, bytes], bytes]:
        admin = AIOKafkaAdminClient(**stack.kafka_client)
        await admin.start()
        await admin.create_topics([NewTopic(topic, 2, 1)])
        await admin.close()
        producer = AIOKafkaProducer(**stack.kafka_client)
        await producer.start()
        try:
            for partition, key, value in [
                (0, b"a", b"a1"),
                (0, b"b", b"b1"),
                (1, b"c", b"c1"),
                (0, b"a", b"a2"),
                (0, b"b", None),  # deleted
                (1, b"c", b"c2"),
            ]:
                await producer.send_and_wait(topic, value, key=key, partition=partition)
        finally:
            await producer.stop()
        tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
        table = await read_table(stack, tps)
        return {k: rec.value for k, rec in table.items()}

    try:
        table = asyncio.run(scenario())
    finally:
        asyncio.run(delete_topics(stack, [topic]))
    assert table == {(0, b"a"): b"a2", (1, b"c"): b"c2"}
