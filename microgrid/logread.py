"""What the analysts' commands share: times given on the command line, and a consumer that reads
a topic's partitions by offset, without a consumer group, and never commits (so nothing an
analyst runs moves a live group's position)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from runtime.settings import Settings

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class BadTime(ValueError):
    pass


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An aware UTC time from `2026-11-30T08:00:00Z` (RFC 3339, any offset), `2026-11-30`
    (midnight UTC), `now`, or a duration ago: `90s`, `15m`, `2h`, `7d`."""
    now = now or datetime.now(UTC)
    value = text.strip()
    if value == "now":
        return now
    if m := _RELATIVE.match(value):
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise BadTime(
            f"{text!r} is not a time: give RFC 3339 (2026-11-30T08:00:00Z), a date (2026-11-30),"
            " 'now', or a duration ago (15m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        if len(value) > 10:  # a date alone means midnight UTC; a time needs its offset
            raise BadTime(f"{text!r} has no UTC offset: add Z or +HH:MM")
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def log_consumer(s: Settings, client_id: str) -> AIOKafkaConsumer:
    """A consumer without a group (assign and seek only; it cannot commit), reading committed
    records only, with fetches large enough for bulk reading."""
    return AIOKafkaConsumer(
        **s.kafka_client,
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        fetch_max_bytes=16 * 1_048_576,
        max_partition_fetch_bytes=2 * 1_048_576,
    )


class UnknownTopic(LookupError):
    pass


def missing_topic(s: Settings, name: str) -> str:
    """What the analysts' and operators' commands say of a platform topic (`name`, without the
    namespace) the broker does not have."""
    return (
        f"topic {s.topic(name)!r} does not exist on {s.kafka_bootstrap_servers}"
        " (is KAFKA_NAMESPACE right? `microgrid stack up` creates the platform's topics)"
    )


class KafkaUnreachable(ConnectionError):
    pass


async def start(s: Settings, consumer: AIOKafkaConsumer) -> None:
    """Start the consumer, or raise KafkaUnreachable with a message for the command line."""
    try:
        await consumer.start()
    except Exception as exc:
        await consumer.stop()
        raise KafkaUnreachable(
            f"cannot reach Kafka at {s.kafka_bootstrap_servers} ({exc});"
            " is the stack up (`microgrid stack up`)?"
        ) from None


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions; UnknownTopic when the broker has no such topic.

    aiokafka bootstraps a group-less consumer's metadata without topics, and `topics()` fills a
    copy of its own, so `partitions_for_topic` knows no topic until the client's own metadata
    is refreshed (which has no public call)."""
    await consumer._client.force_metadata_update()
    ids = consumer.partitions_for_topic(topic)
    if not ids:
        raise UnknownTopic(topic)
    return [TopicPartition(topic, p) for p in sorted(ids)]


Bounds = dict[TopicPartition, tuple[int, int]]


def _ms(when: datetime) -> int:
    return max(0, int(when.timestamp() * 1000))


async def time_bounds(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], first: datetime, last: datetime
) -> Bounds:
    """Each partition's offsets of the records written from `first` up to `last`, or up to its
    end as it is now (`offsets_for_times`: a record's timestamp is when it was written)."""
    ends = await consumer.end_offsets(tps)
    starts = await consumer.offsets_for_times({tp: _ms(first) for tp in tps})
    stops = await consumer.offsets_for_times({tp: _ms(last) for tp in tps})
    bounds: Bounds = {}
    for tp in tps:
        a = starts[tp].offset if starts[tp] is not None else ends[tp]
        found = stops[tp]
        b = min(found.offset, ends[tp]) if found is not None else ends[tp]
        bounds[tp] = (a, max(a, b))
    return bounds


async def read_ranges(
    consumer: AIOKafkaConsumer, bounds: Bounds, max_records: int = 5_000
) -> AsyncIterator[tuple[list[ConsumerRecord[bytes, bytes]], int]]:
    """Each partition's records from offset a up to b (excluded), as `bounds` gives them: per
    poll, the records in range and how many offsets the reading advanced (a gap, a
    transaction marker or a record past b counts too, so the advances add up to the total of
    b - a). Ends when every partition has reached its b."""
    consumer.assign(list(bounds))
    for tp, (a, _) in bounds.items():
        consumer.seek(tp, a)
    pending = {tp for tp, (a, b) in bounds.items() if a < b}
    consumer.pause(*(tp for tp in bounds if tp not in pending))
    done = {tp: a for tp, (a, _) in bounds.items()}
    while pending:
        polled = await consumer.getmany(timeout_ms=1000, max_records=max_records)
        records = [rec for tp, recs in polled.items() for rec in recs if rec.offset < bounds[tp][1]]
        advanced = 0
        for tp in list(pending):
            position = min(await consumer.position(tp), bounds[tp][1])
            advanced += position - done[tp]
            done[tp] = position
            if position >= bounds[tp][1]:
                pending.discard(tp)
                consumer.pause(tp)
        yield records, advanced


async def lost_before(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], retention_h: int, first: datetime
) -> datetime | None:
    """When records from `first` on may be gone from the log: the time from which it holds
    everything (records younger than the retention are never deleted), if `first` is older
    and the log has lost records; None when it holds all the range's."""
    kept_from = datetime.now(UTC) - timedelta(hours=retention_h)
    if first >= kept_from:
        return None
    begins = await consumer.beginning_offsets(tps)
    return kept_from if any(offset > 0 for offset in begins.values()) else None
