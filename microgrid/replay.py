"""`microgrid replay`: one topic's records for a time range, to a JSON lines, CSV or Parquet file.

The range is a time range of the data, not of the log: a reading's own time (`ts`) for
`telemetry.valid` and `telemetry.raw`, the event's time (`at`) for `alerts` and
`control.events`; `--from` is included and `--to` is not. Where in the log such records can
sit follows from the time window the gateway and the validator enforce when they write: a
reading is accepted at most `MAX_FUTURE_SKEW_S` before its `ts` and at most
`MAX_READING_AGE_S` after it, and a record's timestamp is when it was written. So replay
starts each partition at `offsets_for_times(from - MAX_FUTURE_SKEW_S - 60 s)` and stops it at
`offsets_for_times(to + lateness + 60 s)`, or at the partition's end as it was when the replay
began. The lateness is `MAX_READING_AGE_S` unless `--lateness` narrows it: it is what catches
the readings that arrived late, after `--to`. The 60 s absorb clocks that disagree. Records
read there but outside the range are left out.

The consumer has no group and never commits (`microgrid.logread.log_consumer`), so a replay
moves no live consumer's position and may run beside the platform.

Telemetry rows are the reading columns of `runtime.tabular.READING_COLUMNS`, one per reading,
deduplicated by reading identity `(device_id, ts)`: the first in log order wins, exactly as in
the telemetry projection (a device's records all sit in one partition, keyed by device). The
identities of the range are held in memory, as 8 bytes each (per device, a sorted array of
microseconds), nothing else: rows go to the file as they are read, Parquet a row group at a
time.

The file is written beside its name as `NAME.partial` and renamed when the replay is complete,
so a replay that fails or is interrupted never leaves a file that looks whole.
"""

from __future__ import annotations

import contextlib
import os
import time
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import msgspec.inspect
from aiokafka import ConsumerRecord
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from contracts import METRICS, Reading, ReadingBatch, TimeWindow, Topics
from contracts.alerting import AlertEvent
from contracts.control import ControlEvent
from microgrid.logread import (
    KafkaUnreachable,
    log_consumer,
    missing_topic,
    read_ranges,
    time_bounds,
    topic_partitions,
)
from microgrid.logread import start as start_consumer
from runtime.settings import Settings
from runtime.tabular import READING_COLUMNS, Column, Kind, format_of, open_writer
from stream_processors.validation import Valid, validate_record

CLOCK_SLACK: Final = timedelta(seconds=60)
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND: Final = timedelta(microseconds=1)
BATCH_ROWS: Final = 10_000  # rows handed to the writer at a time

Content = Literal["readings", "alerts", "control"]
REPLAYABLE: Final[dict[str, Content]] = {
    Topics.TELEMETRY_VALID: "readings",
    Topics.TELEMETRY_RAW: "readings",
    Topics.ALERTS: "alerts",
    Topics.CONTROL_EVENTS: "control",
}


class ReplayError(Exception):
    """A replay that cannot start: its message says why, for the command line."""


def _column(f: msgspec.inspect.Field) -> Column:
    info = f.type
    nullable = False
    if isinstance(info, msgspec.inspect.UnionType):
        members = [m for m in info.types if not isinstance(m, msgspec.inspect.NoneType)]
        nullable = len(members) < len(info.types)
        info = members[0] if len(members) == 1 else info
    kinds: list[tuple[type, Kind]] = [
        (msgspec.inspect.StrType, "string"),
        (msgspec.inspect.LiteralType, "string"),
        (msgspec.inspect.FloatType, "float"),
        (msgspec.inspect.BoolType, "bool"),
        (msgspec.inspect.IntType, "int"),
        (msgspec.inspect.DateTimeType, "time"),
    ]
    kind: Kind = next((k for cls, k in kinds if isinstance(info, cls)), "json")
    return Column(f.name, kind, required=not nullable)


def event_columns(struct: type[msgspec.Struct]) -> tuple[Column, ...]:
    """A column per field of an event type, typed as the field is (nested values as JSON)."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    return tuple(_column(f) for f in info.fields)


_reading_row = attrgetter("device_id", "site_id", "device_type", "ts", "seq", *METRICS)
_batch = msgspec.json.Decoder(ReadingBatch)


@dataclass
class Selection:
    """What to replay: a topic (without the namespace), a half-open time range of the data, and
    optionally one site or one device."""

    topic: str
    start: datetime
    end: datetime
    site: str | None = None
    device: str | None = None
    lateness: timedelta | None = None  # None: MAX_READING_AGE_S


@dataclass
class Summary:
    path: Path
    records: int = 0  # records read from the log
    rows: int = 0  # rows written
    duplicates: int = 0  # readings left out because their identity came before
    undecodable: int = 0  # records that hold no reading or event (they went to a dead-letter topic)
    seconds: float = 0.0
    partitions: dict[int, tuple[int, int]] = field(default_factory=dict)  # offsets read, [a, b)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class ReadingRows:
    """Readings in range and scope, each identity once (the first in log order).

    A `telemetry.valid` record holds readings the validator accepted. A `telemetry.raw` record
    holds what a client sent: it is judged by the validator's own checks (`validate_record`:
    it decodes, is keyed by its device, names one device and site, and its readings' times
    were in the accepted window when the record was written), and left out, counted, when
    they refuse it. Only the registry's check (which site owns the device) is not made: it
    depends on the registry at the time, which a replay cannot know."""

    columns = READING_COLUMNS

    def __init__(self, sel: Selection, summary: Summary, raw: TimeWindow | None) -> None:
        self.sel = sel
        self.summary = summary
        self.raw = raw
        self.seen: dict[str, array[int]] = {}

    def decode(self, rec: ConsumerRecord[bytes, bytes]) -> list[Reading] | None:
        value = rec.value or b""
        if self.raw is not None:
            written = datetime.fromtimestamp(rec.timestamp / 1000, UTC)
            verdict = validate_record(rec.key, value, written, self.raw)
            if not isinstance(verdict, Valid):
                return None
            value = verdict.value
        try:
            return _batch.decode(value).readings
        except msgspec.MsgspecError:
            return None

    def rows(self, rec: ConsumerRecord[bytes, bytes], out: list[tuple[Any, ...]]) -> None:
        readings = self.decode(rec)
        if readings is None:
            self.summary.undecodable += 1
            return
        start, end, site, device = self.sel.start, self.sel.end, self.sel.site, self.sel.device
        seen_of = self.seen
        for r in readings:
            if not start <= r.ts < end:
                continue
            if (site is not None and r.site_id != site) or (
                device is not None and r.device_id != device
            ):
                continue
            us = (r.ts - EPOCH) // MICROSECOND
            seen = seen_of.get(r.device_id)
            if seen is None:
                seen_of[r.device_id] = array("q", (us,))
            elif us > seen[-1]:  # the common case: a device's readings come in time order
                seen.append(us)
            else:
                i = bisect_left(seen, us)
                if i < len(seen) and seen[i] == us:
                    self.summary.duplicates += 1
                    continue
                seen.insert(i, us)
            out.append(_reading_row(r))


class EventRows:
    """Alert or control events whose time (`at`) is in range, of the site or device asked for,
    each once: an event delivered again (the outbox relay and the stages deliver at least
    once, and a redrive sends a record again) has the same bytes, and is left out, counted.
    A control event names no site: `--site` takes the site's devices from the registry."""

    def __init__(
        self,
        struct: type[AlertEvent] | type[ControlEvent],
        sel: Selection,
        summary: Summary,
        site_devices: set[str] | None,
    ) -> None:
        self.sel = sel
        self.summary = summary
        self.decoder = msgspec.json.Decoder(struct)
        self.columns = event_columns(struct)
        self.values = attrgetter(*(c.name for c in self.columns))
        self.site_devices = site_devices
        self.seen: set[int] = set()  # hashes of the events' bytes

    def rows(self, rec: ConsumerRecord[bytes, bytes], out: list[tuple[Any, ...]]) -> None:
        value = rec.value or b""
        try:
            event = self.decoder.decode(value)
        except msgspec.MsgspecError:
            self.summary.undecodable += 1
            return
        if event.at.tzinfo is None:  # cannot be placed in the range
            self.summary.undecodable += 1
            return
        sel = self.sel
        if not sel.start <= event.at < sel.end:
            return
        if sel.device is not None and event.device_id != sel.device:
            return
        if sel.site is not None:
            if isinstance(event, AlertEvent):
                if event.site_id != sel.site:
                    return
            elif self.site_devices is not None and event.device_id not in self.site_devices:
                return
        digest = hash(value)
        if digest in self.seen:
            self.summary.duplicates += 1
            return
        self.seen.add(digest)
        out.append(self.values(event))


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- records/s" if speed is None else f"{speed:,.0f} records/s")


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("records"),
        RateColumn(),
        TextColumn("{task.fields[rows]:,} rows"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def site_devices(s: Settings, site: str) -> set[str]:
    import psycopg

    try:
        with psycopg.connect(s.database_url, connect_timeout=10) as conn:
            rows = conn.execute("SELECT device_id FROM devices WHERE site_id = %s", (site,))
            return {d for (d,) in rows}
    except psycopg.OperationalError as exc:
        raise ReplayError(
            f"cannot reach PostgreSQL for the devices of site {site!r}: {exc}"
        ) from None


def check(sel: Selection, out: Path, force: bool) -> None:
    """Refuse what cannot be replayed before anything is read."""
    if sel.topic not in REPLAYABLE:
        raise ReplayError(f"cannot replay topic {sel.topic!r}: one of {', '.join(REPLAYABLE)}")
    if sel.start >= sel.end:
        raise ReplayError(
            f"empty range: --from {sel.start.isoformat()} is not before --to {sel.end.isoformat()}"
        )
    try:
        format_of(out)
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    if not out.parent.is_dir():
        raise ReplayError(f"no such directory: {out.parent}")
    if out.exists() and not force:
        raise ReplayError(f"{out} exists: give --force to replace it")


async def replay(
    s: Settings, sel: Selection, out: Path, console: Console, force: bool = False
) -> Summary:
    """Write the selection's rows to `out` and say what was read."""
    check(sel, out, force)
    content = REPLAYABLE[sel.topic]
    summary = Summary(out)
    handler: ReadingRows | EventRows
    if content == "readings":
        window = TimeWindow(
            max_future=timedelta(seconds=s.max_future_skew_s),
            max_age=timedelta(seconds=s.max_reading_age_s),
        )
        handler = ReadingRows(sel, summary, window if sel.topic == Topics.TELEMETRY_RAW else None)
    else:
        devices = site_devices(s, sel.site) if content == "control" and sel.site else None
        struct = AlertEvent if content == "alerts" else ControlEvent
        handler = EventRows(struct, sel, summary, devices)
    lateness = sel.lateness if sel.lateness is not None else timedelta(seconds=s.max_reading_age_s)
    first = sel.start - timedelta(seconds=s.max_future_skew_s) - CLOCK_SLACK
    last = sel.end + lateness + CLOCK_SLACK
    device_key = sel.device.encode() if sel.device is not None else None

    began = time.monotonic()
    consumer = log_consumer(s, "microgrid-replay")
    try:
        await start_consumer(s, consumer)
    except KafkaUnreachable as exc:
        raise ReplayError(str(exc)) from None
    partial = out.with_name(out.name + ".partial")
    try:
        try:
            tps = await topic_partitions(consumer, s.topic(sel.topic))
        except LookupError:
            raise ReplayError(missing_topic(s, sel.topic)) from None
        bounds = await time_bounds(consumer, tps, first, last)
        summary.partitions = {tp.partition: ab for tp, ab in bounds.items()}
        total = sum(b - a for a, b in bounds.values())
        rows: list[tuple[Any, ...]] = []
        with partial.open("wb") as sink, progress_bar(console) as bar:
            task = bar.add_task(f"replay {sel.topic}", total=total, rows=0)
            writer = open_writer(format_of(out), sink, handler.columns)
            try:
                async for records, advanced in read_ranges(consumer, bounds):
                    summary.records += len(records)
                    for rec in records:
                        if device_key is not None and rec.key != device_key:
                            continue  # keyed by device: another device's record
                        if rec.value is not None:
                            handler.rows(rec, rows)
                    if len(rows) >= BATCH_ROWS:
                        writer.write(rows)
                        summary.rows += len(rows)
                        rows = []
                    bar.update(task, advance=advanced, rows=summary.rows)
                writer.write(rows)
                summary.rows += len(rows)
                bar.update(task, rows=summary.rows)
            finally:  # also on failure: pyarrow would write its footer at exit, to a closed file
                writer.close()
        os.replace(partial, out)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    finally:
        await consumer.stop()
    summary.seconds = time.monotonic() - began
    return summary
