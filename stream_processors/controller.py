"""Controller group: command requests and device replies -> dispatches and lifecycle events.

Reads `control.commands` and `control.results` (both keyed by device, so one instance owns a
device's commands and replies), moves each command through the pure state machine of
`stream_processors.lifecycle`, sends dispatches on `control.dispatch` (or, for a device of a
site with topics of its own, on `site.<site>.dispatch`) and every transition on
`control.events`. Replies from sites' results topics reach `control.results` through the
validator, which checks that their devices belong to those sites. Command states are kept by
the stateful shell (`keyed_state`) in the compacted `controller.state` changelog, keyed by
command id on the partition of the device; redelivered requests and replies are then no-ops, so
a restart neither dispatches twice nor finishes a command twice. Deadlines are checked every
second. A command terminal (and past its deadline) for longer than
`CONTROLLER_TERMINAL_RETENTION_S` leaves memory and the changelog (a tombstone); a request
whose deadline is older than that is stale and goes to `control.dlq` instead of running, as do
undecodable records, a request under another device's key and a reply for a command the
controller does not know or from a device it was not sent to.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import msgspec
from aiokafka import ConsumerRecord
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from faststream import FastStream
from faststream.kafka import KafkaBroker, KafkaMessage

from contracts import Groups, Headers, Topics
from contracts.control import CommandRequested, CommandResult
from contracts.topics import site_topic
from runtime.kafka import broker_security, check_device_partitions
from runtime.metrics import RECORDS
from runtime.settings import Settings
from stream_processors.keyed_state import KeyedState, Output, StatefulShell, Unprocessable
from stream_processors.lifecycle import (
    CommandState,
    Step,
    expired,
    on_requested,
    on_result,
    on_tick,
    stale,
)
from stream_processors.partitions import REDELIVERED_BATCHES, StateListener

log = logging.getLogger("microgrid.controller")

TICK_S = 1.0


class Controller:
    def __init__(self, s: Settings) -> None:
        self.commands_topic = s.topic(Topics.CONTROL_COMMANDS)
        self.results_topic = s.topic(Topics.CONTROL_RESULTS)
        self.dispatch_topic = s.topic(Topics.CONTROL_DISPATCH)
        self.events_topic = s.topic(Topics.CONTROL_EVENTS)
        self.topic = s.topic
        self.shell = StatefulShell(
            s,
            name="controller",
            group=s.group(Groups.CONTROLLER),
            changelog=s.topic(Topics.CONTROLLER_STATE),
            state_type=CommandState,
            copy=CommandState.copy,
            dead_letters=s.topic(Topics.CONTROL_DLQ),
            lag_topic=self.commands_topic,
            metrics_port=s.controller_metrics_port,
            on_sent=self.count_transitions,
        )
        self.retention = timedelta(seconds=s.controller_terminal_retention_s)
        self.shell.every(TICK_S, self.tick)
        self.request_decoder = msgspec.json.Decoder(CommandRequested)
        self.result_decoder = msgspec.json.Decoder(CommandResult)

    @property
    def group(self) -> str:
        return self.shell.group

    async def start(self) -> None:
        # a command's state sits on the changelog partition numbered as its device's partition
        topics = [self.commands_topic, self.results_topic, self.shell.changelog]
        await check_device_partitions(self.shell.s, topics)
        await self.shell.start()

    async def stop(self) -> None:
        await self.shell.stop()

    async def handle(self, records: tuple[ConsumerRecord[bytes, bytes], ...]) -> None:
        await self.shell.process(records, self.step)

    def step(
        self, rec: ConsumerRecord[bytes, bytes], states: KeyedState[CommandState], now: datetime
    ) -> list[Output]:
        """A command request (from the API) or a reply (from a device)."""
        key = (rec.key or b"").decode(errors="replace")
        if rec.topic == self.commands_topic:
            try:
                req = self.request_decoder.decode(rec.value or b"")
            except msgspec.MsgspecError as exc:
                raise Unprocessable(f"undecodable command request: {exc}") from exc
            if req.device_id != key:
                raise Unprocessable(f"a request for device {req.device_id!r} under key {key!r}")
            if stale(req, now, self.retention):
                raise Unprocessable(
                    f"stale request: its deadline {req.deadline.isoformat()} lies more than "
                    f"{self.retention.total_seconds():g} s in the past"
                )
            dispatch_topic = (
                self.topic(site_topic(req.site_id, "dispatch"))
                if req.site_topics and req.site_id
                else self.dispatch_topic
            )
            step = on_requested(states.peek(req.id), req, now)
            return self.apply(step, states, rec.partition, dispatch_topic)
        try:
            result = self.result_decoder.decode(rec.value or b"")
        except msgspec.MsgspecError as exc:
            raise Unprocessable(f"undecodable command result: {exc}") from exc
        state = states.peek(result.id)
        if state is None:
            raise Unprocessable(f"a reply for unknown command {result.id!r}")
        if result.device_id != state.device_id:
            raise Unprocessable(
                f"a reply from {result.device_id!r} for command {result.id!r} "
                f"sent to {state.device_id!r}"
            )
        return self.apply(on_result(state, result, now), states)

    def tick(self, states: KeyedState[CommandState], now: datetime) -> list[Output]:
        """Deadlines pass; terminal commands past the retention are forgotten."""
        outputs = []
        for command_id, st in states.items():  # read-only: transitions make new states
            if st.status == "processing" and now >= st.deadline:
                outputs.extend(self.apply(on_tick(st, now), states))
            elif expired(st, now, self.retention):
                states.delete(command_id)
        return outputs

    def apply(
        self,
        step: Step,
        states: KeyedState[CommandState],
        partition: int | None = None,
        dispatch_topic: str | None = None,
    ) -> list[Output]:
        """Record a transition's new state; return its dispatch (to `dispatch_topic`, by
        default control.dispatch) and events to send."""
        state, events, dispatch = step
        if state is None or not events:
            return []
        states.set(state.id, state, partition)
        outputs = []
        if dispatch is not None:
            key = dispatch.device_id.encode()
            topic = dispatch_topic or self.dispatch_topic
            outputs.append(Output(topic, key, msgspec.json.encode(dispatch)))
        for e in events:
            log.info(
                "command %s on %s: %s%s",
                e.command_id,
                e.device_id,
                e.status,
                f" ({e.reason})" if e.reason else "",
            )
            outputs.append(Output(self.events_topic, e.device_id.encode(), msgspec.json.encode(e)))
        return outputs

    def count_transitions(self, sent: list[Output]) -> None:
        transitions = sum(1 for o in sent if o.topic == self.events_topic)
        RECORDS.labels(self.group, "transitions").inc(transitions)


def create_app(s: Settings) -> FastStream:
    broker = KafkaBroker(
        s.kafka_bootstrap_servers.split(","),  # a string would be one host to FastStream
        security=broker_security(s),
        allow_auto_create_topics=False,  # the admin makes topics; components may not
        client_id="microgrid-controller",
        log_level=logging.DEBUG,
    )
    controller = Controller(s)

    @broker.subscriber(
        controller.commands_topic,
        controller.results_topic,
        group_id=controller.group,
        # co-partitioned: a member that owns partition p of the commands owns partition p of
        # the replies, so a reply meets its command's state (round-robin, the default, splits
        # them whenever the member count does not divide the partition count)
        partition_assignment_strategy=(RangePartitionAssignor,),
        **REDELIVERED_BATCHES,
        max_records=500,
        batch_timeout_ms=20,
        auto_offset_reset="earliest",
        listener=StateListener(controller.shell),
    )
    async def run_command_lifecycles(body: Any, msg: KafkaMessage) -> None:
        """Command requests (from the API) and replies (from devices), by device."""
        await controller.handle(msg.raw_message)

    broker.publisher(
        controller.dispatch_topic,
        description="Commands for devices to execute, keyed by device id, for devices of "
        "sites without topics of their own.",
    )
    broker.publisher(
        controller.topic(site_topic("{site}", "dispatch")),
        description="Commands for the devices of a site with topics of its own (`microgrid "
        "keys create --site SITE --kafka`), keyed by device id; only that site's principals "
        "may read it.",
    )
    broker.publisher(
        controller.events_topic,
        description="Every lifecycle transition, keyed by device id.",
    )
    broker.publisher(
        controller.shell.changelog,
        description="Compacted changelog of command states, keyed by command id.",
    )
    broker.publisher(
        controller.shell.dead_letters.topic,
        description="Requests and replies the controller refused (undecodable, stale, unknown "
        "command, wrong device), unchanged; headers give the reason "
        f"({Headers.DLQ_REASON}), the stage ({Headers.DLQ_STAGE}) and origin "
        f"({Headers.DLQ_SOURCE_TOPIC}, {Headers.DLQ_SOURCE_PARTITION}, "
        f"{Headers.DLQ_SOURCE_OFFSET}); {Headers.REDRIVE_COUNT} when the refused record was "
        "redriven.",
    )
    app = FastStream(broker)
    app.on_startup(controller.start)
    app.after_shutdown(controller.stop)
    return app
