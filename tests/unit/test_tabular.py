"""The row writers shared by `microgrid replay` and the readings export, and the command line's
times: each format gives back the rows written, with their types and missing values."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from contracts.alerting import AlertEvent
from contracts.control import CommandRequested, ControlEvent
from microgrid.logread import BadTime, parse_time
from microgrid.replay import event_columns
from runtime.tabular import READING_COLUMNS, Chunks, Format, format_of, open_writer

TS = datetime(2026, 11, 30, 8, 0, 0, 123456, tzinfo=UTC)
ROWS = [
    ("dev-1", "site-a", "battery", TS, 7, 231.5, None, 50.01, -3.25, 55.5, None),
    ("dev-2", "site-a", "pv_inverter", TS + timedelta(seconds=1), None, *([None] * 6)),
]


def written(fmt: Format, rows: Sequence[tuple[object, ...]]) -> bytes:
    sink = Chunks()
    writer = open_writer(fmt, sink, READING_COLUMNS)
    writer.write(rows)
    out = sink.take()
    writer.close()
    return out + sink.take()


def test_parquet_keeps_types_and_nulls_in_row_groups() -> None:
    from runtime.tabular import ParquetRowWriter

    sink = Chunks()
    writer = ParquetRowWriter(sink, READING_COLUMNS, row_group_rows=2)
    writer.write(ROWS * 3)
    first = sink.take()
    assert first, "full row groups are written before close"
    writer.close()
    f = pq.ParquetFile(io.BytesIO(first + sink.take()))
    assert f.metadata.num_row_groups == 3
    table = f.read()
    assert [tuple(r.values()) for r in table.to_pylist()] == ROWS * 3
    assert str(table.schema.field("ts").type) == "timestamp[us, tz=UTC]"
    assert not table.schema.field("device_id").nullable


def test_csv_has_a_header_and_empty_fields_for_missing_values() -> None:
    lines = list(csv.reader(io.StringIO(written("csv", ROWS).decode())))
    assert lines[0] == [c.name for c in READING_COLUMNS]
    assert lines[1] == [
        "dev-1", "site-a", "battery", "2026-11-30T08:00:00.123456Z", "7",
        "231.5", "", "50.01", "-3.25", "55.5", "",
    ]  # fmt: skip
    assert lines[2][4:] == [""] * 7


def test_json_lines_leave_missing_values_out() -> None:
    lines = [json.loads(line) for line in written("jsonl", ROWS).decode().splitlines()]
    assert lines[1] == {
        "device_id": "dev-2",
        "site_id": "site-a",
        "device_type": "pv_inverter",
        "ts": "2026-11-30T08:00:01.123456Z",
    }


def test_every_format_gives_times_in_utc() -> None:
    from datetime import timezone

    plus_two = TS.astimezone(timezone(timedelta(hours=2)))
    row = (ROWS[1][0], ROWS[1][1], ROWS[1][2], plus_two, *ROWS[1][4:])
    line = json.loads(written("jsonl", [row]).decode())
    assert line["ts"] == "2026-11-30T08:00:00.123456Z"
    assert list(csv.reader(io.StringIO(written("csv", [row]).decode())))[1][3] == line["ts"]
    assert pq.read_table(io.BytesIO(written("parquet", [row]))).to_pylist()[0]["ts"] == TS


def test_event_columns_follow_the_event_types() -> None:
    kinds = {c.name: (c.kind, c.required) for c in event_columns(ControlEvent)}
    assert kinds["at"] == ("time", True)
    assert kinds["request"] == ("json", False)
    assert kinds["delivered"] == ("bool", True)
    assert [c.name for c in event_columns(AlertEvent)][:3] == ["alert_id", "kind", "rule_id"]
    event = ControlEvent(
        command_id="c1",
        device_id="d1",
        status="queued",
        at=TS,
        request=CommandRequested(
            id="c1", device_id="d1", command="set_power", params={"kw": 2.5},
            requested_at=TS, deadline=TS,
        ),
    )  # fmt: skip
    columns = event_columns(ControlEvent)
    sink = Chunks()
    writer = open_writer("parquet", sink, columns)
    writer.write([tuple(getattr(event, c.name) for c in columns)])
    writer.close()
    row = pq.read_table(io.BytesIO(sink.take())).to_pylist()[0]
    assert json.loads(row["request"])["params"] == {"kw": 2.5}
    assert row["reason"] is None and row["delivered"] is False


def test_the_format_comes_from_the_extension() -> None:
    from pathlib import Path

    assert format_of(Path("a.PARQUET")) == "parquet"
    assert format_of(Path("a.ndjson")) == "jsonl"
    with pytest.raises(ValueError, match=r"\.jsonl"):
        format_of(Path("a.xlsx"))


def test_times_on_the_command_line() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("now", now) == now
    assert parse_time("2026-11-29", now) == datetime(2026, 11, 29, tzinfo=UTC)
    plus_one = parse_time("2026-11-30T09:00:00+01:00", now)
    assert plus_one == datetime(2026, 11, 30, 8, tzinfo=UTC) and plus_one.tzinfo == UTC
    assert parse_time("2026-11-30T08:00:00Z", now).tzinfo == UTC
    for bad in ("yesterday", "2026-11-30T08:00:00", "-2h", "2w"):
        with pytest.raises(BadTime):
            parse_time(bad, now)
