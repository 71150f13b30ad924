"""Validator group: `telemetry.raw` -> `telemetry.valid` (normalized) or `telemetry.dlq` (reason).

Offsets are committed only after every output record of a poll is acknowledged; a crash
re-validates from the last commit, and the projection drops the repeats (source offset headers).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import ConsumerRecord
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.message import StreamMessage

from contracts import Groups, Headers, TimeWindow, Topics
from microgrid.settings import Settings
from stream_processors.validation import Valid, validate_record

log = logging.getLogger("microgrid.validator")


async def _records(msg: StreamMessage[Any]) -> Any:
    return None  # the handler reads the raw records; skip FastStream's per-record JSON decode


def create_app(s: Settings) -> FastStream:
    broker = KafkaBroker(
        s.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=s.producer_linger_ms,
        max_batch_size=s.producer_max_batch_bytes,
        client_id="microgrid-validator",
        log_level=logging.DEBUG,  # per-batch "Received/Processed" lines only in debug
    )
    raw, valid, dlq = (
        s.topic(Topics.TELEMETRY_RAW),
        s.topic(Topics.TELEMETRY_VALID),
        s.topic(Topics.TELEMETRY_DLQ),
    )
    window = TimeWindow(
        max_future=timedelta(seconds=s.max_future_skew_s),
        max_age=timedelta(seconds=s.max_reading_age_s),
    )
    counts = {"valid": 0, "dlq": 0}

    @broker.subscriber(
        raw,
        group_id=s.group(Groups.VALIDATOR),
        batch=True,
        max_records=s.validator_max_records,
        batch_timeout_ms=50,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=_records,
    )
    async def validate_raw_records(body: Any, msg: KafkaMessage) -> None:
        records: tuple[ConsumerRecord[bytes, bytes], ...] = msg.raw_message
        now = datetime.now(UTC)
        pending = []
        for rec in records:
            verdict = validate_record(rec.key, rec.value, now, window)
            if isinstance(verdict, Valid):
                counts["valid"] += 1
                pending.append(
                    await broker.publish(
                        verdict.value,
                        valid,
                        key=verdict.device_id.encode(),
                        headers={
                            Headers.SOURCE_PARTITION: str(rec.partition),
                            Headers.SOURCE_OFFSET: str(rec.offset),
                        },
                        no_confirm=True,
                    )
                )
            else:
                counts["dlq"] += 1
                log.warning(
                    "dead-lettered %s[%d]@%d: %s",
                    rec.topic,
                    rec.partition,
                    rec.offset,
                    verdict.reason,
                )
                pending.append(
                    await broker.publish(
                        rec.value or b"",
                        dlq,
                        key=rec.key,
                        headers={
                            Headers.DLQ_REASON: verdict.reason,
                            Headers.DLQ_SOURCE_TOPIC: rec.topic,
                            Headers.DLQ_SOURCE_PARTITION: str(rec.partition),
                            Headers.DLQ_SOURCE_OFFSET: str(rec.offset),
                        },
                        no_confirm=True,
                    )
                )
        await asyncio.gather(*pending)

    return FastStream(broker)
