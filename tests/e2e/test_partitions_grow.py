"""`microgrid kafka grow`: the topics keyed by device raised from 4 to 6 partitions with the
platform stopped, state moved after its keys, and the platform started again at 6.

A world of its own (a database, a topic namespace and every component of its own): the command
changes every topic of a namespace and every group of it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Console

from contracts import Groups, Topics
from contracts.control import ControlEvent
from microgrid.partitions import GrowError, Refused, grow, partition_for
from runtime.db import migrate
from runtime.kafka import delete_topics, device_topic_specs, ensure_topics, read_table, topic_specs
from runtime.kafka_access import ensure_access, remove_access
from runtime.keys import create_key
from runtime.settings import PROJECT_ROOT, Settings
from tests.conftest import Components, free_port, wait_for
from tests.e2e.test_alerts import alerts_of, rule, send
from tests.e2e.test_control import answer, command, fetch_next, settled
from tests.support import drop_database, new_device

BEFORE, AFTER = 4, 6
PORTS = (
    "GATEWAY_PORT",
    "API_PORT",
    "VALIDATOR_METRICS_PORT",
    "PROJECTOR_METRICS_PORT",
    "ALERTER_METRICS_PORT",
    "CONTROLLER_METRICS_PORT",
)


class World:
    def __init__(self, components: Components, env: dict[str, str]) -> None:
        self.components = components
        self.s = components.s
        self.env = env

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "microgrid.cli", *args],
            capture_output=True,
            text=True,
            cwd=PROJECT_ROOT,
            env={**os.environ, **self.env, **env},
            timeout=180,
        )

    def start(self, *names: str, partitions: int = BEFORE) -> None:
        for name in names:
            env = {**self.env, "DEVICE_TOPIC_PARTITIONS": str(partitions)}
            self.components.start(name, f"grow-{name}", **env)

    def stop(self, *names: str) -> None:
        for name in names:
            self.components.stop(f"grow-{name}")

    def log(self, name: str) -> str:
        return (self.components.log_dir / f"grow-{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def world(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    name = f"{urlsplit(stack.database_url).path.lstrip('/')}_grow"
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(stack.database_url)._replace(path=f"/{name}"))
    env = {
        "DATABASE_URL": url,
        "KAFKA_NAMESPACE": f"grow-{uuid.uuid4().hex[:8]}.",
        "DEVICE_TOPIC_PARTITIONS": str(BEFORE),
        **{port: str(free_port()) for port in PORTS},
    }
    s = Settings(
        database_url=url,
        kafka_namespace=env["KAFKA_NAMESPACE"],
        device_topic_partitions=BEFORE,
        gateway_port=int(env["GATEWAY_PORT"]),
        api_port=int(env["API_PORT"]),
    )
    migrate(s)
    asyncio.run(ensure_topics(s))
    ensure_access(s)
    components = Components(s, tmp_path_factory.mktemp("grow-logs"))
    try:
        yield World(components, env)
    finally:
        components.stop_all()
        asyncio.run(delete_topics(s, [t.name for t in topic_specs(s)]))
        remove_access(s)
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            drop_database(conn, name)


def devices_that(moves: str, count: int = 1) -> list[str]:
    """Devices whose partition, from BEFORE to AFTER partitions: "to a new" one, "to an old"
    one (another than before), or "stays"."""
    found: list[str] = []
    while len(found) < count:
        device = new_device()
        before = partition_for(device.encode(), BEFORE)
        after = partition_for(device.encode(), AFTER)
        kind = "stays" if after == before else "to a new" if after >= BEFORE else "to an old"
        if kind == moves:
            found.append(device)
    return found


def alerts_are(db: psycopg.Connection, rule_id: str, device: str, statuses: list[str]) -> bool:
    return [row[1] for row in alerts_of(db, rule_id, device)] == statuses


def tokens(s: Settings) -> dict[str, str]:
    out = {}
    for role in ("admin", "operator", "viewer"):
        r = httpx.post(
            f"http://127.0.0.1:{s.api_port}/api/v1/auth/login",
            json={
                "username": getattr(s, f"auth_{role}_username"),
                "password": getattr(s, f"auth_{role}_password"),
            },
            timeout=10,
        )
        assert r.status_code == 200, r.text
        out[role] = r.json()["access_token"]
    return out


async def _surveyed(s: Settings) -> str | None:
    """Why a grow would be refused now (None: it would not), by the command's own survey."""
    try:
        await grow(s, AFTER, Console(stderr=True, quiet=True), dry_run=True)
    except Refused as exc:
        return str(exc)
    return None


def refused_because(s: Settings, *, members: bool) -> str | None:
    """The reasons a grow is refused, leaving out active members unless `members`."""
    reasons = asyncio.run(_surveyed(s))
    if reasons is None:
        return None
    kept = [r for r in reasons.splitlines() if members or "active member" not in r]
    return "\n".join(kept) or None


async def _partitions(s: Settings) -> dict[str, int]:
    admin = AIOKafkaAdminClient(**s.kafka_client)
    await admin.start()
    try:
        described = await admin.describe_topics([t.name for t in device_topic_specs(s)])
    finally:
        await admin.close()
    return {d["topic"]: len(d["partitions"]) for d in described}


async def _committed(s: Settings, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(**s.kafka_client)
    await admin.start()
    try:
        return {
            tp: meta.offset
            for tp, meta in (await admin.list_consumer_group_offsets(s.group(group))).items()
        }
    finally:
        await admin.close()


async def _table(s: Settings, topic: str) -> dict[tuple[int, bytes], dict[str, Any]]:
    tps = [TopicPartition(s.topic(topic), p) for p in range(AFTER)]
    return {k: json.loads(rec.value or b"") for k, rec in (await read_table(s, tps)).items()}


async def _produce(s: Settings, topic: str, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(**s.kafka_client, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(s.topic(topic), value, key=key)
    finally:
        await producer.stop()


async def _records_in(s: Settings, topic: str) -> int:
    consumer = AIOKafkaConsumer(**s.kafka_client)
    await consumer.start()
    try:
        tps = [TopicPartition(s.topic(topic), p) for p in range(AFTER)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def _events(s: Settings) -> list[ControlEvent]:
    topic = s.topic(Topics.CONTROL_EVENTS)
    consumer = AIOKafkaConsumer(**s.kafka_client, isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(AFTER)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        events: list[ControlEvent] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                events += [msgspec.json.decode(r.value or b"", type=ControlEvent) for r in records]
        return events
    finally:
        await consumer.stop()


def test_grow_refuses_while_unsafe_then_moves_state_and_new_partitions_are_read_from_0(
    world: World,
) -> None:
    s = world.s
    world.start("validator", "projector", "gateway", "api", "alerter", "controller")
    who = tokens(s)
    platform = world.components
    site = f"site-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(s.database_url, autocommit=True) as db:
        key = create_key(db, site)
    rule_id = rule(
        platform,
        who,
        kind="threshold",
        metric="temperature_c",
        op="gt",
        threshold=75,
        clear_threshold=70,
        scope={"site_id": site},
    )
    wait_for(lambda: f"rule {rule_id} (" in world.log("alerter"), 30, "the rule at the alerter")
    [to_new], [to_old], [stays] = (devices_that(m) for m in ("to a new", "to an old", "stays"))
    devices = [to_new, to_old, stays]

    # at 4 partitions: an alert opens for each device, and two commands wait for replies
    start = datetime.now(UTC) - timedelta(seconds=60)
    for device in devices:
        for i in range(4):  # a few records first: the state's offset is past 0
            send(platform, key, device, site, start + timedelta(seconds=i), temperature_c=40)
        send(platform, key, device, site, start + timedelta(seconds=5), temperature_c=90)
    with psycopg.connect(s.database_url, autocommit=True) as db:
        for device in devices:
            wait_for(
                partial(alerts_are, db, rule_id, device, ["active_unacknowledged"]),
                30,
                f"an alert open for {device}",
            )
    commands = {d: command(platform, who["operator"], d, ttl_s=600) for d in (to_new, to_old)}
    for device, cid in commands.items():
        assert fetch_next(platform, key, device).json()["id"] == cid  # taken, not answered
    wait_for(
        lambda: refused_because(s, members=False) is None,
        60,
        "every group to have consumed everything",
    )

    # refused: members active (the stream processors and the projector still run)
    world.stop("gateway", "api", "validator")
    done = world.cli("kafka", "grow", "--partitions", str(AFTER), "--yes")
    assert done.returncode == 1, done.stderr
    for group in (Groups.ALERTER, Groups.CONTROLLER, Groups.TELEMETRY_PROJECTOR):
        assert f"consumer group {group} has 1 active member(s)" in done.stderr, done.stderr
    assert "stop the platform first" in done.stderr
    assert set(asyncio.run(_partitions(s)).values()) == {BEFORE}

    # refused: a record the validator has not read
    world.stop("alerter", "controller", "projector")
    asyncio.run(_produce(s, Topics.TELEMETRY_RAW, stays.encode(), b"not json"))
    done = world.cli("kafka", "grow", "--partitions", str(AFTER), "--yes")
    assert done.returncode == 1, done.stderr
    raw_partition = partition_for(stays.encode(), BEFORE)
    assert (
        f"{Groups.VALIDATOR} has not consumed everything of {Topics.TELEMETRY_RAW} partition"
        f" {raw_partition}"
    ) in done.stderr.replace("\n", " "), done.stderr
    assert "active member" not in done.stderr
    assert set(asyncio.run(_partitions(s)).values()) == {BEFORE}
    world.start("validator")  # it dead-letters the record, which no group reads
    wait_for(lambda: refused_because(s, members=False) is None, 60, "the validator to catch up")
    world.stop("validator")

    # not confirmed: nothing changes
    done = world.cli("kafka", "grow", "--partitions", str(AFTER))
    assert done.returncode == 1 and "not confirmed" in done.stderr, done.stderr
    assert set(asyncio.run(_partitions(s)).values()) == {BEFORE}

    # a dry run says what it would do, and does nothing
    wait_for(lambda: refused_because(s, members=True) is None, 60, "no transaction left open")
    dry = world.cli("kafka", "grow", "--partitions", str(AFTER), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert (planned["dry_run"], planned["changed"]) == (True, False)
    assert planned["plan"][0].startswith(f"raise 12 topics from {BEFORE} to {AFTER} partitions")
    assert set(asyncio.run(_partitions(s)).values()) == {BEFORE}

    # done
    done = world.cli("kafka", "grow", "--partitions", str(AFTER), "--yes", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["dry_run"], report["changed"]) == (False, True)
    assert set(asyncio.run(_partitions(s)).values()) == {AFTER}
    assert len(report["raised"]) == len(device_topic_specs(s)) == 12
    assert report["state"][Topics.ALERTER_STATE]["moved"] == 2  # to_new and to_old
    assert report["state"][Topics.ALERTER_STATE]["live"] == 3
    assert report["state"][Topics.CONTROLLER_STATE] == {"live": 2, "moved": 2, "tombstoned": 2}
    assert report["offsets_zero"][Groups.ALERTER] == AFTER - BEFORE
    assert report["offsets_zero"][Groups.CONTROLLER] == 2 * (AFTER - BEFORE)
    assert report["positions_zero"] == {
        n: AFTER - BEFORE for n in ("telemetry", "alerts", "control")
    }
    assert report["written_meanwhile"] == []
    assert report["setting"] == f"DEVICE_TOPIC_PARTITIONS={AFTER}"

    # the state is where its keys map to now; moved, the alerter's has no offset of its input
    states = asyncio.run(_table(s, Topics.ALERTER_STATE))
    assert {k.decode(): p for p, k in states} == {
        d: partition_for(d.encode(), AFTER) for d in devices
    }
    offsets = {k.decode(): v.get("last_offset", -1) for (_, k), v in states.items()}
    assert offsets[to_new] == offsets[to_old] == -1
    assert offsets[stays] >= 4
    commands_state = asyncio.run(_table(s, Topics.CONTROLLER_STATE))
    assert {k.decode(): p for p, k in commands_state} == {
        cid: partition_for(d.encode(), AFTER) for d, cid in commands.items()
    }
    alerter_offsets = asyncio.run(_committed(s, Groups.ALERTER))
    valid = s.topic(Topics.TELEMETRY_VALID)
    assert [alerter_offsets[TopicPartition(valid, p)] for p in range(BEFORE, AFTER)] == [0, 0]

    # run again: nothing left to do
    again = world.cli("kafka", "grow", "--partitions", str(AFTER), "--yes")
    assert again.returncode == 0, again.stderr
    assert f"have {AFTER} partitions already" in again.stdout

    # a stateful processor still told 4 refuses to start
    refused = subprocess.run(
        [sys.executable, "-m", "microgrid.components", "alerter"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, **world.env, "DEVICE_TOPIC_PARTITIONS": str(BEFORE)},
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"set DEVICE_TOPIC_PARTITIONS={AFTER}" in refused.stderr
    assert "refusing to run the platform" in world.cli("run", "--only", "alerter").stderr

    # at 6: readings and replies reach the new partitions before the alerter and the
    # controller join (the alerter's group would start a partition it never saw at its end)
    world.start("validator", "projector", "gateway", "api", partitions=AFTER)
    later = datetime.now(UTC)
    for device in devices:
        send(platform, key, device, site, later, temperature_c=95)  # open already: no new alert
        send(platform, key, device, site, later + timedelta(seconds=1), temperature_c=40)
    for cid in commands.values():
        assert answer(platform, key, cid, "succeeded").status_code == 202
    with psycopg.connect(s.database_url, autocommit=True) as db:
        wait_for(
            lambda: (
                db.execute(
                    "SELECT count(*) FROM telemetry_readings"
                    " WHERE device_id = ANY(%s) AND ts >= %s",
                    (devices, later),
                ).fetchone()
                == (6,)
            ),
            30,
            "the readings stored",
        )
        world.start("alerter", "controller", partitions=AFTER)
        for device in devices:
            wait_for(
                partial(alerts_are, db, rule_id, device, ["cleared_unacknowledged"]),
                30,
                f"the one alert of {device} cleared",
            )
    for cid in commands.values():
        assert settled(platform, who["viewer"], cid, 30)["status"] == "succeeded"
    events = asyncio.run(_events(s))
    for cid in commands.values():
        finished = [e.status for e in events if e.command_id == cid and e.status == "succeeded"]
        assert finished == ["succeeded"], events
    alerter_offsets = asyncio.run(_committed(s, Groups.ALERTER))
    new = partition_for(to_new.encode(), AFTER)
    assert alerter_offsets[TopicPartition(valid, new)] >= 2  # its readings there, from 0
    assert asyncio.run(_records_in(s, Topics.CONTROL_DLQ)) == 0  # no reply met no command
    world.stop("validator", "projector", "gateway", "api", "alerter", "controller")


def test_grow_of_a_missing_namespace_says_so(stack: Settings) -> None:
    s = stack.model_copy(update={"kafka_namespace": f"nowhere-{uuid.uuid4().hex[:8]}."})
    with pytest.raises(GrowError, match="does not exist"):
        asyncio.run(grow(s, AFTER, Console(stderr=True, quiet=True), dry_run=True))
