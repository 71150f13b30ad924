"""Outages stay local: with Redis away the projections keep writing PostgreSQL, the live stream
answers 503 and catches up once Redis returns (a client resuming with Last-Event-ID gets the
alert events of the outage, and the latest values held go to their lossy stream); after a
PostgreSQL restart the next request succeeds; while PostgreSQL is away the gateway trusts a key
no longer than its cache time. Private Redis and PostgreSQL instances (tests/outages.py) and a
Kafka namespace of their own keep the shared stack untouched."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from redis import Redis

from contracts import Streams, Topics
from contracts.alerting import AlertEvent
from runtime.db import migrate
from runtime.kafka import delete_topics, ensure_topics, topic_specs
from runtime.kafka_access import ensure_access, remove_access
from runtime.keys import create_key
from runtime.settings import Settings
from tests.conftest import RUN_ID, Components, free_port, wait_for
from tests.e2e.test_reading_identity import RetryingLoad, identity_rows
from tests.outages import PrivatePostgres, PrivateRedis
from tests.sse import SSEClient
from tests.support import new_device, reading

OUTAGE_S = 30


@pytest.fixture(scope="module")
def namespace(stack: Settings) -> Iterator[Settings]:
    """Topics of their own, so these components share no consumer group with the platform's."""
    s = stack.model_copy(update={"kafka_namespace": f"test-{RUN_ID}-outages."})
    asyncio.run(ensure_topics(s))
    ensure_access(s)  # the components' ACLs in this namespace
    yield s
    asyncio.run(delete_topics(s, [t.name for t in topic_specs(s)]))
    remove_access(s)


@pytest.fixture(scope="module")
def redis() -> Iterator[PrivateRedis]:
    r = PrivateRedis()
    r.up()
    yield r
    r.remove()


def env_for(s: Settings, redis: PrivateRedis, **more: str) -> dict[str, str]:
    return {
        "KAFKA_NAMESPACE": s.kafka_namespace,
        "REDIS_URL": redis.url,
        "GATEWAY_PORT": str(free_port()),
        "API_PORT": str(free_port()),
        "VALIDATOR_METRICS_PORT": str(free_port()),
        "PROJECTOR_METRICS_PORT": str(free_port()),
        **more,
    }


def plant_alert(s: Settings, device: str, site: str) -> str:
    """An alert opening on the device, as the alerter would announce it on `alerts` (the
    projector stores it and announces alert.opened and notification.created): its id."""
    alert_id = f"planted-{uuid.uuid4().hex}"
    event = AlertEvent(
        alert_id=alert_id,
        kind="opened",
        rule_id=str(uuid.uuid4()),
        rule_name="planted",
        device_id=device,
        site_id=site,
        severity="major",
        at=datetime.now(UTC),
        value=1.0,
        message="planted by the outage test",
    )

    async def produce() -> None:
        producer = AIOKafkaProducer(**s.kafka_client, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(
                s.topic(Topics.ALERTS), msgspec.json.encode(event), key=device.encode()
            )
        finally:
            await producer.stop()

    asyncio.run(produce())
    return alert_id


def login(api: str, s: Settings) -> httpx.Response:
    body = {"username": s.auth_admin_username, "password": s.auth_admin_password}
    return httpx.post(f"{api}/api/v1/auth/login", json=body, timeout=20)


def test_redis_away_for_30_s_under_load(
    namespace: Settings,
    redis: PrivateRedis,
    db: psycopg.Connection,
    site: str,
    device_key: str,
    tmp_path: Path,
) -> None:
    env = env_for(namespace, redis)
    api = f"http://127.0.0.1:{env['API_PORT']}"
    ingest = f"http://127.0.0.1:{env['GATEWAY_PORT']}/api/v1/telemetry/batch"
    parts = Components(namespace, tmp_path)
    try:
        for name in ("validator", "projector", "gateway", "api"):
            parts.start(name, **env)
        token = login(api, namespace).json()["access_token"]
        with RetryingLoad(ingest, device_key, site) as load:
            wait_for(lambda: identity_rows(db, load.devices)[0] >= 500, 60, what="load under way")
            live = SSEClient(f"{api}/api/v1/stream", token)
            before = plant_alert(namespace, load.devices[0], site)
            wait_for(lambda: live.of("notification.created", alert_id=before), 30, "an alert")
            wait_for(lambda: live.of("device.latest"), 30, what="a live device.latest")
            live.close()
            resume_from = live.events[-1].id  # what a browser would send

            redis.down()
            outage_began, before_outage = load.stamp, load.sent
            gone = time.monotonic()
            r = httpx.get(f"{api}/api/v1/stream", params={"access_token": token}, timeout=10)
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert int(r.headers["retry-after"]) >= 1
            assert login(api, namespace).status_code == 200  # throttle kept in the process
            # the projections keep writing while Redis is away
            during = plant_alert(namespace, load.devices[1], site)
            wait_for(
                lambda: identity_rows(db, load.devices)[0] >= before_outage + 1000,
                60,
                what="readings stored during the outage",
            )
            wait_for(
                lambda: db.execute("SELECT 1 FROM alerts WHERE id = %s", (during,)).fetchone(),
                60,
                what="the outage's alert stored",
            )
            wait_for(lambda: time.monotonic() - gone >= OUTAGE_S, OUTAGE_S + 5, what="30 s")
        # every reading answered 202 is stored, Redis still down
        wait_for(lambda: identity_rows(db, load.devices)[0] >= load.sent, 60, what="every reading")
        assert identity_rows(db, load.devices) == (load.sent, load.sent)
        assert parts.procs["projector"].poll() is None, "the projector exited"
        outage_ended = load.stamp

        redis.up()
        back = time.monotonic()
        resumed = SSEClient(f"{api}/api/v1/stream", token, last_event_id=resume_from)
        assert resumed.status == 200
        wait_for(lambda: resumed.of("alert.opened", id=during), 30, what="the outage's alert")
        wait_for(
            lambda: resumed.of("notification.created", alert_id=during), 30, "its notification"
        )
        caught_up = time.monotonic() - back
        resumed.close()
        assert not resumed.of("alert.opened", id=before), "resumed before its place"
        assert not resumed.of("error"), "the resume lost its place"

        # the latest values held through the outage went to their own (lossy) stream
        latest_key = namespace.topic(Streams.LATEST)
        stored = Redis.from_url(redis.url)

        def from_outage() -> set[str]:
            found: Any = stored.xrange(latest_key)
            data = [json.loads(fields[b"data"]) for _, fields in found]
            return {
                d["device_id"]
                for d in data
                if outage_began < datetime.fromisoformat(d["ts"]) <= outage_ended
            }

        wait_for(lambda: from_outage() == set(load.devices), 30, what="the outage's latest values")
        found: Any = stored.xrange(namespace.topic(Streams.EVENTS))
        assert {fields[b"event"] for _, fields in found}.isdisjoint({b"device.latest"})
        stored.close()
        log = (tmp_path / "projector.log").read_text(errors="replace")
        held = re.findall(r"Redis back: (\d+) held live events published in ([\d.]+) s", log)
        assert held, "the projector did not publish what it held"
        print(f"\nlive stream caught up {caught_up:.2f} s after Redis returned; projector: {held}")
    finally:
        parts.stop_all()


def test_the_first_request_after_a_postgres_restart_succeeds(
    namespace: Settings, redis: PrivateRedis, tmp_path: Path
) -> None:
    pg = PrivatePostgres()
    parts = Components(namespace, tmp_path)
    try:
        pg.up()
        migrate(namespace.model_copy(update={"database_url": pg.url}))
        env = env_for(namespace, redis, DATABASE_URL=pg.url)
        api = f"http://127.0.0.1:{env['API_PORT']}"
        parts.start("api", **env)
        assert login(api, namespace).status_code == 200  # the pool holds a connection now

        pg.restart()
        first = login(api, namespace)
        assert first.status_code == 200, first.text

        pg.stop()
        down = login(api, namespace)
        assert down.status_code == 503, down.text
        assert down.headers["content-type"].startswith("application/problem+json")
        assert int(down.headers["retry-after"]) >= 1
        pg.start()
        assert login(api, namespace).status_code == 200
    finally:
        parts.stop_all()
        pg.remove()


def test_while_postgres_is_away_keys_are_trusted_no_longer_than_the_cache_time(
    namespace: Settings, redis: PrivateRedis, tmp_path: Path
) -> None:
    """A flood of 10,000 bogus keys evicts no good key (unknown keys are cached apart, by
    hash): with PostgreSQL stopped after it, the good key is still served from the cache. A
    key is served so only until INGEST_KEY_CACHE_S after PostgreSQL last confirmed it, then
    refused with 503; a key never seen is refused at once, and so is a device whose owner the
    gateway has not cached."""
    cache_s = 10.0
    pg = PrivatePostgres()
    parts = Components(namespace, tmp_path)
    try:
        pg.up()
        migrate(namespace.model_copy(update={"database_url": pg.url}))
        with psycopg.connect(pg.url, autocommit=True) as conn:
            good, other = create_key(conn, "site-pg"), create_key(conn, "site-pg")
        urls = {}
        # `long` keeps keys for 10 minutes (the flood may take a while on a busy machine),
        # `short` for cache_s; one worker each, so every request sees the same cache
        for name, cache in (("long", "600"), ("short", str(cache_s))):
            env = env_for(
                namespace, redis, DATABASE_URL=pg.url, GATEWAY_WORKERS="1", INGEST_KEY_CACHE_S=cache
            )
            urls[name] = f"http://127.0.0.1:{env['GATEWAY_PORT']}/api/v1/telemetry"
            parts.start("gateway", alias=f"gateway-{name}", **env)

        known = new_device()  # its owner is cached by each gateway before PostgreSQL stops

        def send(gateway: str, key: str, device: str = known) -> httpx.Response:
            body, auth = reading(device, "site-pg"), {"Authorization": f"Bearer {key}"}
            return httpx.post(urls[gateway], headers=auth, json=body, timeout=20)

        assert send("long", good).status_code == 202

        async def flood() -> list[int]:
            limit = asyncio.Semaphore(32)
            async with httpx.AsyncClient(timeout=20) as client:

                async def one(i: int) -> int:
                    async with limit:
                        auth = {"Authorization": f"Bearer mgk_bogus{i}"}
                        r = await client.post(urls["long"], headers=auth, content=b"{}")
                        return r.status_code

                return await asyncio.gather(*(one(i) for i in range(10_000)))

        began = time.monotonic()
        assert set(asyncio.run(flood())) == {401}
        flooded = time.monotonic() - began

        assert send("short", good).status_code == 202
        confirmed = time.monotonic()
        pg.stop()
        assert send("long", good).status_code == 202  # still cached after the flood
        assert send("short", good).status_code == 202  # confirmed within the cache time
        assert time.monotonic() - confirmed < cache_s, "too slow to show the cached answer"
        # A device whose owner is not cached cannot be checked either (owners never change
        # while PostgreSQL is away, so a cached one stays true).
        unknown_device = send("long", good, new_device())
        assert unknown_device.status_code == 503, unknown_device.text
        assert unknown_device.json()["title"] == "Device registry unavailable"
        assert unknown_device.json()["outcome"] == "not stored"
        for gateway in ("long", "short"):  # a key never seen cannot be checked
            never_seen = send(gateway, other)
            assert never_seen.status_code == 503, never_seen.text
            assert never_seen.headers["content-type"].startswith("application/problem+json")
            assert never_seen.json()["outcome"] == "not stored"
            assert int(never_seen.headers["retry-after"]) >= 1

        wait_for(lambda: time.monotonic() - confirmed > cache_s + 0.2, cache_s + 5, "cache time")
        stale = send("short", good)
        assert stale.status_code == 503, stale.text
        assert "cannot check the key" in stale.json()["detail"]
        assert stale.json()["outcome"] == "not stored"
        assert int(stale.headers["retry-after"]) >= 1
        pg.start()
        wait_for(lambda: send("short", good).status_code == 202, 30, "the key accepted again")
        wait_for(lambda: send("long", other).status_code == 202, 30, "a new key accepted")
        print(f"\n10,000 bogus keys took {flooded:.1f} s; the good key stayed cached")
    finally:
        parts.stop_all()
        pg.remove()
