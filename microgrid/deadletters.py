"""`microgrid dlq list|show|redrive`: the dead-letter topics, read and worked with.

The commands read `telemetry.dlq`, `alerts.dlq` and `control.dlq` (or the one `--topic` names)
with a consumer that has no group and never commits (`microgrid.logread.log_consumer`), from
the start of each partition, or from `offsets_for_times(--since)`, up to the end offsets taken
when the command starts: they end, on empty topics too, and move no live consumer's position.
Topic names are given and shown without the namespace (KAFKA_NAMESPACE); headers are shown as
they are on the broker.

`list` counts the letters by reason, always over the whole selection. Reasons carry specifics
(device ids, sites, times, offsets), so they are grouped by their first line with quoted values
('…'), times (<time>) and numbers (<n>) blanked out: "device 'dev-1' is not registered" and
"device 'dev-2' is not registered" count together, shown with one of them. The letters
themselves follow, the newest `--limit`.

`redrive` sends each selected letter back to the topic it came from (`x-dlq-source-topic`,
namespaced as it is; a site's `site.<site>.telemetry` and so on included), key and value
unchanged, with `x-redrive-count` (the letter's own count plus one) and `x-redriven-from`
(the letter, TOPIC:PARTITION:OFFSET). Every stage copies a redriven record's count onto its
dead letter, so a record still refused comes back with its count, and letters whose count
reached `--max-redrives` are skipped: nothing goes round in a loop. Which letters were
redriven is recorded in PostgreSQL (`dlq_redrives`, by dead-letter topic, partition and
offset), so redriving the same selection again sends nothing. Per chunk of letters, the rows
are inserted in a transaction (`ON CONFLICT DO NOTHING`: only the letters inserted now are
sent, and a concurrent redrive of the same letters waits for this one and then sends none of
them), the records are sent and the broker's acknowledgements awaited (acks=all, idempotent
producer), and only then the transaction commits. A failure before the commit rolls the rows
back, so those letters stay redrivable; if some of their records had reached the log, sending
them again is harmless: readings are stored once by identity `(device_id, ts)`, events and
commands by their ids.

Letters of the telemetry projection ("conflicting duplicate") come from `telemetry.valid` but
hold the one reading refused, not its record's batch, and the projection (like the alerter)
decodes `telemetry.valid` records as batches: a single reading sent there as it is would only
be dead-lettered again as undecodable. Such a letter is redriven to `telemetry.valid` as the
batch of that one reading, `{"readings": [reading]}` (the reading's bytes unchanged inside).
It was validated once already; sent to `telemetry.raw` instead, it would be judged again
against the reading age limit (MAX_READING_AGE_S), which an old conflict may no longer pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Final, NoReturn, TypeVar

import typer

from contracts import Headers, Topics
from runtime.settings import Settings, get_settings

if TYPE_CHECKING:
    import psycopg
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
    from rich.progress import Progress

dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: list, show and redrive them.")

DLQ_TOPICS: Final = (Topics.TELEMETRY_DLQ, Topics.ALERTS_DLQ, Topics.CONTROL_DLQ)
DEFAULT_LIMIT: Final = 50
CHUNK: Final = 500  # letters per redrive transaction
ACK_TIMEOUT_S: Final = 60.0  # the idempotent producer never gives up on a record by itself
SHOWN_REASON: Final = 160  # characters of a reason in a listing
HEX_SHOWN: Final = 4096  # bytes of a value that is not text, in hex


class DlqError(Exception):
    """A command that cannot run or complete: its message says why, for the command line."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of a dead-letter topic (`topic` as on the broker, namespaced)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, rec: ConsumerRecord[bytes, bytes]) -> DeadLetter:
        return cls(
            rec.topic,
            rec.partition,
            rec.offset,
            rec.timestamp,
            rec.key,
            rec.value,
            tuple(rec.headers),
        )

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v.decode(errors="replace")
        return None

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)

    @property
    def reason(self) -> str:
        return self.header(Headers.DLQ_REASON) or ""

    @property
    def source_topic(self) -> str | None:
        return self.header(Headers.DLQ_SOURCE_TOPIC)

    @property
    def redrive_count(self) -> int | None:
        """The letter's x-redrive-count: how often its record had been redriven when a stage
        refused it (None: never). A count that is not a number counts as 0."""
        text = self.header(Headers.REDRIVE_COUNT)
        if text is None:
            return None
        try:
            return max(0, int(text))
        except ValueError:
            return 0

    def ref(self, plain: Callable[[str], str]) -> str:
        return f"{plain(self.topic)}:{self.partition}:{self.offset}"


@dataclass(frozen=True)
class Selection:
    """Which letters: dead-letter topics (without the namespace), a reason's substring (any
    case), letters written at or after `since`."""

    topics: tuple[str, ...] = DLQ_TOPICS
    reason: str | None = None
    since: datetime | None = None

    @cached_property
    def since_ms(self) -> int:
        return 0 if self.since is None else _ms(self.since)

    @cached_property
    def folded(self) -> str | None:
        return None if self.reason is None else self.reason.casefold()

    def matches(self, letter: DeadLetter) -> bool:
        if letter.timestamp_ms < self.since_ms:
            return False
        return self.folded is None or self.folded in letter.reason.casefold()

    def describe(self) -> str:
        parts = [", ".join(self.topics)]
        if self.reason is not None:
            parts.append(f"reason containing {self.reason!r}")
        if self.since is not None:
            parts.append(f"since {self.since.isoformat(timespec='seconds')}")
        return "; ".join(parts)


def _ms(when: datetime) -> int:
    return max(0, int(when.timestamp() * 1000))


def selection(topic: str | None, reason: str | None, since: str | None) -> Selection:
    """The command line's selection, checked; DlqError says what is wrong with it."""
    from microgrid.logread import BadTime, parse_time

    topics = DLQ_TOPICS if topic is None else (dlq_topic(topic),)
    try:
        start = parse_time(since) if since is not None else None
    except BadTime as exc:
        raise DlqError(f"--since: {exc}") from None
    return Selection(topics, reason or None, start)


def dlq_topic(name: str, namespace: str = "") -> str:
    """A dead-letter topic's name without the namespace (given with or without it)."""
    plain = name.removeprefix(namespace) if namespace else name
    if plain not in DLQ_TOPICS:
        raise DlqError(f"unknown dead-letter topic {name!r}: one of {', '.join(DLQ_TOPICS)}")
    return plain


# --- reasons, grouped --------------------------------------------------------------------------

_QUOTED = re.compile(r"""\bb'(?:[^'\\]|\\.)*'|(?<![\w'])'(?:[^'\\]|\\.)*'""")
_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
)
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?\b")


def reason_group(reason: str) -> str:
    """A reason without its specifics: its first line, with quoted values ('…'), times
    (<time>) and numbers (<n>) blanked out."""
    line = reason.strip().split("\n", 1)[0].strip()
    line = _QUOTED.sub("'…'", line)
    line = _TIME.sub("<time>", line)
    return _NUMBER.sub("<n>", line)


@dataclass
class ReasonCount:
    topic: str
    group: str
    example: str  # the first letter's reason, first line
    count: int = 0


# --- reading the dead-letter topics -------------------------------------------------------------


class LetterReader:
    """The letters of the selection's topics, from each partition's start (or the first offset
    at `since`) to its end as it was when the reader started."""

    def __init__(self, s: Settings, sel: Selection) -> None:
        from microgrid.logread import log_consumer

        self.s = s
        self.sel = sel
        self.consumer: AIOKafkaConsumer = log_consumer(s, "microgrid-dlq")
        self.bounds: dict[TopicPartition, tuple[int, int]] = {}
        self.topics: set[str] = set()  # every topic on the broker, when started

    async def __aenter__(self) -> LetterReader:
        from microgrid.logread import UnknownTopic, missing_topic, topic_partitions

        await start_consumer(self.s, self.consumer)
        try:
            tps = []
            for name in self.sel.topics:
                try:
                    tps += await topic_partitions(self.consumer, self.s.topic(name))
                except UnknownTopic:
                    raise DlqError(missing_topic(self.s, name)) from None
            self.topics = set(await self.consumer.topics())
            ends = await self.consumer.end_offsets(tps)
            if self.sel.since is None:
                starts = await self.consumer.beginning_offsets(tps)
            else:
                found = await self.consumer.offsets_for_times(
                    {tp: _ms(self.sel.since) for tp in tps}
                )
                starts = {tp: ends[tp] if at is None else at.offset for tp, at in found.items()}
            self.bounds = {tp: (starts[tp], max(starts[tp], ends[tp])) for tp in tps}
        except BaseException:
            await self.consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    @property
    def total(self) -> int:
        return sum(b - a for a, b in self.bounds.values())

    async def polls(self) -> AsyncIterator[tuple[list[DeadLetter], int]]:
        """Each poll's letters (all of them, the caller selects) and how many offsets it
        advanced the reading by."""
        from microgrid.logread import read_ranges

        async for records, advanced in read_ranges(self.consumer, self.bounds, 10_000):
            yield [DeadLetter.of(rec) for rec in records], advanced


async def start_consumer(s: Settings, consumer: AIOKafkaConsumer) -> None:
    from microgrid.logread import KafkaUnreachable, start

    try:
        await start(s, consumer)
    except KafkaUnreachable as exc:
        raise DlqError(str(exc)) from None


def progress() -> Progress:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("records {task.fields[note]}"),
        console=Console(stderr=True),
        transient=True,
    )


class Namespace:
    """Names as the user gives and reads them: without the deployment's namespace."""

    def __init__(self, s: Settings) -> None:
        self.prefix = s.kafka_namespace

    def __call__(self, name: str) -> str:
        return name.removeprefix(self.prefix) if self.prefix else name


# --- list --------------------------------------------------------------------------------------


@dataclass
class Listing:
    letters: int = 0  # selected
    counts: dict[tuple[str, str], ReasonCount] = field(default_factory=dict)
    newest: list[tuple[int, str, int, int, DeadLetter]] = field(default_factory=list)

    def add(self, letter: DeadLetter, topic: str, limit: int | None) -> None:
        """Count the letter; keep it if it is among the newest `limit` (None: keep all)."""
        self.letters += 1
        group = reason_group(letter.reason)
        count = self.counts.get((topic, group))
        if count is None:
            example = letter.reason.strip().split("\n", 1)[0]
            count = self.counts[(topic, group)] = ReasonCount(topic, group, example)
        count.count += 1
        entry = (letter.timestamp_ms, letter.topic, letter.partition, letter.offset, letter)
        if limit is None or len(self.newest) < limit:
            heapq.heappush(self.newest, entry)
        elif entry[:4] > self.newest[0][:4]:
            heapq.heapreplace(self.newest, entry)

    def shown(self) -> list[DeadLetter]:
        return [e[-1] for e in sorted(self.newest, key=lambda e: e[:4])]


async def list_letters(s: Settings, sel: Selection, limit: int | None) -> Listing:
    plain = Namespace(s)
    listing = Listing()
    async with LetterReader(s, sel) as reader:
        with progress() as bar:
            task = bar.add_task("reading dead letters", total=reader.total, note="")
            async for letters, advanced in reader.polls():
                for letter in letters:
                    if sel.matches(letter):
                        listing.add(letter, plain(letter.topic), limit)
                bar.update(task, advance=advanced, note=f"({listing.letters:,} selected)")
    return listing


def letter_json(letter: DeadLetter, plain: Namespace) -> dict[str, Any]:
    source = letter.source_topic
    return {
        "letter": letter.ref(plain),
        "topic": plain(letter.topic),
        "partition": letter.partition,
        "offset": letter.offset,
        "time": _iso(letter.time),
        "stage": plain(letter.header(Headers.DLQ_STAGE) or "") or None,
        "source": {
            "topic": None if source is None else plain(source),
            "partition": _int(letter.header(Headers.DLQ_SOURCE_PARTITION)),
            "offset": _int(letter.header(Headers.DLQ_SOURCE_OFFSET)),
        },
        "redrive_count": letter.redrive_count,
        "reason": letter.reason,
        "reason_group": reason_group(letter.reason),
        "key": None if letter.key is None else letter.key.decode(errors="replace"),
    }


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def source_of(letter: DeadLetter, plain: Namespace) -> str:
    topic = letter.source_topic
    if topic is None:
        return "?"
    partition = letter.header(Headers.DLQ_SOURCE_PARTITION) or "?"
    offset = letter.header(Headers.DLQ_SOURCE_OFFSET) or "?"
    return f"{plain(topic)}[{partition}]@{offset}"


def safe(text: str) -> str:
    """Text fit for a terminal: what is not printable is escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _short(text: str, width: int = SHOWN_REASON) -> str:
    line = safe(text.strip().split("\n", 1)[0]) or "(no reason)"
    return line if len(line) <= width else line[: width - 1] + "…"


def table(
    rows: Sequence[tuple[str, ...]], out: Callable[[str], None], right: int | None = None
) -> None:
    """Columns aligned (column `right` to the right)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(w) if i == right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        out("  ".join(cells).rstrip())


def print_counts(listing: Listing, sel: Selection, out: Callable[[str], None]) -> None:
    if not listing.letters:
        out(f"no dead letters ({sel.describe()})")
        return
    out(f"{_letters(listing.letters)} ({sel.describe()})")
    out("")
    rows = [("COUNT", "TOPIC", "REASON")]
    for c in sorted(listing.counts.values(), key=lambda c: (-c.count, c.topic, c.group)):
        rows.append((f"{c.count:,}", c.topic, _short(c.group)))
        if c.example.strip() != c.group:
            rows.append(("", "", f"  e.g. {_short(c.example)}"))
    table(rows, out, right=0)


def _letters(n: int) -> str:
    return f"{n:,} dead letter{'' if n == 1 else 's'}"


def print_letters(listing: Listing, plain: Namespace, out: Callable[[str], None]) -> None:
    shown = listing.shown()
    if not shown:
        return
    out("")
    rows = [("LETTER", "TIME", "STAGE", "SOURCE", "REDRIVES", "REASON")]
    for letter in shown:
        count = letter.redrive_count
        rows.append(
            (
                letter.ref(plain),
                _iso(letter.time),
                plain(letter.header(Headers.DLQ_STAGE) or "?"),
                source_of(letter, plain),
                "" if count is None else str(count),
                _short(letter.reason),
            )
        )
    table(rows, out)
    if len(shown) < listing.letters:
        out(f"(the newest {len(shown):,} of {listing.letters:,}; --limit shows more)")


TopicOption = Annotated[
    str | None, typer.Option(help="only this dead-letter topic (e.g. telemetry.dlq)")
]
ReasonOption = Annotated[
    str | None, typer.Option(help="only letters whose reason contains this (any case)")
]
SinceOption = Annotated[
    str | None,
    typer.Option(help="only letters written since TIME: RFC 3339, a date, or 2h, 7d ago"),
]


@dlq_app.command("list")
def list_command(
    topic: TopicOption = None,
    reason: ReasonOption = None,
    since: SinceOption = None,
    limit: Annotated[
        int, typer.Option(min=0, help="letters listed, the newest (0: all); counts are complete")
    ] = DEFAULT_LIMIT,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per letter (counts on stderr)")
    ] = False,
) -> None:
    """Dead letters counted by reason, then listed: where each is, when it was written, the
    stage that refused it, where it came from, how often it was redriven, and why."""
    s = get_settings()
    sel = _checked(lambda: selection(topic, reason, since))
    listing = _run(list_letters(s, sel, limit or None))
    plain = Namespace(s)
    if as_json:
        print_counts(listing, sel, lambda line: typer.echo(line, err=True))
        for letter in listing.shown():
            typer.echo(json.dumps(letter_json(letter, plain)))
        return
    print_counts(listing, sel, typer.echo)
    print_letters(listing, plain, typer.echo)


# --- show --------------------------------------------------------------------------------------

_REF = re.compile(r"^(?P<topic>[^:\s]+):(?P<partition>\d+):(?P<offset>\d+)$")


def parse_ref(text: str, namespace: str = "") -> tuple[str, int, int]:
    """(topic without the namespace, partition, offset) from TOPIC:PARTITION:OFFSET."""
    m = _REF.match(text.strip())
    if m is None:
        raise DlqError(
            f"{text!r} is not TOPIC:PARTITION:OFFSET (as `microgrid dlq list` shows them,"
            " e.g. telemetry.dlq:3:1207)"
        )
    return dlq_topic(m["topic"], namespace), int(m["partition"]), int(m["offset"])


async def fetch_letter(s: Settings, topic: str, partition: int, offset: int) -> DeadLetter:
    from aiokafka import TopicPartition

    from microgrid.logread import UnknownTopic, log_consumer, missing_topic, topic_partitions

    consumer = log_consumer(s, "microgrid-dlq")
    await start_consumer(s, consumer)
    ref = f"{topic}:{partition}:{offset}"
    try:
        try:
            tps = await topic_partitions(consumer, s.topic(topic))
        except UnknownTopic:
            raise DlqError(missing_topic(s, topic)) from None
        tp = TopicPartition(s.topic(topic), partition)
        if tp not in tps:
            raise DlqError(f"{ref}: {topic} has partitions 0 to {len(tps) - 1}")
        begin = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        if offset < begin:
            raise DlqError(
                f"{ref} is no longer in the log: retention deleted partition {partition}'s"
                f" records before offset {begin} (DLQ_RETENTION_HOURS)"
            )
        if offset >= end:
            held = "is empty" if begin == end else f"holds offsets {begin} to {end - 1}"
            raise DlqError(f"{ref} is out of range: partition {partition} of {topic} {held}")
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for rec in (await consumer.getmany(tp, timeout_ms=1000, max_records=1)).get(tp, []):
                if rec.offset != offset:
                    raise DlqError(
                        f"{ref}: no record at that offset (the next is at {rec.offset}); it may"
                        " have been a transaction marker or an aborted record"
                    )
                return DeadLetter.of(rec)
            if await consumer.position(tp) > offset:
                raise DlqError(f"{ref}: no record at that offset (retention or a marker)")
        raise DlqError(f"{ref}: the broker returned nothing within 30 s")
    finally:
        await consumer.stop()


def render_value(value: bytes | None) -> tuple[str, list[str]]:
    """(what the value is, its lines): pretty JSON when it is JSON, else escaped text, else
    hex."""
    if value is None:
        return "none (a tombstone)", []
    if not value:
        return "empty", []
    size = f"{len(value):,} bytes"
    try:
        doc = json.loads(value)
    except ValueError:
        pass
    else:
        return f"{size}, JSON", [safe(line) for line in json.dumps(doc, indent=2).splitlines()]
    try:
        text = value.decode()
    except UnicodeDecodeError:
        shown = value[:HEX_SHOWN]
        lines = [
            f"{i:08x}  {shown[i : i + 16].hex(' '):<47}  "
            + "".join(chr(b) if 32 <= b < 127 else "." for b in shown[i : i + 16])
            for i in range(0, len(shown), 16)
        ]
        if len(value) > len(shown):
            lines.append(f"... {len(value) - len(shown):,} more bytes")
        return f"{size}, binary", lines
    return f"{size}, text (not JSON)", [safe(line) for line in text.splitlines() or [""]]


def _header_value(value: bytes) -> str:
    try:
        return safe(value.decode())
    except UnicodeDecodeError:
        return repr(value)


def print_letter(letter: DeadLetter, plain: Namespace, out: Callable[[str], None]) -> None:
    out(letter.ref(plain))
    out(f"  time      {_iso(letter.time)}")
    out(f"  stage     {safe(plain(letter.header(Headers.DLQ_STAGE) or '?'))}")
    out(f"  source    {safe(source_of(letter, plain))}")
    count = letter.redrive_count
    out(f"  redrives  {'none' if count is None else count}")
    out(f"  key       {'none' if letter.key is None else _header_value(letter.key)}")
    reason = letter.reason.splitlines() or [""]
    out(f"  reason    {safe(reason[0])}")
    for line in reason[1:]:
        out(f"            {safe(line)}")
    out("  headers")
    width = max((len(k) for k, _ in letter.headers), default=0)
    for k, v in letter.headers:
        out(f"    {safe(k).ljust(width)}  {_header_value(v)}")
    what, lines = render_value(letter.value)
    out(f"  value     {what}")
    for line in lines:
        out(f"    {line}")


@dlq_app.command("show")
def show_command(
    letter: Annotated[
        str, typer.Argument(help="TOPIC:PARTITION:OFFSET, as `microgrid dlq list` shows it")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """One dead letter: its headers, reason, key, time and value (pretty JSON when it is
    JSON)."""
    s = get_settings()
    topic, partition, offset = _checked(lambda: parse_ref(letter, s.kafka_namespace))
    found = _run(fetch_letter(s, topic, partition, offset))
    plain = Namespace(s)
    if as_json:
        doc = letter_json(found, plain)
        doc["headers"] = [[k, _header_value(v)] for k, v in found.headers]
        doc["value"] = None if found.value is None else found.value.decode(errors="replace")
        typer.echo(json.dumps(doc))
        return
    print_letter(found, plain, typer.echo)


# --- redrive -----------------------------------------------------------------------------------


@dataclass
class Redrive:
    """What a redrive did (or, dry, would do)."""

    dry_run: bool
    max_redrives: int
    selected: int = 0
    sent: Counter[str] = field(default_factory=Counter)  # by target topic, without namespace
    already: int = 0  # redriven before (dlq_redrives)
    over_max: int = 0  # x-redrive-count >= max_redrives
    no_source: int = 0  # no x-dlq-source-topic header
    no_target: int = 0  # its source topic no longer exists

    def lines(self) -> list[str]:
        verb = "would send" if self.dry_run else "sent"
        by_topic = ", ".join(f"{t} {n:,}" for t, n in sorted(self.sent.items()))
        rows = [
            (verb, self.sent.total(), f"({by_topic})" if by_topic else ""),
            ("already redriven", self.already, "(recorded in dlq_redrives)"),
            (
                "skipped, max redrives",
                self.over_max,
                f"(x-redrive-count >= --max-redrives {self.max_redrives})",
            ),
        ]
        if self.no_source:
            rows.append(("skipped, no source", self.no_source, "(no x-dlq-source-topic)"))
        if self.no_target:
            rows.append(("skipped, no topic", self.no_target, "(source topic gone)"))
        head = f"{'dry run: ' if self.dry_run else ''}{_letters(self.selected)} selected"
        width = max(len(r[0]) for r in rows)
        return [head] + [f"  {r[0].ljust(width)}  {r[1]:>7,}  {r[2]}".rstrip() for r in rows]


def redrive_value(letter: DeadLetter, valid_topic: str) -> bytes | None:
    """The value to send: the letter's, except a single reading refused by the telemetry
    projection, which goes back to telemetry.valid as a batch of that one reading."""
    value = letter.value
    if letter.source_topic != valid_topic or not value:
        return value
    try:
        doc = json.loads(value)
    except ValueError:
        return value
    if isinstance(doc, dict) and "readings" not in doc and "device_id" in doc:
        return b'{"readings":[' + value + b"]}"
    return value


def redrive_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    return [
        (Headers.REDRIVE_COUNT, str((letter.redrive_count or 0) + 1).encode()),
        (Headers.REDRIVEN_FROM, f"{letter.topic}:{letter.partition}:{letter.offset}".encode()),
    ]


def redriven_by() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


class Redriver:
    """Sends chunks of letters back and records them (or, dry, says what it would send)."""

    def __init__(
        self,
        s: Settings,
        conn: psycopg.AsyncConnection,
        producer: AIOKafkaProducer | None,
        result: Redrive,
        out: Callable[[str], None],
    ) -> None:
        self.s = s
        self.conn = conn
        self.producer = producer
        self.result = result
        self.out = out
        self.plain = Namespace(s)
        self.valid_topic = s.topic(Topics.TELEMETRY_VALID)
        self.by = redriven_by()

    async def recorded(self, letters: list[DeadLetter]) -> set[LetterId]:
        """Which of these letters were redriven before."""
        cur = await self.conn.execute(
            "SELECT r.dlq_topic, r.dlq_partition, r.dlq_offset, r.letter_timestamp_ms"
            " FROM dlq_redrives r"
            " JOIN unnest(%s::text[], %s::int[], %s::bigint[], %s::bigint[]) AS l(t, p, o, ts)"
            " ON (r.dlq_topic, r.dlq_partition, r.dlq_offset, r.letter_timestamp_ms)"
            "  = (l.t, l.p, l.o, l.ts)",
            _columns(letters),
        )
        return {(t, p, o, ts) for t, p, o, ts in await cur.fetchall()}

    async def chunk(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        # one lock order for every redrive: two at once over the same letters never deadlock
        letters = sorted(letters, key=_letter_id)
        if self.producer is None:
            done = await self.recorded(letters)
            for letter in letters:
                if _letter_id(letter) in done:
                    self.result.already += 1
                    continue
                self.result.sent[self.plain(letter.source_topic or "")] += 1
                self.out(self.describe(letter, "would send"))
            return
        async with self.conn.transaction():
            cur = await self.conn.execute(
                "INSERT INTO dlq_redrives (dlq_topic, dlq_partition, dlq_offset,"
                " letter_timestamp_ms, target_topic, redrive_count, redriven_by)"
                " SELECT t, p, o, ts, target, n, %s FROM unnest(%s::text[], %s::int[],"
                " %s::bigint[], %s::bigint[], %s::text[], %s::int[]) AS l(t, p, o, ts, target, n)"
                " ON CONFLICT DO NOTHING"
                " RETURNING dlq_topic, dlq_partition, dlq_offset, letter_timestamp_ms",
                (
                    self.by,
                    *_columns(letters),
                    [letter.source_topic for letter in letters],
                    [(letter.redrive_count or 0) + 1 for letter in letters],
                ),
            )
            new = {(t, p, o, ts) for t, p, o, ts in await cur.fetchall()}
            sending = [_letter_id(lt) in new for lt in letters]
            await self.send([lt for lt, send in zip(letters, sending, strict=True) if send])
        for letter, send in zip(letters, sending, strict=True):
            if send:
                self.result.sent[self.plain(letter.source_topic or "")] += 1
            else:
                self.result.already += 1

    async def send(self, letters: list[DeadLetter]) -> None:
        """Send the letters back; return once the broker acknowledged every one."""
        from aiokafka.errors import KafkaError

        assert self.producer is not None
        try:
            pending = [
                await self.producer.send(
                    letter.source_topic or "",
                    redrive_value(letter, self.valid_topic),
                    key=letter.key,
                    headers=redrive_headers(letter),
                )
                for letter in letters
            ]
            await asyncio.wait_for(asyncio.gather(*pending), ACK_TIMEOUT_S)
        except (TimeoutError, KafkaError) as exc:
            why = "no acknowledgement in time" if isinstance(exc, TimeoutError) else repr(exc)
            raise DlqError(
                f"sending {len(letters):,} redriven records failed ({why}): they are not"
                " recorded as redriven, and a new redrive sends them again; sent before:"
                f" {self.result.sent.total():,}"
            ) from None

    def describe(self, letter: DeadLetter, verb: str) -> str:
        count = (letter.redrive_count or 0) + 1
        return (
            f"{verb} {letter.ref(self.plain)} -> {self.plain(letter.source_topic or '?')}"
            f" (x-redrive-count {count}): {_short(letter.reason, 100)}"
        )


LetterId = tuple[str, int, int, int]


def _letter_id(letter: DeadLetter) -> LetterId:
    """A letter: where it is, and when it was written (a topic made again starts its offsets
    at 0, and its new letters are not the old ones)."""
    return (letter.topic, letter.partition, letter.offset, letter.timestamp_ms)


def _columns(
    letters: list[DeadLetter],
) -> tuple[list[str], list[int], list[int], list[int]]:
    return (
        [letter.topic for letter in letters],
        [letter.partition for letter in letters],
        [letter.offset for letter in letters],
        [letter.timestamp_ms for letter in letters],
    )


async def redrive(
    s: Settings,
    sel: Selection,
    max_redrives: int,
    dry_run: bool,
    out: Callable[[str], None],
) -> Redrive:
    import psycopg

    from runtime.kafka import reliable_producer

    result = Redrive(dry_run, max_redrives)
    try:
        conn = await psycopg.AsyncConnection.connect(
            s.database_url, autocommit=True, connect_timeout=10
        )
    except psycopg.OperationalError as exc:
        raise DlqError(f"cannot reach PostgreSQL: {exc}") from None
    producer = None
    try:
        async with LetterReader(s, sel) as reader:
            if not dry_run:
                producer = reliable_producer(s, client_id="microgrid-dlq-redrive")
                try:
                    await producer.start()
                except Exception as exc:
                    await producer.stop()
                    producer = None
                    raise DlqError(f"cannot start a Kafka producer: {exc}") from None
            redriver = Redriver(s, conn, producer, result, out)
            with progress() as bar:
                task = bar.add_task("redriving dead letters", total=reader.total, note="")
                chunk: list[DeadLetter] = []
                async for letters, advanced in reader.polls():
                    for letter in letters:
                        if not sel.matches(letter):
                            continue
                        result.selected += 1
                        if (letter.redrive_count or 0) >= max_redrives:
                            result.over_max += 1
                        elif letter.source_topic is None:
                            result.no_source += 1
                        elif letter.source_topic not in reader.topics:
                            result.no_target += 1
                        else:
                            chunk.append(letter)
                        if len(chunk) >= CHUNK:
                            await redriver.chunk(chunk)
                            chunk = []
                    bar.update(
                        task,
                        advance=advanced,
                        note=f"({result.selected:,} selected, {result.sent.total():,} sent)",
                    )
                await redriver.chunk(chunk)
    except psycopg.errors.UndefinedTable:
        raise DlqError("table dlq_redrives is missing: run `microgrid migrate`") from None
    except psycopg.OperationalError as exc:
        raise DlqError(f"PostgreSQL failed during the redrive: {exc}") from None
    finally:
        if producer is not None:
            with contextlib.suppress(TimeoutError):  # a failed chunk's records may hold it
                await asyncio.wait_for(producer.stop(), 15)
        await conn.close()
    return result


@dlq_app.command("redrive")
def redrive_command(
    topic: TopicOption = None,
    reason: ReasonOption = None,
    since: SinceOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="say what would be sent; send and record nothing")
    ] = False,
    max_redrives: Annotated[
        int,
        typer.Option(min=1, help="skip letters whose record was redriven this often already"),
    ] = 1,
) -> None:
    """Send the selected dead letters back to the topics they came from (key and value
    unchanged; a refused single reading as a batch of one), each at most once: what was sent
    is recorded in PostgreSQL, and a letter whose record was already redriven --max-redrives
    times is skipped."""
    s = get_settings()
    sel = _checked(lambda: selection(topic, reason, since))
    result = _run(redrive(s, sel, max_redrives, dry_run, typer.echo))
    for line in result.lines():
        typer.echo(line)


def _fail(message: str) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


T = TypeVar("T")


def _checked(make: Callable[[], T]) -> T:
    try:
        return make()
    except DlqError as exc:
        _fail(str(exc))


def _run(work: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(work)
    except DlqError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted")
