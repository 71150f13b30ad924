"""History benchmark: the readings route over long ranges, served from the rollups.

    python -m benchmarks.history --days 30        (make bench-history)

Needs PostgreSQL only (`microgrid stack up`). In a scratch database of its own (made, migrated
with `runtime.db.migrate`, and dropped at the end, on Ctrl-C too) it:

1. loads `--days` days of 1-minute readings of one device (43,200 for 30 days) through the
   telemetry projection's own `apply`, in polls of `--poll-size` readings, so the raw rows and
   the rollups are written as the live projector writes them; prints the load rate;
2. times the projector's poll transaction step by step over `--polls` polls of `--poll-size`
   readings of `--poll-devices` devices (a reading per device per second, the live shape):
   storing the readings, adding them to the rollups, updating the devices; the rollups' share
   is the cost they add per reading;
3. asks the readings route (the query API's own controller and authentication, called in
   process through httpx's ASGI transport, with a signed token) for the last 1 hour, 1 day
   and `--days` days, `--repeat` times each, and prints p50/p95 latency with the rows each
   query reads (EXPLAIN ANALYZE), then the longest range's SQL alone, from the rollups and
   forced onto the raw readings, for comparison.

Also: `--polls 0` skips step 2; a run takes about 15 s with the defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import signal
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, cast
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import typer
from litestar import Litestar
from litestar.di import Provide
from psycopg.conninfo import make_conninfo

from contracts import METRICS, Reading
from contracts.api import ReadingSource
from projections import telemetry_store as store
from projections.telemetry import Source, TelemetryProjection
from query_api.auth import TokenIssuer, jwt_auth
from query_api.devices import DeviceController, SeriesQuery, series_query
from query_api.services import Services
from runtime.db import migrate
from runtime.events import EventStream
from runtime.settings import Settings, get_settings

DEVICE = "bench-history-1"
SITE = "bench-history"
USER = "bench-history"
STATEMENT_TIMEOUT_MS = 120_000  # no step of a run waits longer on PostgreSQL


class SilentEvents(EventStream):
    """The projection's live events, dropped: the benchmark measures PostgreSQL work."""

    async def append(self, events: list[tuple[str, Any]]) -> None:
        return None


def month_of_readings(device: str, start: datetime, minutes: int) -> Iterator[Reading]:
    for i in range(minutes):
        day = 2 * math.pi * (i % 1440) / 1440
        yield Reading(
            device_id=device,
            site_id=SITE,
            device_type="battery",
            ts=start + timedelta(minutes=i),
            seq=i,
            voltage_v=230.0 + 3 * math.sin(day),
            current_a=40.0 * math.sin(day + 1),
            frequency_hz=50.0 + 0.05 * math.sin(i / 7),
            power_kw=9.0 * math.sin(day + 1),
            soc_pct=50.0 + 40 * math.sin(day),
            temperature_c=25.0 + 5 * math.sin(day - 1),
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def ms(values: list[float]) -> str:
    p50, p95 = (percentile(values, q) * 1000 for q in (0.5, 0.95))
    return f"p50 {p50:7.2f} ms  p95 {p95:7.2f} ms"


async def load(s: Settings, days: int, poll_size: int) -> datetime:
    """Write the month through the projection's apply, one transaction per poll."""
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    start = end - timedelta(days=days)
    readings = list(month_of_readings(DEVICE, start, days * 1440))
    projection = TelemetryProjection(s, SilentEvents(s))
    seconds = 0.0
    try:
        async with await psycopg.AsyncConnection.connect(s.database_url) as conn:
            for i in range(0, len(readings), poll_size):
                poll = [Source(0, i // poll_size, readings[i : i + poll_size])]
                began = time.perf_counter()
                async with conn.transaction():
                    announce = await projection.apply(conn, poll)
                seconds += time.perf_counter() - began
                if announce is not None:
                    await announce()
                done = min(i + poll_size, len(readings))
                if done % (poll_size * 4) == 0 or done == len(readings):
                    typer.echo(f"  loaded {done:,} of {len(readings):,} readings", err=True)
            await conn.execute("ANALYZE")  # as autovacuum would have by now on a live database
    finally:
        if projection.flusher is not None:
            projection.flusher.cancel()
        await projection.consumer.stop()  # never started: released all the same
        await projection.events.redis.aclose()
    typer.echo(
        f"load: {len(readings):,} readings of one device ({days} days at 1/min) through"
        f" TelemetryProjection.apply in polls of {poll_size:,}: {seconds:.2f} s,"
        f" {len(readings) / seconds:,.0f} readings/s"
    )
    return start


async def poll_steps(s: Settings, polls: int, poll_size: int, devices: int) -> None:
    """The projector's transaction for live-shaped polls, step by step."""
    per_device = max(1, poll_size // devices)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    steps: dict[str, list[float]] = {"readings": [], "rollups": [], "devices": []}
    rollup_cpu: list[float] = []
    async with await psycopg.AsyncConnection.connect(s.database_url) as conn:
        await store.ensure_partitions(conn, {t0.date(), (t0 + timedelta(hours=1)).date()})
        await conn.commit()
        for p in range(polls):
            poll = [
                Reading(
                    device_id=f"bench-poll-{d}",
                    site_id=SITE,
                    device_type="meter",
                    ts=t0 + timedelta(seconds=p * per_device + k),
                    seq=p * per_device + k,
                    voltage_v=230.0 + k,
                    power_kw=float(d % 50),
                    frequency_hz=50.0,
                )
                for d in range(devices)
                for k in range(per_device)
            ]
            async with conn.transaction():
                began = time.perf_counter()
                written = await store.write_readings(conn, poll)
                wrote = time.perf_counter()
                cpu = time.process_time()
                await store.upsert_rollups(conn, written.readings)
                rollup_cpu.append(time.process_time() - cpu)
                rolled = time.perf_counter()
                await store.upsert_devices(conn, poll)
                steps["readings"].append(wrote - began)
                steps["rollups"].append(rolled - wrote)
                steps["devices"].append(time.perf_counter() - rolled)
    n = len(poll)
    med = {k: statistics.median(v) for k, v in steps.items()}
    total = sum(med.values())
    typer.echo(
        f"projector poll ({polls} polls of {n:,} readings, {devices:,} devices, medians):"
        f" store readings {med['readings'] * 1000:.1f} ms, rollups {med['rollups'] * 1000:.1f} ms"
        f" ({med['rollups'] / n * 1e6:.1f} us/reading, of which client CPU"
        f" {statistics.median(rollup_cpu) / n * 1e6:.1f} us), devices"
        f" {med['devices'] * 1000:.1f} ms; the rollups are {med['rollups'] / total:.0%} of the"
        f" transaction (without them {(total - med['rollups']) * 1000:.1f} ms,"
        f" with {total * 1000:.1f} ms)"
    )


def rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's table scans returned (EXPLAIN ANALYZE)."""
    own = int(plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1))
    below = sum(rows_read(child) for child in plan.get("Plans", []))
    return (own if "Relation Name" in plan else 0) + below


async def queries(s: Settings, repeat: int, days: int) -> None:
    services = Services(s)
    auth = jwt_auth(s, services.users)
    token = TokenIssuer(auth).issue(USER, "viewer")
    app = Litestar(
        route_handlers=[DeviceController],
        dependencies={"services": Provide(lambda: services, use_cache=True, sync_to_thread=False)},
        on_app_init=[auth.on_app_init],
        logging_config=None,
    )
    ranges = [("1 h", timedelta(hours=1)), ("1 d", timedelta(days=1))]
    ranges.append((f"{days} d", timedelta(days=days)))
    await services.pool.open(wait=True)
    try:
        async with (  # the app's ASGI callable, in this event loop (no server, no thread)
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=cast(Any, app)), base_url="http://bench"
            ) as client,
            await psycopg.AsyncConnection.connect(s.database_url, autocommit=True) as conn,
        ):

            def query(
                end: datetime, span: timedelta, source: ReadingSource | None = None
            ) -> SeriesQuery:
                return series_query(
                    DEVICE,
                    end - span,
                    end,
                    300,
                    list(METRICS),
                    now=end,
                    raw_retention=timedelta(days=s.telemetry_raw_retention_days),
                    m1_retention=timedelta(days=s.rollup_1m_retention_days),
                    source=source,
                )

            headers = {"Authorization": f"Bearer {token}"}
            path = f"/api/v1/devices/{DEVICE}/readings"
            typer.echo(
                f"readings route, {repeat} requests per range (every metric, 300 points,"
                " in-process HTTP: token, user, SQL, JSON):"
            )
            for label, span in ranges:
                end = datetime.now(UTC)
                params = {"from": (end - span).isoformat(), "to": end.isoformat()}
                times = []
                body: dict[str, Any] = {}
                for i in range(repeat + 1):
                    began = time.perf_counter()
                    r = await client.get(path, params=params, headers=headers)
                    if i:  # the first warms the caches (user, plans)
                        times.append(time.perf_counter() - began)
                    if r.status_code != 200:
                        raise RuntimeError(f"{r.status_code}: {r.text}")
                    body = r.json()
                q = query(end, span)
                read = await explain_rows(conn, q.sql, q.params)
                typer.echo(
                    f"  {label:>5}: source {body['source']:>3}, {len(body['points']):3} buckets"
                    f" of {body['bucket_s']:>5} s, {read:>6,} rows read  {ms(times)}"
                )
            end, month = datetime.now(UTC), timedelta(days=days)
            raw, rolled = query(end, month, "raw"), query(end, month)
            typer.echo(f"the {days}-day query's SQL alone, {repeat} times each:")
            for name, q in ((f"rollups ({rolled.source})", rolled), ("raw readings", raw)):
                times = []
                for i in range(repeat + 1):
                    began = time.perf_counter()
                    await (await conn.execute(q.sql, q.params)).fetchall()
                    if i:
                        times.append(time.perf_counter() - began)
                read = await explain_rows(conn, q.sql, q.params)
                typer.echo(f"  {name:>14}: {read:>6,} rows read  {ms(times)}")
    finally:
        await services.pool.close()
        await services.redis.aclose()
        await services.stream_redis.aclose()


async def explain_rows(conn: psycopg.AsyncConnection, sql: str, params: tuple[Any, ...]) -> int:
    cur = await conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)
    row = await cur.fetchone()
    assert row is not None
    return rows_read(row[0][0]["Plan"])


async def run(
    s: Settings, days: int, poll_size: int, polls: int, poll_devices: int, repeat: int
) -> None:
    typer.echo("migrating the scratch database", err=True)
    await asyncio.to_thread(migrate, s)
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (username, role, password_hash) VALUES (%s, 'viewer', '-')",
            (USER,),  # never logs in: the benchmark signs its token
        )
    await load(s, days, poll_size)
    if polls:
        await poll_steps(s, polls, poll_size, poll_devices)
    await queries(s, repeat, days)


def scratch_url(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def main(
    days: Annotated[int, typer.Option(min=1, max=366, help="days of 1-minute readings")] = 30,
    poll_size: Annotated[int, typer.Option(min=100, max=20_000, help="readings per poll")] = 5000,
    polls: Annotated[
        int, typer.Option(min=0, max=200, help="live-shaped polls timed step by step (0: none)")
    ] = 20,
    poll_devices: Annotated[
        int, typer.Option(min=1, max=20_000, help="devices the timed polls' readings spread over")
    ] = 1000,
    repeat: Annotated[int, typer.Option(min=1, max=1000, help="requests per range")] = 50,
) -> None:
    base = get_settings()
    name = f"microgrid_bench_history_{uuid.uuid4().hex[:8]}"
    s = base.model_copy(
        update={
            "database_url": make_conninfo(
                scratch_url(base.database_url, name),
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            ),
            # the in-process API signs its own token: dev rules, a secret of this run
            "environment": "dev",
            "auth_token_secret": secrets.token_urlsafe(32),
        }
    )
    with psycopg.connect(base.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    typer.echo(f"scratch database {name}", err=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleaned up as on Ctrl-C
    interrupted = False
    try:
        asyncio.run(run(s, days, poll_size, polls, poll_devices, repeat))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the drop is not cut short
        with (
            psycopg.connect(base.database_url, autocommit=True) as conn,
            contextlib.suppress(psycopg.Error),
        ):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        typer.echo(f"dropped {name}", err=True)
    if interrupted:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130)


if __name__ == "__main__":
    typer.run(main)
