"""Prometheus metrics of the consumer processes: records processed and consumer lag.

HTTP apps expose `/metrics` through Litestar's Prometheus plugin; consumer processes, which
serve no HTTP, start prometheus_client's exporter on their own port.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge, start_http_server

from runtime.settings import Settings

log = logging.getLogger("microgrid.metrics")

RECORDS = Counter(
    "microgrid_records_processed_total",
    "Kafka records handled by a consumer group, by outcome",
    ["group", "outcome"],
)
READINGS = Counter(
    "microgrid_readings_processed_total",
    "Readings handled by a consumer group, by outcome",
    ["group", "outcome"],
)
LAG = Gauge(
    "microgrid_consumer_lag",
    "Records between the group's committed offset and the partition's end",
    ["group", "topic", "partition"],
)


def serve_metrics(s: Settings, port: int) -> None:
    try:
        start_http_server(port, addr=s.metrics_host)
    except OSError as exc:  # metrics are worth a warning, not an outage
        log.error("cannot serve metrics on %s:%d: %s", s.metrics_host, port, exc)
    else:
        log.info("metrics on http://%s:%d/metrics", s.metrics_host, port)


async def report_lag(s: Settings, group: str, topic: str, interval_s: float = 5.0) -> None:
    """Refresh the lag gauge of (group, topic) until cancelled."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap_servers)
    ends = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap_servers, enable_auto_commit=False)
    await admin.start()
    await ends.start()
    try:
        while True:
            try:
                await _update_lag(admin, ends, group, topic)
            except KafkaError as exc:
                log.debug("lag refresh failed: %r", exc)
            await asyncio.sleep(interval_s)
    finally:
        await ends.stop()
        await admin.close()


async def _update_lag(
    admin: AIOKafkaAdminClient, ends: AIOKafkaConsumer, group: str, topic: str
) -> None:
    described = await admin.describe_topics([topic])
    partitions = sorted(p["partition"] for d in described for p in d.get("partitions", []))
    tps = [TopicPartition(topic, p) for p in partitions]
    if not tps:
        return
    committed = await admin.list_consumer_group_offsets(group, partitions=tps)
    latest = await ends.end_offsets(tps)
    for tp in tps:
        meta = committed.get(tp)
        position = meta.offset if meta is not None and meta.offset >= 0 else 0
        LAG.labels(group, topic, str(tp.partition)).set(max(0, latest[tp] - position))
