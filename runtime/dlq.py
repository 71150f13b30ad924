"""Dead letters: a record a stage cannot use goes, unchanged, to that stage's dead-letter topic
with why (`x-dlq-reason`), who refused it (`x-dlq-stage`, the consumer group) and where it came
from (`x-dlq-source-topic`, `-partition`, `-offset`), and the stage moves on.

A record sent back by `microgrid dlq redrive` carries `x-redrive-count`; when a stage refuses it
again, its dead letter carries the same count (as found by `redrive_count`), so the next redrive
knows it failed before and does not send it round in a loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord

from contracts import Headers
from runtime.kafka import RenewableProducer
from runtime.metrics import RECORDS
from runtime.settings import Settings

log = logging.getLogger("microgrid.dlq")

MAX_REASON = 1000  # characters of a reason kept in the header


def redrive_count(headers: Sequence[tuple[str, bytes]]) -> bytes | None:
    """The record's `x-redrive-count` as it was sent (not decoded), None when it has none or
    it is not a number: a device with a Kafka client writes its own headers, and passing them
    on unchecked would let it put anything on the platform's topics."""
    for name, value in headers:
        if name == Headers.REDRIVE_COUNT:
            return value if len(value) <= 6 and value.isdigit() else None
    return None


def dlq_headers(
    reason: str,
    stage: str,
    topic: str,
    partition: int,
    offset: int,
    redrive_count: bytes | None = None,
) -> list[tuple[str, bytes]]:
    headers = [
        (Headers.DLQ_REASON, reason[:MAX_REASON].encode(errors="replace")),
        (Headers.DLQ_STAGE, stage.encode()),
        (Headers.DLQ_SOURCE_TOPIC, topic.encode()),
        (Headers.DLQ_SOURCE_PARTITION, str(partition).encode()),
        (Headers.DLQ_SOURCE_OFFSET, str(offset).encode()),
    ]
    if redrive_count is not None:
        headers.append((Headers.REDRIVE_COUNT, redrive_count))
    return headers


@dataclass(frozen=True, slots=True)
class Letter:
    """What goes to a dead-letter topic, and which record of which topic it came from."""

    value: bytes | None
    key: bytes | None
    reason: str
    topic: str
    partition: int
    offset: int
    redrive_count: bytes | None = None  # the source record's x-redrive-count, if redriven


class DeadLetters:
    """One stage's dead-letter topic, with a producer started on first need."""

    def __init__(self, s: Settings, topic: str, stage: str) -> None:
        self.topic = topic
        self.stage = stage
        self.producer = RenewableProducer(s, f"{stage}-dlq")

    async def send(self, records: list[tuple[ConsumerRecord[bytes, bytes], str]]) -> None:
        """Dead-letter each (record, reason), unchanged, and return once the broker
        acknowledged them all; raises (KafkaError) when it did not, so the caller keeps its
        position and retries."""
        await self.send_letters(self.letters(records))

    def letters(self, records: list[tuple[ConsumerRecord[bytes, bytes], str]]) -> list[Letter]:
        return [
            Letter(
                r.value,
                r.key,
                reason,
                r.topic,
                r.partition,
                r.offset,
                redrive_count(r.headers) if r.headers else None,
            )
            for r, reason in records
        ]

    async def send_letters(self, letters: list[Letter]) -> None:
        """Like `send`, for letters whose value is not the source record's (a part of it)."""
        if not letters:
            return
        if self.producer.producer is None:
            await self.producer.start()
        producer = self.producer.producer
        assert producer is not None
        try:
            await asyncio.gather(*await self.send_with(producer, letters))
        except Exception:
            await self.producer.renew_if_broken()
            raise
        self.sent(len(letters))

    def sent(self, count: int) -> None:
        """Count letters the broker acknowledged (or a transaction holding them committed)."""
        RECORDS.labels(self.stage, "dead-lettered").inc(count)

    async def send_with(
        self, producer: AIOKafkaProducer, letters: list[Letter]
    ) -> list[asyncio.Future[Any]]:
        """Queue the letters on `producer` (a caller's, in a transaction say); the futures
        resolve once the broker acknowledged each."""
        pending = []
        for letter in letters:
            log.warning(
                "%s dead-lettered %s[%d]@%d: %s",
                self.stage,
                letter.topic,
                letter.partition,
                letter.offset,
                letter.reason,
            )
            headers = dlq_headers(
                letter.reason,
                self.stage,
                letter.topic,
                letter.partition,
                letter.offset,
                letter.redrive_count,
            )
            pending.append(
                await producer.send(self.topic, letter.value, key=letter.key, headers=headers)
            )
        return pending

    async def close(self) -> None:
        await self.producer.stop()
