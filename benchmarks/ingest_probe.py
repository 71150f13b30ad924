"""Batch-ingest probe: saturate the gateway for a while, then wait for PostgreSQL to catch up.

    python -m benchmarks.ingest_probe --duration 30 --concurrency 8 --devices-per-batch 100

Needs the platform running (`microgrid run`). Prints accepted readings/min with HTTP latency
percentiles, then persisted readings/min from the first request until the last row landed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated

import httpx
import msgspec
import psycopg
import typer

from runtime.keys import create_key
from runtime.settings import Settings, get_settings

SITE = "site-probe"


@dataclass
class Tally:
    accepted: int = 0
    refused: int = 0
    latencies: list[float] = field(default_factory=list)


def _batch(run: str, worker: int, seq: int, devices: int, per_device: int) -> bytes:
    ts = datetime.now(UTC).isoformat()
    readings = [
        {
            "device_id": f"probe-{run}-{worker}-{d}",
            "site_id": SITE,
            "device_type": "meter",
            "ts": ts,
            "seq": seq + i,
            "power_kw": 1.0,
            "voltage_v": 230.0,
        }
        for d in range(devices)
        for i in range(per_device)
    ]
    return msgspec.json.encode({"readings": readings})


async def _worker(
    url: str, key: str, run: str, worker: int, until: float, shape: tuple[int, int], tally: Tally
) -> None:
    devices, per_device = shape
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=10) as client:
        seq = 0
        while time.monotonic() < until:
            body = _batch(run, worker, seq, devices, per_device)
            seq += per_device
            started = time.perf_counter()
            resp = await client.post(url, content=body, headers=headers)
            tally.latencies.append(time.perf_counter() - started)
            if resp.status_code == 202:
                tally.accepted += devices * per_device
            else:
                tally.refused += 1


def _rows(s: Settings) -> int:
    with psycopg.connect(s.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry_readings").fetchone()
    return int(row[0]) if row else 0


async def probe(s: Settings, duration: float, concurrency: int, shape: tuple[int, int]) -> None:
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        key = create_key(conn, SITE)
    before = _rows(s)
    url = f"http://{s.gateway_host}:{s.gateway_port}/api/v1/telemetry/batch"
    run, tally = uuid.uuid4().hex[:6], Tally()
    start = time.monotonic()
    until = start + duration
    await asyncio.gather(
        *(_worker(url, key, run, w, until, shape, tally) for w in range(concurrency))
    )
    elapsed = time.monotonic() - start
    q = statistics.quantiles(tally.latencies, n=100)
    typer.echo(
        f"accepted {tally.accepted} readings in {elapsed:.1f}s = "
        f"{tally.accepted / elapsed * 60:,.0f}/min; refused requests {tally.refused}; "
        f"HTTP p50 {q[49] * 1000:.1f} ms, p95 {q[94] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms"
    )
    persisted = 0
    while time.monotonic() - start < duration + 120:
        persisted = _rows(s) - before
        if persisted >= tally.accepted:
            break
        await asyncio.sleep(0.2)
    total = time.monotonic() - start
    typer.echo(
        f"persisted {persisted} readings {total:.1f}s after the first request = "
        f"{persisted / total * 60:,.0f}/min end to end; lost {max(0, tally.accepted - persisted)}"
    )


def main(
    duration: Annotated[float, typer.Option(min=1, max=600)] = 30,
    concurrency: Annotated[int, typer.Option(min=1, max=256)] = 8,
    devices_per_batch: Annotated[int, typer.Option(min=1)] = 100,
    readings_per_device: Annotated[int, typer.Option(min=1)] = 1,
) -> None:
    if devices_per_batch * readings_per_device > 1000:
        raise typer.BadParameter("a batch holds at most 1000 readings")
    asyncio.run(
        probe(get_settings(), duration, concurrency, (devices_per_batch, readings_per_device))
    )


if __name__ == "__main__":
    typer.run(main)
