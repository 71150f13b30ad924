"""`microgrid rebuild`: a read model rebuilt from its topic while the platform writes, swapped in,
and compared with the tables it replaced.

These tests run in a world of their own (a database, a topic namespace, and a gateway,
validator and projector of their own): a rebuild replaces whole tables, so it must not meet the
rows other tests write straight into the session's database."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from contracts import Topics
from contracts.alerting import AlertEvent
from contracts.control import CommandRequested, ControlEvent
from runtime.db import migrate
from runtime.kafka import delete_topics, ensure_topics, topic_specs
from runtime.kafka_access import ensure_access, remove_access
from runtime.keys import create_key
from runtime.settings import PROJECT_ROOT, Settings
from tests.conftest import Components, free_port, wait_for
from tests.support import drop_database, new_device

TELEMETRY_TABLES = [
    "telemetry_readings",
    "devices",
    "device_latest",
    "telemetry_rollup_1m",
    "telemetry_rollup_1h",
]


class World:
    def __init__(self, components: Components, env: dict[str, str]) -> None:
        self.components = components
        self.s = components.s
        self.env = env

    def cli(
        self, *args: str, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "microgrid.cli", *args],
            capture_output=True,
            text=True,
            cwd=PROJECT_ROOT,
            env={**os.environ, **self.env, **(env or {})},
            timeout=timeout,
        )

    def rebuild(self, *args: str, **env: str) -> tuple[int, dict[str, Any]]:
        done = self.cli("rebuild", *args, "--json", env=env)
        assert done.returncode in (0, 2), done.stderr
        return done.returncode, json.loads(done.stdout)

    def db(self) -> psycopg.Connection:
        return psycopg.connect(self.s.database_url, autocommit=True)

    def post(self, key: str, readings: list[dict[str, Any]]) -> int:
        r = httpx.post(
            f"http://127.0.0.1:{self.s.gateway_port}/api/v1/telemetry/batch",
            json={"readings": readings},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        return r.status_code


@pytest.fixture(scope="module")
def world(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    name = f"{urlsplit(stack.database_url).path.lstrip('/')}_rebuild"
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(stack.database_url)._replace(path=f"/{name}"))
    env = {
        "DATABASE_URL": url,
        "KAFKA_NAMESPACE": f"rebuild-{uuid.uuid4().hex[:8]}.",
        "GATEWAY_PORT": str(free_port()),
        "VALIDATOR_METRICS_PORT": str(free_port()),
        "PROJECTOR_METRICS_PORT": str(free_port()),
    }
    s = Settings(
        database_url=url,
        kafka_namespace=env["KAFKA_NAMESPACE"],
        gateway_port=int(env["GATEWAY_PORT"]),
    )
    migrate(s)
    asyncio.run(ensure_topics(s))
    ensure_access(s)
    components = Components(s, tmp_path_factory.mktemp("rebuild-logs"))
    try:
        for component in ("validator", "projector", "gateway"):
            components.start(component, f"rebuild-{component}", **env)
        yield World(components, env)
    finally:
        components.stop_all()
        asyncio.run(delete_topics(s, [t.name for t in topic_specs(s)]))
        remove_access(s)
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            drop_database(conn, name)


def readings(device: str, site: str, start: datetime, n: int, step_s: float = 1.0) -> list[Any]:
    return [
        {
            "device_id": device,
            "site_id": site,
            "device_type": "battery",
            "ts": (start + timedelta(seconds=i * step_s)).isoformat(),
            "seq": i,
            "soc_pct": round(random.uniform(20, 80), 3),
            "power_kw": round(random.uniform(-5, 5), 4),
            "voltage_v": round(random.uniform(225, 235), 3),
        }
        for i in range(n)
    ]


def stored(db: psycopg.Connection, devices: list[str]) -> int:
    row = db.execute(
        "SELECT count(*) FROM telemetry_readings WHERE device_id = ANY(%s)", (devices,)
    ).fetchone()
    return int(row[0]) if row else 0


def shape(db: psycopg.Connection) -> list[Any]:
    """The live tables' indexes (names and definitions), constraints and storage options."""
    return db.execute(
        "SELECT c.relname, c.reloptions, pg_get_partkeydef(c.oid),"
        " (SELECT array_agg(pg_get_indexdef(i.indexrelid) ORDER BY 1) FROM pg_index i"
        "  WHERE i.indrelid = c.oid),"
        " (SELECT array_agg(conname || ' ' || pg_get_constraintdef(k.oid) ORDER BY 1)"
        "  FROM pg_constraint k WHERE k.conrelid = c.oid)"
        " FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace"
        " AND c.relname = ANY(%s) ORDER BY 1",
        (TELEMETRY_TABLES,),
    ).fetchall()


def no_differences(report: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """The tables that differ, with (only in rebuilt, only in old); empty when none do."""
    return {
        d["table"]: (d["only_in_rebuilt"], d["only_in_old"])
        for d in report["differences"]
        if d["only_in_rebuilt"] or d["only_in_old"]
    }


class Load:
    """Readings sent without pause from a thread, each batch until it is answered 202."""

    def __init__(self, world: World, key: str, site: str) -> None:
        self.world, self.key, self.site = world, key, site
        self.devices = [new_device() for _ in range(4)]
        self.sent = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        seq = 0
        while not self.stopping.is_set():
            now = datetime.now(UTC)
            batch = [
                r
                for d in self.devices
                for r in readings(d, self.site, now - timedelta(seconds=2), 1)
            ]
            for r in batch:
                r["ts"] = (now - timedelta(seconds=2, microseconds=seq)).isoformat()
            seq += 1
            if self.world.post(self.key, batch) == 202:
                self.sent += len(batch)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


def test_a_telemetry_rebuild_under_live_load_ends_identical_and_the_projection_goes_on(
    world: World,
) -> None:
    site = f"site-{uuid.uuid4().hex[:8]}"
    with world.db() as db:
        key = create_key(db, site)
        devices = [new_device() for _ in range(5)]
        start = datetime.now(UTC) - timedelta(hours=2)
        first = {d: readings(d, site, start, 400, step_s=10) for d in devices}
        for device in devices:
            assert world.post(key, first[device]) == 202
        # a retry, a conflicting duplicate (dead-lettered live: the rebuild refuses it too) and
        # a late reading (older than the device's newest)
        again = first[devices[0]][0]
        assert world.post(key, [again]) == 202
        assert world.post(key, [{**again, "soc_pct": 99.0}]) == 202
        assert world.post(key, readings(devices[1], site, start - timedelta(minutes=30), 1)) == 202
        wait_for(lambda: stored(db, devices) == 5 * 400 + 1, 60, "the readings to be stored")

        before = shape(db)
        with Load(world, key, site) as load:
            wait_for(lambda: load.sent >= 200, 30, "live load")
            code, report = world.rebuild("telemetry")
            swapped_at = load.sent
            wait_for(lambda: load.sent >= swapped_at + 40, 30, "readings accepted after the swap")
        assert code == 0, report
        assert report["swapped"] is True
        assert no_differences(report) == {}, report["differences"]
        assert report["rows"]["telemetry_readings"] >= 5 * 400 + 1
        assert report["refused"] == 1  # the conflicting duplicate, as live
        assert shape(db) == before  # the same indexes, constraints, partitioning, fillfactor
        backup = report["backup_schema"]
        assert backup and db.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s)",
            (backup, TELEMETRY_TABLES),
        ).fetchone() == (len(TELEMETRY_TABLES),)

        # the live projection writes on, into the rebuilt tables: every reading answered 202
        # is stored once, and the rollups count each once
        marker = new_device()
        assert world.post(key, readings(marker, site, datetime.now(UTC), 1)) == 202
        wait_for(lambda: stored(db, [marker]) == 1, 60, "the marker in the rebuilt table")
        assert stored(db, load.devices) == load.sent
        rows = db.execute(
            "SELECT (SELECT count(*) FROM telemetry_readings WHERE device_id = ANY(%(d)s)),"
            " (SELECT sum(count) FROM telemetry_rollup_1m WHERE device_id = ANY(%(d)s)),"
            " (SELECT sum(count) FROM telemetry_rollup_1h WHERE device_id = ANY(%(d)s))",
            {"d": [*devices, *load.devices]},
        ).fetchone()
        assert rows is not None and rows[0] == rows[1] == rows[2], rows

        # what the live tables lost, a rebuild restores: first compared only, then swapped
        lost = db.execute(
            "DELETE FROM telemetry_readings WHERE device_id = %s AND ts < %s",
            (devices[2], start + timedelta(seconds=100)),
        ).rowcount
        assert lost == 10
        code, report = world.rebuild("telemetry", "--compare-only")
        assert code == 2 and report["swapped"] is False
        assert no_differences(report) == {"telemetry_readings": (10, 0)}
        assert stored(db, [devices[2]]) == 390  # the live table is unchanged
        code, report = world.rebuild("telemetry", "--drop-old")
        assert code == 0 and no_differences(report) == {"telemetry_readings": (10, 0)}
        assert stored(db, [devices[2]]) == 400
        assert report["backup_schema"] is None
        assert db.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rebuild\\_new\\_%%'"
        ).fetchone() == (0,)


async def _produce(s: Settings, topic: str, records: list[tuple[str, Any]]) -> None:
    producer = AIOKafkaProducer(**s.kafka_client, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(
                s.topic(topic), msgspec.json.encode(value), key=key.encode()
            )
    finally:
        await producer.stop()


def test_alerts_and_control_rebuild_to_the_same_rows_and_rollups_alone(world: World) -> None:
    s = world.s
    site, device = f"site-{uuid.uuid4().hex[:8]}", new_device()
    now = datetime.now(UTC).replace(microsecond=0)
    events: list[tuple[str, Any]] = []
    for i in range(20):
        common: dict[str, Any] = {
            "alert_id": f"alert-{uuid.uuid4()}",
            "rule_id": str(uuid.uuid4()),
            "rule_name": "soc low",
            "device_id": device,
            "site_id": site,
            "severity": "major",
        }
        at = now - timedelta(minutes=60 - i)
        events.append((device, AlertEvent(kind="opened", at=at, value=5.0, **common)))
        if i % 2:
            events.append((device, AlertEvent(kind="acknowledged", at=at, by="ops", **common)))
        if i % 3:
            events.append(
                (device, AlertEvent(kind="cleared", at=at + timedelta(seconds=30), **common))
            )
    commands: list[tuple[str, Any]] = []
    for i in range(10):
        cid = str(uuid.uuid4())
        at = now - timedelta(minutes=30 - i)
        request = CommandRequested(
            id=cid,
            device_id=device,
            command="set_power_limit",
            params={"kw": i},
            requested_at=at,
            deadline=at + timedelta(seconds=60),
            requested_by="ops",
            site_id=site,
        )
        ids: dict[str, Any] = {"command_id": cid, "device_id": device}
        commands.append((device, ControlEvent(**ids, status="queued", at=at, request=request)))
        commands.append((device, ControlEvent(**ids, status="processing", at=at)))
        if i % 2:
            commands.append((device, ControlEvent(**ids, status="succeeded", at=at)))
    asyncio.run(_produce(s, Topics.ALERTS, events))
    asyncio.run(_produce(s, Topics.CONTROL_EVENTS, commands))
    with world.db() as db:
        wait_for(
            lambda: (
                db.execute(
                    "SELECT (SELECT count(*) FROM alerts WHERE device_id = %(d)s),"
                    " (SELECT count(*) FROM control_commands WHERE device_id = %(d)s"
                    "  AND status <> 'queued')",
                    {"d": device},
                ).fetchone()
                == (20, 10)
            ),
            60,
            "the events to be projected",
        )
        db.execute(
            "DELETE FROM notifications WHERE device_id = %s AND id LIKE '%%:cleared'", (device,)
        )
        code, report = world.rebuild("alerts")
        assert code == 0 and report["rows"]["alerts"] == 20
        assert no_differences(report) == {"notifications": (13, 0)}, report["differences"]
        code, report = world.rebuild("control", "--compare-only")
        assert code == 0 and report["rows"] == {"control_commands": 10}
        assert no_differences(report) == {}
        code, report = world.rebuild("rollups")
        assert code == 0 and no_differences(report) == {}
        assert [d["table"] for d in report["differences"]] == [
            "telemetry_rollup_1m",
            "telemetry_rollup_1h",
        ]


def test_bad_arguments_are_refused_clearly(world: World) -> None:
    done = world.cli("rebuild", "readings")
    assert done.returncode == 1
    assert "no read model 'readings'" in done.stderr
    assert "telemetry, rollups, alerts, control" in done.stderr
    unreachable = {**world.env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    done = subprocess.run(
        [sys.executable, "-m", "microgrid.cli", "rebuild", "alerts"],
        capture_output=True,
        text=True,
        cwd=Path(PROJECT_ROOT),
        env={**os.environ, **unreachable},
        timeout=60,
    )
    assert done.returncode == 1 and "cannot reach PostgreSQL" in done.stderr


async def _forget(s: Settings, topic: str) -> None:
    """Delete every record of the topic so far, as retention would once they were old."""
    tps = [TopicPartition(s.topic(topic), p) for p in range(s.device_topic_partitions)]
    consumer = AIOKafkaConsumer(**s.kafka_client)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(**s.kafka_client)
    await admin.start()
    try:
        await admin.delete_records(
            {tp: RecordsToDelete(before_offset=end) for tp, end in ends.items() if end > 0}
        )
    finally:
        await admin.close()


def test_what_the_log_no_longer_holds_is_carried_over(world: World) -> None:
    """Runs last in this module: the log it leaves has lost its older records."""
    site = f"site-{uuid.uuid4().hex[:8]}"
    old, new = new_device(), new_device()
    with world.db() as db:
        key = create_key(db, site)
        start = datetime.now(UTC) - timedelta(hours=2)
        assert world.post(key, readings(old, site, start, 100, step_s=10)) == 202
        wait_for(lambda: stored(db, [old]) == 100, 60, "the first readings")
        asyncio.run(_forget(world.s, Topics.TELEMETRY_VALID))
        assert world.post(key, readings(new, site, start + timedelta(hours=1), 50)) == 202
        wait_for(lambda: stored(db, [new]) == 50, 60, "the readings after the loss")
        # a log said to keep an hour: every reading is older than the cutoff, so every row is
        # carried over, and the log's readings (which the rows hold) are skipped
        code, report = world.rebuild("telemetry", "--drop-old", TELEMETRY_RETENTION_HOURS="1")
        assert code == 0, report
        assert report["cutoff"] is not None
        assert no_differences(report) == {}, report["differences"]
        assert report["carried"]["telemetry_readings"] == report["rows"]["telemetry_readings"]
        assert report["skipped_before_cutoff"] == 50
        assert stored(db, [old, new]) == 150
