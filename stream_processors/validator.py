"""Validator group: `telemetry.raw` and each site's `site.<site>.telemetry` -> `telemetry.valid`
(normalized) or `telemetry.dlq` (reason); each site's `site.<site>.results` -> `control.results`
or `control.dlq`.

Besides the readings' own checks (`validation.py`), each device must belong to the site its
readings name (the registry, `runtime.devices`): the gateway checked this for HTTP devices;
for devices producing straight to Kafka it is checked here, and their records for another
site's device are dead-lettered. On a site's own topics the site is the topic's, which only
that site's principals may write (the broker's ACLs): a reading naming another site, or a
reply from another site's device, is dead-lettered. The site topics are followed by pattern,
so a site given topics later is picked up within VALIDATOR_TOPIC_REFRESH_S.

A record `microgrid dlq redrive` sent back keeps its `x-redrive-count` on what is derived from
it (its telemetry.valid or control.results record, or its dead letter), so a stage further on
that refuses it again dead-letters it with that count.

Offsets are committed only after every output record of a poll is acknowledged; a crash or a
failed publish re-validates from the last commit, and the projection drops the repeats by the
readings' identity (the source offset headers are provenance only).
Output goes through a plain idempotent aiokafka producer owned by the app: per record it costs
a fifth of FastStream's publish path, which dominated the profile with one-reading records.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError
from faststream import FastStream
from faststream.kafka import KafkaBroker, KafkaMessage
from psycopg_pool import AsyncConnectionPool

from contracts import Groups, Headers, TimeWindow, Topics
from contracts.control import CommandResult
from contracts.topics import SITE_ID_PATTERN
from runtime.devices import DeviceOwners, RegistryUnavailable
from runtime.dlq import dlq_headers, redrive_count
from runtime.kafka import RenewableProducer, broker_security
from runtime.metrics import RECORDS, report_lag, serve_metrics
from runtime.settings import Settings
from stream_processors.partitions import REDELIVERED_BATCHES
from stream_processors.validation import Invalid, Valid, validate_record

log = logging.getLogger("microgrid.validator")


class RecordRouter:
    """Sends each verdict where it belongs, keyed by device, with its provenance headers."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.group = s.group(Groups.VALIDATOR)
        self.producer = RenewableProducer(s, "microgrid-validator-out")
        self.pool = AsyncConnectionPool(
            s.database_url,
            min_size=1,
            max_size=2,
            open=False,
            check=AsyncConnectionPool.check_connection,
        )
        self.devices = DeviceOwners(self.pool, s.database_url, s.device_registration)
        self.lag_task: asyncio.Task[None] | None = None
        self.valid = s.topic(Topics.TELEMETRY_VALID)
        self.dlq = s.topic(Topics.TELEMETRY_DLQ)
        self.results = s.topic(Topics.CONTROL_RESULTS)
        self.control_dlq = s.topic(Topics.CONTROL_DLQ)
        self.sources = Sources(s)
        self.result_decoder = msgspec.json.Decoder(CommandResult)
        self.window = TimeWindow(
            max_future=timedelta(seconds=s.max_future_skew_s),
            max_age=timedelta(seconds=s.max_reading_age_s),
        )

    async def start(self) -> None:
        # aiokafka binds a producer to the running loop: make it once the app's loop runs.
        await self.producer.start()
        await self.pool.open(wait=False)  # the first lookups wait; a missing database retries
        await self.devices.start()
        serve_metrics(self.s, self.s.validator_metrics_port)
        raw = self.s.topic(Topics.TELEMETRY_RAW)
        self.lag_task = asyncio.create_task(report_lag(self.s, self.group, raw))

    async def stop(self) -> None:
        if self.lag_task is not None:
            self.lag_task.cancel()
        await self.devices.stop()
        await self.producer.stop()
        await self.pool.close()

    async def route(self, records: tuple[ConsumerRecord[bytes, bytes], ...]) -> None:
        try:
            await self._route(records)
        except KafkaError:
            # FastStream redelivers the batch; a dead producer must not fail it forever.
            await self.producer.renew_if_broken()
            raise

    async def _route(self, records: tuple[ConsumerRecord[bytes, bytes], ...]) -> None:
        producer = self.producer.producer
        assert producer is not None, "RecordRouter.start() first"
        now = datetime.now(UTC)
        verdicts: list[Valid | Invalid | Reply | BadReply] = []
        for rec in records:
            site, kind = self.sources.of(rec.topic)
            if kind == "results":
                verdicts.append(self._reply(rec, site))
                continue
            read = validate_record(rec.key, rec.value, now, self.window)
            if isinstance(read, Valid) and site is not None and read.site_id != site:
                read = Invalid(f"readings for site {read.site_id!r} on the topic of site {site!r}")
            verdicts.append(read)
        owners = await self._owners(verdicts)
        pending = []
        try:
            for rec, checked in zip(records, verdicts, strict=True):
                verdict = checked
                if isinstance(verdict, Valid | Reply):
                    owner = owners.get(verdict.device_id)
                    if owner != verdict.site_id:
                        reason = (
                            f"device {verdict.device_id!r} is not registered"
                            if owner is None
                            else f"device {verdict.device_id!r} belongs to another site than"
                            f" {verdict.site_id!r}"
                        )
                        verdict = (
                            BadReply(reason) if isinstance(verdict, Reply) else Invalid(reason)
                        )
                if isinstance(verdict, Valid):
                    headers = [
                        (Headers.SOURCE_PARTITION, str(rec.partition).encode()),
                        (Headers.SOURCE_OFFSET, str(rec.offset).encode()),
                    ]
                    if rec.topic != self.sources.raw:  # offsets of telemetry.raw need no topic
                        headers.append((Headers.SOURCE_TOPIC, rec.topic.encode()))
                    if rec.headers and (count := redrive_count(rec.headers)) is not None:
                        headers.append((Headers.REDRIVE_COUNT, count))
                    fut = await producer.send(
                        self.valid, verdict.value, key=verdict.device_id.encode(), headers=headers
                    )
                    outcome = "valid"
                elif isinstance(verdict, Reply):
                    key = verdict.device_id.encode()
                    count = redrive_count(rec.headers) if rec.headers else None
                    fut = await producer.send(
                        self.results,
                        rec.value,
                        key=key,
                        headers=None if count is None else [(Headers.REDRIVE_COUNT, count)],
                    )
                    outcome = "reply"
                else:
                    log.warning(
                        "dead-lettered %s[%d]@%d: %s",
                        rec.topic,
                        rec.partition,
                        rec.offset,
                        verdict.reason,
                    )
                    headers = dlq_headers(
                        verdict.reason,
                        self.group,
                        rec.topic,
                        rec.partition,
                        rec.offset,
                        redrive_count(rec.headers) if rec.headers else None,
                    )
                    dlq = self.control_dlq if isinstance(verdict, BadReply) else self.dlq
                    fut = await producer.send(dlq, rec.value, key=rec.key, headers=headers)
                    outcome = "dlq"
                pending.append(fut)
                RECORDS.labels(self.group, outcome).inc()
        finally:
            # every send settles before a failure is raised, also when a send itself raised:
            # the redelivered batch does not race what is left of this attempt (its repeats
            # are dropped by identity downstream)
            outcomes = await asyncio.gather(*pending, return_exceptions=True)
        for outcome_of_send in outcomes:
            if isinstance(outcome_of_send, BaseException):
                raise outcome_of_send

    def _reply(self, rec: ConsumerRecord[bytes, bytes], site: str | None) -> Reply | BadReply:
        """A device's reply on its site's results topic, before its device is checked."""
        assert site is not None
        try:
            result = self.result_decoder.decode(rec.value or b"")
        except msgspec.MsgspecError as exc:
            return BadReply(f"undecodable command result: {exc}")
        if not result.id or not result.device_id:
            return BadReply("a reply on Kafka names its command (id) and device_id")
        if rec.key != result.device_id.encode():
            key = (rec.key or b"")[:80]
            return BadReply(f"record key {key!r} is not the reply's device id {result.device_id!r}")
        return Reply(result.device_id, site)

    async def _owners(self, verdicts: list[Valid | Invalid | Reply | BadReply]) -> dict[str, str]:
        """The owner site of the valid records' devices; with the first-reading policy a
        device nobody registered is registered to the site its first record names. While
        PostgreSQL cannot answer for a device not cached, the batch waits and is delivered
        again: records are neither passed on unchecked nor dead-lettered for an outage."""
        cached = self.devices.owners
        owners: dict[str, str] = {}
        claims: dict[str, str] = {}
        asks: set[str] = set()  # replies register nobody
        for v in verdicts:
            if isinstance(v, Valid | Reply):
                owner = cached.get(v.device_id)
                if owner is not None:
                    owners[v.device_id] = owner
                elif isinstance(v, Valid):
                    claims.setdefault(v.device_id, v.site_id)
                else:
                    asks.add(v.device_id)
        lookups: list[tuple[list[str], str | None]] = [
            ([d for d, s in claims.items() if s == site], site) for site in set(claims.values())
        ]
        asks -= claims.keys()
        if asks:
            lookups.append((sorted(asks), None))
        for devices, site in lookups:
            try:
                found = await self.devices.resolve(devices, site, "first reading, on Kafka")
            except RegistryUnavailable as exc:
                log.warning("cannot look up device owners, retrying the batch: %s", exc)
                await asyncio.sleep(REGISTRY_RETRY_S)
                raise
            owners.update((d, o) for d, o in found.items() if o is not None)
        return owners


REGISTRY_RETRY_S = 1.0


class Reply(msgspec.Struct, frozen=True):
    """A reply from a site's results topic whose shape and key are right."""

    device_id: str
    site_id: str  # the topic's


class BadReply(msgspec.Struct, frozen=True):
    """A reply from a site's results topic that goes to control.dlq."""

    reason: str


class Sources:
    """Which topics the validator reads, and what each record's topic says: (site, kind) with
    site None for `telemetry.raw` and kind "telemetry" or "results"."""

    def __init__(self, s: Settings) -> None:
        self.raw = s.topic(Topics.TELEMETRY_RAW)
        ns = re.escape(s.kafka_namespace)
        self.pattern = (
            rf"^{ns}(?:{re.escape(Topics.TELEMETRY_RAW)}"
            rf"|site\.({SITE_ID_PATTERN})\.(telemetry|results))$"
        )
        self._regex = re.compile(self.pattern)
        self._known: dict[str, tuple[str | None, str]] = {self.raw: (None, "telemetry")}

    def of(self, topic: str) -> tuple[str | None, str]:
        known = self._known.get(topic)
        if known is None:
            match = self._regex.match(topic)
            assert match is not None, f"subscribed to {topic!r} by mistake"
            known = self._known[topic] = (match[1], match[2])
        return known


def create_app(s: Settings) -> FastStream:
    broker = KafkaBroker(
        s.kafka_bootstrap_servers.split(","),  # a string would be one host to FastStream
        security=broker_security(s),
        allow_auto_create_topics=False,  # the admin makes topics; components may not
        client_id="microgrid-validator",
        log_level=logging.DEBUG,  # per-batch "Received/Processed" lines only in debug
        metadata_max_age_ms=int(s.validator_topic_refresh_s * 1000),  # sites' new topics
    )
    router = RecordRouter(s)

    @broker.subscriber(
        pattern=router.sources.pattern,
        group_id=router.group,
        **REDELIVERED_BATCHES,
        max_records=s.validator_max_records,
        batch_timeout_ms=50,
        fetch_min_bytes=s.consumer_fetch_min_bytes,
        fetch_max_wait_ms=s.consumer_fetch_max_wait_ms,
        auto_offset_reset="earliest",
    )
    async def validate_raw_records(body: Any, msg: KafkaMessage) -> None:
        """Readings as sent by devices (one reading, or a batch of one device's readings) on
        telemetry.raw and sites' telemetry topics; devices' replies on sites' results topics."""
        await router.route(msg.raw_message)

    # Declared for the AsyncAPI document; RecordRouter's producer sends the records.
    broker.publisher(
        s.topic(Topics.TELEMETRY_VALID),
        description="Validated readings, one batch per record, keyed by device id; headers "
        f"{Headers.SOURCE_PARTITION} and {Headers.SOURCE_OFFSET} name the raw record, and "
        f"{Headers.REDRIVE_COUNT} is the raw record's when it was redriven.",
    )
    broker.publisher(
        s.topic(Topics.CONTROL_RESULTS),
        description="Devices' replies from sites' results topics, unchanged, keyed by device "
        "id, once the device is known to belong to the topic's site; a redriven reply keeps "
        f"its {Headers.REDRIVE_COUNT}.",
    )
    broker.publisher(
        s.topic(Topics.CONTROL_DLQ),
        description="Replies from sites' results topics that were refused (undecodable, no "
        "command id or device id, a key other than the device id, a device not registered or "
        f"of another site), unchanged, with the dead-letter headers (and {Headers.REDRIVE_COUNT}"
        " when the reply was redriven).",
    )
    broker.publisher(
        s.topic(Topics.TELEMETRY_DLQ),
        description="Refused raw records, unchanged (and readings the telemetry projection "
        f"refused); headers give the reason ({Headers.DLQ_REASON}), the stage that refused "
        f"it ({Headers.DLQ_STAGE}) and origin ({Headers.DLQ_SOURCE_TOPIC}, "
        f"{Headers.DLQ_SOURCE_PARTITION}, {Headers.DLQ_SOURCE_OFFSET}); "
        f"{Headers.REDRIVE_COUNT} when the refused record was redriven.",
    )
    app = FastStream(broker)
    app.on_startup(router.start)
    app.after_shutdown(router.stop)  # consumers are stopped by then
    return app
