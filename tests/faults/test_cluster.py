"""A broker of the three-broker cluster (`microgrid stack up --brokers 3`) killed with SIGKILL
under load and started again: nothing acknowledged is lost, writes and processing go on with
two brokers of three (min.insync.replicas=2), and the returning broker catches up.

The cluster is this test's own, in a temporary STACK_DIR on free ports, so the shared stack
stays as it is; PostgreSQL and Redis are the shared ones (a database and a namespace of its
own)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis
from confluent_kafka.admin import ConfigResource

from contracts import Topics
from microgrid.stack import KafkaCluster, under_replicated_partitions
from runtime.db import migrate
from runtime.kafka import topic_specs
from runtime.kafka_access import admin_client
from runtime.keys import create_key
from runtime.settings import PROJECT_ROOT, Settings
from tests.conftest import Components, free_port, wait_for
from tests.faults import table
from tests.support import drop_database, new_device, reading, retrying_post

SCENARIO = "broker kill -9 (3-node cluster)"
VICTIM = 1  # the broker on the configured port, the one clients bootstrap from first


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_ports() -> tuple[int, int, int]:
    """Client, controller and TLS ports of node 1 whose +100 and +200 (nodes 2 and 3) are free
    too; below the ephemeral range, so no outgoing connection takes one meanwhile."""
    for _ in range(200):
        base = random.randrange(20_000, 32_000)
        if all(port_free(base + offset + step) for offset in (0, 1, 2) for step in (0, 100, 200)):
            return base, base + 1, base + 2
    raise AssertionError("no free ports for the cluster")


@dataclass
class Cluster:
    cluster: KafkaCluster
    settings: Settings  # the test's clients: every broker, replication 3, its own namespace
    env: dict[str, str]  # the same for the components' processes
    db: psycopg.Connection
    components: Components


@pytest.fixture()
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A three-broker cluster of its own (`stack up --brokers 3`, which creates the platform's
    topics in a fresh namespace), a database of its own, and a validator, a projector and a
    gateway on them; all stopped and removed at the end, whatever happened."""
    client, controller, tls = cluster_ports()
    namespace = f"cluster-{uuid.uuid4().hex[:8]}."
    base = Settings()
    test_db = f"microgrid_cluster_{uuid.uuid4().hex[:8]}"
    env = {
        "STACK_DIR": str(tmp_path / "stack"),
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{client}",
        "KAFKA_CONTROLLER_PORT": str(controller),
        "KAFKA_TLS_PORT": str(tls),
        "KAFKA_HEAP": "512m",
        "KAFKA_NAMESPACE": namespace,
        "DEVICE_TOPIC_PARTITIONS": "4",
        "DATABASE_URL": urlunsplit(urlsplit(base.database_url)._replace(path=f"/{test_db}")),
        "ENVIRONMENT": "test",
    }
    settings = Settings(**{name.lower(): value for name, value in env.items()})  # type: ignore[arg-type]
    kafka = KafkaCluster(settings)
    admin_conn = psycopg.connect(base.database_url, autocommit=True)
    components = Components(settings, tmp_path)
    db: psycopg.Connection | None = None
    up: subprocess.Popen[str] | None = None
    try:
        up = subprocess.Popen(
            [sys.executable, "-m", "microgrid.cli", "stack", "up", "--brokers", "3"],
            env={**os.environ, **env},
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        admin_conn.execute(f'CREATE DATABASE "{test_db}"')  # meanwhile
        migrate(settings)
        out, _ = up.communicate(timeout=180)
        assert up.returncode == 0, out
        # what clients learn (where the environment does not say otherwise): every broker, and
        # topics with a copy on each
        monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
        monkeypatch.delenv("TOPIC_REPLICATION_FACTOR", raising=False)
        clients = Settings(stack_dir=settings.stack_dir)
        assert clients.kafka_bootstrap_servers == kafka.bootstrap_servers
        assert clients.topic_replication_factor == 3
        env.update(
            {
                "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "TOPIC_REPLICATION_FACTOR": "3",
                "GATEWAY_PORT": str(free_port()),
                "GATEWAY_WORKERS": "1",
                "VALIDATOR_METRICS_PORT": str(free_port()),
                "PROJECTOR_METRICS_PORT": str(free_port()),
            }
        )
        settings = kafka.client_settings().model_copy(
            update={"gateway_port": int(env["GATEWAY_PORT"])}
        )
        components.s = settings
        db = psycopg.connect(settings.database_url, autocommit=True)
        for name in ("validator", "projector", "gateway"):
            components.start(name, **env)
        yield Cluster(kafka, settings, env, db, components)
    finally:
        if up is not None and up.poll() is None:
            up.kill()
            up.wait()
        components.stop_all()
        for node in kafka.running():  # its data goes with the temporary directory
            kafka.kill(node.node_id)
        if db is not None:
            db.close()
        drop_database(admin_conn, test_db)
        admin_conn.close()
        with contextlib.suppress(redis.RedisError):
            r = redis.Redis.from_url(settings.redis_url)
            for key in r.scan_iter(f"{namespace}*"):
                r.delete(key)
            r.close()


@dataclass
class Load:
    """Batches of readings for a few devices, each device's one after another, each retried
    until answered 202 (429, 503 and connection errors, as the README tells clients)."""

    url: str
    key: str
    site: str
    devices: list[str] = field(default_factory=lambda: [new_device() for _ in range(8)])
    accepted: list[tuple[str, int]] = field(default_factory=list)  # (device, seq), in order
    sent: int = 0
    retries: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        try:
            asyncio.run(self._all())
        except BaseException as exc:  # shown by the test, not lost in the thread
            self.error = exc

    async def _all(self) -> None:
        async with httpx.AsyncClient(timeout=15) as client:
            await asyncio.gather(*(self._device(client, d) for d in self.devices))

    async def _device(self, client: httpx.AsyncClient, device: str) -> None:
        seq = 0
        while not self.stopping.is_set():
            batch = [reading(device, self.site, seq + i) for i in range(10)]
            self.sent += len(batch)
            await retrying_post(client, self.url, self.key, {"readings": batch}, 90, self._retried)
            self.accepted.extend((device, seq + i) for i in range(10))
            seq += 10
            await asyncio.sleep(0.02)

    def _retried(self) -> None:
        self.retries += 1

    def latest(self) -> dict[str, int]:
        """Each device's highest seq answered 202 so far."""
        out: dict[str, int] = {}
        for device, seq in list(self.accepted):
            out[device] = max(out.get(device, -1), seq)
        return out


def stored_max_seq(db: psycopg.Connection, devices: list[str]) -> dict[str, int]:
    rows = db.execute(
        "SELECT device_id, max(seq) FROM telemetry_readings WHERE device_id = ANY(%s)"
        " GROUP BY device_id",
        (devices,),
    )
    return {device: int(seq) for device, seq in rows}


def pg_now(db: psycopg.Connection) -> datetime:
    row = db.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]


def test_a_broker_killed_under_load_loses_nothing_and_catches_up(cluster: Cluster) -> None:
    c, db = cluster, cluster.db
    started = time.monotonic()
    topics = [spec.name for spec in topic_specs(c.settings)]
    admin = admin_client(c.settings)  # held: its futures fail once it is collected
    metadata = admin.list_topics(timeout=10)
    assert {
        (name, len(p.replicas))
        for name in topics
        for p in metadata.topics[name].partitions.values()
    } == {(name, 3) for name in topics}, "every partition has a replica on each broker"
    raw = ConfigResource("TOPIC", c.settings.topic(Topics.TELEMETRY_RAW))
    configs = admin.describe_configs([raw])[raw].result(timeout=10)
    assert configs["min.insync.replicas"].value == "2"

    site = f"site-{uuid.uuid4().hex[:8]}"
    load = Load(f"{c.components.gateway_url}/api/v1/telemetry/batch", create_key(db, site), site)
    thread = load.start()
    outage: dict[str, Any] = {}
    try:
        wait_for(lambda: len(load.accepted) >= 300, 60, "load before the kill")
        wait_for(
            lambda: stored_max_seq(db, load.devices),
            60,
            f"readings stored before the kill (the components' logs: {c.components.log_dir})",
        )

        at_kill = pg_now(db)
        c.cluster.kill(VICTIM)
        # the controllers fence the dead broker (broker.session.timeout.ms, 9 s) and move the
        # leadership of its partitions to the in-sync replicas left
        wait_for(lambda: under_replicated_partitions(c.settings) > 0, 60, "the broker fenced")
        fenced = load.latest()

        def every_device_written_after_fencing() -> bool:
            stored = stored_max_seq(db, load.devices)
            return all(stored.get(d, -1) > seq for d, seq in fenced.items())

        wait_for(
            every_device_written_after_fencing,
            60,
            "a reading of every device (every partition) accepted and stored after the fencing",
        )
        outage["under_replicated"] = under_replicated_partitions(c.settings)
        assert outage["under_replicated"] > 0
        restart = pg_now(db)
        outage["stored"] = db.execute(
            "SELECT count(*) FROM telemetry_readings WHERE device_id = ANY(%s)"
            " AND ingested_at > %s AND ingested_at < %s",
            (load.devices, at_kill, restart),
        ).fetchone()[0]  # type: ignore[index]

        c.cluster.start(VICTIM)
        back = pg_now(db)
        back_t = time.monotonic()
        wait_for(
            lambda: under_replicated_partitions(c.settings) == 0,
            90,
            "the returning broker to catch up (under-replicated partitions back to 0)",
        )
        outage["catch_up_s"] = time.monotonic() - back_t
        first_after = wait_for(
            lambda: db.execute(
                "SELECT min(ingested_at) FROM telemetry_readings WHERE device_id = ANY(%s)"
                " AND ingested_at >= %s",
                (load.devices, back),
            ).fetchone()[0],  # type: ignore[index]
            60,
            "a reading stored after the broker returned",
        )
        outage["recovery_s"] = max(0.0, (first_after - back).total_seconds())
        target = len(load.accepted) + 300
        wait_for(lambda: len(load.accepted) >= target, 60, "load after the broker returned")
    finally:
        load.stopping.set()
        thread.join(timeout=120)
    assert load.error is None, repr(load.error)

    accepted = set(load.accepted)
    assert len(accepted) == len(load.accepted)

    def stored() -> tuple[int, int]:
        row = db.execute(
            "SELECT count(*), count(DISTINCT (device_id, seq)) FROM telemetry_readings"
            " WHERE device_id = ANY(%s)",
            (load.devices,),
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    with contextlib.suppress(AssertionError):
        wait_for(lambda: stored()[1] >= len(accepted), 60, "every accepted reading stored")
    rows, distinct = stored()
    found = {
        (device, int(seq))
        for device, seq in db.execute(
            "SELECT device_id, seq FROM telemetry_readings WHERE device_id = ANY(%s)",
            (load.devices,),
        )
    }
    lost = len(accepted - found)
    table.record(
        table.Row(
            SCENARIO,
            sent=load.sent,
            accepted=len(accepted),
            stored=len(accepted & found),
            duplicates=rows - distinct,
            lost=lost,
            recovery_s=outage.get("recovery_s"),
            note=(
                f"{outage.get('stored')} stored while down, caught up in"
                f" {outage.get('catch_up_s', float('nan')):.1f} s, {load.retries} retries,"
                f" {time.monotonic() - started:.0f} s"
            ),
        )
    )
    assert lost == 0, f"{lost} readings answered 202 are not stored"
    assert rows == distinct == len(found), "a reading stored twice"
    assert found == accepted, "stored readings nobody was answered 202 for"
    assert outage["stored"] > 0, "nothing was stored while the broker was down"
    assert under_replicated_partitions(c.settings) == 0
