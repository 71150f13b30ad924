"""Alerter group: `telemetry.valid` x rules -> alert events on `alerts`.

Rules come from the compacted `alert-rules` topic, read in full at start and followed after.
Per-device state lives in memory for the partitions this instance owns and in the compacted
`alerter.state` changelog (same partition as the device's readings), restored on assignment.
State records the last telemetry offset evaluated, so readings re-delivered after a crash are
not evaluated twice; alert ids are deterministic, so an event emitted twice projects once.
Offline rules are evaluated on a clock tick, not only when readings arrive.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from faststream import FastStream
from faststream.kafka import KafkaBroker, KafkaMessage

from contracts import Groups, ReadingBatch, Topics
from contracts.alerting import AlertEvent, AlertRuleRecord
from runtime.kafka import RenewableProducer, read_table
from runtime.metrics import RECORDS, report_lag, serve_metrics
from runtime.settings import Settings
from stream_processors.alerting import (
    DeviceState,
    evaluate_reading,
    evaluate_silence,
    silence_settled,
)
from stream_processors.partitions import REDELIVERED_BATCHES, StateListener

log = logging.getLogger("microgrid.alerter")

TICK_S = 1.0


class Alerter:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.group = s.group(Groups.ALERTER)
        self.valid_topic = s.topic(Topics.TELEMETRY_VALID)
        self.state_topic = s.topic(Topics.ALERTER_STATE)
        self.alerts_topic = s.topic(Topics.ALERTS)
        self.rules: dict[str, AlertRuleRecord] = {}
        self.rules_ready = asyncio.Event()
        self.states: dict[str, DeviceState] = {}
        # devices whose offline alerts are all open: the clock skips them until they report
        # again or the rules change, so silent devices cost nothing per tick
        self.settled: set[str] = set()
        self.partition_of: dict[str, int] = {}
        self.lock = asyncio.Lock()
        self.producer = RenewableProducer(s, "microgrid-alerter-out")
        self.batch_decoder = msgspec.json.Decoder(ReadingBatch)
        self.state_decoder = msgspec.json.Decoder(DeviceState)
        self.rule_decoder = msgspec.json.Decoder(AlertRuleRecord)
        self.tasks: list[asyncio.Task[None]] = []
        self.backlogged = False
        self.ready: dict[int, asyncio.Event] = {}  # partition -> its state is restored

    async def start(self) -> None:
        await self.producer.start()
        serve_metrics(self.s, self.s.alerter_metrics_port)
        self.tasks = [
            asyncio.create_task(self.follow_rules()),
            asyncio.create_task(self.tick()),
            asyncio.create_task(report_lag(self.s, self.group, self.valid_topic)),
        ]
        await asyncio.wait_for(self.rules_ready.wait(), timeout=60)
        log.info("alerter ready with %d rules", len(self.rules))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.producer.stop()

    async def follow_rules(self) -> None:
        """Read every rule, say so, then keep applying changes as they come."""
        tp = TopicPartition(self.s.topic(Topics.ALERT_RULES), 0)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.s.kafka_bootstrap_servers, enable_auto_commit=False
        )
        await consumer.start()
        try:
            consumer.assign([tp])
            consumer.seek(tp, (await consumer.beginning_offsets([tp]))[tp])
            end = (await consumer.end_offsets([tp]))[tp]
            while await consumer.position(tp) < end:
                for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                    for rec in records:
                        self._apply_rule(rec)
            self.rules_ready.set()
            async for rec in consumer:
                self._apply_rule(rec)
        finally:
            await consumer.stop()

    def _apply_rule(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        rule_id = (rec.key or b"").decode()
        self.settled.clear()
        if rec.value is None:
            if self.rules.pop(rule_id, None) is not None and self.rules_ready.is_set():
                log.info("rule %s deleted; %d rules", rule_id, len(self.rules))
            return
        try:
            rule = self.rule_decoder.decode(rec.value)
        except msgspec.MsgspecError as exc:
            log.error("ignored undecodable rule %r: %s", rule_id, exc)
            return
        self.rules[rule.id] = rule
        if self.rules_ready.is_set():
            log.info("rule %s (%s) set; %d rules", rule.id, rule.name, len(self.rules))

    async def restore(self, partitions: list[int]) -> None:
        tps = [TopicPartition(self.state_topic, p) for p in partitions]
        table = await read_table(self.s, tps)
        restored: dict[str, tuple[DeviceState, int]] = {}
        for i, ((partition, key), rec) in enumerate(table.items()):
            restored[key.decode()] = (self.state_decoder.decode(rec.value), partition)
            if i % 10_000 == 9_999:
                await asyncio.sleep(0)  # keep heartbeats going through a large restore
        async with self.lock:
            for device, (state, partition) in restored.items():
                self.states[device] = state
                self.partition_of[device] = partition
            for p in partitions:
                self.ready.setdefault(p, asyncio.Event()).set()
        log.info("restored state of %d devices for partitions %s", len(restored), partitions)

    async def forget(self, partitions: list[int]) -> None:
        async with self.lock:  # let the batch in flight finish
            for p in partitions:
                self.ready[p] = asyncio.Event()
            gone = [d for d, p in self.partition_of.items() if p in partitions]
            for device in gone:
                self.states.pop(device, None)
                self.partition_of.pop(device, None)
                self.settled.discard(device)

    async def evaluate(self, records: tuple[ConsumerRecord[bytes, bytes], ...]) -> None:
        self.backlogged = len(records) >= self.s.alerter_max_records
        for p in {rec.partition for rec in records}:
            # records can arrive before the assignment's state is restored; a timeout
            # fails the batch, which FastStream then redelivers
            await asyncio.wait_for(self.ready.setdefault(p, asyncio.Event()).wait(), timeout=30)
        async with self.lock:
            events: list[AlertEvent] = []
            changed: dict[str, DeviceState] = {}
            for rec in records:
                device = (rec.key or b"").decode()
                try:
                    readings = self.batch_decoder.decode(rec.value or b"").readings
                except msgspec.MsgspecError as exc:
                    log.error("skipped undecodable record @%d: %s", rec.offset, exc)
                    continue
                self.settled.discard(device)
                state = self.states.get(device)
                if state is None:
                    first = readings[0]
                    state = DeviceState(first.device_id, first.site_id, first.device_type)
                    self.states[device] = state
                if rec.offset <= state.last_offset:
                    RECORDS.labels(self.group, "replayed").inc()
                    continue  # evaluated before a crash: its events were already sent
                for reading in readings:
                    events.extend(evaluate_reading(self.rules, reading, state))
                state.last_offset = rec.offset
                self.partition_of[device] = rec.partition
                changed[device] = state
                RECORDS.labels(self.group, "evaluated").inc()
            await self.emit(events, changed)

    async def emit(self, events: list[AlertEvent], changed: dict[str, DeviceState]) -> None:
        """Send alert events and the new device states; return once all are acknowledged."""
        producer = self.producer.producer
        assert producer is not None
        futures = []
        try:
            for e in events:
                log.info("alert %s %s: %s %s", e.kind, e.alert_id, e.device_id, e.message)
                futures.append(
                    await producer.send(
                        self.alerts_topic, msgspec.json.encode(e), key=e.device_id.encode()
                    )
                )
            for device, state in changed.items():
                futures.append(
                    await producer.send(
                        self.state_topic,
                        msgspec.json.encode(state),
                        key=device.encode(),
                        partition=self.partition_of[device],
                    )
                )
            await asyncio.gather(*futures)
        except KafkaError:
            await self.producer.renew_if_broken()
            raise

    async def tick(self) -> None:
        """Offline rules fire on time passing; skipped while readings are backlogged, when a
        device's latest reading may simply not have been read yet."""
        while True:
            await asyncio.sleep(TICK_S)
            if self.backlogged or not self.rules_ready.is_set():
                continue
            try:
                async with self.lock:
                    now = datetime.now(UTC)
                    silences = [r.silent_s for r in self.rules.values() if r.kind == "offline"]
                    if not silences:
                        continue
                    recent = now - timedelta(seconds=min(s for s in silences if s is not None))
                    events: list[AlertEvent] = []
                    changed: dict[str, DeviceState] = {}
                    for device, state in self.states.items():
                        if device in self.settled:
                            continue
                        if state.last_ts is not None and state.last_ts >= recent:
                            continue  # reported lately: no offline rule can fire
                        found = evaluate_silence(self.rules, state, now)
                        if found:
                            events.extend(found)
                            changed[device] = state
                        if silence_settled(self.rules, state):
                            self.settled.add(device)
                    if events:
                        await self.emit(events, changed)
            except KafkaError as exc:
                log.warning("offline evaluation could not be sent: %r", exc)


def create_app(s: Settings) -> FastStream:
    broker = KafkaBroker(
        s.kafka_bootstrap_servers, client_id="microgrid-alerter", log_level=logging.DEBUG
    )
    alerter = Alerter(s)

    @broker.subscriber(
        alerter.valid_topic,
        group_id=alerter.group,
        **REDELIVERED_BATCHES,
        max_records=s.alerter_max_records,
        batch_timeout_ms=50,
        fetch_min_bytes=s.consumer_fetch_min_bytes,
        fetch_max_wait_ms=s.consumer_fetch_max_wait_ms,
        auto_offset_reset="latest",  # a new group judges the present, not a week of history
        listener=StateListener(alerter),
    )
    async def evaluate_alert_rules(body: Any, msg: KafkaMessage) -> None:
        """Validated readings, evaluated against every alert rule that applies."""
        await alerter.evaluate(msg.raw_message)

    broker.publisher(
        alerter.alerts_topic,
        description="Alert edges (opened, cleared), keyed "
        "by device id; the alert id is stable across replays.",
    )
    broker.publisher(
        alerter.state_topic,
        description="Compacted changelog of per-device alert state, keyed by device id.",
    )
    app = FastStream(broker)
    app.on_startup(alerter.start)
    app.after_shutdown(alerter.stop)
    return app
