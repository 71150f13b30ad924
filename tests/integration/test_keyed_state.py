"""The stateful shell against a real broker: states reach the changelog (and memory) only after
their outputs, never for a batch whose outputs failed, so a redelivered batch emits its events
once; refused records are dead-lettered; a restore that fails is retried, and `/readyz` says
so; states restore as they were written."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from prometheus_client import REGISTRY

from contracts import Headers, Reading, ReadingBatch, Topics
from contracts.alerting import AlertEvent, ThresholdRule
from runtime.kafka import delete_topics, ensure_topics, read_table, reliable_producer, topic_specs
from runtime.retry import RetryPolicy
from runtime.settings import Settings
from stream_processors.alerter import Alerter
from stream_processors.alerting import DeviceState
from stream_processors.keyed_state import KeyedState, Output, StatefulShell, Unprocessable
from tests.conftest import free_port, wait_for


class Counter(msgspec.Struct):
    n: int


def record(topic: str, partition: int, offset: int, key: str, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(
        topic, partition, offset, 0, 0, key.encode(), value, None, len(key), len(value), ()
    )


def test_states_are_written_after_their_outputs_and_never_for_a_failed_batch(
    stack: Settings,
) -> None:
    s = stack.model_copy(update={"kafka_namespace": f"shell-{uuid.uuid4().hex[:8]}."})
    source, out, changelog, dlq = s.topic("in"), s.topic("out"), s.topic("state"), s.topic("dlq")
    oversized = b"x" * (5 * 1_048_576)  # above the producer's 4 MiB request limit

    def step(rec: ConsumerRecord, state: KeyedState[Counter], now: datetime) -> list[Output]:
        if rec.value == b"junk":
            raise Unprocessable("not a count")
        key = (rec.key or b"").decode()
        current = state.get(key) or Counter(0)
        state.set(key, Counter(current.n + 1), rec.partition)
        value = oversized if rec.value == b"big" else f"{key}={current.n + 1}".encode()
        return [Output(out, rec.key or b"", value)]

    async def scenario() -> tuple[bool, list[bytes], dict[str, int], dict[str, int]]:
        admin = AIOKafkaAdminClient(**s.kafka_client)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(t, 2, 1) for t in (source, out, changelog, dlq)])
        finally:
            await admin.close()
        shell: StatefulShell[Counter] = StatefulShell(
            s,
            name="shell-check",
            group=s.group("shell-check"),
            changelog=changelog,
            state_type=Counter,
            dead_letters=dlq,
            lag_topic=out,
            metrics_port=0,
        )
        try:
            await shell.restore([0, 1])
            await shell.process(
                (record(source, 0, 0, "a", b"1"), record(source, 1, 0, "b", b"junk")), step
            )
            failed = False
            try:  # "c" counts, but its output cannot be sent
                await shell.process((record(source, 1, 1, "c", b"big"),), step)
            except KafkaError:
                failed = True
            await shell.process((record(source, 0, 1, "a", b"2"),), step)
        finally:
            await shell.stop()
        sent = sorted(r.value or b"" for r in await read_all(s, out, 2))
        table = await read_table(s, [TopicPartition(changelog, p) for p in (0, 1)])
        written = {
            key.decode(): msgspec.json.decode(rec.value or b"", type=Counter).n
            for (_, key), rec in table.items()
        }
        reborn: StatefulShell[Counter] = StatefulShell(
            s,
            name="shell-check",
            group=s.group("shell-check"),
            changelog=changelog,
            state_type=Counter,
            dead_letters=dlq,
            lag_topic=out,
            metrics_port=0,
        )
        await reborn.restore([0, 1])
        await reborn.stop()
        restored = {key: value.n for key, value in reborn.state.items()}
        await delete_topics(s, [source, out, changelog, dlq])
        return failed, sent, written, restored

    failed, sent, written, restored = asyncio.run(scenario())
    assert failed
    assert sent == [b"a=1", b"a=2"]  # "b" was unprocessable, "c" could not be sent
    assert written == {"a": 2}  # nothing of the failed batch reached the changelog
    assert restored == {"a": 2}


# --- the alerter's shell: state after acknowledgement, dead letters, restore retries --------

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
HOT = ThresholdRule(
    name="Over-temperature", severity="critical", metric="temperature_c", op="gt", threshold=75.0
)


def readings(device: str, *values: tuple[int, float]) -> bytes:
    return msgspec.json.encode(
        ReadingBatch(
            readings=[
                Reading(
                    device_id=device,
                    site_id="site-1",
                    device_type="battery",
                    ts=T0 + timedelta(seconds=t),
                    temperature_c=v,
                )
                for t, v in values
            ]
        )
    )


async def read_all(s: Settings, topic: str, at_least: int, timeout_s: float = 15.0) -> list[Any]:
    """The records of `topic` from its beginning, once there are `at_least` (or the time is
    up), and anything that follows them within half a second."""
    consumer = AIOKafkaConsumer(
        topic, **s.kafka_client, auto_offset_reset="earliest", isolation_level="read_committed"
    )
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < at_least and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(recs)
        for recs in (await consumer.getmany(timeout_ms=500)).values():
            got.extend(recs)
    finally:
        await consumer.stop()
    return sorted(got, key=lambda r: (r.partition, r.offset))


def alerter_for(stack: Settings) -> Alerter:
    s = stack.model_copy(update={"kafka_namespace": f"alerter-{uuid.uuid4().hex[:8]}."})
    alerter = Alerter(s)
    alerter.rules = {"r-hot": HOT}
    alerter.rules_ready.set()
    return alerter


def test_a_batch_whose_events_could_not_be_sent_emits_each_of_them_once_when_redelivered(
    stack: Settings,
) -> None:
    alerter = alerter_for(stack)
    s, shell = alerter.s, alerter.shell
    source = s.topic(Topics.TELEMETRY_VALID)
    before = (record(source, 0, 0, "dev-1", readings("dev-1", (-10, 50.0))),)  # a known device
    batch = (
        record(source, 0, 1, "dev-1", readings("dev-1", (0, 80.0))),  # opens
        record(source, 0, 2, "dev-1", readings("dev-1", (10, 60.0))),  # clears
        record(source, 0, 3, "dev-1", readings("dev-1", (20, 90.0))),  # opens again
    )

    async def scenario() -> tuple[type[Exception] | None, list[AlertEvent], DeviceState | None]:
        await ensure_topics(s)
        await shell.restore(list(range(s.device_topic_partitions)))
        try:
            await shell.process(before, alerter.step)
            # The first attempt goes through a producer (partition 0's transactional id, so it
            # fences the shell's own) that refuses any record over 64 bytes: aiokafka raises
            # MessageSizeTooLargeError, as a broker's limit would.
            small = reliable_producer(
                s, transactional_id=shell.transactional_id(0), max_request_size=64
            )
            await small.start()
            await small.begin_transaction()
            await small.commit_transaction()
            shell.producers[0] = small
            failed = None
            try:
                await shell.process(batch, alerter.step)
            except KafkaError as exc:
                failed = type(exc)
            await shell.restore([0])  # partition 0's producer anew, its state as committed
            await shell.process(batch, alerter.step)  # FastStream's redelivery
            await shell.process(batch, alerter.step)  # and once more: all replayed
        finally:
            await shell.stop()
        sent = await read_all(s, s.topic(Topics.ALERTS), 3)
        events = [msgspec.json.decode(r.value, type=AlertEvent) for r in sent]
        return failed, events, shell.state.peek("dev-1")

    try:
        failed, events, state = asyncio.run(scenario())
    finally:
        asyncio.run(delete_topics(alerter.s, [t.name for t in topic_specs(alerter.s)]))
    assert failed is MessageSizeTooLargeError
    assert [(e.kind, e.value) for e in events] == [
        ("opened", 80.0),
        ("cleared", 60.0),
        ("opened", 90.0),
    ]
    assert events[0].alert_id == events[1].alert_id != events[2].alert_id
    assert state is not None and state.last_offset == 3
    assert state.rules["r-hot"].open_id == events[2].alert_id


def test_records_the_alerter_refuses_are_dead_lettered_with_why_and_the_rest_is_evaluated(
    stack: Settings,
) -> None:
    alerter = alerter_for(stack)
    s, shell = alerter.s, alerter.shell
    source = s.topic(Topics.TELEMETRY_VALID)
    batch = (
        record(source, 1, 0, "dev-2", b"{not json"),
        record(source, 1, 1, "dev-2", readings("dev-3", (0, 99.0))),  # another device's
        record(source, 1, 2, "dev-2", readings("dev-2", (0, 99.0))),
    )

    async def scenario() -> tuple[list[Any], list[AlertEvent]]:
        await ensure_topics(s)
        try:
            await shell.restore(list(range(s.device_topic_partitions)))
            await shell.process(batch, alerter.step)
        finally:
            await shell.stop()
        dead = await read_all(s, s.topic(Topics.ALERTS_DLQ), 2)
        sent = await read_all(s, s.topic(Topics.ALERTS), 1)
        return dead, [msgspec.json.decode(r.value, type=AlertEvent) for r in sent]

    try:
        dead, events = asyncio.run(scenario())
    finally:
        asyncio.run(delete_topics(s, [t.name for t in topic_specs(s)]))
    assert [(e.kind, e.device_id, e.value) for e in events] == [("opened", "dev-2", 99.0)]
    assert [(r.key, r.value) for r in dead] == [
        (b"dev-2", batch[0].value),
        (b"dev-2", batch[1].value),
    ]
    headers = [dict(r.headers) for r in dead]
    assert b"undecodable" in headers[0][Headers.DLQ_REASON]
    assert b"'dev-3'" in headers[1][Headers.DLQ_REASON]
    for h, offset in zip(headers, (b"0", b"1"), strict=True):
        assert h[Headers.DLQ_STAGE] == alerter.group.encode()
        assert h[Headers.DLQ_SOURCE_TOPIC] == source.encode()
        assert (h[Headers.DLQ_SOURCE_PARTITION], h[Headers.DLQ_SOURCE_OFFSET]) == (b"1", offset)
    state = shell.state.peek("dev-2")
    assert state is not None and state.last_offset == 2


def readyz(port: int) -> tuple[int, Any]:
    r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    return r.status_code, r.json()


def test_a_failed_restore_is_retried_and_the_partition_becomes_ready(stack: Settings) -> None:
    s = stack.model_copy(update={"kafka_namespace": f"restore-{uuid.uuid4().hex[:8]}."})
    changelog, out = s.topic("state"), s.topic("out")
    port = free_port()
    shell: StatefulShell[Counter] = StatefulShell(
        s,
        name="restore-check",
        group=s.group("restore-check"),
        changelog=changelog,  # not created yet: reading it fails
        state_type=Counter,
        dead_letters=s.topic("dlq"),
        lag_topic=out,
        metrics_port=port,
    )
    shell.restore_attempt_s = 1.0
    shell.restore_policy = RetryPolicy(initial_s=0.2, max_s=0.5, deadline_s=None)
    failures = REGISTRY.get_sample_value(
        "microgrid_state_restore_failures_total", {"group": shell.group}
    )

    def step(rec: ConsumerRecord, state: KeyedState[Counter], now: datetime) -> list[Output]:
        key = (rec.key or b"").decode()
        current = state.get(key) or Counter(0)
        current.n += 1
        state.set(key, current, rec.partition)
        return [Output(out, rec.key or b"", str(current.n).encode())]

    async def scenario() -> tuple[tuple[int, Any], tuple[int, Any], float, int | None]:
        admin = AIOKafkaAdminClient(**s.kafka_client)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(out, 1, 1)])
            await shell.start()
            shell.assign([0])  # what the rebalance listener does
            await asyncio.to_thread(
                wait_for,
                lambda: (
                    (
                        REGISTRY.get_sample_value(
                            "microgrid_state_restore_failures_total", {"group": shell.group}
                        )
                        or 0
                    )
                    >= (failures or 0) + 2
                ),
                30,
                "two failed restore attempts",
            )
            before = await asyncio.to_thread(readyz, port)
            not_ready = REGISTRY.get_sample_value(
                "microgrid_state_partitions_not_ready", {"group": shell.group}
            )
            # a batch of the partition waits for its state meanwhile
            waiting = asyncio.create_task(shell.process((record(out, 0, 0, "k", b""),), step))
            await admin.create_topics([NewTopic(changelog, 1, 1)])
            producer = AIOKafkaProducer(**s.kafka_client)
            await producer.start()
            try:
                await producer.send_and_wait(
                    changelog, msgspec.json.encode(Counter(41)), key=b"k", partition=0
                )
            finally:
                await producer.stop()
            await asyncio.wait_for(waiting, 30)
            after = await asyncio.to_thread(
                wait_for, lambda: (r := readyz(port))[0] == 200 and r, 10, "/readyz 200"
            )
            counted = shell.state.peek("k")
            return before, after, not_ready or 0, None if counted is None else counted.n
        finally:
            await shell.stop()
            await admin.close()

    try:
        before, after, not_ready, counted = asyncio.run(scenario())
    finally:
        asyncio.run(delete_topics(s, [changelog, out]))
    assert before == (503, {"status": "not ready", "partitions": [0]})
    assert not_ready == 1
    assert after == (200, {"status": "ready"})
    assert counted == 42  # restored (41), then the waiting batch counted once
    assert (
        REGISTRY.get_sample_value("microgrid_state_partitions_not_ready", {"group": shell.group})
        == 0
    )


def test_a_member_that_lost_its_partition_cannot_write_after_its_successor(
    stack: Settings,
) -> None:
    """The zombie case: a member holds partition 0 and has worked on a batch; meanwhile the
    group gave partition 0 to another member (the first was paused past its session timeout,
    say), which restored the state and went on. Whatever the first then tries to commit (its
    outputs, its state, the group's offsets) is refused by the broker, and nothing of it is
    read: neither by a reader of committed records nor by the next restore."""
    s = stack.model_copy(update={"kafka_namespace": f"fence-{uuid.uuid4().hex[:8]}."})
    source, out, changelog, dlq = s.topic("in"), s.topic("out"), s.topic("state"), s.topic("dlq")
    group = s.group("fence-check")

    def step(rec: ConsumerRecord, state: KeyedState[Counter], now: datetime) -> list[Output]:
        key = (rec.key or b"").decode()
        current = state.get(key) or Counter(0)
        state.set(key, Counter(current.n + 1), rec.partition)
        return [Output(out, rec.key or b"", f"{key}={current.n + 1}@{rec.offset}".encode())]

    def member() -> StatefulShell[Counter]:
        return StatefulShell(
            s,
            name="fence-check",
            group=group,
            changelog=changelog,
            state_type=Counter,
            dead_letters=dlq,
            lag_topic=out,
            metrics_port=0,
        )

    async def scenario() -> tuple[type[BaseException] | None, bool, bool, list[bytes], int, Any]:
        admin = AIOKafkaAdminClient(**s.kafka_client)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(t, 1, 1) for t in (source, out, changelog, dlq)])
        finally:
            await admin.close()
        zombie, successor = member(), member()
        try:
            await zombie.restore([0])
            await zombie.process((record(source, 0, 0, "a", b""),), step)
            await successor.restore([0])  # the group gave partition 0 to another member
            await successor.process((record(source, 0, 1, "a", b""),), step)
            refused = None
            try:  # the first member, back, works on its next batch
                await zombie.process((record(source, 0, 1, "a", b""),), step)
            except KafkaError as exc:
                refused = type(exc)
            still_owned = 0 in zombie.owned
            waited = False
            try:  # its next batch of the partition waits (never skipped: skipping would
                # let FastStream commit past records the group may still give it)
                await asyncio.wait_for(zombie.process((record(source, 0, 2, "a", b""),), step), 2)
            except TimeoutError:
                waited = True
            await successor.process((record(source, 0, 2, "a", b""),), step)
        finally:
            await zombie.stop()
            await successor.stop()
        sent = [r.value or b"" for r in await read_all(s, out, 3)]
        table = await read_table(s, [TopicPartition(changelog, 0)])
        state = msgspec.json.decode(table[(0, b"a")].value or b"", type=Counter).n
        check = AIOKafkaAdminClient(**s.kafka_client)
        await check.start()
        try:
            offsets = await check.list_consumer_group_offsets(group)
        finally:
            await check.close()
        await delete_topics(s, [source, out, changelog, dlq])
        return refused, still_owned, waited, sent, state, offsets.get(TopicPartition(source, 0))

    refused, still_owned, waited, sent, state, committed = asyncio.run(scenario())
    assert refused is not None and issubclass(refused, KafkaError)
    assert not still_owned and waited  # the fenced member stops working the partition
    assert sent == [b"a=1@0", b"a=2@1", b"a=3@2"]  # nothing of the fenced batch
    assert state == 3
    assert committed is not None and committed.offset == 3
