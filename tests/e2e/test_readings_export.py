"""GET /api/v1/readings/export against the real processes: readings sent through the gateway
come out as CSV, Parquet and JSON lines exactly as PostgreSQL holds them for the range (from
included, to excluded, a late reading in its place), within the user's sites; bad ranges and
parameters are 400 problems; a large export comes out whole and in order across several of the
cursor's batches; exports past the concurrent limit are refused and a closed one gives its
connection back; a response stopped because its client went away (however often) gives its
connection back to the pool rather than losing it; an export whose client stops reading stops
after EXPORT_TIMEOUT_S and frees its slot."""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any, cast

import httpx
import psycopg
import pyarrow.parquet as pq
import pytest
from litestar.plugins.problem_details import ProblemDetailsException
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from contracts import METRICS
from query_api.export import BATCH_ROWS, _chunks, _respond, export_sql
from query_api.services import Services
from runtime.keys import create_key
from runtime.settings import Settings
from runtime.tabular import READING_COLUMNS
from tests.conftest import Components, free_port, wait_for
from tests.e2e.test_query_api import assert_problem, auth, ingest
from tests.e2e.test_tenancy_api import login, make_user
from tests.support import new_device

PATH = "/api/v1/readings/export"
NAMES = [c.name for c in READING_COLUMNS]
KINDS = {c.name: c.kind for c in READING_COLUMNS}
MEDIA = {
    "csv": "text/csv",
    "parquet": "application/vnd.apache.parquet",
    "jsonl": "application/x-ndjson",
}
FORMATS = tuple(MEDIA)
STORED_SQL = f"""
SELECT r.device_id, d.site_id, d.device_type, r.ts, r.seq, {", ".join(f"r.{m}" for m in METRICS)}
FROM telemetry_readings r JOIN devices d USING (device_id)
WHERE r.ts >= %(start)s AND r.ts < %(end)s
  AND (%(site_id)s::text IS NULL OR d.site_id = %(site_id)s)
  AND (%(devices)s::text[] IS NULL OR r.device_id = ANY(%(devices)s))
ORDER BY r.device_id, r.ts
"""


def stored(
    db: psycopg.Connection,
    start: datetime,
    end: datetime,
    site_id: str | None = None,
    devices: list[str] | None = None,
) -> list[dict[str, Any]]:
    """What PostgreSQL holds for the range, as export rows (column -> value)."""
    params = {"start": start, "end": end, "site_id": site_id, "devices": devices}
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute(STORED_SQL, params).fetchall()


def _value(kind: str, text: str) -> Any:
    if text == "":
        return None
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "time":
        return datetime.fromisoformat(text)
    return text


def rows_of(r: httpx.Response, fmt: str) -> list[dict[str, Any]]:
    """An export's rows (column -> value, None when missing), read as its format says."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(MEDIA[fmt]), r.headers
    disposition = r.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="readings_'), disposition
    assert disposition.endswith(f'.{fmt}"'), disposition
    if fmt == "parquet":
        table = pq.read_table(io.BytesIO(r.content))
        assert table.column_names == NAMES
        return cast(list[dict[str, Any]], table.to_pylist())
    if fmt == "jsonl":
        rows = []
        for line in r.text.splitlines():
            found = json.loads(line)
            assert set(found) <= set(NAMES), found
            rows.append({n: _value(KINDS[n], str(found.get(n, ""))) for n in NAMES})
        return rows
    lines = list(csv.reader(io.StringIO(r.text, newline="")))
    assert lines[0] == NAMES
    return [
        {n: _value(KINDS[n], v) for n, v in zip(NAMES, line, strict=True)} for line in lines[1:]
    ]


def export(client: httpx.Client, token: str, **params: Any) -> httpx.Response:
    query = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in params.items()}
    return client.get(PATH, params=query, headers=auth(token))


def body(device: str, site: str, device_type: str, ts: datetime, seq: int) -> dict[str, Any]:
    """A reading with metrics that differ by `seq`, some of them missing, all in the ranges no
    default alert rule minds."""
    reading: dict[str, Any] = {
        "device_id": device,
        "site_id": site,
        "device_type": device_type,
        "ts": ts.isoformat(),
        "seq": seq,
        "power_kw": seq % 50_000 * 1.5 - 3.25,  # within the allowed range at any seq
        "voltage_v": 230.0 + (seq % 20) / 7,
    }
    if seq % 2 == 0:
        reading["temperature_c"] = 20.0 + (seq % 30) / 3
    if device_type == "battery":
        reading["soc_pct"] = 50.0 + seq % 40
    return reading


@dataclass(frozen=True)
class World:
    site: str
    other_site: str
    battery: str  # of `site`, with readings at `start`, `end` and one that came late
    inverter: str  # of `site`
    other: str  # of `other_site`
    start: datetime
    end: datetime
    late: datetime
    viewer: str  # a token of a viewer of `site` only


@pytest.fixture(scope="module")
def client(platform: Components) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=platform.api_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def world(platform: Components, client: httpx.Client) -> World:
    """Two sites' readings, ten seconds apart from `t0`; the range [t0 + 20 s, t0 + 70 s) has
    readings exactly at both ends and a microsecond inside each, and a reading sent after the
    others that is older than most of them."""
    t0 = (datetime.now(UTC) - timedelta(minutes=30)).replace(microsecond=0)
    start, end, late = (
        t0 + timedelta(seconds=20),
        t0 + timedelta(seconds=70),
        t0 + timedelta(seconds=35),
    )
    site, other_site = f"site-{uuid.uuid4().hex[:8]}", f"site-{uuid.uuid4().hex[:8]}"
    battery, inverter, other = new_device(), new_device(), new_device()
    with psycopg.connect(platform.s.database_url, autocommit=True) as db:
        key, other_key = create_key(db, site), create_key(db, other_site)
        step = timedelta(seconds=10)
        readings = [body(battery, site, "battery", t0 + k * step, k) for k in range(10)]
        us = timedelta(microseconds=1)
        readings += [
            body(battery, site, "battery", start - us, 50),
            body(battery, site, "battery", end - us, 51),
        ]
        half = timedelta(seconds=5)
        readings += [
            body(inverter, site, "pv_inverter", t0 + k * step + half, k) for k in range(10)
        ]
        ingest(platform, key, readings)
        ingest(
            platform,
            other_key,
            [body(other, other_site, "meter", t0 + k * step, k) for k in range(10)],
        )

        def count(devices: list[str]) -> int:
            row = db.execute(
                "SELECT count(*) FROM telemetry_readings WHERE device_id = ANY(%s)", (devices,)
            ).fetchone()
            return int(row[0]) if row else 0

        wait_for(lambda: count([battery, inverter, other]) == 32, 60, "the readings stored")
        ingest(platform, key, [body(battery, site, "battery", late, 99)])  # late: older than most
        wait_for(lambda: count([battery]) == 13, 60, "the late reading stored")
        viewer = make_user(db, "viewer", [site])
    return World(
        site, other_site, battery, inverter, other, start, end, late, login(client, viewer)
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_export_holds_what_postgresql_holds_for_the_range(
    client: httpx.Client, db: psycopg.Connection, tokens: dict[str, str], world: World, fmt: str
) -> None:
    w = world
    admin = tokens["admin"]
    expected = stored(db, w.start, w.end, site_id=w.site)
    rows = rows_of(
        export(client, admin, **{"from": w.start, "to": w.end}, site_id=w.site, format=fmt), fmt
    )
    assert rows == expected
    # battery: 20..60 s, the late one and one a microsecond before `to`; inverter: 25..65 s
    assert len(rows) == 12
    assert {r["site_id"] for r in rows} == {w.site}
    assert [(r["device_id"], r["ts"]) for r in rows] == sorted(
        (r["device_id"], r["ts"]) for r in rows
    )
    battery = [r for r in rows if r["device_id"] == w.battery]
    times = [r["ts"] for r in battery]
    assert times[0] == w.start  # from: included
    assert w.end not in times  # to: excluded
    assert w.end - timedelta(microseconds=1) in times
    assert w.start - timedelta(microseconds=1) not in times
    late = next(r for r in battery if r["seq"] == 99)
    sent = body(w.battery, w.site, "battery", w.late, 99)
    assert late == {
        **dict.fromkeys(NAMES),
        **{k: v for k, v in sent.items() if k != "ts"},
        "ts": w.late,
    }
    assert times.index(w.late) == 2  # in ts order, not in the order it arrived
    assert {r["device_type"] for r in rows} == {"battery", "pv_inverter"}
    assert any(r["temperature_c"] is None for r in rows)  # a missing metric stays missing
    assert all(r["soc_pct"] is None for r in rows if r["device_type"] == "pv_inverter")

    one = export(client, admin, **{"from": w.start, "to": w.end}, device_id=w.battery, format=fmt)
    assert rows_of(one, fmt) == battery
    assert f"readings_{w.battery}_" in one.headers["content-disposition"]
    # the same range written with another offset, and the format left out for CSV
    east = timezone(timedelta(hours=2))
    params = {
        "from": w.start.astimezone(east),
        "to": w.end.astimezone(east),
        "device_id": w.battery,
    }
    if fmt != "csv":
        params["format"] = fmt
    assert rows_of(export(client, admin, **params), fmt) == battery


def test_a_user_of_some_sites_exports_only_their_sites(
    client: httpx.Client, db: psycopg.Connection, tokens: dict[str, str], world: World
) -> None:
    w = world
    span = {"from": w.start, "to": w.end}
    mine = stored(db, w.start, w.end, site_id=w.site)
    theirs = stored(db, w.start, w.end, site_id=w.other_site)
    assert len(theirs) == 5
    # without a filter: their own sites' readings, none of the other site's in the same range
    assert rows_of(export(client, w.viewer, **span), "csv") == mine
    assert (
        rows_of(export(client, w.viewer, **span, site_id=w.site, format="parquet"), "parquet")
        == mine
    )
    # another site: nothing, as every list's site filter
    r = export(client, w.viewer, **span, site_id=w.other_site)
    assert rows_of(r, "csv") == []
    assert r.text.splitlines() == [",".join(NAMES)]
    # another site's device: 404, as an unknown device and as that device's readings
    refused = assert_problem(export(client, w.viewer, **span, device_id=w.other), 404)
    unknown = assert_problem(export(client, w.viewer, **span, device_id=new_device()), 404)
    assert refused["title"] == unknown["title"]
    readings = client.get(f"/api/v1/devices/{w.other}/readings", headers=auth(w.viewer))
    assert readings.status_code == 404
    # an admin exports both sites
    everything = rows_of(export(client, tokens["admin"], **span), "csv")
    assert all(row in everything for row in mine + theirs)
    other = export(client, tokens["admin"], **span, device_id=w.other, format="jsonl")
    assert rows_of(other, "jsonl") == theirs


def test_bad_ranges_and_parameters_are_400_problems(
    client: httpx.Client,
    db: psycopg.Connection,
    tokens: dict[str, str],
    world: World,
    stack: Settings,
) -> None:
    w = world
    admin = tokens["admin"]
    bound = timedelta(hours=stack.export_max_range_h)
    at, before = w.start.isoformat(), (w.start - timedelta(hours=1)).isoformat()
    cases: list[dict[str, Any]] = [
        {"to": at},  # from missing
        {"from": before},  # to missing
        {"from": at, "to": at},  # from = to
        {"from": at, "to": before},  # from > to
        {"from": (w.start - bound - timedelta(seconds=1)).isoformat(), "to": at},
        {"from": before.removesuffix("+00:00"), "to": at},  # no time zone
        {"from": before, "to": at.removesuffix("+00:00")},
        {"from": before, "to": at, "format": "xlsx"},
        {"from": "1700000000", "to": at},  # a number, not an RFC 3339 time
        {"from": "yesterday", "to": at},
    ]
    for params in cases:
        r = client.get(PATH, params={**params, "device_id": w.battery}, headers=auth(admin))
        assert_problem(r, 400)
    r = client.get(PATH, params=cases[4] | {"device_id": w.battery}, headers=auth(admin))
    assert "EXPORT_MAX_RANGE_H" in assert_problem(r, 400)["detail"]
    # exactly the bound is allowed
    longest = export(client, admin, **{"from": w.end - bound, "to": w.end}, device_id=w.battery)
    assert rows_of(longest, "csv") == stored(db, w.end - bound, w.end, devices=[w.battery])
    assert_problem(client.get(PATH, params={"from": before, "to": at}), 401)


@dataclass(frozen=True)
class Large:
    """One device's readings, 10 ms apart: more than two of the cursor's batches."""

    device: str
    start: datetime
    n: int
    step: timedelta

    @property
    def end(self) -> datetime:
        return self.start + self.n * self.step

    def params(self, fmt: str = "csv") -> dict[str, str]:
        span = {"from": self.start.isoformat(), "to": self.end.isoformat()}
        return {**span, "device_id": self.device, "format": fmt}


def store_readings(platform: Components, db: psycopg.Connection, n: int, hours_ago: int) -> Large:
    """`n` readings of a new device of a new site, sent through the gateway and stored."""
    site, device = f"site-{uuid.uuid4().hex[:8]}", new_device()
    t0 = (datetime.now(UTC) - timedelta(hours=hours_ago)).replace(microsecond=0)
    step = timedelta(milliseconds=10)
    key = create_key(db, site)
    ingest(platform, key, [body(device, site, "battery", t0 + i * step, i) for i in range(n)])
    wait_for(
        lambda: (
            db.execute(
                "SELECT count(*) = %s FROM telemetry_readings WHERE device_id = %s", (n, device)
            ).fetchone()
            == (True,)
        ),
        120,
        f"{n} readings stored",
    )
    return Large(device, t0, n, step)


@pytest.fixture(scope="module")
def large(platform: Components) -> Large:
    with psycopg.connect(platform.s.database_url, autocommit=True) as db:
        return store_readings(platform, db, 2 * BATCH_ROWS + 2_345, hours_ago=2)


def test_a_large_export_comes_out_whole_and_in_order(
    client: httpx.Client, db: psycopg.Connection, tokens: dict[str, str], large: Large
) -> None:
    """More rows than two of the cursor's batches, one device: every row, in ts order, in a
    chunked body (no Content-Length: written while it was read)."""
    n = large.n
    expected = stored(db, large.start, large.end, devices=[large.device])
    assert len(expected) == n
    for fmt in ("csv", "parquet"):
        r = client.get(PATH, params=large.params(fmt), headers=auth(tokens["admin"]))
        assert "content-length" not in r.headers
        assert r.headers["transfer-encoding"] == "chunked"
        rows = rows_of(r, fmt)
        assert [row["seq"] for row in rows] == list(range(n))
        assert rows == expected


def test_exports_past_the_limit_are_refused_and_a_closed_one_gives_its_connection_back(
    stack: Settings,
) -> None:
    """Two exports at once with EXPORT_MAX_CONCURRENT=1: the second is refused (503) before it
    takes a connection; the first, closed before its end (a client that went away), gives its
    slot and connection back, and the next export runs."""

    async def run() -> None:
        pool = AsyncConnectionPool(stack.database_url, min_size=1, max_size=2, open=False)
        await pool.open()
        services = cast(
            Services,
            SimpleNamespace(
                pool=pool,
                exports=asyncio.Semaphore(1),
                settings=stack.model_copy(update={"export_max_concurrent": 1}),
            ),
        )
        now = datetime.now(UTC)
        sql = export_sql(False, False, False)
        params = {"start": now - timedelta(days=1), "end": now, "sites": None}
        params |= {"site_id": None, "device_id": None}
        try:
            first = _chunks(services, sql, params, "csv")
            assert (await anext(first)).startswith(b"device_id,site_id")
            assert pool.get_stats()["pool_available"] < pool.get_stats()["pool_size"]
            second = _chunks(services, sql, params, "csv")
            with pytest.raises(ProblemDetailsException) as refused:
                await anext(second)
            assert refused.value.status_code == 503
            assert refused.value.headers and "Retry-After" in refused.value.headers
            await first.aclose()
            stats = pool.get_stats()
            assert stats["pool_available"] == stats["pool_size"]
            assert not services.exports.locked()
            third = _chunks(services, sql, params, "jsonl")
            async for _ in third:
                assert services.exports.locked()
            assert not services.exports.locked()
        finally:
            await pool.close()

    asyncio.run(run())


@pytest.mark.parametrize("stopped", ["waiting", "sending"])
def test_a_stopped_response_gives_its_connection_back(
    stack: Settings, large: Large, stopped: str
) -> None:
    """Litestar's own streaming response, stopped as when its client goes away (a cancel scope
    that cancels again at every await) after the first chunk: while it waits for the export's
    next chunk, or while its send waits for a socket that never drains. When the response has
    ended, the export has too: its connection is back in the pool (neither closed nor
    replaced), its slot free, and the body has no end."""

    async def run() -> None:
        pool = AsyncConnectionPool(stack.database_url, min_size=1, max_size=2, open=False)
        await pool.open()
        services = cast(
            Services,
            SimpleNamespace(pool=pool, exports=asyncio.Semaphore(1), settings=stack),
        )
        sql = export_sql(False, False, True)
        params: dict[str, Any] = {"start": large.start, "end": large.end, "sites": None}
        params |= {"site_id": None, "device_id": large.device}
        sent: list[dict[str, Any]] = []
        gone = asyncio.Event()

        async def send(message: Any) -> None:
            sent.append(message)
            if message["type"] == "http.response.body":
                gone.set()
                if stopped == "sending":
                    await asyncio.Event().wait()  # a client that stopped reading

        async def receive() -> Any:
            await gone.wait()
            return {"type": "http.disconnect"}

        try:
            await pool.wait()
            before = pool.get_stats()
            response = await _respond(services, sql, params, "csv", "readings.csv")
            assert services.exports.locked()
            asgi = response.to_asgi_response(None, cast(Any, None))
            await asyncio.wait_for(asgi(cast(Any, {"type": "http"}), receive, send), 30)
            after = pool.get_stats()
            assert not services.exports.locked()
            assert after["pool_size"] == before["pool_size"]
            assert after["pool_available"] == after["pool_size"]
            assert after.get("connections_num", 0) == before.get("connections_num", 0)
            assert sent[0]["status"] == 200
            bodies = [m for m in sent if m["type"] == "http.response.body"]
            assert bodies[0]["body"].startswith(b"device_id,site_id")
            assert all(m["more_body"] for m in bodies)  # cut short: no last chunk
        finally:
            await pool.close()

    asyncio.run(run())


# An export's connection left in its transaction: the export's cursor was its last statement.
IDLE_EXPORTS_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND state LIKE 'idle in transaction%'
  AND query LIKE '%readings_export%'
"""


def idle_exports(db: psycopg.Connection) -> int:
    row = db.execute(IDLE_EXPORTS_SQL).fetchone()
    return int(row[0]) if row else 0


def discarded_connections(platform: Components) -> int:
    """Connections the API's pool has thrown away: psycopg logs each (a query cancelled and
    then interrupted, a connection closed instead of given back)."""
    log = (platform.log_dir / "api.log").read_text(errors="replace")
    return sum("discarding" in line and "psycopg" in line for line in log.splitlines())


def test_aborted_downloads_give_their_connections_back(
    platform: Components,
    client: httpx.Client,
    db: psycopg.Connection,
    tokens: dict[str, str],
    large: Large,
) -> None:
    """Twelve exports, more than the pool's 8 connections and the export slots, each closed by
    its client after the first chunk while the server still reads: each export's connection
    goes back to the pool, none stays in its transaction, and other requests and a whole
    export still run."""
    headers = auth(tokens["admin"])
    discarded = discarded_connections(platform)

    def abort(fmt: str) -> bool:
        with client.stream("GET", PATH, params=large.params(fmt), headers=headers) as r:
            if r.status_code == 503:  # the export aborted before still holds its slot
                return False
            assert r.status_code == 200, r.read()
            assert next(r.iter_raw())
        return True  # closed after its first chunk: the connection is dropped

    for i in range(12):
        fmt = FORMATS[i % len(FORMATS)]
        wait_for(functools.partial(abort, fmt), 30, f"export {i} ({fmt}) answered and aborted")
    wait_for(lambda: idle_exports(db) == 0, 30, "no export's connection left in its transaction")
    devices = client.get("/api/v1/devices", headers=headers)
    assert devices.status_code == 200, devices.text

    def whole() -> httpx.Response | None:
        r = client.get(PATH, params=large.params(), headers=headers)
        return None if r.status_code == 503 else r

    rows = rows_of(wait_for(whole, 30, "an export after the aborted ones"), "csv")
    assert [row["seq"] for row in rows] == list(range(large.n))
    # given back, not closed: a cancelled cleanup interrupts the query's cancellation, and
    # psycopg then closes the connection and the pool discards it
    assert discarded_connections(platform) == discarded


EXPORT_TIMEOUT_S = 8


def test_an_export_stops_after_export_timeout_s(
    platform: Components, db: psycopg.Connection, tokens: dict[str, str], large: Large
) -> None:
    """An API with EXPORT_TIMEOUT_S=8 and one export slot: a client that reads the first chunk
    and then stops reading holds the slot (another export is 503) until the time is up; then
    the export stops, its connection leaves its transaction, the next export runs, and the
    stalled body, read on, ends short."""
    # More batches than the socket, the response and the export's queue take ahead of a client
    # that stopped reading
    many = store_readings(platform, db, 10 * BATCH_ROWS, hours_ago=3)
    port = free_port()
    platform.start(
        "api",
        alias="api-export-timeout",
        API_PORT=str(port),
        EXPORT_TIMEOUT_S=str(EXPORT_TIMEOUT_S),
        EXPORT_MAX_CONCURRENT="1",
    )
    headers = auth(tokens["admin"])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            started = time.monotonic()
            with c.stream("GET", PATH, params=many.params("jsonl"), headers=headers) as stalled:
                assert stalled.status_code == 200
                chunks = stalled.iter_raw()
                lines = next(chunks).count(b"\n")
                # the server has written what the socket takes and waits, its transaction open
                wait_for(lambda: idle_exports(db) == 1, 10, "the stalled export waiting")
                busy = c.get(PATH, params=large.params(), headers=headers)
                assert_problem(busy, 503)
                assert time.monotonic() - started < EXPORT_TIMEOUT_S  # the slot was held

                def next_export() -> httpx.Response | None:
                    r = c.get(PATH, params=large.params(), headers=headers)
                    return None if r.status_code == 503 else r

                after = wait_for(next_export, EXPORT_TIMEOUT_S + 30, "the slot given back")
                assert time.monotonic() - started >= EXPORT_TIMEOUT_S
                rows = rows_of(after, "csv")
                assert [row["seq"] for row in rows] == list(range(large.n))
                assert idle_exports(db) == 0
                # the stalled body: what was written before the time was up, then no end
                with pytest.raises(httpx.RemoteProtocolError):
                    for chunk in chunks:
                        lines += chunk.count(b"\n")
                assert lines < many.n
    finally:
        platform.stop("api-export-timeout")
