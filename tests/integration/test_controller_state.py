"""The controller's state stays bounded: a finished command leaves memory and its changelog (a
tombstone) once the retention has passed, and a request too old to be told apart from one
already forgotten is dead-lettered, never run."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from contracts import Headers, Topics
from contracts.control import CommandRequested, CommandResult, ControlEvent
from runtime.kafka import delete_topics, ensure_topics, topic_specs
from runtime.settings import Settings
from stream_processors.controller import Controller
from tests.conftest import free_port


def record(topic: str, offset: int, key: str, value: Any) -> ConsumerRecord[bytes, bytes]:
    raw = msgspec.json.encode(value)
    return ConsumerRecord(topic, 0, offset, 0, 0, key.encode(), raw, None, len(key), len(raw), ())


async def records_of(s: Settings, topic: str, until: Any, timeout_s: float = 20.0) -> list[Any]:
    """The records of `topic` from its beginning, read until `until(records)` holds."""
    consumer = AIOKafkaConsumer(topic, **s.kafka_client, auto_offset_reset="earliest")
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while not until(got):
            assert time.monotonic() < deadline, f"timed out reading {topic}: {got!r}"
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                got.extend(recs)
    finally:
        await consumer.stop()
    return got


def test_terminal_commands_are_tombstoned_after_the_retention_and_stale_requests_refused(
    stack: Settings,
) -> None:
    s = stack.model_copy(
        update={
            "kafka_namespace": f"ctl-{uuid.uuid4().hex[:8]}.",
            "controller_terminal_retention_s": 1.0,
            "controller_metrics_port": free_port(),
        }
    )
    controller = Controller(s)
    shell = controller.shell
    commands, results = controller.commands_topic, controller.results_topic
    now = datetime.now(UTC)
    fresh = CommandRequested(
        id="c-1",
        device_id="bat-1",
        command="charge",
        params={"power_kw": 5.0},
        requested_at=now,
        deadline=now + timedelta(seconds=2),
        requested_by="operator",
    )
    old = msgspec.structs.replace(
        fresh,
        id="c-2",
        requested_at=now - timedelta(hours=1),
        deadline=now - timedelta(hours=1) + timedelta(seconds=60),
    )
    done = CommandResult(status="succeeded", id="c-1", device_id="bat-1")

    def tombstoned(recs: list[Any]) -> bool:
        mine = [r for r in recs if r.key == b"c-1"]
        return bool(mine) and mine[-1].value is None

    async def scenario() -> tuple[list[Any], list[Any], list[ControlEvent], bool]:
        await ensure_topics(s)
        await shell.start()  # runs the tick every second
        try:
            await shell.restore(list(range(s.device_topic_partitions)))
            await shell.process(
                (record(commands, 0, "bat-1", fresh), record(commands, 1, "bat-1", old)),
                controller.step,
            )
            await shell.process((record(results, 0, "bat-1", done),), controller.step)
            changelog = await records_of(s, shell.changelog, tombstoned)
            gone = shell.state.peek("c-1") is None
            # The request of the forgotten command, redelivered: its deadline is now more
            # than the retention past, so it is refused rather than dispatched again.
            await shell.process((record(commands, 0, "bat-1", fresh),), controller.step)
        finally:
            await shell.stop()
        dead = await records_of(s, s.topic(Topics.CONTROL_DLQ), lambda r: len(r) >= 2)
        events = await records_of(s, controller.events_topic, lambda r: len(r) >= 3)
        decoded = [msgspec.json.decode(r.value, type=ControlEvent) for r in events]
        return changelog, dead, decoded, gone

    try:
        changelog, dead, events, gone = asyncio.run(scenario())
    finally:
        asyncio.run(delete_topics(s, [t.name for t in topic_specs(s)]))
    assert gone and len(shell.state) == 0
    written = [(r.key, r.value is None) for r in changelog]
    assert written[0] == (b"c-1", False) and written[-1] == (b"c-1", True)
    assert b"c-2" not in {key for key, _ in written}  # the stale request left no state
    assert [(e.command_id, e.status) for e in events] == [
        ("c-1", "queued"),
        ("c-1", "processing"),
        ("c-1", "succeeded"),
    ]
    assert events[0].request == fresh
    assert [msgspec.json.decode(r.value, type=CommandRequested).id for r in dead] == ["c-2", "c-1"]
    for r in dead:
        headers = dict(r.headers)
        assert headers[Headers.DLQ_REASON].startswith(b"stale request")
        assert headers[Headers.DLQ_STAGE] == controller.group.encode()
        assert headers[Headers.DLQ_SOURCE_TOPIC] == commands.encode()
