"""`microgrid backtest`: the alerts one rule would have raised over a time range of history.

The readings are evaluated by the alerter's own pure code (`stream_processors.alerting`:
`evaluate_reading`, `evaluate_silence`, `DeviceState`, `alert_id`), as the alerter does: per
device, in log order (a device's records all sit in one `telemetry.valid` partition), with one
`DeviceState` per device, here starting empty at `--from`. A record the alerter would refuse
(undecodable, or a reading of another device than its key) is skipped. A reading older than,
or as old as, its device's newest is ignored, as live; readings outside `[from, to)` are not
evaluated, and once a device has a reading at or past `to` in the log, its later records are
not either (live, they come after that reading and are older than it, or past `to` too).

Offline rules fire on the wall clock live, so here on reading-time gaps: before a reading that
comes more than `silent_s` after its device's previous one, and at `to`, silence is evaluated
at the moment it became due (`silence_due_at`), so the alert's id and start are those the
alerter gives it; its opening time is that moment, where the alerter's is its first clock tick
after it (`TICK_S`).

The log is read as `microgrid replay` reads it (`microgrid.replay`: from `from -
MAX_FUTURE_SKEW_S - 60 s` to `to + MAX_READING_AGE_S + 60 s`, capped at the end the log had
when the backtest began), by a consumer without a group that commits nothing; nothing is
written anywhere.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from contracts import Reading, ReadingBatch, Topics
from contracts.alerting import (
    SERVER_SET,
    AlertEvent,
    AlertRuleSpec,
    OfflineRule,
    RateOfChangeRule,
    ThresholdRule,
)
from microgrid.logread import (
    KafkaUnreachable,
    log_consumer,
    lost_before,
    missing_topic,
    read_ranges,
    time_bounds,
    topic_partitions,
)
from microgrid.logread import start as start_consumer
from microgrid.replay import CLOCK_SLACK, RateColumn
from runtime.settings import Settings
from stream_processors.alerting import DeviceState, RuleState, evaluate_reading, evaluate_silence

MICROSECOND: Final = timedelta(microseconds=1)
# ids of rules given without one: a name-based UUID of the rule's canonical JSON
_RULE_NAMESPACE: Final = uuid.UUID("0b9e6a4c-2f1d-4c55-9d2e-7a1f3c5b8e40")


class BacktestError(Exception):
    """A backtest that cannot run: its message says why, for the command line."""


def load_rule(path: Path) -> tuple[str, AlertRuleSpec]:
    """A rule from a JSON file, as the API takes it or as it answers it (with `id` and
    timestamps), and its id: the file's `id`, else one derived from the rule's content."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BacktestError(f"cannot read rule file {path}: {exc.strerror or exc}") from None
    return parse_rule(data, str(path))


def parse_rule(data: bytes, name: str = "rule") -> tuple[str, AlertRuleSpec]:
    try:
        rule = msgspec.json.decode(data, type=AlertRuleSpec)
    except msgspec.ValidationError as exc:
        raise BacktestError(f"{name} is not a valid alert rule: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BacktestError(f"{name} is not JSON: {exc}") from None
    problems = [p for p in rule.problems() if p["field"] not in SERVER_SET]
    if problems:
        listed = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise BacktestError(f"{name} is not a valid alert rule: {listed}")
    return rule.id or derived_rule_id(rule), rule


def derived_rule_id(rule: AlertRuleSpec) -> str:
    """The same rule (whatever its id, timestamps or `enabled`) gives the same id."""
    bare = msgspec.structs.replace(rule, id=None, created_at=None, updated_at=None, enabled=True)
    # decoded again, as from a file: numbers take their declared types (75 is 75.0)
    decoded = msgspec.json.decode(msgspec.json.encode(bare), type=AlertRuleSpec)
    return str(uuid.uuid5(_RULE_NAMESPACE, msgspec.json.encode(decoded, order="sorted").decode()))


def silence_due_at(rule: OfflineRule, last_ts: datetime) -> datetime:
    """The first instant at which `evaluate_silence` opens an alert for a device whose newest
    reading is at `last_ts`: just past `silent_s` after it."""
    return last_ts + timedelta(seconds=rule.silent_s) + MICROSECOND


def observed_rate(rs: RuleState, ts: datetime, value: float) -> float | None:
    """The change per second a rate_of_change rule just evaluated for the reading (`ts`,
    `value`): from the oldest sample its state keeps in the window, as the rule computes it."""
    if not rs.samples:
        return None
    t0, v0 = rs.samples[0]
    dt = (ts - t0).total_seconds()
    return (value - v0) / dt if dt > 0 else None


def more_extreme(rule: AlertRuleSpec, a: float, b: float) -> float:
    """Of two values, the one further in the direction the rule alerts on: the metric's for a
    threshold (furthest outside the band for `outside`), the rate's for a rate of change (the
    larger magnitude when the rule watches both ways), the longer silence for offline."""
    if isinstance(rule, ThresholdRule) and rule.op == "outside":
        assert rule.low is not None and rule.high is not None
        return b if max(rule.low - b, b - rule.high) > max(rule.low - a, a - rule.high) else a
    if isinstance(rule, ThresholdRule | RateOfChangeRule) and rule.op == "lt":
        return min(a, b)
    if isinstance(rule, RateOfChangeRule) and rule.op is None:
        return b if abs(b) > abs(a) else a
    return max(a, b)


def peak_unit(rule: AlertRuleSpec) -> str:
    if isinstance(rule, ThresholdRule):
        return rule.metric
    if isinstance(rule, RateOfChangeRule):
        return f"{rule.metric}/s"
    return "s silent"


class Episode(msgspec.Struct, kw_only=True):
    """One alert the rule would have raised: `cleared_at` None when still open at `to`."""

    alert_id: str
    device_id: str
    site_id: str
    opened_at: datetime
    cleared_at: datetime | None = None
    peak: float | None = None


@dataclass
class Device:
    state: DeviceState
    open: Episode | None = None
    since: datetime | None = None  # an open offline alert: the reading its silence follows
    readings: int = 0  # in range
    ignored: int = 0  # of those, older than or as old as the device's newest


@dataclass
class Counts:
    undecodable: int = 0  # records the alerter refuses (it dead-letters them)
    records: int = 0  # records read from the log


class Evaluation:
    """The pure core of a backtest: one rule, the range `[start, end)`, optionally one site;
    records given in log order per device; the episodes (`finish`)."""

    def __init__(
        self,
        rule_id: str,
        rule: AlertRuleSpec,
        start: datetime,
        end: datetime,
        site: str | None = None,
    ) -> None:
        # a disabled rule would raise nothing: back-test it as if enabled
        self.rule = msgspec.structs.replace(rule, enabled=True)
        self.rule_id = rule_id
        self.rules = {rule_id: self.rule}
        self.start, self.end, self.site = start, end, site
        self.devices: dict[str, Device] = {}
        self.past_end: set[str] = set()  # devices with a reading at or past `end` in the log
        self.episodes: list[Episode] = []
        self.counts = Counts()
        self.decoder = msgspec.json.Decoder(ReadingBatch)

    def record(self, key: bytes | None, value: bytes) -> None:
        """One `telemetry.valid` record, keyed by its device, as the alerter takes it."""
        try:
            readings = self.decoder.decode(value).readings
        except msgspec.MsgspecError:
            self.counts.undecodable += 1
            return
        device = (key or b"").decode(errors="replace")
        if any(r.device_id != device for r in readings):
            self.counts.undecodable += 1
            return
        for r in readings:
            self.reading(r)

    def reading(self, r: Reading) -> None:
        # every device's readings are evaluated, and `site` picks the alerts (`finish`): a
        # device that moved between sites has the state it has live
        if r.device_id in self.past_end or r.ts < self.start:
            return
        if r.ts >= self.end:
            self.past_end.add(r.device_id)
            return
        dev = self.devices.get(r.device_id)
        if dev is None:
            dev = self.devices[r.device_id] = Device(
                DeviceState(r.device_id, r.site_id, r.device_type)
            )
        state = dev.state
        dev.readings += 1
        if state.last_ts is not None and r.ts <= state.last_ts:
            dev.ignored += 1  # as evaluate_reading does: late, or a repeat
            return
        self.silence_until(dev, r.ts)
        self.apply(dev, evaluate_reading(self.rules, r, state), r)

    def silence_until(self, dev: Device, until: datetime) -> None:
        """Evaluate silence at the moment it became due, if it did before `until`."""
        rule, last_ts = self.rule, dev.state.last_ts
        if not isinstance(rule, OfflineRule) or last_ts is None:
            return
        if (until - last_ts).total_seconds() > rule.silent_s:
            now = min(silence_due_at(rule, last_ts), until)
            self.apply(dev, evaluate_silence(self.rules, dev.state, now), None)

    def apply(self, dev: Device, events: list[AlertEvent], r: Reading | None) -> None:
        for e in events:
            if e.kind == "opened":
                dev.open = Episode(
                    alert_id=e.alert_id,
                    device_id=e.device_id,
                    site_id=e.site_id,
                    opened_at=e.at.astimezone(UTC),  # a reading's time may carry any offset
                )
                dev.since = dev.state.last_ts
                self.episodes.append(dev.open)
            elif e.kind == "cleared" and dev.open is not None:
                dev.open.cleared_at = e.at.astimezone(UTC)
                self.close(dev, e.at)
                return
        if dev.open is not None and r is not None:
            self.note_peak(dev.open, dev.state.rules.get(self.rule_id), r)

    def note_peak(self, episode: Episode, rs: RuleState | None, r: Reading) -> None:
        rule = self.rule
        if isinstance(rule, OfflineRule) or rs is None:
            return
        value: float | None = getattr(r, rule.metric)
        if value is not None and isinstance(rule, RateOfChangeRule):
            value = observed_rate(rs, r.ts, value)
        if value is not None:
            peak = episode.peak
            episode.peak = value if peak is None else more_extreme(rule, peak, value)

    def close(self, dev: Device, at: datetime) -> None:
        assert dev.open is not None
        if isinstance(self.rule, OfflineRule) and dev.since is not None:
            dev.open.peak = (at - dev.since).total_seconds()
        dev.open = dev.since = None

    def finish(self) -> list[Episode]:
        """Silence up to `end`, then every episode, by device and opening time."""
        for dev in self.devices.values():
            self.silence_until(dev, self.end)
            if dev.open is not None and isinstance(self.rule, OfflineRule):
                assert dev.since is not None
                dev.open.peak = (self.end - dev.since).total_seconds()
        episodes = [e for e in self.episodes if self.site is None or e.site_id == self.site]
        return sorted(episodes, key=lambda e: (e.device_id, e.opened_at, e.alert_id))

    def _concerned(self) -> list[Device]:
        """The devices the rule concerned (their state has the rule's), of `site` if given."""
        return [
            d
            for d in self.devices.values()
            if self.rule_id in d.state.rules and (self.site is None or d.state.site_id == self.site)
        ]

    @property
    def applied_to(self) -> int:
        return len(self._concerned())

    @property
    def evaluated(self) -> tuple[int, int]:
        """Readings in range of the devices the rule concerned, and of those the ones ignored."""
        concerned = self._concerned()
        return sum(d.readings for d in concerned), sum(d.ignored for d in concerned)


class Range(msgspec.Struct):
    start: datetime = msgspec.field(name="from")
    end: datetime = msgspec.field(name="to")


class Summary(msgspec.Struct):
    readings: int  # in range, of the devices the rule concerned (of the site), ignored included
    ignored: int  # older than or as old as their device's newest, as live
    devices: int  # the rule concerned
    alerts: int  # opened
    open_at_end: int  # still open at `to`
    undecodable: int  # records the alerter would refuse


class Report(msgspec.Struct):
    """What `--json` writes: the same for the same log and range. What the read took (records,
    seconds) is left out: a recent range is read up to the log's end, which moves."""

    rule_id: str
    rule: AlertRuleSpec
    range: Range
    site: str | None
    alerts: list[Episode]
    summary: Summary


@dataclass
class Result:
    report: Report
    records: int = 0  # read from the log
    seconds: float = 0.0


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("{task.fields[alerts]:,} alerts"),
        TimeRemainingColumn(),
        console=console,
    )


async def backtest(
    s: Settings,
    rule_id: str,
    rule: AlertRuleSpec,
    start: datetime,
    end: datetime,
    site: str | None,
    console: Console,
) -> Result:
    """Read `telemetry.valid` for the range and evaluate the rule on it."""
    if start >= end:
        raise BacktestError(
            f"empty range: --from {start.isoformat()} is not before --to {end.isoformat()}"
        )
    evaluation = Evaluation(rule_id, rule, start, end, site)
    counts = evaluation.counts
    first = start - timedelta(seconds=s.max_future_skew_s) - CLOCK_SLACK
    last = end + timedelta(seconds=s.max_reading_age_s) + CLOCK_SLACK
    topic = s.topic(Topics.TELEMETRY_VALID)
    began = time.monotonic()
    consumer = log_consumer(s, "microgrid-backtest")
    try:
        await start_consumer(s, consumer)
    except KafkaUnreachable as exc:
        raise BacktestError(str(exc)) from None
    try:
        try:
            tps = await topic_partitions(consumer, topic)
        except LookupError:
            raise BacktestError(missing_topic(s, Topics.TELEMETRY_VALID)) from None
        bounds = await time_bounds(consumer, tps, first, last)
        gone = await lost_before(consumer, tps, s.telemetry_retention_hours, first)
        if gone is not None:
            console.print(
                f"[yellow]the log no longer holds every reading before {gone:%Y-%m-%dT%H:%MZ}"
                f" (TELEMETRY_RETENTION_HOURS={s.telemetry_retention_hours}): devices start"
                " with their first reading still there[/yellow]"
            )
        with progress_bar(console) as bar:
            total = sum(b - a for a, b in bounds.values())
            task = bar.add_task("backtest", total=total, alerts=0)
            async for records, advanced in read_ranges(consumer, bounds):
                counts.records += len(records)
                for rec in records:
                    if rec.value is not None:
                        evaluation.record(rec.key, rec.value)
                bar.update(task, advance=advanced, alerts=len(evaluation.episodes))
            episodes = evaluation.finish()
            bar.update(task, alerts=len(episodes))
    finally:
        await consumer.stop()
    report = Report(
        rule_id=rule_id,
        rule=msgspec.structs.replace(rule, id=rule_id, created_at=None, updated_at=None),
        range=Range(start.astimezone(UTC), end.astimezone(UTC)),
        site=site,
        alerts=episodes,
        summary=Summary(
            readings=evaluation.evaluated[0],
            ignored=evaluation.evaluated[1],
            devices=evaluation.applied_to,
            alerts=len(episodes),
            open_at_end=sum(e.cleared_at is None for e in episodes),
            undecodable=counts.undecodable,
        ),
    )
    return Result(report, counts.records, time.monotonic() - began)
