"""Devices: list with online status, whether they are alerting and latest metrics, detail,
and downsampled readings.

A device is online when its last reading is younger than `DEVICE_OFFLINE_AFTER_S` (`ONLINE`),
alerting when one of its alerts is active (`ALERTING`: active_unacknowledged or
active_acknowledged; a partial index of migration 011 holds just those alerts).

A user scoped to sites sees the devices the registry gives to those sites; another site's
device answers 404 as an unknown one does (`query_api.scope`).

Readings are served from the raw rows or from their rollups (migration 013), chosen by
`series_query`: long ranges read about as many rows as short ones."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, NamedTuple

from litestar import Controller, Request, get
from litestar.params import Parameter
from psycopg.rows import dict_row

from contracts import METRICS
from contracts.api import (
    Bucket,
    Device,
    DevicePage,
    DeviceStatusFilter,
    Metrics,
    ReadingSeries,
    ReadingSource,
    Stat,
)
from contracts.readings import DeviceType
from query_api.pagination import MAX_LIMIT, Cursor, decode_cursor, page_of
from query_api.scope import in_scope, owns
from query_api.services import Services
from runtime.http import problem
from runtime.openapi import problems

# Conditions on a row `d` of devices (with `%(offline_after)s`, the settings' seconds).
ONLINE = "d.last_seen > now() - make_interval(secs => %(offline_after)s)"
ALERTING = (
    "EXISTS (SELECT 1 FROM alerts a WHERE a.device_id = d.device_id"
    " AND a.status IN ('active_unacknowledged', 'active_acknowledged'))"
)
_DEVICE_SQL = f"""
SELECT d.device_id, d.site_id, d.device_type, d.first_seen, d.last_seen,
       {ONLINE} AS online, {ALERTING} AS alerting,
       l.ts, {", ".join(f"l.{m}" for m in METRICS)}
FROM devices d LEFT JOIN device_latest l USING (device_id)
WHERE {in_scope("d.device_id")}
  AND (%(site_id)s::text IS NULL OR d.site_id = %(site_id)s)
  AND (%(device_type)s::text IS NULL OR d.device_type = %(device_type)s)
  AND (%(device_id)s::text IS NULL OR d.device_id = %(device_id)s)
  AND (%(after)s::text IS NULL OR d.device_id > %(after)s)
  AND {{status}}
ORDER BY d.device_id
LIMIT %(limit)s
"""
# By `status`: alerting is a condition of its own at the top of the WHERE, so the planner joins
# the active alerts' index to the devices rather than probing it device by device.
DEVICE_SQL: Final = {
    None: _DEVICE_SQL.format(status="true"),
    "online": _DEVICE_SQL.format(status=ONLINE),
    "offline": _DEVICE_SQL.format(status=f"NOT ({ONLINE})"),
    "alerting": _DEVICE_SQL.format(status=ALERTING),
}

MAX_POINTS = 2000
MAX_SPAN = timedelta(days=366)
# Up to this range a series reads raw readings, whose buckets start at `from` exactly.
RAW_MAX_SPAN = timedelta(hours=1)
ROLLUPS: Final = {"1m": ("telemetry_rollup_1m", 60), "1h": ("telemetry_rollup_1h", 3600)}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _device(row: dict[str, Any]) -> Device:
    latest = None
    if row["ts"] is not None:
        latest = Metrics(ts=row["ts"], **{m: row[m] for m in METRICS})
    return Device(
        device_id=row["device_id"],
        site_id=row["site_id"],
        device_type=row["device_type"],
        status="online" if row["online"] else "offline",
        alerting=row["alerting"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        latest=latest,
    )


def _series_sql(metrics: list[str]) -> str:
    stats = ", ".join(f"min({m}), avg({m}), max({m})" for m in metrics)
    return (
        f"SELECT date_bin(make_interval(secs => %s), ts, %s) AS bucket, count(*), {stats}"
        " FROM telemetry_readings WHERE device_id = %s AND ts >= %s AND ts < %s"
        " GROUP BY 1 ORDER BY 1"
    )


def _rollup_sql(table: str, metrics: list[str]) -> str:
    stats = ", ".join(
        f"min({m}_min), sum({m}_sum) / nullif(sum({m}_count), 0)::float8, max({m}_max)"
        for m in metrics
    )
    return (
        f"SELECT date_bin(make_interval(secs => %s), bucket, %s) AS b, sum(count)::bigint,"
        f" {stats} FROM {table} WHERE device_id = %s AND bucket >= %s AND bucket < %s"
        " GROUP BY 1 ORDER BY 1"
    )


READINGS_DESCRIPTION: Final = """\
Readings in [from, to) (default: the last hour; at most 366 days) as at most `points` time
buckets of `bucket_s` seconds, with the count of readings and min/avg/max per metric.
`source` says where they came from: the raw readings (`raw`) for a range of up to an hour or
buckets under a minute, buckets starting at `from`; else the 1-minute rollups (`1m`), or the
1-hour rollups (`1h`) for buckets of an hour or more. A range starting before the raw
readings' retention (TELEMETRY_RAW_RETENTION_DAYS) reads rollups, one before the 1-minute
rollups' retention the 1-hour ones. From rollups, `start` and `end` widen to whole minutes or
hours (UTC), `bucket_s` is a multiple of 60 or 3600, and buckets start at `start`.
404 for a device of a site outside the user's sites."""


class SeriesQuery(NamedTuple):
    """What a readings request runs: its source, range, bucket size, SQL and parameters."""

    source: ReadingSource
    start: datetime
    end: datetime
    bucket_s: int
    sql: str
    params: tuple[Any, ...]


def choose_source(
    start: datetime,
    end: datetime,
    bucket_s: int,
    now: datetime,
    raw_retention: timedelta,
    m1_retention: timedelta,
) -> ReadingSource:
    """Raw readings for a range of up to an hour or buckets under a minute (within the raw
    readings' retention); else 1-hour rollups for buckets of an hour or more (or from before
    the minute rollups' retention), and 1-minute rollups for the rest."""
    if start >= now - raw_retention and (end - start <= RAW_MAX_SPAN or bucket_s < 60):
        return "raw"
    if bucket_s >= 3600 or start < now - m1_retention:
        return "1h"
    return "1m"


def _aligned(t: datetime, step_s: int, up: bool = False) -> datetime:
    steps, rest = divmod(t - _EPOCH, timedelta(seconds=step_s))
    return _EPOCH + timedelta(seconds=step_s * (steps + (1 if up and rest else 0)))


def series_query(
    device_id: str,
    start: datetime,
    end: datetime,
    points: int,
    metrics: list[str],
    *,
    now: datetime,
    raw_retention: timedelta,
    m1_retention: timedelta,
    source: ReadingSource | None = None,
) -> SeriesQuery:
    """The query of at most `points` buckets over [start, end), from `source` (default: the
    one `choose_source` picks). From rollups, the range widens to whole rollup buckets, and the
    bucket size is a multiple of theirs, aligned to the widened start."""
    bucket_s = max(1, math.ceil((end - start).total_seconds() / points))
    source = source or choose_source(start, end, bucket_s, now, raw_retention, m1_retention)
    if source == "raw":
        params = (bucket_s, start, device_id, start, end)
        return SeriesQuery(source, start, end, bucket_s, _series_sql(metrics), params)
    table, step = ROLLUPS[source]
    lo, hi = _aligned(start, step), _aligned(end, step, up=True)
    per_point = math.ceil((hi - lo).total_seconds() / points)
    bucket_s = step * math.ceil(per_point / step)
    params = (bucket_s, lo, device_id, lo, hi)
    return SeriesQuery(source, lo, hi, bucket_s, _rollup_sql(table, metrics), params)


METRICS_PATTERN = f"^({'|'.join(METRICS)})(,({'|'.join(METRICS)}))*$"
_NUMBER = re.compile(r"^\s*[-+]?[0-9.eE+-]+\s*$")


def refuse_numeric_times(request: Request[Any, Any, Any], *names: str) -> None:
    """400 for a time parameter given as a number: the type decoder would take it as Unix
    seconds, where the document asks for an RFC 3339 date-time."""
    for name in names:
        if _NUMBER.match(request.query_params.get(name, "")):
            raise problem(400, "Invalid time range", f"{name}: an RFC 3339 date-time")


class DeviceController(Controller):
    path = "/api/v1/devices"
    tags = ["devices"]

    async def _fetch(
        self, services: Services, sites: list[str] | None, **filters: Any
    ) -> list[dict[str, Any]]:
        status = filters.pop("status", None)
        params = {
            "sites": sites,
            "site_id": None,
            "device_type": None,
            "device_id": None,
            "after": None,
            "limit": 1,
            **filters,
            "offline_after": services.settings.device_offline_after_s,
        }
        async with services.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(DEVICE_SQL[status], params)
            return await cur.fetchall()

    @get()
    async def list_devices(
        self,
        services: Services,
        request: Request[Any, Any, Any],
        site_id: str | None = None,
        device_type: Annotated[DeviceType | None, Parameter(description="only this type")] = None,
        status: Annotated[
            DeviceStatusFilter | None,
            Parameter(description="`alerting`: with an active alert (acknowledged or not)"),
        ] = None,
        cursor: Cursor = None,
        limit: Annotated[int, Parameter(ge=1, le=MAX_LIMIT)] = 100,
    ) -> DevicePage:
        """Devices in id order, with online status, whether they are alerting and their
        latest metrics (of the user's sites)."""
        after = decode_cursor(cursor, str)
        rows = await self._fetch(
            services,
            request.user.scope,
            site_id=site_id,
            device_type=device_type,
            status=status,
            after=after[0] if after else None,
            limit=limit + 1,
        )
        rows, next_cursor = page_of(rows, limit, lambda r: (r["device_id"],))
        return DevicePage(items=[_device(r) for r in rows], next_cursor=next_cursor)

    @get("/{device_id:str}", opt=problems(404))
    async def get_device(
        self, services: Services, request: Request[Any, Any, Any], device_id: str
    ) -> Device:
        rows = await self._fetch(services, request.user.scope, device_id=device_id)
        if not rows:
            raise problem(404, "Unknown device", f"no device {device_id!r} has reported")
        return _device(rows[0])

    @get("/{device_id:str}/readings", opt=problems(404), description=READINGS_DESCRIPTION)
    async def get_readings(
        self,
        services: Services,
        request: Request[Any, Any, Any],
        device_id: str,
        start: Annotated[datetime | None, Parameter(query="from")] = None,
        end: Annotated[datetime | None, Parameter(query="to")] = None,
        points: Annotated[int, Parameter(ge=1, le=MAX_POINTS)] = 300,
        metrics: Annotated[
            str | None, Parameter(pattern=METRICS_PATTERN, description="comma-separated")
        ] = None,
    ) -> ReadingSeries:
        """Readings as buckets with min/avg/max per metric (READINGS_DESCRIPTION)."""
        refuse_numeric_times(request, "from", "to")
        end = end or datetime.now(UTC)
        start = start or end - timedelta(hours=1)
        if start.tzinfo is None or end.tzinfo is None:
            raise problem(400, "Invalid time range", "from and to need a time zone")
        if not start < end or end - start > MAX_SPAN:
            raise problem(
                400, "Invalid time range", f"need from < to, at most {MAX_SPAN.days} days"
            )
        chosen = list(METRICS) if not metrics else [m.strip() for m in metrics.split(",")]
        unknown = [m for m in chosen if m not in METRICS]
        if unknown:
            raise problem(
                400, "Unknown metric", f"{', '.join(unknown)}; known: {', '.join(METRICS)}"
            )
        s = services.settings
        query = series_query(
            device_id,
            start,
            end,
            points,
            chosen,
            now=datetime.now(UTC),
            raw_retention=timedelta(days=s.telemetry_raw_retention_days),
            m1_retention=timedelta(days=s.rollup_1m_retention_days),
        )
        async with services.pool.connection() as conn:
            if not await owns(conn, request.user.scope, device_id):
                raise problem(404, "Unknown device", f"no device {device_id!r} has reported")
            cur = await conn.execute(query.sql, query.params)
            rows = await cur.fetchall()
        buckets = []
        for row in rows:
            stats = {}
            for i, m in enumerate(chosen):
                lo, avg, hi = row[2 + 3 * i : 5 + 3 * i]
                if avg is not None:
                    stats[m] = Stat(min=lo, avg=float(avg), max=hi)
            buckets.append(Bucket(t=row[0], count=row[1], metrics=stats))
        return ReadingSeries(
            device_id=device_id,
            start=query.start,
            end=query.end,
            bucket_s=query.bucket_s,
            source=query.source,
            points=buckets,
        )
