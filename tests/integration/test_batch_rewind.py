"""A failed batch is redelivered in full, whichever partitions it spans.

The stream processors consume in batches nacked on error (`REDELIVERED_BATCHES`): when a
handler raises, FastStream's nack must rewind every partition of the batch. Releases before
0.7.8 rewound only the first record's partition, and the next successful batch committed past
the records of the others, so readings answered 202 never reached `telemetry.valid` nor the
DLQ.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faststream.kafka import KafkaBroker, KafkaMessage

from runtime.kafka import broker_security, delete_topics
from runtime.settings import Settings
from stream_processors.partitions import REDELIVERED_BATCHES

PARTITIONS = 6
PER_PARTITION = 20


def test_a_failed_batch_spanning_several_partitions_is_redelivered_for_each(
    stack: Settings,
) -> None:
    s = stack.model_copy(update={"kafka_namespace": f"rewind-{uuid.uuid4().hex[:8]}."})
    topic = s.topic("rewind.check")
    group = s.group("rewind-check")
    produced = {(p, i) for p in range(PARTITIONS) for i in range(PER_PARTITION)}

    async def scenario() -> tuple[set[int], set[tuple[int, int]], dict[int, int]]:
        admin = AIOKafkaAdminClient(**s.kafka_client)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(**s.kafka_client, acks="all")
        await producer.start()
        try:
            for p, i in sorted(produced):
                await producer.send(topic, f"{p}:{i}".encode(), partition=p)
            await producer.flush()
        finally:
            await producer.stop()

        failed_partitions: set[int] = set()
        processed: set[tuple[int, int]] = set()
        broker = KafkaBroker(
            s.kafka_bootstrap_servers, security=broker_security(s), log_level=logging.DEBUG
        )

        @broker.subscriber(  # as the validator, alerter and controller subscribe
            topic,
            group_id=group,
            **REDELIVERED_BATCHES,
            max_records=500,
            batch_timeout_ms=50,
            auto_offset_reset="earliest",
        )
        async def handle(body: Any, msg: KafkaMessage) -> None:
            records = msg.raw_message
            partitions = {r.partition for r in records}
            if not failed_partitions and len(partitions) > 1:
                failed_partitions.update(partitions)
                raise RuntimeError("the first batch spanning several partitions fails")
            processed.update((r.partition, int(r.value.split(b":")[1])) for r in records)

        await broker.start()
        try:
            # Done once the group has committed every partition to its end: any record not
            # processed by then was skipped for good.
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            committed: dict[int, int] = {}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            admin = AIOKafkaAdminClient(**s.kafka_client)
            await admin.start()
            try:
                while loop.time() < deadline:
                    offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
                    committed = {tp.partition: meta.offset for tp, meta in offsets.items()}
                    if all(committed.get(p) == PER_PARTITION for p in range(PARTITIONS)):
                        break
                    await asyncio.sleep(0.1)
            finally:
                await admin.close()
        finally:
            await broker.stop()
            await delete_topics(s, [topic])
        return failed_partitions, processed, committed

    failed_partitions, processed, committed = asyncio.run(scenario())
    assert len(failed_partitions) > 1, "no batch spanned several partitions"
    assert committed == dict.fromkeys(range(PARTITIONS), PER_PARTITION)
    missing = sorted(produced - processed)
    assert not missing, f"committed past {len(missing)} unprocessed records: {missing[:10]}"
