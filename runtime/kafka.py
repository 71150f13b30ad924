"""Kafka client factories, and topics created or brought to their configs idempotently."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import AIOKafkaConnection, CloseReason
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from faststream.security import SASLScram512

from contracts import Topics
from contracts.topics import SITE_TOPICS, site_topic
from runtime.settings import Settings

HOUR_MS = 3_600_000
log = logging.getLogger("microgrid.kafka")


def closed_transport_is_a_connection_error() -> None:
    """aiokafka turns an OSError from writing to a connection into KafkaConnectionError, which
    it retries; uvloop raises RuntimeError instead ("the handler is closed") when the broker
    closed the connection first (aio-libs/aiokafka#1038, open). Under a consumer's group
    coordination that error ends the coordination for good, and every later poll re-raises it:
    after a broker restart in the suite, the validator stopped consuming (FastStream retried
    the same dead consumer every 5 s) and the projector process ended. Each component process
    calls this once, before it connects: the write's RuntimeError becomes what aiokafka
    expects. Idempotent."""
    original = AIOKafkaConnection.send
    if getattr(original, "closed_transport_handled", False):
        return

    def send(self: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
        try:
            return original(self, request, expect_response)
        except RuntimeError as err:
            if "closed" not in str(err):
                raise
            self.close(reason=CloseReason.CONNECTION_BROKEN)
            raise KafkaConnectionError(
                f"Connection at {self.host}:{self.port} broken: {err}"
            ) from err

    send.closed_transport_handled = True  # type: ignore[attr-defined]
    AIOKafkaConnection.send = send


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(s: Settings) -> list[TopicSpec]:
    durability = {"min.insync.replicas": str(min(2, s.topic_replication_factor))}
    telemetry = {"retention.ms": str(s.telemetry_retention_hours * HOUR_MS), **durability}
    dlq = {"retention.ms": str(s.dlq_retention_hours * HOUR_MS), **durability}
    compacted = {"cleanup.policy": "compact", **durability}
    # State changelogs are read in full when partitions are assigned: small segments and an
    # eager cleaner keep them near one record per key, whatever the write rate (the default
    # 1 GiB active segment is never compacted and grew to 70 MB a partition in benchmarks).
    changelog = {
        **compacted,
        "segment.bytes": str(4 * 1_048_576),
        "segment.ms": str(5 * 60_000),
        "min.cleanable.dirty.ratio": "0.2",
    }
    n = s.device_topic_partitions
    return [
        TopicSpec(s.topic(Topics.TELEMETRY_RAW), n, telemetry),
        TopicSpec(s.topic(Topics.TELEMETRY_VALID), n, telemetry),
        TopicSpec(s.topic(Topics.TELEMETRY_DLQ), n, dlq),
        TopicSpec(s.topic(Topics.ALERT_RULES), 1, compacted),
        TopicSpec(s.topic(Topics.ALERTS), n, dlq),
        TopicSpec(s.topic(Topics.ALERTS_DLQ), n, dlq),
        # one changelog partition per telemetry.valid partition: state moves with its devices
        TopicSpec(s.topic(Topics.ALERTER_STATE), n, changelog),
        TopicSpec(s.topic(Topics.CONTROL_COMMANDS), n, dlq),
        TopicSpec(s.topic(Topics.CONTROL_DISPATCH), n, dlq),
        TopicSpec(s.topic(Topics.CONTROL_RESULTS), n, dlq),
        TopicSpec(s.topic(Topics.CONTROL_EVENTS), n, dlq),
        TopicSpec(s.topic(Topics.CONTROLLER_STATE), n, changelog),
        TopicSpec(s.topic(Topics.CONTROL_DLQ), n, dlq),
    ]


def device_topic_specs(s: Settings) -> list[TopicSpec]:
    """The platform's topics keyed by device id, every one but `alert-rules`: they have
    DEVICE_TOPIC_PARTITIONS partitions each and are co-partitioned (a device's records, and its
    state in the changelogs, have the same partition number in each), so they are raised
    together (`microgrid kafka grow`)."""
    rules = s.topic(Topics.ALERT_RULES)
    return [spec for spec in topic_specs(s) if spec.name != rules]


class PartitionMismatch(RuntimeError):
    """Topics keyed by device without DEVICE_TOPIC_PARTITIONS partitions."""


def partition_mismatch(s: Settings, counts: dict[str, int]) -> str | None:
    """What is wrong when these topics keyed by device (name: partitions) do not all have
    DEVICE_TOPIC_PARTITIONS partitions, or None."""
    setting = s.device_topic_partitions
    if all(n == setting for n in counts.values()):
        return None
    by_count: dict[int, list[str]] = {}
    for name, n in sorted(counts.items()):
        by_count.setdefault(n, []).append(name.removeprefix(s.kafka_namespace))
    if len(by_count) == 1:
        (n,) = by_count
        return (
            f"the topics keyed by device have {n} partitions but DEVICE_TOPIC_PARTITIONS is"
            f" {setting}: set DEVICE_TOPIC_PARTITIONS={n} (the setting has to follow the"
            " topics after `microgrid kafka grow`)"
        )
    have = "; ".join(f"{n} partitions: {', '.join(names)}" for n, names in sorted(by_count.items()))
    return (
        f"the topics keyed by device have different partition counts ({have};"
        f" DEVICE_TOPIC_PARTITIONS is {setting}): a `microgrid kafka grow` did not finish;"
        " run it again with the same --partitions"
    )


async def partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """The partitions of each of these topics that exists (the others are left out)."""
    described = await admin.describe_topics(topics)
    return {d["topic"]: len(d["partitions"]) for d in described if not d["error_code"]}


async def check_device_partitions(s: Settings, topics: list[str]) -> None:
    """Raise PartitionMismatch unless these topics keyed by device have DEVICE_TOPIC_PARTITIONS
    partitions: what the stateful processors check at start, since they keep a device's state
    on the changelog partition of the same number as its input partition."""
    admin = AIOKafkaAdminClient(**s.kafka_client)
    await admin.start()
    try:
        counts = await partition_counts(admin, topics)
    finally:
        await admin.close()
    if problem := partition_mismatch(s, counts):
        raise PartitionMismatch(problem)


def site_topic_specs(s: Settings, site_id: str) -> list[TopicSpec]:
    """The topics of a site whose devices have Kafka clients: readings are kept like
    `telemetry.raw`, commands and replies like the shared control topics."""
    durability = {"min.insync.replicas": str(min(2, s.topic_replication_factor))}
    retention = {
        "telemetry": s.telemetry_retention_hours * HOUR_MS,
        "dispatch": s.dlq_retention_hours * HOUR_MS,
        "results": s.dlq_retention_hours * HOUR_MS,
    }
    return [
        TopicSpec(
            s.topic(site_topic(site_id, kind)),
            s.site_topic_partitions,
            {"retention.ms": str(retention[kind]), **durability},
        )
        for kind in SITE_TOPICS
    ]


async def ensure_topics(
    s: Settings, specs: list[TopicSpec] | None = None, timeout_s: float = 15.0
) -> list[str]:
    """Create missing topics and bring existing ones to the configs of `specs` (default: the
    platform's, `topic_specs`); return the names created. Partition counts of existing topics
    are left as they are."""
    specs = topic_specs(s) if specs is None else specs
    admin = AIOKafkaAdminClient(**s.kafka_client)
    deadline = asyncio.get_running_loop().time() + timeout_s
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)  # one clear error at the end, not one per attempt
    try:
        while True:
            try:
                await admin.start()
                break
            except KafkaConnectionError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(1.0)
    finally:
        aiokafka_log.setLevel(level)
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        await _reconcile_configs(admin, [spec for spec in specs if spec.name in existing])
        for spec in specs:
            if spec.name in existing:
                continue
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            spec.name,
                            spec.partitions,
                            s.topic_replication_factor,
                            topic_configs=spec.config,
                        )
                    ]
                )
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
    return created


DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs config_source: set on the topic itself


async def _reconcile_configs(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
    """Set the configs of `specs` on existing topics where the broker has other values, and
    keep whatever else was set on those topics (by an operator, say)."""
    if not specs:
        return
    resources = [ConfigResource(ConfigResourceType.TOPIC, spec.name) for spec in specs]
    current: dict[str, dict[str, str]] = {}
    dynamic: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for code, message, _type, name, entries in response.resources:
            if code:
                raise KafkaError(f"cannot read the configs of topic {name}: {message}")
            current[name] = {entry[0]: entry[1] for entry in entries}
            dynamic[name] = {e[0]: e[1] for e in entries if e[3] == DYNAMIC_TOPIC_CONFIG}
    stale = [
        spec
        for spec in specs
        if any(current[spec.name].get(k) != v for k, v in spec.config.items())
    ]
    if not stale:
        return
    # AlterConfigs replaces all of a topic's dynamic configs: send the kept ones with ours
    responses = await admin.alter_configs(
        [
            ConfigResource(
                ConfigResourceType.TOPIC, spec.name, {**dynamic[spec.name], **spec.config}
            )
            for spec in stale
        ]
    )
    for response in responses:
        for code, message, _type, name in response.resources:
            if code:
                raise KafkaError(f"cannot update the configs of topic {name}: {message}")
    log.info("updated the configs of topics %s", ", ".join(spec.name for spec in stale))


async def delete_topics(s: Settings, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(**s.kafka_client)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


class KafkaProbe:
    """Answers whether the broker is reachable now, reusing one admin connection."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.admin: AIOKafkaAdminClient | None = None

    async def __call__(self) -> None:
        try:
            if self.admin is None:
                self.admin = AIOKafkaAdminClient(**self.s.kafka_client, request_timeout_ms=2000)
                await self.admin.start()
            await self.admin.describe_cluster()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        admin, self.admin = self.admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()


class RenewableProducer:
    """A reliable producer that replaces itself once aiokafka's sender has died.

    After a fatal error (an out-of-order sequence after a broker restart, say) an aiokafka
    producer fails every later send with the same error; only a new producer recovers.
    """

    def __init__(self, s: Settings, client_id: str, **overrides: object) -> None:
        self.s = s
        self.client_id = client_id
        self.overrides = overrides
        self.producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> AIOKafkaProducer:
        producer = reliable_producer(self.s, client_id=self.client_id, **self.overrides)
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self.producer = producer  # only a started producer replaces the one in use
        return producer

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()  # flushes what is buffered

    async def reachable(self) -> bool:
        """Whether the producer holds or can open a connection to a broker. Costs nothing
        while a connection is open (a metadata request instead decodes every topic of the
        cluster: 5 % of a gateway worker's CPU at two looks a second, with 800 partitions)."""
        if self.producer is None:
            return False
        client = self.producer.client
        for broker in client.cluster.brokers():
            if await client.ready(broker.nodeId):
                return True
        return False

    @property
    def broken(self) -> bool:
        sender = getattr(self.producer, "_sender", None)  # aiokafka keeps no public flag
        task = getattr(sender, "_sender_task", None)
        return task is not None and task.done()

    async def renew_if_broken(self) -> bool:
        async with self._lock:
            if not self.broken:
                return False
            old = self.producer
            log.warning("Kafka producer %s has failed for good; replacing it", self.client_id)
            try:
                await self.start()
            except Exception as exc:  # the broker may still be away: the next caller retries
                log.warning("could not replace Kafka producer %s: %r", self.client_id, exc)
                return False
            if old is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(old.stop(), timeout=5)
            return True


async def read_table(
    s: Settings, partitions: list[TopicPartition]
) -> dict[tuple[int, bytes], ConsumerRecord[bytes, bytes]]:
    """The latest committed record of each key now in these compacted partitions, by
    (partition, key); deleted keys (tombstones) are left out, and so is what aborted
    transactions wrote. The event loop runs between fetches, so a long
    read does not starve the consumer group's heartbeats."""
    consumer = AIOKafkaConsumer(
        **s.kafka_client, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        # explicit offsets: seek_to_beginning right after assign can lose to the default reset
        for tp, begin in (await consumer.beginning_offsets(partitions)).items():
            consumer.seek(tp, begin)
        table: dict[tuple[int, bytes], ConsumerRecord[bytes, bytes]] = {}
        pending = {tp for tp in partitions if ends[tp] > 0}
        while pending:
            polled = await consumer.getmany(*pending, timeout_ms=500, max_records=10_000)
            for tp, records in polled.items():
                for rec in records:
                    if rec.value is None:
                        table.pop((rec.partition, rec.key or b""), None)
                    else:
                        table[(rec.partition, rec.key or b"")] = rec
                if records and records[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
            await asyncio.sleep(0)
        return table
    finally:
        await consumer.stop()


def broker_security(s: Settings) -> SASLScram512:
    """FastStream's form of `Settings.kafka_client`'s authentication."""
    if s.kafka_tls:
        return SASLScram512(
            s.kafka_username, s.kafka_password, ssl_context=s.kafka_ssl_context(), use_ssl=True
        )
    return SASLScram512(s.kafka_username, s.kafka_password)


def reliable_producer(s: Settings, **overrides: object) -> AIOKafkaProducer:
    """Producer for data we answer for: acks=all, idempotent, batched with a short linger."""
    options: dict[str, object] = {
        **s.kafka_client,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": s.producer_linger_ms,
        "max_batch_size": s.producer_max_batch_bytes,
        "max_request_size": 4 * 1_048_576,
        "compression_type": None if s.producer_compression == "none" else s.producer_compression,
        "request_timeout_ms": 10_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)
