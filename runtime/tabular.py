"""Rows written as JSON lines, CSV or Parquet, a bounded batch at a time.

`microgrid replay` writes a file with these writers and the query API's readings export streams
them, so both give the same columns with the same types for the same readings. A writer takes
rows as tuples in its columns' order and writes them to a binary sink as they come: Parquet a
row group per `ROW_GROUP_ROWS` rows (the footer at the end), CSV and JSON lines as text. Nothing
holds more than one row group.

Column kinds: `string`, `int` (64-bit), `float` (double), `time` (UTC, microseconds; RFC 3339
in CSV and JSON lines), `bool`, and `json` (a nested value: a JSON string in CSV and Parquet).
A missing value is an empty CSV field, a Parquet null, and a key left out in JSON lines (so a
replayed reading's line is itself a reading the gateway accepts).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Protocol, get_args

import msgspec

from contracts import METRICS

Format = Literal["jsonl", "csv", "parquet"]
FORMATS: Final[tuple[str, ...]] = get_args(Format)
Kind = Literal["string", "int", "float", "time", "bool", "json"]
ROW_GROUP_ROWS: Final = 65_536


class Column(msgspec.Struct, frozen=True):
    name: str
    kind: Kind
    required: bool = False


# One reading per row: what a reading says, typed (the metrics as doubles, ts as a UTC time).
READING_COLUMNS: Final[tuple[Column, ...]] = (
    Column("device_id", "string", required=True),
    Column("site_id", "string", required=True),
    Column("device_type", "string", required=True),
    Column("ts", "time", required=True),
    Column("seq", "int"),
    *(Column(m, "float") for m in METRICS),
)

_EXTENSIONS: Final[dict[str, Format]] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}

MEDIA_TYPES: Final[dict[str, str]] = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}


def format_of(path: Path) -> Format:
    """The format a file's extension names; ValueError for any other extension."""
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(_EXTENSIONS)
        raise ValueError(
            f"cannot tell the format of {path.name!r}: its extension is one of {known}"
        )
    return fmt


class Sink(Protocol):
    """Where a writer's bytes go: a binary file, or `Chunks`."""

    def write(self, data: bytes | bytearray, /) -> int: ...


class RowWriter(Protocol):
    def write(self, rows: Sequence[tuple[Any, ...]]) -> None: ...

    def close(self) -> None:
        """Write what is buffered and the format's trailer (Parquet's footer); the sink stays
        open."""


def open_writer(
    fmt: Format, sink: Sink, columns: Sequence[Column], row_group_rows: int = ROW_GROUP_ROWS
) -> RowWriter:
    """A writer of `fmt`; Parquet's row groups hold `row_group_rows` rows (the last fewer)."""
    if fmt == "jsonl":
        return JsonLinesWriter(sink, columns)
    if fmt == "csv":
        return CsvWriter(sink, columns)
    if fmt == "parquet":
        return ParquetRowWriter(sink, columns, row_group_rows)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _text(kind: Kind, value: Any) -> Any:
    if value is None:
        return ""
    if kind == "time":
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if kind == "json":
        return msgspec.json.encode(value).decode()
    if kind == "bool":
        return "true" if value else "false"
    return value


class CsvWriter:
    """A header line, then one line per row (RFC 4180 quoting, `\\r\\n` line ends)."""

    def __init__(self, sink: Sink, columns: Sequence[Column]) -> None:
        self.sink = sink
        self.kinds = [c.kind for c in columns]
        self.plain = all(k in ("string", "int", "float") for k in self.kinds)
        self.buffer = io.StringIO()
        self.csv = csv.writer(self.buffer)
        self.csv.writerow([c.name for c in columns])

    def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        kinds = self.kinds
        self.csv.writerows([[_text(k, v) for k, v in zip(kinds, row, strict=True)] for row in rows])
        self._flush()

    def _flush(self) -> None:
        self.sink.write(self.buffer.getvalue().encode())
        self.buffer.seek(0)
        self.buffer.truncate()

    def close(self) -> None:
        self._flush()


class JsonLinesWriter:
    """One JSON object per line; missing values are left out."""

    def __init__(self, sink: Sink, columns: Sequence[Column]) -> None:
        self.sink = sink
        self.names = [c.name for c in columns]
        self.times = [i for i, c in enumerate(columns) if c.kind == "time"]
        self.encoder = msgspec.json.Encoder()

    def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        names = self.names
        if self.times:  # in UTC, as in the other formats (a reading keeps the offset it came with)
            rows = [_in_utc(row, self.times) for row in rows]
        objects = [{n: v for n, v in zip(names, row, strict=True) if v is not None} for row in rows]
        buffer = bytearray()
        for obj in objects:
            self.encoder.encode_into(obj, buffer, len(buffer))
            buffer.extend(b"\n")
        self.sink.write(buffer)

    def close(self) -> None:
        pass


def _in_utc(row: tuple[Any, ...], times: list[int]) -> tuple[Any, ...]:
    values = list(row)
    for i in times:
        if values[i] is not None:
            values[i] = values[i].astimezone(UTC)
    return tuple(values)


class ParquetRowWriter:
    """Row groups of `row_group_rows` rows, each written as soon as it is full."""

    def __init__(
        self, sink: Sink, columns: Sequence[Column], row_group_rows: int = ROW_GROUP_ROWS
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.columns = list(columns)
        self.schema = parquet_schema(columns)
        self.json = [i for i, c in enumerate(columns) if c.kind == "json"]
        self.writer = pq.ParquetWriter(sink, self.schema, compression="zstd")
        self.row_group_rows = row_group_rows
        self.pending: list[tuple[Any, ...]] = []

    def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        self.pending.extend(rows)
        while len(self.pending) >= self.row_group_rows:
            group, self.pending = (
                self.pending[: self.row_group_rows],
                self.pending[self.row_group_rows :],
            )
            self._write_group(group)

    def _write_group(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        arrays = [list(col) for col in zip(*rows, strict=True)]
        for i in self.json:
            arrays[i] = [None if v is None else msgspec.json.encode(v).decode() for v in arrays[i]]
        batch = self.pa.RecordBatch.from_arrays(
            [self.pa.array(a, type=f.type) for a, f in zip(arrays, self.schema, strict=True)],
            schema=self.schema,
        )
        self.writer.write_batch(batch, row_group_size=len(rows))

    def close(self) -> None:
        self._write_group(self.pending)
        self.pending = []
        self.writer.close()


def parquet_schema(columns: Sequence[Column]) -> Any:
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "int": pa.int64(),
        "float": pa.float64(),
        "time": pa.timestamp("us", tz="UTC"),
        "bool": pa.bool_(),
        "json": pa.string(),
    }
    return pa.schema([pa.field(c.name, types[c.kind], nullable=not c.required) for c in columns])


class Chunks:
    """A sink that keeps what is written until it is taken: for streaming a writer's output
    (an HTTP response) a batch of rows at a time."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.position = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.parts.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return False

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


def reading_row(
    device_id: str,
    site_id: str,
    device_type: str,
    ts: datetime,
    seq: int | None,
    metrics: Iterable[float | None],
) -> tuple[Any, ...]:
    return (device_id, site_id, device_type, ts, seq, *metrics)
