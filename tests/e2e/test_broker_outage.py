"""With the broker down the gateway refuses quickly (503, not stored, Retry-After) and
recovers after."""

from __future__ import annotations

import time

import httpx
import psycopg
import pytest

from microgrid.stack import Kafka
from runtime.settings import Settings
from tests.conftest import Components, wait_for
from tests.support import new_device, reading, stored_count


@pytest.mark.broker_outage
def test_gateway_answers_503_while_broker_is_down_and_recovers(
    platform: Components, db: psycopg.Connection, stack: Settings, site: str, device_key: str
) -> None:
    kafka = Kafka(stack)
    if kafka.status().pid is None:
        pytest.skip("Kafka was not started by this stack; not stopping someone else's broker")
    url = f"{platform.gateway_url}/api/v1/telemetry"
    headers = {"Authorization": f"Bearer {device_key}"}
    kafka.down()
    refused: list[str] = []

    def refused_at_once() -> bool:
        """A reading answered 503 "not stored" within 2.5 s (the gateway looks at the broker
        every half second; a request handed over just before it noticed waits for its ack)."""
        device = new_device()
        started = time.monotonic()
        try:
            r = httpx.post(url, headers=headers, json=reading(device, site), timeout=15)
        except httpx.TimeoutException:
            return False
        elapsed = time.monotonic() - started
        if r.status_code != 503 or r.json().get("outcome") != "not stored":
            return False
        assert r.headers["retry-after"].isdigit()
        assert r.headers["content-type"].startswith("application/problem+json")
        refused.append(device)
        return elapsed < 2.5

    try:
        wait_for(refused_at_once, 60, what="a reading refused at once as not stored")
        ready = httpx.get(f"{platform.gateway_url}/readyz", timeout=10)
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["kafka"] != "ok"
        assert ready.json()["checks"]["postgres"] == "ok"
    finally:
        kafka.up()
    device = new_device()

    def accepted() -> bool:
        resp = httpx.post(url, headers=headers, json=reading(device, site), timeout=10)
        return resp.status_code == 202

    wait_for(accepted, 90, what="gateway to accept again")
    wait_for(
        lambda: httpx.get(f"{platform.gateway_url}/readyz", timeout=10).status_code == 200,
        30,
        what="gateway ready again",
    )
    wait_for(lambda: stored_count(db, [device])[0] >= 1, 60, what="reading after recovery")
    assert stored_count(db, refused) == (0, 0)
