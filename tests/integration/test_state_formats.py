"""Records written by earlier releases still restore: the changelogs of the alerter and the
controller, and the rules on `alert-rules`.

`tests/data/*.jsonl` hold records as the code wrote them before the stateful processors shared
one shell and rule kinds became a tagged union (one `{"key", "value"}` per line).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from contracts import Reading
from contracts.alerting import AlertRuleSpec, OfflineRule, RateOfChangeRule, ThresholdRule
from runtime.kafka import delete_topics
from runtime.settings import Settings
from stream_processors.alerter import Alerter
from stream_processors.alerting import DeviceState, evaluate_reading
from stream_processors.keyed_state import StatefulShell
from stream_processors.lifecycle import CommandState

DATA = Path(__file__).resolve().parent.parent / "data"
RULE = msgspec.json.Decoder(AlertRuleSpec)


def written(name: str) -> list[tuple[str, bytes]]:
    lines = (DATA / name).read_text().splitlines()
    return [(r["key"], json.dumps(r["value"]).encode()) for r in map(json.loads, lines)]


def restore(stack: Settings, name: str, state_type: type[Any]) -> StatefulShell[Any]:
    """Write the records of `name` to a new two-partition changelog, then restore it."""
    s = stack.model_copy(update={"kafka_namespace": f"formats-{uuid.uuid4().hex[:8]}."})
    topic = s.topic(name)
    shell: StatefulShell[Any] = StatefulShell(
        s,
        name="format-check",
        group=s.group("format-check"),
        changelog=topic,
        state_type=state_type,
        dead_letters=s.topic("dlq"),
        lag_topic=topic,
        metrics_port=0,
    )

    async def scenario() -> None:
        admin = AIOKafkaAdminClient(**s.kafka_client)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 2, 1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(**s.kafka_client, acks="all")
        await producer.start()
        try:
            for i, (key, value) in enumerate(written(f"{name}.jsonl")):
                await producer.send_and_wait(topic, value, key=key.encode(), partition=i % 2)
        finally:
            await producer.stop()
        try:
            await shell.restore([0, 1])
        finally:
            await delete_topics(s, [topic])

    asyncio.run(scenario())
    return shell


def test_alerter_state_written_before_restores_and_evaluation_goes_on(stack: Settings) -> None:
    shell = restore(stack, "alerter.state", DeviceState)
    battery = shell.state.get("site-001-battery-1")
    silent = shell.state.get("site-002-load-1")
    assert isinstance(battery, DeviceState) and isinstance(silent, DeviceState)
    assert (shell.state.partition_of("site-001-battery-1"), battery.last_offset) == (0, 103)
    assert (shell.state.partition_of("site-002-load-1"), silent.last_offset) == (1, 7)
    hot = battery.rules["r-hot"]
    opened = hot.open_id
    assert opened is not None and hot.rule_name == "Over-temperature"
    assert [v for _, v in battery.rules["r-soc"].samples] == [90.0, 88.0, 80.0, 70.0]
    assert silent.rules["r-off"].open_id is not None

    # The restored state carries on: the open over-temperature alert clears below 70 °C.
    rules = {key: RULE.decode(value) for key, value in written("alert-rules.jsonl")}
    assert battery.last_ts is not None
    cool = Reading(
        device_id="site-001-battery-1",
        site_id="site-001",
        device_type="battery",
        ts=battery.last_ts + timedelta(seconds=10),
        temperature_c=65.0,
    )
    [cleared] = evaluate_reading(rules, cool, battery)
    assert (cleared.kind, cleared.alert_id) == ("cleared", opened)


def test_controller_state_written_before_restores(stack: Settings) -> None:
    shell = restore(stack, "controller.state", CommandState)
    first = shell.state.get("2f0c7a1e-1111-4c2b-9a51-000000000001")
    done = shell.state.get("2f0c7a1e-1111-4c2b-9a51-000000000002")
    assert isinstance(first, CommandState) and isinstance(done, CommandState)
    assert (first.status, first.command, first.params) == (
        "processing",
        "charge",
        {"power_kw": 5.0},
    )
    assert done.status == "succeeded"
    assert done.terminal_at is None  # written before it was recorded: expires from the deadline


def test_rules_written_before_are_read_by_the_alerter(stack: Settings) -> None:
    alerter = Alerter(stack)
    decoded = {
        key: alerter.rule_decoder.decode(value) for key, value in written("alert-rules.jsonl")
    }
    assert {key: type(rule) for key, rule in decoded.items()} == {
        "r-hot": ThresholdRule,
        "r-freq": ThresholdRule,
        "r-soc": RateOfChangeRule,
        "r-off": OfflineRule,
    }
    assert msgspec.to_builtins(decoded["r-freq"]) == {
        "id": "r-freq",
        "kind": "threshold",
        "name": "Frequency",
        "severity": "major",
        "metric": "frequency_hz",
        "op": "outside",
        "low": 49.5,
        "high": 50.5,
        "for_s": 5.0,
        "scope": {},
        "enabled": True,
    }
    soc = decoded["r-soc"]
    assert isinstance(soc, RateOfChangeRule) and soc.scope.device_type == "battery"
