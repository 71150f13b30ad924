"""The simulator executes commands from `control.dispatch` and replies on `control.results`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from contracts import Topics
from contracts.control import CommandDispatch, CommandResult
from runtime.settings import Settings
from simulator.commands import serve_commands
from simulator.devices import Battery, Genset
from simulator.fleet import Site, build_fleet


@pytest.fixture()
async def fleet(stack: Settings) -> AsyncIterator[list[Site]]:
    """A small fleet executing commands in this process, started and ready for dispatches."""
    sites = build_fleet(8, seed=5)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve_commands(stack, sites, stop, ready=ready))
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiting}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():
        waiting.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        task.result()  # the failure, if it failed
        raise AssertionError("serve_commands did not get its partitions within 60 s")
    yield sites
    stop.set()
    await asyncio.wait_for(task, timeout=20)


def dispatch(device_id: str, command: str, params: dict[str, Any], ttl_s: float = 30) -> Any:
    return CommandDispatch(
        id=f"cmd-{uuid.uuid4().hex[:10]}",
        device_id=device_id,
        command=command,
        params=params,
        deadline=datetime.now(UTC) + timedelta(seconds=ttl_s),
    )


async def send(s: Settings, *dispatches: CommandDispatch) -> None:
    producer = AIOKafkaProducer(**s.kafka_client, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for d in dispatches:
            await producer.send_and_wait(
                s.topic(Topics.CONTROL_DISPATCH), msgspec.json.encode(d), key=d.device_id.encode()
            )
    finally:
        await producer.stop()


async def results(
    s: Settings, ids: set[str], want: set[str], wait_s: float = 20
) -> dict[str, tuple[bytes | None, CommandResult]]:
    """Results on control.results for `ids`, read until those in `want` have arrived (and a
    little longer, so that unexpected ones show too)."""
    consumer = AIOKafkaConsumer(
        s.topic(Topics.CONTROL_RESULTS),
        **s.kafka_client,
        auto_offset_reset="earliest",
        group_id=f"test-results-{uuid.uuid4().hex[:6]}",
    )
    await consumer.start()
    found: dict[str, tuple[bytes | None, CommandResult]] = {}
    try:
        deadline = time.monotonic() + wait_s
        grace: float | None = None
        while time.monotonic() < (deadline if grace is None else grace):
            polled = await consumer.getmany(timeout_ms=300)
            for record in (r for recs in polled.values() for r in recs):
                try:
                    result = msgspec.json.decode(record.value, type=CommandResult)
                except msgspec.ValidationError:
                    continue  # another test's record, one the controller dead-letters
                if result.id in ids:
                    found[result.id] = (record.key, result)
            if grace is None and want <= set(found):
                grace = time.monotonic() + 1.5
    finally:
        await consumer.stop()
    return found


async def test_dispatched_commands_are_executed_and_answered(
    fleet: list[Site], stack: Settings
) -> None:
    s = stack
    devices = {d.device_id: d for site in fleet for d in site.devices}
    for d in devices.values():
        d.failure_rate = 0.0
    battery, genset = devices["site-001-battery-1"], devices["site-001-genset-1"]
    assert isinstance(battery, Battery) and isinstance(genset, Genset)
    charge = dispatch(battery.device_id, "charge", {"power_kw": 3.5})
    start = dispatch(genset.device_id, "start", {})
    invalid = dispatch(battery.device_id, "start", {})
    stranger = dispatch("site-999-battery-1", "charge", {"power_kw": 1})
    overdue = dispatch(battery.device_id, "discharge", {"power_kw": 1}, ttl_s=-5)
    t0 = time.monotonic()
    await send(s, charge, start, invalid, stranger, overdue)
    ids = {d.id for d in (charge, start, invalid, stranger, overdue)}
    found = await results(s, ids, want={charge.id, start.id, invalid.id})
    assert set(found) == {charge.id, start.id, invalid.id}
    assert found[charge.id] == (
        battery.device_id.encode(),
        CommandResult(id=charge.id, device_id=battery.device_id, status="succeeded"),
    )
    assert found[start.id][1].status == "succeeded"
    assert found[start.id][0] == genset.device_id.encode()
    _, failed = found[invalid.id]
    assert failed.status == "failed" and "a battery accepts" in failed.reason
    assert battery.setpoint_kw == 3.5
    assert genset.forced is True
    assert time.monotonic() - t0 >= 0.1  # not instantaneous


async def test_a_refused_command_is_reported_failed_with_its_reason(
    fleet: list[Site], stack: Settings
) -> None:
    s = stack
    battery = next(d for site in fleet for d in site.devices if isinstance(d, Battery))
    battery.failure_rate = 1.0
    charge = dispatch(battery.device_id, "charge", {"power_kw": 2})
    await send(s, charge)
    found = await results(s, {charge.id}, want={charge.id})
    _, result = found[charge.id]
    assert result.status == "failed"
    assert result.reason in Battery.FAILURE_REASONS
    assert battery.setpoint_kw is None
