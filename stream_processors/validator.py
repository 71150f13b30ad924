"""Validator group: `telemetry.raw` -> `telemetry.valid` (normalized) or `telemetry.dlq` (reason).

Besides the readings' own checks (`validation.py`), each device must belong to the site its
readings name (the registry, `runtime.devices`): the gateway checked this for HTTP devices;
for devices producing straight to Kafka it is checked here, and their records for another
site's device are dead-lettered.

Offsets are committed only after every output record of a poll is acknowledged; a crash
re-validates from the last commit, and the projection drops the repeats (source offset headers).
Output goes through a plain idempotent aiokafka producer owned by the app: per record it costs
a fifth of FastStream's publish path, which dominated the profile with one-reading records.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError
from faststream import FastStream
from faststream.kafka import KafkaBroker, KafkaMessage
from psycopg_pool import AsyncConnectionPool

from contracts import Groups, Headers, TimeWindow, Topics
from runtime.devices import DeviceOwners, RegistryUnavailable
from runtime.dlq import dlq_headers
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
        verdicts = [validate_record(rec.key, rec.value, now, self.window) for rec in records]
        owners = await self._owners(verdicts)
        pending = []
        for rec, verdict in zip(records, verdicts, strict=True):
            owner = owners.get(verdict.device_id) if isinstance(verdict, Valid) else None
            if isinstance(verdict, Valid) and owner != verdict.site_id:
                verdict = Invalid(
                    f"device {verdict.device_id!r} is not registered (DEVICE_REGISTRATION=admin)"
                    if owner is None
                    else f"device {verdict.device_id!r} belongs to another site than"
                    f" {verdict.site_id!r}"
                )
            if isinstance(verdict, Valid):
                headers = [
                    (Headers.SOURCE_PARTITION, str(rec.partition).encode()),
                    (Headers.SOURCE_OFFSET, str(rec.offset).encode()),
                ]
                fut = await producer.send(
                    self.valid, verdict.value, key=verdict.device_id.encode(), headers=headers
                )
            else:
                log.warning(
                    "dead-lettered %s[%d]@%d: %s",
                    rec.topic,
                    rec.partition,
                    rec.offset,
                    verdict.reason,
                )
                headers = dlq_headers(
                    verdict.reason, self.group, rec.topic, rec.partition, rec.offset
                )
                fut = await producer.send(self.dlq, rec.value, key=rec.key, headers=headers)
            pending.append(fut)
            RECORDS.labels(self.group, "valid" if isinstance(verdict, Valid) else "dlq").inc()
        await asyncio.gather(*pending)

    async def _owners(self, verdicts: list[Valid | Invalid]) -> dict[str, str]:
        """The owner site of the valid records' devices; with the first-reading policy a
        device nobody registered is registered to the site its first record names. While
        PostgreSQL cannot answer for a device not cached, the batch waits and is delivered
        again: records are neither passed on unchecked nor dead-lettered for an outage."""
        cached = self.devices.owners
        owners: dict[str, str] = {}
        claims: dict[str, str] = {}
        for v in verdicts:
            if isinstance(v, Valid):
                owner = cached.get(v.device_id)
                if owner is None:
                    claims.setdefault(v.device_id, v.site_id)
                else:
                    owners[v.device_id] = owner
        for site in set(claims.values()):
            devices = [d for d, s in claims.items() if s == site]
            try:
                found = await self.devices.resolve(devices, site, "first reading, on Kafka")
            except RegistryUnavailable as exc:
                log.warning("cannot look up device owners, retrying the batch: %s", exc)
                await asyncio.sleep(REGISTRY_RETRY_S)
                raise
            owners.update((d, o) for d, o in found.items() if o is not None)
        return owners


REGISTRY_RETRY_S = 1.0


def create_app(s: Settings) -> FastStream:
    broker = KafkaBroker(
        s.kafka_bootstrap_servers,
        security=broker_security(s),
        allow_auto_create_topics=False,  # the admin makes topics; components may not
        client_id="microgrid-validator",
        log_level=logging.DEBUG,  # per-batch "Received/Processed" lines only in debug
    )
    router = RecordRouter(s)

    @broker.subscriber(
        s.topic(Topics.TELEMETRY_RAW),
        group_id=router.group,
        **REDELIVERED_BATCHES,
        max_records=s.validator_max_records,
        batch_timeout_ms=50,
        fetch_min_bytes=s.consumer_fetch_min_bytes,
        fetch_max_wait_ms=s.consumer_fetch_max_wait_ms,
        auto_offset_reset="earliest",
    )
    async def validate_raw_records(body: Any, msg: KafkaMessage) -> None:
        """Readings as sent by devices: one reading, or a batch of one device's readings."""
        await router.route(msg.raw_message)

    # Declared for the AsyncAPI document; RecordRouter's producer sends the records.
    broker.publisher(
        s.topic(Topics.TELEMETRY_VALID),
        description="Validated readings, one batch per record, keyed by device id; headers "
        f"{Headers.SOURCE_PARTITION} and {Headers.SOURCE_OFFSET} name the raw record.",
    )
    broker.publisher(
        s.topic(Topics.TELEMETRY_DLQ),
        description="Refused raw records, unchanged (and readings the telemetry projection "
        f"refused); headers give the reason ({Headers.DLQ_REASON}), the stage that refused "
        f"it ({Headers.DLQ_STAGE}) and origin ({Headers.DLQ_SOURCE_TOPIC}, "
        f"{Headers.DLQ_SOURCE_PARTITION}, {Headers.DLQ_SOURCE_OFFSET}).",
    )
    app = FastStream(broker)
    app.on_startup(router.start)
    app.after_shutdown(router.stop)  # consumers are stopped by then
    return app
