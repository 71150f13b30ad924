"""A reading is stored once per identity (device_id, ts), however often it is sent; a reading
that repeats an identity with other values is dead-lettered, and the first stays; answers
other than 202 say what was stored, and a client that retries them stores everything once."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import psycopg
import pytest

from contracts import Headers, Topics
from microgrid.stack import Kafka
from runtime.keys import create_key
from runtime.settings import Settings
from tests.conftest import Components, free_port, wait_for
from tests.e2e.test_ingest_kafka import dead_letters, produce
from tests.support import new_device, reading, retrying_post, stored_count


def identity_rows(db: psycopg.Connection, device_ids: list[str]) -> tuple[int, int]:
    """(rows, distinct (device_id, ts)) in telemetry_readings for these devices."""
    row = db.execute(
        "SELECT count(*), count(DISTINCT (device_id, ts)) FROM telemetry_readings"
        " WHERE device_id = ANY(%s)",
        (device_ids,),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def stored_power(db: psycopg.Connection, device: str) -> list[float]:
    rows = db.execute(
        "SELECT power_kw FROM telemetry_readings WHERE device_id = %s ORDER BY ts", (device,)
    ).fetchall()
    return [r[0] for r in rows]


def projector_count(s: Settings, outcome: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{s.projector_metrics_port}/metrics", timeout=5).text
    prefix = "microgrid_readings_processed_total{"
    group = s.group("microgrid.projector.telemetry")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and f'group="{group}"' in line and f'"{outcome}"' in line
    )


def test_a_reading_sent_again_is_stored_once_and_counted(
    platform: Components, db: psycopg.Connection, stack: Settings, site: str, device_key: str
) -> None:
    device = new_device()
    first, second = reading(device, site, seq=1), reading(device, site, seq=2)
    headers = {"Authorization": f"Bearer {device_key}"}
    before = projector_count(stack, "duplicate")
    for body in (first, first, second):  # a client's retry
        r = httpx.post(f"{platform.gateway_url}/api/v1/telemetry", json=body, headers=headers)
        assert r.status_code == 202, r.text
    batch = {"readings": [first, second, second]}  # a batch resent, with a repeat inside
    r = httpx.post(f"{platform.gateway_url}/api/v1/telemetry/batch", json=batch, headers=headers)
    assert r.json() == {"accepted": 3}  # taken into the log; storage keeps one of each
    raw = msgspec.json.encode(first)  # a direct producer's retry
    asyncio.run(produce(stack, [(device.encode(), raw), (device.encode(), raw)]))
    # all 8 copies processed (duplicates counted), 2 stored
    wait_for(lambda: projector_count(stack, "duplicate") - before >= 6, what="6 duplicates")
    assert identity_rows(db, [device]) == (2, 2)
    assert projector_count(stack, "duplicate") - before == 6


def test_a_conflicting_duplicate_goes_to_the_dlq_and_the_first_stays(
    platform: Components, db: psycopg.Connection, stack: Settings, site: str, device_key: str
) -> None:
    device = new_device()
    original = reading(device, site, seq=7, power_kw=1.5)
    changed = {**original, "power_kw": 9.5}  # same identity, other values
    in_batch = reading(device, site, seq=8, power_kw=2.0)
    headers = {"Authorization": f"Bearer {device_key}"}
    url = platform.gateway_url
    r = httpx.post(f"{url}/api/v1/telemetry", json=original, headers=headers)
    assert r.status_code == 202
    wait_for(lambda: stored_power(db, device) == [1.5], what="the first reading")
    r = httpx.post(f"{url}/api/v1/telemetry", json=changed, headers=headers)
    assert r.status_code == 202  # the log takes it; the projection refuses to store it
    batch = {"readings": [in_batch, {**in_batch, "power_kw": 3.0}]}  # first in a batch wins
    r = httpx.post(f"{url}/api/v1/telemetry/batch", json=batch, headers=headers)
    assert r.status_code == 202

    letters = asyncio.run(dead_letters(stack, device.encode(), want=2))
    assert len(letters) == 2
    refused = []
    for rec in letters:
        h = {k: v.decode() for k, v in rec.headers}
        assert h[Headers.DLQ_REASON] == "conflicting duplicate"
        assert h[Headers.DLQ_SOURCE_TOPIC] == stack.topic(Topics.TELEMETRY_VALID)
        assert int(h[Headers.DLQ_SOURCE_PARTITION]) >= 0
        assert int(h[Headers.DLQ_SOURCE_OFFSET]) >= 0
        refused.append(msgspec.json.decode(rec.value))
    assert sorted(r["power_kw"] for r in refused) == [3.0, 9.5]
    assert {datetime.fromisoformat(r["ts"]) for r in refused} == {
        datetime.fromisoformat(original["ts"]),
        datetime.fromisoformat(in_batch["ts"]),
    }
    wait_for(lambda: stored_power(db, device) == [1.5, 2.0], what="both first readings")
    latest = db.execute(
        "SELECT power_kw FROM device_latest WHERE device_id = %s", (device,)
    ).fetchone()
    assert latest == (2.0,)


def test_rate_limits_answer_429_naming_the_limit_and_store_nothing(
    platform: Components, db: psycopg.Connection, site: str, device_key: str
) -> None:
    port = free_port()
    platform.start(
        "gateway",
        alias="limited-gateway",
        GATEWAY_PORT=str(port),
        INGEST_KEY_READINGS_PER_S="60",
        INGEST_SITE_READINGS_PER_S="100",
    )
    url = f"http://127.0.0.1:{port}/api/v1/telemetry/batch"
    other_key = create_key(db, site)  # the same site: shares the site's limit
    accepted, refused = new_device(), new_device()
    try:

        def post(key: str, device: str, n: int) -> httpx.Response:
            body = {"readings": [reading(device, site, seq=i) for i in range(n)]}
            return httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"})

        ok = post(device_key, accepted, 50)
        assert ok.status_code == 202, ok.text
        by_key = post(device_key, refused, 20)  # 70 > 60 for this key
        by_site = post(other_key, refused, 60)  # 110 > 100 for the site
    finally:
        platform.stop("limited-gateway")
    for resp, name, value in (
        (by_key, "INGEST_KEY_READINGS_PER_S", 60),
        (by_site, "INGEST_SITE_READINGS_PER_S", 100),
    ):
        assert resp.status_code == 429, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert int(resp.headers["retry-after"]) >= 1
        body = resp.json()
        assert (body["limit"], body["limit_value"], body["outcome"]) == (name, value, "not stored")
        assert name in body["detail"]
    wait_for(lambda: stored_count(db, [accepted]) == (50, 50), what="the accepted batch")
    assert stored_count(db, [refused]) == (0, 0)


class RetryingLoad:
    """A client posting batches of new readings (8 devices, 25 readings each) four at a time,
    each retried until 202, until told to stop; it counts what it sent and its retries."""

    def __init__(self, url: str, key: str, site: str) -> None:
        self.url, self.key, self.site = url, key, site
        self.devices = [new_device() for _ in range(8)]
        self.sent = 0
        self.retries = 0  # attempts answered 429/503, timed out or cut off
        self.stop = threading.Event()
        self.stamp = datetime.now(UTC) - timedelta(seconds=60)
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(4)))

    async def _client(self, client: httpx.AsyncClient, lane: int) -> None:
        seq = 0
        while not self.stop.is_set():
            device = self.devices[(lane + seq) % len(self.devices)]
            batch = []
            for i in range(25):  # a microsecond of its own for every reading of the load
                self.stamp += timedelta(microseconds=1)
                batch.append(
                    {**reading(device, self.site, seq=seq * 1000 + i), "ts": self.stamp.isoformat()}
                )
            seq += 1
            await retrying_post(
                client, self.url, self.key, {"readings": batch}, 120, self.count_retry
            )
            self.sent += len(batch)

    def count_retry(self) -> None:
        self.retries += 1

    def __enter__(self) -> RetryingLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=180)
        assert not self.thread.is_alive()


def all_stored(db: psycopg.Connection, load: RetryingLoad, timeout: float) -> None:
    """Every reading the client sent (each answered 202) is stored, once."""
    try:
        wait_for(lambda: identity_rows(db, load.devices)[0] >= load.sent, timeout, "every reading")
    except AssertionError as exc:
        rows, distinct = identity_rows(db, load.devices)
        raise AssertionError(f"{exc}: {rows} rows, {distinct} readings of {load.sent}") from None
    assert identity_rows(db, load.devices) == (load.sent, load.sent)


def test_a_retrying_client_stores_everything_once_across_a_gateway_kill(
    platform: Components, db: psycopg.Connection, site: str, device_key: str
) -> None:
    port = free_port()
    env = {"GATEWAY_PORT": str(port), "GATEWAY_WORKERS": "1"}
    platform.start("gateway", alias="killed-gateway", **env)
    url = f"http://127.0.0.1:{port}/api/v1/telemetry/batch"
    try:
        with RetryingLoad(url, device_key, site) as load:
            wait_for(lambda: stored_count(db, load.devices)[0] >= 500, 60, what="load under way")
            platform.kill("killed-gateway")  # SIGKILL, requests in flight
            platform.start("gateway", alias="killed-gateway", **env)
            wait_for(lambda: load.retries > 0, 60, what="a batch retried across the kill")
            done = load.sent
            wait_for(lambda: load.sent >= done + 500, 60, what="load after the restart")
    finally:
        platform.stop("killed-gateway")
    all_stored(db, load, 60)


@pytest.mark.broker_outage
def test_a_retrying_client_stores_everything_once_across_a_broker_kill(
    platform: Components, db: psycopg.Connection, stack: Settings, site: str, device_key: str
) -> None:
    kafka = Kafka(stack)
    pid = kafka.status().pid
    if pid is None:
        pytest.skip("Kafka was not started by this stack; not killing someone else's broker")
    url = f"{platform.gateway_url}/api/v1/telemetry/batch"
    with RetryingLoad(url, device_key, site) as load:
        try:
            wait_for(lambda: stored_count(db, load.devices)[0] >= 500, 60, what="load under way")
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not kafka.status().running, 30, what="the broker gone")
            # the broker stays down until the client has been refused: a restart quicker than
            # the gateway's look at the broker could otherwise leave nothing refused
            wait_for(lambda: load.retries > 0, 60, what="a batch refused during the outage")
        finally:
            kafka.up()
        done = load.sent
        wait_for(lambda: load.sent >= done + 500, 120, what="load after the restart")
    all_stored(db, load, 120)
