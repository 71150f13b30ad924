"""Prometheus metrics of the consumer processes: records processed and consumer lag.

HTTP apps expose `/metrics` through Litestar's Prometheus plugin; consumer processes, which
serve no other HTTP, answer `/metrics` (prometheus_client's exposition) and `/readyz` on their
own port (`serve_metrics`): 200 `{"status": "ready"}`, or 503 with the partitions whose state
is not restored yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.exposition import MetricsHandler

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


NotReady = Callable[[], list[int]]  # the partitions not ready; empty when ready


class _Handler(MetricsHandler):
    not_ready: NotReady | None = None

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/readyz":
            return super().do_GET()  # /metrics (prometheus_client answers any other path too)
        waiting = self.not_ready() if self.not_ready is not None else []
        body = {"status": "not ready", "partitions": waiting} if waiting else {"status": "ready"}
        raw = json.dumps(body).encode()
        self.send_response(503 if waiting else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every few seconds are not worth a log line


class MetricsServer:
    """`/metrics` and `/readyz` on a port, served by a daemon thread."""

    def __init__(self, host: str, port: int, not_ready: NotReady | None) -> None:
        attrs = {"registry": REGISTRY, "not_ready": staticmethod(not_ready) if not_ready else None}
        handler = type("Handler", (_Handler,), attrs)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_metrics(
    s: Settings, port: int, not_ready: NotReady | None = None
) -> MetricsServer | None:
    """Serve `/metrics`, and `/readyz` as `not_ready` says (always ready without it)."""
    try:
        server = MetricsServer(s.metrics_host, port, not_ready)
    except OSError as exc:  # metrics are worth a warning, not an outage
        log.error("cannot serve metrics on %s:%d: %s", s.metrics_host, port, exc)
        return None
    log.info("metrics on http://%s:%d/metrics, readiness on /readyz", s.metrics_host, server.port)
    return server


async def report_lag(s: Settings, group: str, topic: str, interval_s: float = 5.0) -> None:
    """Refresh the lag gauge of (group, topic) until cancelled."""
    admin = AIOKafkaAdminClient(**s.kafka_client)
    ends = AIOKafkaConsumer(**s.kafka_client, enable_auto_commit=False)
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
