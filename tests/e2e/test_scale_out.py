"""Several members per consumer group on one broker."""

from __future__ import annotations

import os
import signal
import threading
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
import msgspec
import psycopg
from aiokafka.partitioner import murmur2

from contracts import Reading
from contracts.alerting import AlertRuleSpec
from microgrid.backtest import Evaluation
from tests.conftest import Components, free_port, wait_for
from tests.e2e.test_alerts import api, rule
from tests.e2e.test_control import answer, command, fetch_next, register, settled
from tests.support import new_device, stored_count


def partition_of(device: str, partitions: int) -> int:
    """Where the producers put a device's records (Kafka's default partitioner)."""
    return (murmur2(device.encode()) & 0x7FFFFFFF) % partitions


def owns(platform: Components, alias: str) -> bool:
    log = platform.log_dir / f"{alias}.log"
    return "restored state" in log.read_text(errors="replace")


def test_commands_complete_with_controllers_that_do_not_divide_the_partitions(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    """Three controllers share four partitions of commands and of replies: with round-robin
    assignment a member would get the replies of commands another member holds, and those
    commands would fail as never answered. Co-partitioned, each completes."""
    n = platform.s.device_topic_partitions
    extra = ["controller-2", "controller-3"]
    for alias in extra:
        platform.start("controller", alias, CONTROLLER_METRICS_PORT=str(free_port()))
    try:
        for alias in extra:  # the group rebalanced: each new member owns partitions now
            wait_for(partial(owns, platform, alias), 60, f"{alias} to own partitions")
        devices: dict[int, list[str]] = {}
        while len(devices) < n or min(len(d) for d in devices.values()) < 2:
            device = register(platform, db, device_key, site)
            devices.setdefault(partition_of(device, n), []).append(device)
        ids = []
        for group in devices.values():
            for device in group[:2]:
                cid = command(platform, tokens["operator"], device)
                assert fetch_next(platform, device_key, device).json()["id"] == cid
                assert answer(platform, device_key, cid, "succeeded").status_code == 202
                ids.append(cid)
        outcomes = [settled(platform, tokens["viewer"], cid, 30) for cid in ids]
        assert [(o["status"], o.get("reason")) for o in outcomes] == [("succeeded", None)] * len(
            ids
        ), outcomes
    finally:
        for alias in extra:
            platform.stop(alias)


class Load:
    """Readings of a site's devices, a batch after another, each until it is answered 202 (in
    send order, which is log order: each waits for the one before)."""

    def __init__(self, platform: Components, key: str, site: str) -> None:
        self.platform, self.key, self.site = platform, key, site
        self.devices = [new_device() for _ in range(8)]
        self.sent: list[dict[str, Any]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        i = 0
        with httpx.Client(timeout=10) as client:
            while not self.stopping.is_set():
                ts = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
                hot = (i // 25) % 2 == 1  # episodes of 25 batches over 75 °C, then 25 below
                batch = [
                    {
                        "device_id": d,
                        "site_id": self.site,
                        "device_type": "battery",
                        "ts": ts,
                        "seq": i,
                        "temperature_c": 90.0 if hot else 40.0,
                    }
                    for d in self.devices
                ]
                r = client.post(
                    f"{self.platform.gateway_url}/api/v1/telemetry/batch",
                    json={"readings": batch},
                    headers={"Authorization": f"Bearer {self.key}"},
                )
                if r.status_code == 202:
                    self.sent.extend(batch)
                    i += 1

    def more(self, n: int, what: str) -> None:
        """Wait until n more readings were answered 202."""
        target = len(self.sent) + n
        wait_for(lambda: len(self.sent) >= target, 60, what)


def hot_rule(platform: Components, tokens: dict[str, str], site: str) -> tuple[str, dict[str, Any]]:
    """A threshold rule on the site's temperature, once the alerter has it; the rule as the
    API answers it."""
    spec = {
        "kind": "threshold",
        "metric": "temperature_c",
        "op": "gt",
        "threshold": 75,
        "clear_threshold": 70,
        "scope": {"site_id": site},
    }
    rule_id = rule(platform, tokens, **spec)
    alerter_log = platform.log_dir / "alerter.log"
    wait_for(lambda: f"rule {rule_id} (" in alerter_log.read_text(errors="replace"), 30, "rule")
    answered = api(platform, tokens["viewer"], "GET", f"/api/v1/alert-rules/{rule_id}").json()
    return rule_id, dict(answered)


def joined(platform: Components, alias: str, marker: str, seen: int) -> bool:
    log = platform.log_dir / f"{alias}.log"
    return log.exists() and log.read_text(errors="replace").count(marker) > seen


def test_members_joining_and_dying_under_load_lose_repeat_and_miss_nothing(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    """A second validator, alerter and projector join under load, are killed (-9) under load,
    and join again: every reading answered 202 is stored once, and the alerts are exactly those
    the alerter's pure evaluation gives for the readings sent."""
    rule_id, answered = hot_rule(platform, tokens, site)
    members = {
        "validator": ("VALIDATOR_METRICS_PORT", "assigned to partitions: (TopicPartition"),
        "alerter": ("ALERTER_METRICS_PORT", "restored state"),
        "projector": ("PROJECTOR_METRICS_PORT", "assigned partitions"),
    }
    load = Load(platform, device_key, site)
    load.thread.start()
    try:
        load.more(400, "load before the members join")
        for attempt in ("join", "join again"):
            seen = {n: 0 for n in members}
            for name, (port, marker) in members.items():
                alias = f"{name}-2"
                log = platform.log_dir / f"{alias}.log"
                seen[name] = log.read_text(errors="replace").count(marker) if log.exists() else 0
                platform.start(name, alias, **{port: str(free_port())})
            for name, (_, marker) in members.items():
                wait_for(
                    partial(joined, platform, f"{name}-2", marker, seen[name]),
                    60,
                    f"{name}-2 to {attempt} its group",
                )
            load.more(400, f"load after the members {attempt}")
            if attempt == "join":
                for name in members:
                    platform.kill(f"{name}-2")
                load.more(400, "load after the members were killed")
        for name in members:
            platform.stop(f"{name}-2")
        load.more(200, "load after the members left")
    finally:
        load.stopping.set()
        load.thread.join(timeout=30)

    each_reading_once_and_the_alerts_of_the_pure_evaluation(db, load, rule_id, answered, site)


def test_a_member_paused_past_its_session_timeout_writes_nothing_wrong_when_it_resumes(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    """A second alerter and projector are stopped (SIGSTOP) under load until the group has
    given their partitions to the first members, then resumed: whatever they had in hand when
    they stopped, every reading answered 202 is stored once and the alerts are exactly those of
    the pure evaluation."""
    rule_id, answered = hot_rule(platform, tokens, site)
    members = {
        "alerter": ("ALERTER_METRICS_PORT", "restored state"),
        "projector": ("PROJECTOR_METRICS_PORT", "telemetry: assigned partitions"),
    }

    def count(alias: str, marker: str) -> int:
        log = platform.log_dir / f"{alias}.log"
        return log.read_text(errors="replace").count(marker) if log.exists() else 0

    load = Load(platform, device_key, site)
    load.thread.start()
    try:
        load.more(300, "load before the members join")
        for name, (port, marker) in members.items():
            seen = count(f"{name}-2", marker)
            platform.start(name, f"{name}-2", **{port: str(free_port())})
            wait_for(partial(joined, platform, f"{name}-2", marker, seen), 60, f"{name}-2")
        load.more(300, "load with two members each")
        firsts = {name: count(name, marker) for name, (_, marker) in members.items()}
        for name in members:
            os.kill(platform.procs[f"{name}-2"].pid, signal.SIGSTOP)
        try:
            for name, (_, marker) in members.items():  # the first members took over
                wait_for(
                    partial(joined, platform, name, marker, firsts[name]),
                    60,
                    f"{name} to take the paused member's partitions",
                )
            load.more(300, "load while the members are paused")
        finally:
            for name in members:
                os.kill(platform.procs[f"{name}-2"].pid, signal.SIGCONT)
        load.more(600, "load after the members resumed")
        for name in members:
            platform.stop(f"{name}-2")
        load.more(200, "load after the members left")
    finally:
        load.stopping.set()
        load.thread.join(timeout=30)

    each_reading_once_and_the_alerts_of_the_pure_evaluation(db, load, rule_id, answered, site)


def each_reading_once_and_the_alerts_of_the_pure_evaluation(
    db: psycopg.Connection, load: Load, rule_id: str, answered: dict[str, Any], site: str
) -> None:
    """Every reading answered 202 is stored once, and the alerts table holds exactly the
    alerts the alerter's pure evaluation gives for the readings sent, in the order sent."""
    sent = load.sent
    wait_for(
        lambda: stored_count(db, load.devices)[0] >= len(sent),
        120,
        "every reading answered 202 to be stored",
    )
    rows, distinct = stored_count(db, load.devices)
    assert rows == distinct == len(sent)
    rule_spec = msgspec.convert(answered, AlertRuleSpec)
    start = min(datetime.fromisoformat(r["ts"]) for r in sent)
    evaluation = Evaluation(rule_id, rule_spec, start, datetime.now(UTC), site)
    for r in sent:
        evaluation.reading(msgspec.convert(r, Reading))
    expected = {(e.alert_id, e.device_id, e.opened_at, e.cleared_at) for e in evaluation.finish()}
    assert len(expected) >= 2 * len(load.devices)

    def live() -> set[tuple[Any, ...]]:
        rows = db.execute(
            "SELECT id, device_id, opened_at, cleared_at FROM alerts WHERE rule_id = %s",
            (rule_id,),
        ).fetchall()
        return {(i, d, o.astimezone(UTC), c and c.astimezone(UTC)) for i, d, o, c in rows}

    wait_for(lambda: live() == expected, 60, "the alerts of the pure evaluation")
