"""Rollups: the 1-minute and 1-hour rollups equal an aggregate of the stored readings (late
readings in, repeats and conflicting duplicates never counted); the readings route serves long
ranges from them, and retention drops whole expired day partitions."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from contracts import METRICS
from query_api.devices import series_query
from runtime.keys import create_key
from runtime.settings import Settings
from tests.conftest import Components, wait_for
from tests.support import new_device

CONFLICTING_POWER = 77_777.0  # in range, and no other reading of the test has it
STATS = ", ".join(f"{m}_count, {m}_sum, {m}_min, {m}_max" for m in METRICS)
RAW_STATS = ", ".join(f"count({m}), sum({m}), min({m}), max({m})" for m in METRICS)


def body(device: str, site: str, ts: datetime, k: int, **metrics: float | None) -> dict[str, Any]:
    values: dict[str, float | None] = {
        "voltage_v": 230.0 + k % 7,
        "power_kw": float((k * 37) % 101 - 50) + 0.25,
        "soc_pct": None if k % 3 == 0 else 20.0 + k % 50,  # a metric a reading may lack
        **metrics,
    }
    reading: dict[str, Any] = {"device_id": device, "site_id": site, "device_type": "battery"}
    reading |= {"ts": ts.isoformat(), "seq": k}
    return reading | {m: v for m, v in values.items() if v is not None}


def post(platform: Components, key: str, readings: list[dict[str, Any]]) -> None:
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry/batch",
        headers={"Authorization": f"Bearer {key}"},
        json={"readings": readings},
        timeout=10,
    )
    assert r.status_code == 202, r.text


def stored(db: psycopg.Connection, device: str) -> int:
    row = db.execute(
        "SELECT count(*) FROM telemetry_readings WHERE device_id = %s", (device,)
    ).fetchone()
    return int(row[0]) if row else 0


def rollup_rows(db: psycopg.Connection, table: str, device: str) -> list[tuple[Any, ...]]:
    return db.execute(
        f"SELECT bucket, count, {STATS} FROM {table} WHERE device_id = %s ORDER BY bucket",
        (device,),
    ).fetchall()


def raw_aggregate(db: psycopg.Connection, device: str, step: str) -> list[tuple[Any, ...]]:
    return db.execute(
        f"SELECT date_bin(%s::interval, ts, timestamptz 'epoch') AS b, count(*), {RAW_STATS}"
        " FROM telemetry_readings WHERE device_id = %s GROUP BY 1 ORDER BY 1",
        (step, device),
    ).fetchall()


def assert_same(rollups: list[tuple[Any, ...]], raw: list[tuple[Any, ...]]) -> None:
    """Counts, minima and maxima exactly; sums to float rounding (added in another order)."""
    assert [r[:2] for r in rollups] == [r[:2] for r in raw]
    for got, want in zip(rollups, raw, strict=True):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if (i - 2) % 4 == 1 and w is not None:  # a sum
                assert g == pytest.approx(w, rel=1e-12), (got[0], i)
            else:
                assert g == w, (got[0], i)


@pytest.fixture(scope="module")
def history(platform: Components, stack: Settings) -> Iterator[tuple[str, datetime]]:
    """A device with readings over three past hours, then a late reading, a retry of a stored
    one and a conflicting duplicate in one batch, and a marker that ends it."""
    site = f"site-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(stack.database_url, autocommit=True) as db:
        key = create_key(db, site)
        device = new_device()
        base = (datetime.now(UTC) - timedelta(hours=4)).replace(minute=0, second=0, microsecond=0)
        first = [
            body(device, site, base + timedelta(minutes=7 * k, seconds=k), k) for k in range(26)
        ]
        post(platform, key, first)
        wait_for(lambda: stored(db, device) == 26, 60, "the first 26 readings stored")
        # older than the newest, in the minute and hour of reading 1 (stored)
        late = body(device, site, base + timedelta(minutes=7, seconds=40), 100, power_kw=-49.5)
        conflict = first[2] | {"power_kw": CONFLICTING_POWER}
        marker = body(device, site, base + timedelta(hours=3, minutes=1), 101)
        post(platform, key, [late, first[0], late, conflict, marker])
        wait_for(lambda: stored(db, device) == 28, 60, "the late reading and the marker stored")
    yield device, base


def test_rollups_equal_an_aggregate_of_the_stored_readings(
    history: tuple[str, datetime], db: psycopg.Connection
) -> None:
    device, base = history
    minutes = rollup_rows(db, "telemetry_rollup_1m", device)
    assert_same(minutes, raw_aggregate(db, device, "1 minute"))
    hours = rollup_rows(db, "telemetry_rollup_1h", device)
    assert_same(hours, raw_aggregate(db, device, "1 hour"))
    assert sum(r[1] for r in minutes) == sum(r[1] for r in hours) == 28  # each reading once
    assert [r[0] for r in hours] == [base + timedelta(hours=h) for h in range(4)]
    late_minute = next(r for r in minutes if r[0] == base + timedelta(minutes=7))
    assert late_minute[1] == 2  # reading 1 and the late one
    power_max = 2 + 4 * METRICS.index("power_kw") + 3
    assert CONFLICTING_POWER not in {r[power_max] for r in minutes + hours}


def relations(db: psycopg.Connection, sql: str, params: tuple[Any, ...]) -> set[str]:
    """The tables a query's plan reads."""
    row = db.execute(f"EXPLAIN (FORMAT JSON) {sql}", params).fetchone()
    assert row is not None
    plan: dict[str, Any] = row[0][0]

    def walk(node: dict[str, Any]) -> Iterator[str]:
        if "Relation Name" in node:
            yield node["Relation Name"]
        for child in node.get("Plans", []):
            yield from walk(child)

    return set(walk(plan["Plan"]))


def readings(
    platform: Components, token: str, device: str, start: datetime, end: datetime
) -> dict[str, Any]:
    r = httpx.get(
        f"{platform.api_url}/api/v1/devices/{device}/readings",
        params={"from": start.isoformat(), "to": end.isoformat(), "metrics": "power_kw,soc_pct"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def expected_series(
    db: psycopg.Connection, device: str, series: dict[str, Any]
) -> list[tuple[Any, ...]]:
    """The series computed from the raw readings over the response's buckets."""
    start = datetime.fromisoformat(series["start"])
    return db.execute(
        "SELECT date_bin(make_interval(secs => %s), ts, %s), count(*),"
        " min(power_kw), avg(power_kw), max(power_kw), min(soc_pct), avg(soc_pct), max(soc_pct)"
        " FROM telemetry_readings WHERE device_id = %s AND ts >= %s AND ts < %s"
        " GROUP BY 1 ORDER BY 1",
        (series["bucket_s"], start, device, start, datetime.fromisoformat(series["end"])),
    ).fetchall()


def assert_series(series: dict[str, Any], expected: list[tuple[Any, ...]]) -> None:
    got = series["points"]
    assert [(datetime.fromisoformat(p["t"]), p["count"]) for p in got] == [e[:2] for e in expected]
    for p, e in zip(got, expected, strict=True):
        for i, m in enumerate(("power_kw", "soc_pct")):
            lo, avg, hi = e[2 + 3 * i : 5 + 3 * i]
            if avg is None:
                assert m not in p["metrics"]
                continue
            stat = p["metrics"][m]
            assert (stat["min"], stat["max"]) == (lo, hi)
            assert stat["avg"] == pytest.approx(avg, rel=1e-12)


@pytest.mark.parametrize(
    ("span", "source", "table"),
    [
        (timedelta(days=30), "1h", "telemetry_rollup_1h"),
        (timedelta(hours=12), "1m", "telemetry_rollup_1m"),
    ],
)
def test_long_ranges_are_served_from_the_rollups(
    history: tuple[str, datetime],
    platform: Components,
    stack: Settings,
    tokens: dict[str, str],
    db: psycopg.Connection,
    span: timedelta,
    source: str,
    table: str,
) -> None:
    device, base = history
    end = base + timedelta(hours=3, minutes=30, seconds=17)
    start = end - span
    series = readings(platform, tokens["viewer"], device, start, end)
    step = 3600 if source == "1h" else 60
    assert series["source"] == source
    assert series["bucket_s"] % step == 0
    lo, hi = datetime.fromisoformat(series["start"]), datetime.fromisoformat(series["end"])
    assert lo <= start < lo + timedelta(seconds=step) and hi - timedelta(seconds=step) < end <= hi
    assert len(series["points"]) <= 300
    assert sum(p["count"] for p in series["points"]) == 28
    assert_series(series, expected_series(db, device, series))

    query = series_query(
        device,
        start,
        end,
        300,
        ["power_kw", "soc_pct"],
        now=datetime.now(UTC),
        raw_retention=timedelta(days=stack.telemetry_raw_retention_days),
        m1_retention=timedelta(days=stack.rollup_1m_retention_days),
    )
    assert (query.source, query.bucket_s) == (source, series["bucket_s"])
    read = relations(db, query.sql, query.params)
    assert any(r.startswith(table) for r in read), read
    assert not any(r.startswith("telemetry_readings") for r in read), read


def test_an_hour_is_served_from_the_raw_readings(
    history: tuple[str, datetime],
    platform: Components,
    stack: Settings,
    tokens: dict[str, str],
    db: psycopg.Connection,
) -> None:
    device, base = history
    start = base + timedelta(minutes=5, seconds=3)
    end = start + timedelta(hours=1)
    series = readings(platform, tokens["viewer"], device, start, end)
    assert series["source"] == "raw"
    assert (datetime.fromisoformat(series["start"]), series["bucket_s"]) == (start, 12)
    assert_series(series, expected_series(db, device, series))
    query = series_query(
        device,
        start,
        end,
        300,
        ["power_kw", "soc_pct"],
        now=datetime.now(UTC),
        raw_retention=timedelta(days=stack.telemetry_raw_retention_days),
        m1_retention=timedelta(days=stack.rollup_1m_retention_days),
    )
    read = relations(db, query.sql, query.params)
    assert any(r.startswith("telemetry_readings") for r in read), read
    assert not any(r.startswith("telemetry_rollup") for r in read), read


def test_retention_drops_the_expired_day_partitions_only(db: psycopg.Connection) -> None:
    """In a schema of its own (the functions work on the tables the search_path finds):
    readings kept 30 days, minute rollups 90, hour rollups 730."""
    schema = f"retention_{uuid.uuid4().hex[:8]}"
    today = datetime.now(UTC).date()
    ages = (120, 95, 89, 40, 31, 29, 1, 0)  # days before today
    db.execute(f"CREATE SCHEMA {schema}")
    try:
        for table, key in (("telemetry_readings", "ts"), ("telemetry_rollup_1m", "bucket")):
            db.execute(
                f"CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"
                f" PARTITION BY RANGE ({key})"
            )
        db.execute(
            f"CREATE TABLE {schema}.telemetry_rollup_1h"
            " (LIKE public.telemetry_rollup_1h INCLUDING ALL)"
        )
        db.execute(f"SET search_path = {schema}, public")
        counts = ", ".join(f"{m}_count" for m in METRICS)
        zeros = ", ".join("0" for _ in METRICS)
        for age in ages:
            day = today - timedelta(days=age)
            db.execute("SELECT ensure_telemetry_partition(%s)", (day,))
            noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
            db.execute("INSERT INTO telemetry_readings (device_id, ts) VALUES ('d', %s)", (noon,))
            db.execute(
                f"INSERT INTO telemetry_rollup_1m (device_id, bucket, count, {counts})"
                f" VALUES ('d', %s, 1, {zeros})",
                (noon,),
            )
        now = datetime.now(UTC)
        hours = [now - timedelta(days=731), now - timedelta(days=729)]
        for hour in hours:
            db.execute(
                f"INSERT INTO telemetry_rollup_1h (device_id, bucket, count, {counts})"
                f" VALUES ('d', date_bin('1 hour', %s, timestamptz 'epoch'), 1, {zeros})",
                (hour,),
            )

        dropped = db.execute("SELECT * FROM drop_expired_telemetry(30, 90, 730)").fetchall()

        def suffix(age: int) -> str:
            return (today - timedelta(days=age)).strftime("%Y%m%d")

        expected: set[tuple[str, int | None]] = {
            (f"{schema}.telemetry_readings_{suffix(a)}", None) for a in (120, 95, 89, 40, 31)
        }
        expected |= {(f"{schema}.telemetry_rollup_1m_{suffix(a)}", None) for a in (120, 95)}
        expected |= {("telemetry_rollup_1h", 1)}
        assert set(dropped) == expected
        left = {
            name
            for (name,) in db.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)
            )
        }
        assert left == {
            "telemetry_readings",
            "telemetry_rollup_1m",
            "telemetry_rollup_1h",
            *(f"telemetry_readings_{suffix(a)}" for a in (29, 1, 0)),
            *(f"telemetry_rollup_1m_{suffix(a)}" for a in (89, 40, 31, 29, 1, 0)),
        }
        rows = db.execute("SELECT count(*) FROM telemetry_readings").fetchone()
        assert rows == (3,)
        assert db.execute("SELECT count(*) FROM telemetry_rollup_1h").fetchone() == (1,)
        again = db.execute("SELECT * FROM drop_expired_telemetry(30, 90, 730)").fetchall()
        assert again == []
    finally:
        db.execute("SET search_path TO DEFAULT")
        db.execute(f"DROP SCHEMA {schema} CASCADE")
