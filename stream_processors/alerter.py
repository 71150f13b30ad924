"""Alerter group: `telemetry.valid` x rules -> alert events on `alerts`.

Rules come from the compacted `alert-rules` topic, read in full at start and followed after.
Per-device state (`stream_processors.alerting.DeviceState`) is kept by the stateful shell
(`keyed_state`) in the compacted `alerter.state` changelog, on the partition of the device's
readings. State records the last telemetry offset evaluated, so readings re-delivered after a
crash are not evaluated twice; alert ids are deterministic, so an event emitted twice projects
once. Readings are evaluated on a copy of the device's state, which becomes its state only once
the alert events are acknowledged (a batch that fails is evaluated again from the same state).
A record the alerter cannot use (undecodable, or readings of a device other than the record's
key) goes to `alerts.dlq`. Offline rules are evaluated on a clock tick, not only when readings
arrive.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from faststream import FastStream
from faststream.kafka import KafkaBroker, KafkaMessage

from contracts import Groups, Headers, ReadingBatch, Topics
from contracts.alerting import AlertEvent, AlertRuleSpec
from runtime.kafka import broker_security, check_device_partitions
from runtime.metrics import RECORDS
from runtime.settings import Settings
from stream_processors.alerting import (
    DeviceState,
    Rules,
    evaluate_reading,
    evaluate_silence,
    shortest_silence,
    silence_due,
    silence_settled,
)
from stream_processors.keyed_state import KeyedState, Output, StatefulShell, Unprocessable
from stream_processors.partitions import REDELIVERED_BATCHES, StateListener

log = logging.getLogger("microgrid.alerter")

TICK_S = 1.0


class Alerter:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.valid_topic = s.topic(Topics.TELEMETRY_VALID)
        self.alerts_topic = s.topic(Topics.ALERTS)
        self.rules: Rules = {}
        self.rules_ready = asyncio.Event()
        # devices whose offline alerts are all open: the clock skips them until they report
        # again or the rules change, so silent devices cost nothing per tick
        self.settled: set[str] = set()
        self.backlogged = False
        self.batch_decoder = msgspec.json.Decoder(ReadingBatch)
        self.rule_decoder = msgspec.json.Decoder(AlertRuleSpec)
        self.shell = StatefulShell(
            s,
            name="alerter",
            group=s.group(Groups.ALERTER),
            changelog=s.topic(Topics.ALERTER_STATE),
            state_type=DeviceState,
            copy=DeviceState.copy,
            dead_letters=s.topic(Topics.ALERTS_DLQ),
            lag_topic=self.valid_topic,
            metrics_port=s.alerter_metrics_port,
            on_forget=self.settled.difference_update,
        )
        self.shell.every(TICK_S, self.tick)

    @property
    def group(self) -> str:
        return self.shell.group

    async def start(self) -> None:
        # state sits on the changelog partition numbered as its readings' partition
        await check_device_partitions(self.s, [self.valid_topic, self.shell.changelog])
        await self.shell.start(self.follow_rules())
        await asyncio.wait_for(self.rules_ready.wait(), timeout=60)
        log.info("alerter ready with %d rules", len(self.rules))

    async def stop(self) -> None:
        await self.shell.stop()

    async def follow_rules(self) -> None:
        """Read every rule, say so, then keep applying changes as they come."""
        tp = TopicPartition(self.s.topic(Topics.ALERT_RULES), 0)
        consumer = AIOKafkaConsumer(**self.s.kafka_client, enable_auto_commit=False)
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
        self.rules[rule_id] = rule
        if self.rules_ready.is_set():
            log.info("rule %s (%s) set; %d rules", rule_id, rule.name, len(self.rules))

    async def evaluate(self, records: tuple[ConsumerRecord[bytes, bytes], ...]) -> None:
        self.backlogged = len(records) >= self.s.alerter_max_records
        await self.shell.process(records, self.step)

    def step(
        self, rec: ConsumerRecord[bytes, bytes], states: KeyedState[DeviceState], now: datetime
    ) -> list[Output]:
        """One record of one device's readings: its alert events, its new state."""
        device = (rec.key or b"").decode(errors="replace")
        try:
            readings = self.batch_decoder.decode(rec.value or b"").readings
        except msgspec.MsgspecError as exc:
            raise Unprocessable(f"undecodable reading batch: {exc}") from exc
        for reading in readings:
            if reading.device_id != device:
                raise Unprocessable(
                    f"a reading of device {reading.device_id!r} under the key {device!r}"
                )
        self.settled.discard(device)
        current = states.peek(device)
        if current is not None and rec.offset <= current.last_offset:
            RECORDS.labels(self.group, "replayed").inc()
            return []  # evaluated before a crash: its events were already sent
        if current is None:
            first = readings[0]
            state = DeviceState(first.device_id, first.site_id, first.device_type)
        else:
            state = states.get(device) or current  # a copy, or what this batch staged
        events = [e for reading in readings for e in evaluate_reading(self.rules, reading, state)]
        state.last_offset = rec.offset
        states.set(device, state, rec.partition)
        RECORDS.labels(self.group, "evaluated").inc()
        return self.outputs(events)

    def tick(self, states: KeyedState[DeviceState], now: datetime) -> list[Output]:
        """Offline rules fire on time passing; skipped while readings are backlogged, when a
        device's latest reading may simply not have been read yet."""
        if self.backlogged or not self.rules_ready.is_set():
            return []
        silence = shortest_silence(self.rules)
        if silence is None:
            return []
        recent = now - timedelta(seconds=silence)
        events: list[AlertEvent] = []
        due: list[str] = []
        for device, committed in states.items():  # read-only: a state to change is copied
            if device in self.settled:
                continue
            if committed.last_ts is not None and committed.last_ts >= recent:
                continue  # reported lately: no offline rule can fire
            if silence_due(self.rules, committed, now):
                due.append(device)
            elif silence_settled(self.rules, committed):
                self.settled.add(device)  # as committed: its alerts are acknowledged
        for device in due:
            state = states.get(device)
            assert state is not None
            events.extend(evaluate_silence(self.rules, state, now))
            states.set(device, state)
        return self.outputs(events)

    def outputs(self, events: list[AlertEvent]) -> list[Output]:
        for e in events:
            log.info("alert %s %s: %s %s", e.kind, e.alert_id, e.device_id, e.message)
        return [
            Output(self.alerts_topic, e.device_id.encode(), msgspec.json.encode(e)) for e in events
        ]


def create_app(s: Settings) -> FastStream:
    broker = KafkaBroker(
        s.kafka_bootstrap_servers.split(","),  # a string would be one host to FastStream
        security=broker_security(s),
        allow_auto_create_topics=False,  # the admin makes topics; components may not
        client_id="microgrid-alerter",
        log_level=logging.DEBUG,
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
        listener=StateListener(alerter.shell),
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
        alerter.shell.changelog,
        description="Compacted changelog of per-device alert state, keyed by device id.",
    )
    broker.publisher(
        alerter.shell.dead_letters.topic,
        description="Records the alerter refused (undecodable, readings of another device than "
        "the key), unchanged; headers give the reason "
        f"({Headers.DLQ_REASON}), the stage ({Headers.DLQ_STAGE}) and origin "
        f"({Headers.DLQ_SOURCE_TOPIC}, {Headers.DLQ_SOURCE_PARTITION}, "
        f"{Headers.DLQ_SOURCE_OFFSET}); {Headers.REDRIVE_COUNT} when the refused record was "
        "redriven.",
    )
    app = FastStream(broker)
    app.on_startup(alerter.start)
    app.after_shutdown(alerter.stop)
    return app
