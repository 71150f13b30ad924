"""Helpers shared by the integration and end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg

from runtime.settings import PROJECT_ROOT


def microgrid_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`microgrid ARGS...` in a process of its own, with this session's environment."""
    return subprocess.run(
        [sys.executable, "-m", "microgrid.cli", *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=os.environ,
        input=stdin,
        timeout=60,
    )


def reading(device_id: str, site_id: str, seq: int = 0, **metrics: Any) -> dict[str, Any]:
    ts = datetime.now(UTC) - timedelta(seconds=1) + timedelta(microseconds=seq)
    body: dict[str, Any] = {
        "device_id": device_id,
        "site_id": site_id,
        "device_type": "battery",
        "ts": ts.isoformat(),
        "seq": seq,
        "soc_pct": 50.0,
        "power_kw": 1.5,
    }
    body.update(metrics)
    return body


def new_device() -> str:
    return f"dev-{uuid.uuid4().hex[:10]}"


def stored_count(db: psycopg.Connection, device_ids: list[str]) -> tuple[int, int]:
    """(rows, distinct (device, seq)) in telemetry_readings for these devices."""
    row = db.execute(
        "SELECT count(*), count(DISTINCT (device_id, seq)) FROM telemetry_readings"
        " WHERE device_id = ANY(%s)",
        (device_ids,),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def retrying_post(
    client: httpx.AsyncClient,
    url: str,
    key: str,
    body: dict[str, Any],
    deadline_s: float,
    on_retry: Callable[[], None] = lambda: None,
) -> int:
    """POST until 202, retrying 429/503 (after Retry-After, capped for tests), timeouts and
    connection errors, as the README tells clients to; returns the attempts it took."""
    give_up = time.monotonic() + deadline_s
    attempts = 0
    while True:
        attempts += 1
        try:
            r = await client.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
        except httpx.TransportError:
            delay = 0.2
        else:
            if r.status_code == 202:
                return attempts
            assert r.status_code in (429, 503), f"{r.status_code}: {r.text}"
            delay = min(float(r.headers.get("retry-after", "1")), 1.0)
        assert time.monotonic() < give_up, f"no 202 within {deadline_s} s"
        on_retry()
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # backoff with jitter


def drop_database(conn: psycopg.Connection, name: str, timeout: float = 30.0) -> None:
    """DROP DATABASE ... WITH (FORCE), again while an autovacuum worker is in it: FORCE may
    terminate only sessions of roles this one has the rights of, and such a worker has none,
    so the drop is refused until the worker (busy for milliseconds) has left."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.errors.InsufficientPrivilege:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
