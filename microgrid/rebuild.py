"""`microgrid rebuild telemetry|alerts|control|rollups`: a read model rebuilt from its topic into
fresh tables beside the live ones, swapped in atomically, then compared with what it replaced.

The projection's own code does the work (`apply` of `projections.telemetry`, `.alerts`,
`.control`), on a connection whose `search_path` puts a scratch schema first, so its unqualified
SQL writes the scratch tables; they are made like the live ones (columns, defaults, checks,
constraints and indexes under their own names, partitioned the same way). What the projection
sends elsewhere goes nowhere: dead letters are counted, live events dropped. The topic is read
without a consumer group (`microgrid.logread`), so no live position moves.

1. **Carry-over.** Once the log has lost records to retention (a partition no longer begins
   at offset 0), rows older than the log can still restore are copied from the live tables as
   they are: their time (a reading's `ts`, a rollup's bucket, an alert's opening, a command's
   creation; a notification's creation, or its alert's opening) is before the cutoff,
   `now - retention + skew + 1 h` rounded up to the hour. Records younger than the retention
   are never deleted by Kafka, so everything from the cutoff on comes from the log alone.
   Devices and latest values are carried whole, then updated from the log. One snapshot holds
   the rows carried and the live positions they reflect: readings before the cutoff are
   skipped in the records before those positions (the rows hold them), and applied after them
   (a reading that came late during the rebuild). Alert and control events are applied on top
   of the rows carried: their projections only move a row forward.
2. **Bulk.** Every partition from its beginning up to the live projection's stored position,
   a poll per transaction, with a progress bar. The live projection keeps running.
3. **Catch-up.** Again up to the live positions, until fewer than `CATCH_UP_RECORDS` are left.
4. **Freeze and compare.** The live tables are locked against writes (`EXCLUSIVE`: readers go
   on, the live projection waits) and the live positions read under `FOR UPDATE`; the last
   records are applied, a repeatable-read snapshot is taken, and the lock is released. The
   comparison runs in that snapshot (`EXCEPT ALL` both ways, leaving out columns set by the
   clock at write time, rollup sums compared as `real`) while the live projection goes on.
5. **Swap.** One short transaction: the live tables locked (`ACCESS EXCLUSIVE`), the records
   since the comparison applied, the live tables moved to a backup schema and the rebuilt ones
   into `public`. The live projection then goes on from its positions, which are exactly where
   the rebuild stopped, into the new tables (PostgreSQL resolves names again after the move,
   prepared statements included).

A second rebuild of the same model waits for nothing: an advisory lock refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from psycopg import sql
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from contracts import METRICS, Topics
from microgrid.logread import (
    KafkaUnreachable,
    log_consumer,
    missing_topic,
    read_ranges,
    topic_partitions,
)
from microgrid.logread import start as start_consumer
from projections.alerts import AlertsProjection
from projections.base import REFUSED, Projection
from projections.control import ControlProjection
from projections.telemetry import Source, TelemetryProjection
from runtime.settings import Settings

HOUR: Final = timedelta(hours=1)
CATCH_UP_RECORDS: Final = 5_000  # left to read before the swap locks the live tables
MAX_ROUNDS: Final = 20
SAMPLES: Final = 5  # differing rows shown per table and side


class RebuildError(RuntimeError):
    """A rebuild that cannot start or go on, with a message for the command line."""


@dataclass(frozen=True)
class Model:
    name: str
    topic: str
    projection: Callable[[Settings], Projection[Any]]
    built: tuple[str, ...]  # tables the projection writes, all made in the scratch schema
    swapped: tuple[str, ...]  # of those, the ones swapped and compared (in write order)
    # table -> which rows are carried over, given %(cutoff)s (None: every row)
    carried: dict[str, str | None]
    volatile: dict[str, tuple[str, ...]] = field(default_factory=dict)  # set by the clock
    approximate: dict[str, tuple[str, ...]] = field(default_factory=dict)  # float sums
    retention_hours: Callable[[Settings], int] = lambda s: s.dlq_retention_hours


def _metrics_sums() -> tuple[str, ...]:
    return tuple(f"{m}_sum" for m in METRICS)


TELEMETRY_TABLES: Final = (
    "telemetry_readings",
    "devices",
    "device_latest",
    "telemetry_rollup_1m",
    "telemetry_rollup_1h",
)
ROLLUPS: Final = ("telemetry_rollup_1m", "telemetry_rollup_1h")


class _Silent:
    """Live events of a rebuild go nowhere."""

    async def append(self, events: list[tuple[str, Any]]) -> None:
        return None


def _telemetry(s: Settings) -> Projection[Any]:
    return TelemetryProjection(s, _Silent(), group="rebuild.telemetry")  # type: ignore[arg-type]


def _alerts(s: Settings) -> Projection[Any]:
    return AlertsProjection(s, _Silent(), group="rebuild.alerts")  # type: ignore[arg-type]


def _control(s: Settings) -> Projection[Any]:
    return ControlProjection(s, _Silent(), group="rebuild.control")  # type: ignore[arg-type]


_TELEMETRY_CARRIED: Final[dict[str, str | None]] = {
    "telemetry_readings": "ts < %(cutoff)s",
    "devices": None,
    "device_latest": None,
    "telemetry_rollup_1m": "bucket < %(cutoff)s",
    "telemetry_rollup_1h": "bucket < %(cutoff)s",
}
MODELS: Final[dict[str, Model]] = {
    "telemetry": Model(
        "telemetry",
        Topics.TELEMETRY_VALID,
        _telemetry,
        TELEMETRY_TABLES,
        TELEMETRY_TABLES,
        _TELEMETRY_CARRIED,
        volatile={"telemetry_readings": ("ingested_at",), "device_latest": ("updated_at",)},
        approximate={t: _metrics_sums() for t in ROLLUPS},
        retention_hours=lambda s: s.telemetry_retention_hours,
    ),
    "rollups": Model(
        "rollups",
        Topics.TELEMETRY_VALID,
        _telemetry,
        TELEMETRY_TABLES,
        ROLLUPS,
        {t: _TELEMETRY_CARRIED[t] for t in ROLLUPS},
        approximate={t: _metrics_sums() for t in ROLLUPS},
        retention_hours=lambda s: s.telemetry_retention_hours,
    ),
    "alerts": Model(
        "alerts",
        Topics.ALERTS,
        _alerts,
        ("alerts", "notifications"),
        ("alerts", "notifications"),
        {
            "alerts": "opened_at < %(cutoff)s",
            # with the alerts carried over, all their notifications: a clear the log replays
            # changes no alert carried over already cleared, and so makes no notification
            "notifications": "created_at < %(cutoff)s OR alert_id IN"
            " (SELECT id FROM public.alerts WHERE opened_at < %(cutoff)s)",
        },
    ),
    "control": Model(
        "control",
        Topics.CONTROL_EVENTS,
        _control,
        ("control_commands",),
        ("control_commands",),
        {"control_commands": "created_at < %(cutoff)s"},
    ),
}


class _CountedLetters:
    """In place of the projection's dead-letter producer: counts what it would have sent."""

    def __init__(self) -> None:
        self.count = 0

    async def send(self, records: Sequence[Any]) -> None:
        self.count += len(records)

    async def send_letters(self, letters: Sequence[Any]) -> None:
        self.count += len(letters)

    async def close(self) -> None:
        return None


@dataclass
class Difference:
    table: str
    only_new: int  # rows the rebuild has and the live table had not
    only_old: int
    samples_new: list[dict[str, Any]]
    samples_old: list[dict[str, Any]]
    rows: int  # in the rebuilt table


@dataclass
class Summary:
    model: str
    swapped: bool
    records: int = 0
    applied: int = 0  # records whose content was applied
    refused: int = 0  # records the projection would have dead-lettered
    skipped_rows: int = 0  # readings before the cutoff (restored by the carry-over)
    carried: dict[str, int] = field(default_factory=dict)
    cutoff: datetime | None = None
    rows: dict[str, int] = field(default_factory=dict)  # per table, after the rebuild
    differences: list[Difference] = field(default_factory=list)
    backup_schema: str | None = None
    elapsed_s: float = 0.0
    pause_s: float = 0.0  # how long the live tables were locked against writes

    @property
    def rate(self) -> float:
        return self.records / self.elapsed_s if self.elapsed_s else 0.0


# --- the scratch schema ----------------------------------------------------------------------


def _q(*parts: str) -> sql.Composable:
    return sql.Identifier(*parts)


async def _make_tables(conn: psycopg.AsyncConnection, scratch: str, tables: Sequence[str]) -> None:
    """Tables in `scratch` made like the live ones, constraints and indexes under their names."""
    for table in tables:
        live = f"public.{table}"
        cur = await conn.execute(
            "SELECT pg_get_partkeydef(oid), array_to_string(reloptions, ', ') FROM pg_class"
            " WHERE oid = %s::regclass",
            (live,),
        )
        row = await cur.fetchone()
        partition = sql.SQL(f" PARTITION BY {row[0]}") if row and row[0] else sql.SQL("")
        options = sql.SQL(f" WITH ({row[1]})") if row and row[1] else sql.SQL("")  # fillfactor
        await conn.execute(
            sql.SQL(
                "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
                " INCLUDING GENERATED INCLUDING STORAGE){}{}"
            ).format(_q(scratch, table), _q("public", table), partition, options)
        )
        cur = await conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = %s::regclass AND contype IN ('p', 'u', 'x') ORDER BY conname",
            (live,),
        )
        for name, definition in await cur.fetchall():
            await conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    _q(scratch, table), _q(name), sql.SQL(definition)
                )
            )
        cur = await conn.execute(
            "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indrelid = %s::regclass"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"
            " ORDER BY i.indexrelid",
            (live,),
        )
        on_live = re.compile(rf" ON (ONLY )?public\.{re.escape(table)} ")
        for (definition,) in await cur.fetchall():
            made = on_live.sub(f' ON "{scratch}".{table} ', definition, count=1)
            await conn.execute(sql.SQL(made))


_PARTITION_DAY = re.compile(r"_(\d{8})$")


async def _partition_days(conn: psycopg.AsyncConnection, tables: Sequence[str]) -> set[date]:
    """The days of the live tables' day partitions."""
    days: set[date] = set()
    for table in tables:
        cur = await conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = %s::regclass",
            (f"public.{table}",),
        )
        for (name,) in await cur.fetchall():
            if m := _PARTITION_DAY.search(name):
                days.add(datetime.strptime(m.group(1), "%Y%m%d").date())
    return days


async def _partitions(conn: psycopg.AsyncConnection, schema: str, table: str) -> list[str]:
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = %s::regclass ORDER BY 1",
        (f'"{schema}".{table}',),
    )
    return [name for (name,) in await cur.fetchall()]


async def _columns(conn: psycopg.AsyncConnection, table: str) -> list[str]:
    cur = await conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
        " AND NOT attisdropped ORDER BY attnum",
        (f"public.{table}",),
    )
    return [name for (name,) in await cur.fetchall()]


async def _carry(
    conn: psycopg.AsyncConnection, scratch: str, model: Model, cutoff: datetime | None
) -> dict[str, int]:
    """Copy what the log can no longer restore from the live tables (nothing while it holds
    everything)."""
    carried: dict[str, int] = {}
    if cutoff is None:
        return carried
    for table, condition in model.carried.items():
        cols = sql.SQL(", ").join(_q(c) for c in await _columns(conn, table))
        where = sql.SQL(" WHERE " + condition) if condition else sql.SQL("")
        cur = await conn.execute(
            sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}{}").format(
                _q(scratch, table), cols, cols, _q("public", table), where
            ),
            {"cutoff": cutoff} if condition else None,
        )
        carried[table] = cur.rowcount
    return carried


# --- reading and applying the log ------------------------------------------------------------


class _Applier:
    """Applies the topic's records with the projection's own code to the scratch tables."""

    def __init__(self, projection: Projection[Any], cutoff: datetime | None) -> None:
        self.p = projection
        self.letters = _CountedLetters()
        projection.dead_letters = self.letters  # type: ignore[assignment]
        self.cutoff = cutoff
        # per partition, the live position the rows carried over reflect: readings before the
        # cutoff in the records before it are in those rows already
        self.carried_upto: dict[int, int] = {}
        self.records = 0
        self.applied = 0
        self.refused = 0
        self.skipped = 0

    def _item(self, rec: ConsumerRecord[bytes, bytes]) -> Any | None:
        try:
            item = self.p.decode(rec)
        except (ValueError, msgspec.MsgspecError):
            self.refused += 1
            return None
        if (
            self.cutoff is not None
            and isinstance(item, Source)
            and rec.offset < self.carried_upto.get(rec.partition, 0)
        ):
            kept = [r for r in item.readings if r.ts >= self.cutoff]
            if len(kept) < len(item.readings):
                self.skipped += len(item.readings) - len(kept)
                item = msgspec.structs.replace(item, readings=kept)
            if not kept:
                return None
        return item

    async def apply(
        self, conn: psycopg.AsyncConnection, records: list[ConsumerRecord[bytes, bytes]]
    ) -> None:
        self.records += len(records)
        items = [i for i in map(self._item, records) if i is not None]
        if not items:
            return
        # what apply returns to run after the commit announces live events: not wanted here
        try:
            async with conn.transaction():
                await self.p.apply(conn, items)
            self.applied += len(items)
        except REFUSED:  # as the live projection: one by one, each in a savepoint
            async with conn.transaction():
                for item in items:
                    try:
                        async with conn.transaction():
                            await self.p.apply(conn, [item])
                        self.applied += 1
                    except REFUSED:
                        self.refused += 1


async def _live_positions(
    conn: psycopg.AsyncConnection,
    projection: str,
    topic: str,
    begins: dict[TopicPartition, int],
    lock: bool = False,
) -> dict[TopicPartition, int]:
    """Where the live projection stands in each partition (its beginning when it has
    projected nothing there), never before the log's beginning."""
    cur = await conn.execute(
        "SELECT partition, next_offset FROM public.projection_offsets"
        " WHERE projection = %s AND topic = %s" + (" FOR UPDATE" if lock else ""),
        (projection, topic),
    )
    stored: dict[int, int] = dict(await cur.fetchall())
    return {tp: max(begins[tp], stored.get(tp.partition, -1)) for tp in begins}


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} records/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


# --- comparison and swap ----------------------------------------------------------------------


async def _compare(
    conn: psycopg.AsyncConnection, scratch: str, model: Model, table: str
) -> Difference:
    columns = [c for c in await _columns(conn, table) if c not in model.volatile.get(table, ())]
    approx = set(model.approximate.get(table, ()))
    cols = sql.SQL(", ").join(
        sql.SQL("{}::real AS {}").format(_q(c), _q(c)) if c in approx else _q(c) for c in columns
    )

    async def side(a: str, b: str) -> tuple[int, list[dict[str, Any]]]:
        query = sql.SQL("SELECT {} FROM {} EXCEPT ALL SELECT {} FROM {}").format(
            cols, _q(a, table), cols, _q(b, table)
        )
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM ({}) d").format(query))
        row = await cur.fetchone()
        n = int(row[0]) if row else 0
        samples: list[dict[str, Any]] = []
        if n:
            cur = await conn.execute(sql.SQL("{} LIMIT {}").format(query, sql.Literal(SAMPLES)))
            samples = [dict(zip(columns, r, strict=True)) for r in await cur.fetchall()]
        return n, samples

    only_new, samples_new = await side(scratch, "public")
    only_old, samples_old = await side("public", scratch)
    cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_q(scratch, table)))
    row = await cur.fetchone()
    return Difference(table, only_new, only_old, samples_new, samples_old, row[0] if row else 0)


async def _move(conn: psycopg.AsyncConnection, table: str, source: str, target: str) -> None:
    """Move a table, and its partitions (which ALTER TABLE does not move), to another schema."""
    for part in await _partitions(conn, source, table):
        await conn.execute(
            sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(_q(source, part), _q(target))
        )
    await conn.execute(
        sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(_q(source, table), _q(target))
    )


# --- the command -------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the steps of one rebuild share."""

    s: Settings
    model: Model
    scratch: str
    conn: psycopg.AsyncConnection  # search_path: the scratch schema first
    consumer: AIOKafkaConsumer
    applier: _Applier
    projection: str
    topic: str
    begins: dict[TopicPartition, int]
    positions: dict[TopicPartition, int]
    cutoff: datetime | None


async def rebuild(
    s: Settings,
    name: str,
    console: Console,
    swap: bool = True,
    drop_old: bool = False,
    now: datetime | None = None,
) -> Summary:
    model = MODELS.get(name)
    if model is None:
        raise RebuildError(f"no read model {name!r}: choose one of {', '.join(MODELS)}")
    started = time.monotonic()
    now = now or datetime.now(UTC)
    scratch = f"rebuild_new_{name}_{now.strftime('%Y%m%d%H%M%S')}"
    summary = Summary(name, swapped=False)
    try:
        conn = await psycopg.AsyncConnection.connect(s.database_url)
    except psycopg.OperationalError as exc:
        raise RebuildError(f"cannot reach PostgreSQL ({exc}); is the stack up?") from None
    consumer = log_consumer(s, client_id=f"microgrid-rebuild-{name}")
    try:
        await _claim(conn, name)
        await start_consumer(s, consumer)
        topic = s.topic(model.topic)
        try:
            tps = await topic_partitions(consumer, topic)
        except LookupError:
            raise RebuildError(missing_topic(s, model.topic)) from None
        begins = await consumer.beginning_offsets(tps)
        cutoff = _cutoff(s, model, begins, now)
        projection = model.projection(s)
        run = _Run(
            s,
            model,
            scratch,
            conn,
            consumer,
            _Applier(projection, cutoff),
            projection.name,
            topic,
            begins,
            dict(begins),
            cutoff,
        )
        summary.cutoff = cutoff
        try:
            summary.carried = await _prepare(run)
        except psycopg.errors.UndefinedTable as exc:
            raise RebuildError(f"{exc}: is the database migrated (`microgrid migrate`)?") from None

        with _progress(console) as progress:
            task = progress.add_task(f"rebuild {name}", total=0, rate="-")
            for _ in range(MAX_ROUNDS):
                live = await _live_positions(conn, run.projection, topic, begins)
                await conn.commit()
                left = sum(max(0, live[tp] - run.positions[tp]) for tp in tps)
                if left <= CATCH_UP_RECORDS:
                    break
                progress.update(task, total=(progress.tasks[0].total or 0) + left)
                await _read(run, live, progress, task, started)
        pause, summary.differences = await _freeze_and_compare(run)
        summary.rows = {d.table: d.rows for d in summary.differences}
        if swap:
            more, summary.backup_schema = await _swap(run)
            pause += more
            summary.swapped = True
        summary.pause_s = pause
        if swap and drop_old and summary.backup_schema:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(_q(summary.backup_schema)))
            await conn.commit()
            summary.backup_schema = None
        applier = run.applier
        summary.records, summary.applied = applier.records, applier.applied
        summary.refused = applier.refused + applier.letters.count
        summary.skipped_rows = applier.skipped
        summary.elapsed_s = time.monotonic() - started
        return summary
    finally:
        await consumer.stop()
        with contextlib.suppress(psycopg.Error):
            await conn.rollback()
            await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(_q(scratch)))
            await conn.commit()
        await conn.close()


async def _prepare(run: _Run) -> dict[str, int]:
    """The scratch schema: tables like the live ones, their day partitions, and the rows
    carried over; the connection's search_path then puts it first. One snapshot (repeatable
    read) holds the rows carried over and the live positions they reflect: readings before
    the cutoff are skipped in the records before those positions only, so one that came late,
    after them, is applied like any other."""
    conn, scratch, model = run.conn, run.scratch, run.model
    await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
    async with conn.transaction():
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(_q(scratch)))
        await _make_tables(conn, scratch, model.built)
        await conn.execute(sql.SQL("SET search_path = {}, public").format(_q(scratch)))
        if "telemetry_readings" in model.built:
            days = await _partition_days(conn, ["telemetry_readings", "telemetry_rollup_1m"])
            for day in sorted(days):
                await conn.execute("SELECT ensure_telemetry_partition(%s)", (day,))
        carried = await _carry(conn, scratch, model, run.cutoff)
        if carried:
            live = await _live_positions(conn, run.projection, run.topic, run.begins)
            run.applier.carried_upto = {tp.partition: o for tp, o in live.items()}
    await conn.set_isolation_level(None)
    return carried


async def _claim(conn: psycopg.AsyncConnection, name: str) -> None:
    """One rebuild of a model at a time (a session lock, released with the connection); the
    scratch schemas of rebuilds of it that died are dropped."""
    cur = await conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (f"rebuild:{name}",))
    row = await cur.fetchone()
    if not row or not row[0]:
        raise RebuildError(f"another rebuild of {name} is running")
    cur = await conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"rebuild\\_new\\_{name}\\_%",)
    )
    for (schema,) in await cur.fetchall():
        await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(_q(schema)))
    await conn.commit()


def _cutoff(
    s: Settings, model: Model, begins: dict[TopicPartition, int], now: datetime | None
) -> datetime | None:
    """None while the log holds everything; else the time from which every record is still in
    the log (records younger than the retention are never deleted), rounded up to the hour."""
    if all(offset == 0 for offset in begins.values()):
        return None
    now = now or datetime.now(UTC)
    at = now - timedelta(hours=model.retention_hours(s), seconds=-s.max_future_skew_s) + HOUR
    floor = at.replace(minute=0, second=0, microsecond=0)
    return floor if floor == at else floor + HOUR


async def _read(
    run: _Run,
    until: dict[TopicPartition, int],
    progress: Progress | None = None,
    task: TaskID | None = None,
    started: float = 0.0,
) -> None:
    """Apply the records from the rebuild's positions up to `until`, a poll per transaction."""
    conn, applier, positions = run.conn, run.applier, run.positions
    bounds = {tp: (positions[tp], max(positions[tp], until[tp])) for tp in positions}
    async for records, advanced in read_ranges(run.consumer, bounds):
        await applier.apply(conn, records)
        await conn.commit()
        if progress is not None and task is not None:
            elapsed = time.monotonic() - started
            rate = f"{applier.records / elapsed:,.0f}" if elapsed else "-"
            progress.update(task, advance=advanced, rate=rate)
    for tp, (_, b) in bounds.items():
        positions[tp] = b


async def _locked(run: _Run, conn: psycopg.AsyncConnection, mode: str) -> dict[TopicPartition, int]:
    """In `conn`'s transaction: lock the live tables (with a timeout) and read the live
    projection's positions, which cannot move while they are held."""
    tables = sql.SQL(", ").join(_q("public", t) for t in run.model.swapped)
    await conn.execute("SET LOCAL lock_timeout = '10s'")
    await conn.execute(sql.SQL("LOCK TABLE {} IN " + mode + " MODE").format(tables))
    return await _live_positions(conn, run.projection, run.topic, run.begins, lock=True)


async def _retrying(attempt: Callable[[], Any]) -> Any:
    for tries in range(5):
        try:
            return await attempt()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
            if tries == 4:
                raise RebuildError(
                    "could not lock the live tables in 5 tries (10 s each); try again"
                ) from None
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def _freeze_and_compare(run: _Run) -> tuple[float, list[Difference]]:
    """Bring the scratch tables to the live projection's positions while the live tables are
    locked against writes, take a snapshot holding both, let the live projection go on, and
    compare in the snapshot: the comparison never holds the live projection up."""
    s = run.s
    async with (
        await psycopg.AsyncConnection.connect(s.database_url) as lock,
        await psycopg.AsyncConnection.connect(s.database_url) as snap,
    ):

        async def freeze() -> float:
            locked = time.monotonic()
            async with lock.transaction():
                live = await _locked(run, lock, "EXCLUSIVE")
                await _read(run, live)  # committed on the rebuild's own connection
                await snap.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
                await snap.execute("SELECT 1")  # the snapshot: the scratch and live as locked
            return time.monotonic() - locked

        pause = await _retrying(freeze)
        differences = [await _compare(snap, run.scratch, run.model, t) for t in run.model.swapped]
        await snap.rollback()
    return pause, differences


async def _swap(run: _Run) -> tuple[float, str]:
    """One transaction: lock the live tables, apply the records since the comparison, move the
    rebuilt tables in and the live ones to a backup schema."""
    conn, scratch = run.conn, run.scratch
    backup = scratch.replace("rebuild_new_", "rebuild_old_", 1)
    counts = (run.applier.records, run.applier.applied, run.applier.refused, run.applier.skipped)

    async def attempt() -> float:
        locked = time.monotonic()
        a = run.applier
        a.records, a.applied, a.refused, a.skipped = counts  # a retry applies them again
        async with conn.transaction():
            live = await _locked(run, conn, "ACCESS EXCLUSIVE")
            bounds = {tp: (run.positions[tp], max(run.positions[tp], live[tp])) for tp in live}
            async for records, _ in read_ranges(run.consumer, bounds):
                await a.apply(conn, records)  # savepoints of this transaction
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(_q(backup)))
            for table in run.model.swapped:
                await _move(conn, table, "public", backup)
                await _move(conn, table, scratch, "public")
        for tp, (_, b) in bounds.items():
            run.positions[tp] = b
        return time.monotonic() - locked

    pause: float = await _retrying(attempt)
    return pause, backup


def report(summary: Summary) -> dict[str, Any]:
    """The summary as JSON-ready data (`--json`)."""
    return {
        "model": summary.model,
        "swapped": summary.swapped,
        "records": summary.records,
        "applied": summary.applied,
        "refused": summary.refused,
        "skipped_before_cutoff": summary.skipped_rows,
        "cutoff": summary.cutoff.isoformat() if summary.cutoff else None,
        "carried": summary.carried,
        "rows": summary.rows,
        "differences": [
            {
                "table": d.table,
                "only_in_rebuilt": d.only_new,
                "only_in_old": d.only_old,
                "samples_rebuilt": d.samples_new,
                "samples_old": d.samples_old,
            }
            for d in summary.differences
        ],
        "backup_schema": summary.backup_schema,
        "elapsed_s": round(summary.elapsed_s, 3),
        "records_per_s": round(summary.rate, 1),
        "pause_s": round(summary.pause_s, 3),
    }


__all__ = ["MODELS", "KafkaUnreachable", "RebuildError", "Summary", "rebuild", "report"]
