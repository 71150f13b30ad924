"""Readings export: every stored reading of a time range as one CSV, Parquet or JSON lines
file, streamed while PostgreSQL reads it.

The rows come from a server-side cursor, `BATCH_ROWS` at a time, and are written by the writers
`microgrid replay` uses (`runtime.tabular`, the same columns and types), so an export holds one
batch (and, for Parquet, one row group) whatever its range. A batch is encoded in a thread: the
event loop goes on serving other requests meanwhile. Rows come in (device_id, ts) order: the
identity index of each day's partition gives that order, so the plan is a merge of index scans
that streams from its first row, where ts order would sort the whole range before the first.

The answer starts once the first bytes are written: a refusal or an unreachable database before
that is still a problem answer; a failure after it cuts the body short (the chunked transfer
never ends, and a Parquet file has no footer), so a client can tell a partial file.

The cursor is read by a task of its own, a couple of batches ahead of the response (`_Export`):
a client that goes away stops that task once, so it closes its cursor and gives its connection
back however the response was stopped. The task has `EXPORT_TIMEOUT_S` in all, after which it
stops and the body is cut short: a client that stops reading holds a slot, a connection and
its transaction no longer than that.

A request asks for at most `EXPORT_MAX_RANGE_H` hours (`to - from`; default 168, the telemetry
log's retention). Each export holds a pooled connection and its transaction while it streams,
so at most `EXPORT_MAX_CONCURRENT` stream at once per process; past them the API answers 503
with Retry-After rather than let exports take the connections other requests need.

A user scoped to sites exports their sites' devices only (`query_api.scope`): a `site_id` of
another site exports nothing, as every list's site filter gives nothing; a `device_id` of
another site's device answers 404, as that device's readings do, since naming one device is
asking for that device rather than filtering a list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Annotated, Any, Final

import anyio
from litestar import Request, get
from litestar.background_tasks import BackgroundTask
from litestar.params import Parameter
from litestar.response import Stream

from query_api.devices import refuse_numeric_times
from query_api.scope import of_sites, owns
from query_api.services import Services
from runtime.http import problem
from runtime.openapi import files, problems
from runtime.tabular import MEDIA_TYPES, READING_COLUMNS, Chunks, Format, open_writer

BATCH_ROWS: Final = 10_000
BUSY_RETRY_AFTER_S: Final = 5
QUEUE_CHUNKS: Final = 2  # written ahead of the client: at most this many batches' bytes

log = logging.getLogger("microgrid.api")

# Where each column of READING_COLUMNS comes from: a reading's own columns, and its device's.
_SOURCES: Final = {"site_id": "d.site_id", "device_type": "d.device_type"}
_SELECT: Final = ", ".join(_SOURCES.get(c.name, f"r.{c.name}") for c in READING_COLUMNS)


@cache
def export_sql(scoped: bool, site: bool, device: bool) -> str:
    """The export's query with only the conditions the request needs: a scoped user's sites
    ANDed at the top (`of_sites`), so the planner joins the sites' devices to the readings."""
    conditions = ["r.ts >= %(start)s", "r.ts < %(end)s"]
    if scoped:
        conditions.append(of_sites("r.device_id"))
    if site:
        conditions.append("d.site_id = %(site_id)s")
    if device:
        conditions.append("r.device_id = %(device_id)s")
    return (
        f"SELECT {_SELECT} FROM telemetry_readings r JOIN devices d USING (device_id)"
        f" WHERE {' AND '.join(conditions)} ORDER BY r.device_id, r.ts"
    )


def _utc(name: str, value: datetime) -> datetime:
    if value.tzinfo is None:
        raise problem(400, "Invalid time range", "from and to need a time zone")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise problem(400, "Invalid time range", f"{name} is out of range") from None


def file_name(start: datetime, end: datetime, of: str | None, fmt: Format) -> str:
    """`readings_[<site or device>_]<from>_<to>.<format>`, in characters any file system and
    header takes."""
    stamp = "%Y%m%dT%H%M%SZ"
    parts = ["readings", *([re.sub(r"[^A-Za-z0-9.-]", "_", of)[:64]] if of else [])]
    parts += [f"{start:{stamp}}", f"{end:{stamp}}"]
    return f"{'_'.join(parts)}.{fmt}"


async def _chunks(
    services: Services, sql: str, params: dict[str, Any], fmt: Format
) -> AsyncGenerator[bytes, None]:
    """The file's bytes, written a batch of rows at a time as the cursor gives them."""
    if services.exports.locked():
        raise problem(
            503,
            "Too many exports at once",
            f"{services.settings.export_max_concurrent} exports are streaming: retry shortly",
            headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
        )
    async with services.exports, services.pool.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        sink = Chunks()
        writer = open_writer(fmt, sink, READING_COLUMNS)
        async with conn.cursor("readings_export", binary=True) as cur:
            await cur.execute(sql, params)
            while rows := await cur.fetchmany(BATCH_ROWS):
                await asyncio.to_thread(writer.write, rows)
                if data := sink.take():
                    yield data
        await asyncio.to_thread(writer.close)
        yield sink.take()


class _Export:
    """One export's bytes, made by a task of its own and handed to the response through a small
    queue.

    Litestar's `Stream` stops a response whose client went away by cancelling it through an anyio
    cancel scope, which cancels again at every await of the cleanup after it: the cursor's CLOSE,
    the rollback, the pool's putconn. The cursor is therefore read in a plain asyncio task, which
    is cancelled once (`close`), so its `async with` blocks end normally and the connection goes
    back to the pool. The task is given `EXPORT_TIMEOUT_S` in all: a client that stops reading
    (its send waits for the socket to drain, and so does the task, on the full queue) holds the
    connection, its transaction and the export's slot that long at most; then the body ends
    short, as after any failure."""

    def __init__(self, services: Services, sql: str, params: dict[str, Any], fmt: Format) -> None:
        # each item: bytes to send, None for the end, or the error that cut the export short
        self._queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue(QUEUE_CHUNKS)
        self._ended = False
        self._task = asyncio.create_task(self._produce(services, sql, params, fmt))

    async def _produce(
        self, services: Services, sql: str, params: dict[str, Any], fmt: Format
    ) -> None:
        limit = services.settings.export_timeout_s
        error: Exception
        try:
            async with asyncio.timeout(limit) as deadline:
                async with contextlib.aclosing(_chunks(services, sql, params, fmt)) as chunks:
                    async for data in chunks:
                        if data:
                            await self._queue.put(data)
        except Exception as exc:
            error = exc
            if isinstance(exc, TimeoutError) and deadline.expired():
                log.warning("readings export stopped after EXPORT_TIMEOUT_S (%g s)", limit)
                error = problem(
                    503,
                    "Export took too long",
                    f"an export may stream for {limit:g} s at most (EXPORT_TIMEOUT_S):"
                    " ask for a shorter range",
                )
        else:
            await self._queue.put(None)
            return
        # Cut short: the chunks still queued are dropped (the body ends short anyway), so the
        # error is the next item even while nobody reads the queue.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(error)

    async def next(self) -> bytes | None:
        """The next bytes, or None at the end; the export's error if it was cut short."""
        if self._ended:
            return None
        item = await self._queue.get()
        if item is None or isinstance(item, Exception):
            self._ended = True
            if item is not None:
                raise item
        return item

    async def body(self, first: bytes | None) -> AsyncIterator[bytes]:
        """`first`, then the rest; the task is stopped however the response ends."""
        try:
            data = first
            while data is not None:
                yield data
                data = await self.next()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop the task (once: it closes its cursor, transaction and connection normally) and
        wait for it, shielded from the response's cancellation. Idempotent."""
        self._task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait([self._task])


async def _respond(
    services: Services, sql: str, params: dict[str, Any], fmt: Format, name: str
) -> Stream:
    """The export as a file answer, once its first bytes are there: refusals and outages up to
    them are raised, and so answered as problems."""
    export = _Export(services, sql, params, fmt)
    try:
        first = await export.next()
    except BaseException:
        await export.close()
        raise
    return Stream(
        export.body(first),
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
        # Litestar never closes the iterator: a response stopped while it was sending leaves
        # `body` suspended at a yield, its `finally` to the garbage collector. This stops the
        # task as soon as the response has ended.
        background=BackgroundTask(export.close),
    )


DESCRIPTION: Final = """Every stored reading with `from <= ts < to` as one file, streamed as it
is read: one row per reading with the columns device_id, site_id, device_type, ts (UTC), seq and
one per metric (empty in CSV, null in Parquet, left out in JSON lines when the reading has none),
in device_id then ts order. `format`: csv (the default), parquet or jsonl.

The range may be at most `EXPORT_MAX_RANGE_H` hours long (`to - from`; by default 168, the
telemetry log's retention): a longer one, `from >= to`, a missing bound or a time without a zone
is 400. At most `EXPORT_MAX_CONCURRENT` exports stream at once per API process (by default 2);
past them 503 with Retry-After.

Within the user's sites: without `site_id`, the user's sites' readings; a `site_id` of another
site exports no rows (as every list's site filter); a `device_id` of another site's device is
404, as for an unknown one and for that device's readings.

An export streams for at most `EXPORT_TIMEOUT_S` seconds (by default 600), however slowly its
client reads: past them it stops, as after a failure.

The answer is chunked: a failure after the first bytes cuts it short (no final chunk; a
Parquet file without its footer), which clients see as an incomplete transfer."""


@get(
    "/api/v1/readings/export",
    tags=["readings"],
    description=DESCRIPTION,
    opt={**problems(404), **files(*(MEDIA_TYPES[f] for f in ("csv", "parquet", "jsonl")))},
    response_description="The readings as a file (chunked: a body cut short is incomplete)",
)
async def export_readings(
    services: Services,
    request: Request[Any, Any, Any],
    start: Annotated[
        datetime, Parameter(query="from", description="RFC 3339 with a zone; included")
    ],
    end: Annotated[datetime, Parameter(query="to", description="RFC 3339 with a zone; excluded")],
    site_id: Annotated[str | None, Parameter(description="only this site's devices")] = None,
    device_id: Annotated[str | None, Parameter(description="only this device")] = None,
    fmt: Annotated[
        Format, Parameter(query="format", description="csv (default), parquet or jsonl")
    ] = "csv",
) -> Stream:
    """The readings of [from, to) as a file, streamed (`DESCRIPTION`)."""
    refuse_numeric_times(request, "from", "to")
    start, end = _utc("from", start), _utc("to", end)
    hours = services.settings.export_max_range_h
    if not start < end or end - start > timedelta(hours=hours):
        raise problem(
            400,
            "Invalid time range",
            f"need from < to, at most {hours} hours apart (EXPORT_MAX_RANGE_H)",
        )
    sites = request.user.scope
    if device_id is not None and sites is not None:
        async with services.pool.connection() as conn:
            if not await owns(conn, sites, device_id):
                raise problem(404, "Unknown device", f"no device {device_id!r} has reported")
    sql = export_sql(sites is not None, site_id is not None, device_id is not None)
    params = {
        "start": start,
        "end": end,
        "sites": sites,
        "site_id": site_id,
        "device_id": device_id,
    }
    name = file_name(start, end, device_id or site_id, fmt)
    return await _respond(services, sql, params, fmt, name)
