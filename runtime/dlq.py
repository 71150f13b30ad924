"""Dead letters: a record a stage cannot use goes, unchanged, to that stage's dead-letter topic
with why (`x-dlq-reason`), who refused it (`x-dlq-stage`, the consumer group) and where it came
from (`x-dlq-source-topic`, `-partition`, `-offset`), and the stage moves on.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import ConsumerRecord

from contracts import Headers
from runtime.kafka import RenewableProducer
from runtime.metrics import RECORDS
from runtime.settings import Settings

log = logging.getLogger("microgrid.dlq")

MAX_REASON = 1000  # characters of a reason kept in the header


def dlq_headers(
    reason: str, stage: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    return [
        (Headers.DLQ_REASON, reason[:MAX_REASON].encode(errors="replace")),
        (Headers.DLQ_STAGE, stage.encode()),
        (Headers.DLQ_SOURCE_TOPIC, topic.encode()),
        (Headers.DLQ_SOURCE_PARTITION, str(partition).encode()),
        (Headers.DLQ_SOURCE_OFFSET, str(offset).encode()),
    ]


class DeadLetters:
    """One stage's dead-letter topic, with a producer started on first need."""

    def __init__(self, s: Settings, topic: str, stage: str) -> None:
        self.topic = topic
        self.stage = stage
        self.producer = RenewableProducer(s, f"{stage}-dlq")

    async def send(self, records: list[tuple[ConsumerRecord[bytes, bytes], str]]) -> None:
        """Dead-letter each (record, reason) and return once the broker acknowledged them all;
        raises (KafkaError) when it did not, so the caller keeps its position and retries."""
        if not records:
            return
        if self.producer.producer is None:
            await self.producer.start()
        producer = self.producer.producer
        assert producer is not None
        pending = []
        for rec, reason in records:
            log.warning(
                "%s dead-lettered %s[%d]@%d: %s",
                self.stage,
                rec.topic,
                rec.partition,
                rec.offset,
                reason,
            )
            headers = dlq_headers(reason, self.stage, rec.topic, rec.partition, rec.offset)
            pending.append(await producer.send(self.topic, rec.value, key=rec.key, headers=headers))
            RECORDS.labels(self.stage, "dead-lettered").inc()
        try:
            await asyncio.gather(*pending)
        except Exception:
            await self.producer.renew_if_broken()
            raise

    async def close(self) -> None:
        await self.producer.stop()
