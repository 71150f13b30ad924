"""Controller group: command requests and device replies -> dispatches and lifecycle events.

Reads `control.commands` and `control.results` (both keyed by device, so one instance owns a
device's commands and replies), moves each command through the pure state machine of
`stream_processors.lifecycle`, sends dispatches on `control.dispatch` and every transition on
`control.events`. Command states live in memory for the owned partitions and in the compacted
`controller.state` changelog, restored on assignment; redelivered requests and replies are
then no-ops, so a restart neither dispatches twice nor finishes a command twice. Deadlines
are checked every second.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from faststream import FastStream
from faststream.kafka import KafkaBroker, KafkaMessage

from contracts import Groups, Topics
from contracts.control import CommandDispatch, CommandRequested, CommandResult, ControlEvent
from runtime.kafka import RenewableProducer, read_table
from runtime.metrics import RECORDS, report_lag, serve_metrics
from runtime.settings import Settings
from stream_processors.lifecycle import CommandState, Step, on_requested, on_result, on_tick
from stream_processors.partitions import REDELIVERED_BATCHES, StateListener

log = logging.getLogger("microgrid.controller")

TICK_S = 1.0


class Controller:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.group = s.group(Groups.CONTROLLER)
        self.commands_topic = s.topic(Topics.CONTROL_COMMANDS)
        self.results_topic = s.topic(Topics.CONTROL_RESULTS)
        self.state_topic = s.topic(Topics.CONTROLLER_STATE)
        self.states: dict[str, CommandState] = {}
        self.partition_of: dict[str, int] = {}
        self.ready: dict[int, asyncio.Event] = {}
        self.lock = asyncio.Lock()
        self.producer = RenewableProducer(s, "microgrid-controller-out")
        self.request_decoder = msgspec.json.Decoder(CommandRequested)
        self.result_decoder = msgspec.json.Decoder(CommandResult)
        self.state_decoder = msgspec.json.Decoder(CommandState)
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.producer.start()
        serve_metrics(self.s, self.s.controller_metrics_port)
        self.tasks = [
            asyncio.create_task(self.tick()),
            asyncio.create_task(report_lag(self.s, self.group, self.commands_topic)),
        ]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.producer.stop()

    async def restore(self, partitions: list[int]) -> None:
        tps = [TopicPartition(self.state_topic, p) for p in partitions]
        records = (await read_table(self.s, tps)).values()
        async with self.lock:
            for rec in records:
                state = self.state_decoder.decode(rec.value)
                self.states[state.id] = state
                self.partition_of[state.id] = rec.partition
            for p in partitions:
                self.ready.setdefault(p, asyncio.Event()).set()
        log.info("restored %d commands for partitions %s", len(records), partitions)

    async def forget(self, partitions: list[int]) -> None:
        async with self.lock:
            for p in partitions:
                self.ready[p] = asyncio.Event()
            for cid in [c for c, p in self.partition_of.items() if p in partitions]:
                self.states.pop(cid, None)
                self.partition_of.pop(cid, None)

    def _step(self, rec: ConsumerRecord[bytes, bytes], now: datetime) -> Step | None:
        try:
            if rec.topic == self.commands_topic:
                req = self.request_decoder.decode(rec.value or b"")
                self.partition_of.setdefault(req.id, rec.partition)
                return on_requested(self.states.get(req.id), req, now)
            result = self.result_decoder.decode(rec.value or b"")
        except msgspec.MsgspecError as exc:
            log.error(
                "skipped undecodable %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc
            )
            RECORDS.labels(self.group, "undecodable").inc()
            return None
        if result.id not in self.states:
            log.warning("reply for unknown command %r from %r", result.id, result.device_id)
        return on_result(self.states.get(result.id), result, now)

    async def handle(self, records: tuple[ConsumerRecord[bytes, bytes], ...]) -> None:
        for p in {rec.partition for rec in records}:
            await asyncio.wait_for(self.ready.setdefault(p, asyncio.Event()).wait(), timeout=30)
        async with self.lock:
            now = datetime.now(UTC)
            steps = [step for rec in records if (step := self._step(rec, now)) is not None]
            await self.apply(steps)

    async def apply(self, steps: list[Step]) -> None:
        """Record the new states, then send dispatches, events and states; return once the
        broker acknowledged them all."""
        dispatches: list[CommandDispatch] = []
        events: list[ControlEvent] = []
        changed: dict[str, CommandState] = {}
        for state, new_events, dispatch in steps:
            if state is None or not new_events:
                continue
            self.states[state.id] = state
            changed[state.id] = state
            events.extend(new_events)
            if dispatch is not None:
                dispatches.append(dispatch)
        if not changed:
            return
        producer = self.producer.producer
        assert producer is not None
        futures = []
        try:
            for d in dispatches:
                futures.append(
                    await producer.send(
                        self.s.topic(Topics.CONTROL_DISPATCH),
                        msgspec.json.encode(d),
                        key=d.device_id.encode(),
                    )
                )
            for e in events:
                log.info(
                    "command %s on %s: %s%s",
                    e.command_id,
                    e.device_id,
                    e.status,
                    f" ({e.reason})" if e.reason else "",
                )
                futures.append(
                    await producer.send(
                        self.s.topic(Topics.CONTROL_EVENTS),
                        msgspec.json.encode(e),
                        key=e.device_id.encode(),
                    )
                )
            for cid, state in changed.items():
                futures.append(
                    await producer.send(
                        self.state_topic,
                        msgspec.json.encode(state),
                        key=cid.encode(),
                        partition=self.partition_of[cid],
                    )
                )
            await asyncio.gather(*futures)
        except KafkaError:
            await self.producer.renew_if_broken()
            raise
        RECORDS.labels(self.group, "transitions").inc(len(events))

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                async with self.lock:
                    now = datetime.now(UTC)
                    steps = [
                        on_tick(st, now)
                        for st in self.states.values()
                        if st.status == "processing" and now >= st.deadline
                    ]
                    await self.apply(steps)
            except KafkaError as exc:
                log.warning("timeouts could not be sent: %r", exc)


def create_app(s: Settings) -> FastStream:
    broker = KafkaBroker(
        s.kafka_bootstrap_servers, client_id="microgrid-controller", log_level=logging.DEBUG
    )
    controller = Controller(s)

    @broker.subscriber(
        controller.commands_topic,
        controller.results_topic,
        group_id=controller.group,
        **REDELIVERED_BATCHES,
        max_records=500,
        batch_timeout_ms=20,
        auto_offset_reset="earliest",
        listener=StateListener(controller),
    )
    async def run_command_lifecycles(body: Any, msg: KafkaMessage) -> None:
        """Command requests (from the API) and replies (from devices), by device."""
        await controller.handle(msg.raw_message)

    broker.publisher(
        s.topic(Topics.CONTROL_DISPATCH),
        description="Commands for devices to execute, keyed by device id.",
    )
    broker.publisher(
        s.topic(Topics.CONTROL_EVENTS),
        description="Every lifecycle transition, keyed by device id.",
    )
    broker.publisher(
        controller.state_topic,
        description="Compacted changelog of command states, keyed by command id.",
    )
    app = FastStream(broker)
    app.on_startup(controller.start)
    app.after_shutdown(controller.stop)
    return app
