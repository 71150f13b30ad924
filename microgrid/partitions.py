"""`microgrid kafka grow --partitions N`: more partitions for the topics keyed by device, in a
maintenance stop, with the stateful processors' state moved to follow its keys.

A consumer group keeps at most as many members busy as its topics have partitions
(DEVICE_TOPIC_PARTITIONS). Kafka can add partitions to a topic, never remove them, and adding
them changes where keys go: a producer puts a record in partition `murmur2(key) % count`
(aiokafka's default partitioner, as Kafka's Java client's), so after the change many devices'
new records go to another partition than their old ones. Three things then have to hold, and
this command checks or makes them:

- **Nothing old is left to read.** Records already in a partition stay there while a device's
  new records go to its new partition; a group reading both would take them in any order. So
  every consumer group of the platform must have consumed every record of the topics it reads
  (its committed offsets; the projections' positions in PostgreSQL, `projection_offsets`), and
  have no member: the platform is stopped. An open transaction (a member stopped moments ago)
  counts as not consumed yet.
- **State follows its keys.** The alerter and the controller keep state per key on the
  changelog partition numbered as the input partition of the key's device (`keyed_state`):
  the alerter by device id, the controller by command id on its device's partition. Each live
  state record whose device now maps elsewhere is written to that partition, then a tombstone
  is written for it at the old one. A moved alerter state forgets the input offset it had
  reached (`last_offset`): that offset was of the old partition, and its device has no record
  in the new one yet.
- **No group skips the new partitions.** A group that first sees a partition starts it at its
  reset policy, and the alerter's is "latest": records written to a new partition before the
  alerter joins would be skipped. So every group that has committed offsets on a topic gets
  offset 0 committed for each partition of it that has none, and every projection with stored
  positions for a topic gets position 0 for those partitions. Before the partitions are added,
  a partition a group has never committed gets its end committed (where its reset policy would
  start it anyway, as nothing is left to read): so a partition without a commit is always a
  new one, and a command that stopped half way can be run again to finish.

The changelogs are raised first and the state moved, then the other topics in one request,
then the offsets are committed. A run that stopped part way (an interrupt, the broker away)
finds some topics or all at N, and does what is left when run again. The alerter, the
controller and `microgrid run` refuse to start while their topics disagree with each other or
with DEVICE_TOPIC_PARTITIONS (`runtime.kafka.check_device_partitions`), so only a run stopped
between raising the last topics and committing offset 0 (moments) leaves a platform that starts
without a warning: run the command again before starting it, whenever it did not finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2
from aiokafka.protocol.admin import DescribeGroupsRequest, DescribeGroupsRequest_v2

from contracts import Groups, Topics
from runtime.settings import Settings

if TYPE_CHECKING:
    import psycopg
    from aiokafka.admin import AIOKafkaAdminClient
    from rich.console import Console
    from rich.progress import Progress

Reset = Literal["earliest", "latest"]
SETTLE_S: Final = 30.0  # how long the broker may take to show the new partitions
READ_S: Final = 120.0  # the longest a look at a range of records may take
ACK_TIMEOUT_S: Final = 60.0  # the idempotent producer never gives up on a record by itself
CHUNK: Final = 1000  # state records sent between two waits for acknowledgements


class GrowError(Exception):
    """The command cannot run or go on: the message says why, for the command line."""


class Refused(GrowError):
    """It would not be safe: the reasons, one a line."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("\n".join(reasons))
        self.reasons = reasons


# --- who reads what ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reader:
    """A consumer group of the platform and the topics keyed by device it reads (names without
    the namespace), where it starts a partition it has no position for, and, for a projection,
    the name its positions are stored under in PostgreSQL (its Kafka offsets are only kept for
    lag monitoring)."""

    group: str
    topics: tuple[str, ...]
    reset: Reset
    projection: str | None = None


READERS: Final = (
    Reader(Groups.VALIDATOR, (Topics.TELEMETRY_RAW,), "earliest"),
    Reader(Groups.ALERTER, (Topics.TELEMETRY_VALID,), "latest"),
    Reader(Groups.CONTROLLER, (Topics.CONTROL_COMMANDS, Topics.CONTROL_RESULTS), "earliest"),
    Reader(Groups.TELEMETRY_PROJECTOR, (Topics.TELEMETRY_VALID,), "earliest", "telemetry"),
    Reader(Groups.ALERTS_PROJECTOR, (Topics.ALERTS,), "earliest", "alerts"),
    Reader(Groups.CONTROL_PROJECTOR, (Topics.CONTROL_EVENTS,), "earliest", "control"),
)
# Each simulator run reads control.dispatch in a group of its own, from the end: only its
# members matter (none may run), never its offsets.
SIMULATOR_GROUPS: Final = Groups.SIMULATOR + "."
CHANGELOGS: Final = (Topics.ALERTER_STATE, Topics.CONTROLLER_STATE)


def partition_for(key: bytes, partitions: int) -> int:
    """The partition the platform's producers give a key (aiokafka's default partitioner:
    murmur2, as Kafka's Java client)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# --- state that follows its keys ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Move:
    """A state record of a changelog on a partition its key no longer maps to: `value` is
    written at `target` (None: a copy is there already), then a tombstone at `source`."""

    key: bytes
    source: int
    target: int
    value: bytes | None


Place = Callable[[bytes, bytes, int], tuple[int, bytes]]


def place_alerter_state(key: bytes, value: bytes, partitions: int) -> tuple[int, bytes]:
    """A device's alert state goes where its readings go (its key is the device id); moved, it
    has evaluated no reading of its new partition yet."""
    from stream_processors.alerting import DeviceState

    state = msgspec.json.decode(value, type=DeviceState)
    moved = msgspec.structs.replace(state, last_offset=-1)
    return partition_for(key, partitions), msgspec.json.encode(moved)


def place_controller_state(key: bytes, value: bytes, partitions: int) -> tuple[int, bytes]:
    """A command's state (keyed by command id) goes where its device's requests and replies
    go."""
    from stream_processors.lifecycle import CommandState

    state = msgspec.json.decode(value, type=CommandState)
    return partition_for(state.device_id.encode(), partitions), value


PLACES: Final[dict[str, Place]] = {
    Topics.ALERTER_STATE: place_alerter_state,
    Topics.CONTROLLER_STATE: place_controller_state,
}


def plan_moves(
    table: dict[tuple[int, bytes], bytes], place: Place, partitions: int, topic: str
) -> list[Move]:
    """The moves that put every live record of a changelog (`table`: value by partition and
    key) on the partition its key maps to with `partitions` partitions. A key found at its
    target already (a run that stopped between the copies and the tombstones) only needs its
    tombstone."""
    moves = []
    for (source, key), value in sorted(table.items()):
        try:
            target, moved = place(key, value, partitions)
        except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
            raise GrowError(
                f"{topic} partition {source}: the state of key {key!r} does not decode ({exc});"
                " nothing was changed"
            ) from None
        if target == source:
            continue
        moves.append(Move(key, source, target, None if (target, key) in table else moved))
    return moves


# --- consumed or not ---------------------------------------------------------------------------


def resume_at(committed: int | None, begin: int, end: int, reset: Reset) -> int:
    """Where a reader goes on in a partition: its committed offset (or stored position), within
    the log; else where its reset policy starts it."""
    if committed is None or committed < 0:
        return begin if reset == "earliest" else end
    return min(max(committed, begin), end)


@dataclass(frozen=True, slots=True)
class Behind:
    """A reader with records left to read in a partition: from `position` up to `end`."""

    reader: str  # the group, or "projection NAME"
    topic: str
    partition: int
    position: int
    end: int


# --- what the broker and the database say -----------------------------------------------------


@dataclass
class Survey:
    """The state of things before a change (names are namespaced)."""

    counts: dict[str, int]  # topic keyed by device: partitions
    active: dict[str, list[str]]  # group: its members (client id @ host)
    behind: list[Behind]
    open_transactions: list[TopicPartition]
    committed: dict[tuple[str, str], dict[int, int]]  # (group, topic): partition: offset
    positions: dict[tuple[str, str], dict[int, int]]  # (projection, topic): partition: offset
    ends: dict[TopicPartition, int]  # every partition's end (uncommitted records included)
    live: dict[str, int] = field(default_factory=dict)  # changelog: live keys
    moves: dict[str, list[Move]] = field(default_factory=dict)  # changelog: moves
    groups_skipped: list[str] = field(default_factory=list)  # readers that never read

    def below(self, n: int) -> dict[str, int]:
        return {t: c for t, c in self.counts.items() if c < n}

    def unset(self, s: Settings, n: int) -> tuple[dict[tuple[str, str], list[int]], ...]:
        """The partitions (of n) without a committed offset, of each (group, topic) with one at
        least; and without a stored position, of each (projection, topic) with one at least."""
        groups: dict[tuple[str, str], list[int]] = {}
        projections: dict[tuple[str, str], list[int]] = {}
        for r in READERS:
            for t in r.topics:
                topic = s.topic(t)
                if r.projection is not None:
                    have = self.positions.get((r.projection, topic), {})
                    if have:
                        projections[(r.projection, topic)] = [p for p in range(n) if p not in have]
                committed = self.committed.get((s.group(r.group), topic), {})
                if committed:
                    groups[(s.group(r.group), topic)] = [p for p in range(n) if p not in committed]
        return (
            {k: v for k, v in groups.items() if v},
            {k: v for k, v in projections.items() if v},
        )


def refusals(s: Settings, sv: Survey, n: int) -> list[str]:
    """Why raising the topics keyed by device to `n` partitions is not safe now (none: it is)."""
    plain = Plain(s)
    reasons = []
    over = {t: c for t, c in sv.counts.items() if c > n}
    if over:
        have = (
            f"{len(over)} topics have {next(iter(over.values()))}"
            if len(set(over.values())) == 1
            else ", ".join(f"{plain(t)} {c}" for t, c in sorted(over.items()))
        )
        reasons.append(
            f"--partitions {n} is fewer than the topics have ({have}): Kafka can add partitions,"
            " never remove them"
        )
    for group, members in sorted(sv.active.items()):
        reasons.append(
            f"consumer group {plain(group)} has {len(members)} active member(s)"
            f" ({', '.join(sorted(members))}): stop the platform first (every component,"
            " the gateway and the query API too, and any simulator)"
        )
    for tp in sv.open_transactions:
        reasons.append(
            f"{plain(tp.topic)} partition {tp.partition} has a transaction still open (a"
            " member stopped or died moments ago leaves it open until its transaction timeout):"
            " try again in a minute"
        )
    for b in sv.behind:
        reasons.append(
            f"{plain(b.reader)} has not consumed everything of {plain(b.topic)} partition"
            f" {b.partition} (at offset {b.position}, the log ends at {b.end}): its records"
            " there would be read after the device's new records in its new partition; run the"
            " platform until it has caught up (with the gateway and the query API stopped, or"
            " devices not sending), then stop it and try again"
        )
    return reasons


def nothing_to_do(s: Settings, sv: Survey, n: int) -> bool:
    groups, projections = sv.unset(s, n)
    return not sv.below(n) and not any(sv.moves.values()) and not groups and not projections


class Plain:
    """Names as the operator gives and reads them: without the deployment's namespace."""

    def __init__(self, s: Settings) -> None:
        self.prefix = s.kafka_namespace

    def __call__(self, name: str) -> str:
        return name.removeprefix(self.prefix) if self.prefix else name


class _DescribeGroups(DescribeGroupsRequest):
    """DescribeGroups at version 2: aiokafka 0.14 sends v3 but reads the answer as v2 (its v3
    request names the v2 response, which lacks `authorized_operations`), so the answer does
    not parse and the connection is closed. v2 answers the same, without it."""

    def prepare(self, versions: dict[int, tuple[int, int]]) -> Any:
        low, high = versions.get(self.API_KEY, (0, -1))
        if low <= 2 <= high:
            return self.build(DescribeGroupsRequest_v2)
        return super().prepare(versions)


async def describe_members(admin: AIOKafkaAdminClient, groups: list[str]) -> dict[str, list[str]]:
    """The groups that have members (or are between generations), with their members."""
    by_node: dict[int, list[str]] = {}
    for group in groups:
        by_node.setdefault(await admin.find_coordinator(group), []).append(group)
    active: dict[str, list[str]] = {}
    for node, names in by_node.items():
        response = await admin._send_request(_DescribeGroups(names), node)
        for error_code, group, state, _ptype, _protocol, members, *_ in response.groups:
            if error_code:
                raise GrowError(f"cannot describe consumer group {group}: error {error_code}")
            if members or state in ("PreparingRebalance", "CompletingRebalance", "Stable"):
                active[group] = [f"{m[1]}@{m[2].lstrip('/')}" for m in members] or [state]
    return active


def _consumer(s: Settings, committed: bool) -> AIOKafkaConsumer:
    """A consumer without a group: read_committed for what readers see (ends are then the last
    stable offsets), read_uncommitted for the logs' true ends."""
    return AIOKafkaConsumer(
        **s.kafka_client,
        client_id="microgrid-grow",
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed" if committed else "read_uncommitted",
        auto_offset_reset="earliest",
        fetch_max_bytes=16 * 1_048_576,
        max_partition_fetch_bytes=2 * 1_048_576,
    )


async def with_records(
    consumer: AIOKafkaConsumer, ranges: dict[TopicPartition, tuple[int, int]]
) -> set[TopicPartition]:
    """The partitions with at least one committed record in their range [a, b): a range may
    hold only transaction markers, or records of aborted transactions, which no reader gets."""
    ranges = {tp: (a, b) for tp, (a, b) in ranges.items() if a < b}
    if not ranges:
        return set()
    consumer.assign(list(ranges))
    for tp, (a, _) in ranges.items():
        consumer.seek(tp, a)
    found: set[TopicPartition] = set()
    pending = set(ranges)
    deadline = time.monotonic() + READ_S
    while pending:
        if time.monotonic() > deadline:
            raise GrowError(f"reading {len(pending)} partitions took over {READ_S:.0f} s")
        polled = await consumer.getmany(*pending, timeout_ms=500, max_records=500)
        for tp, records in polled.items():
            if any(rec.offset < ranges[tp][1] for rec in records):
                found.add(tp)
                pending.discard(tp)
                consumer.pause(tp)
        for tp in list(pending):
            if await consumer.position(tp) >= ranges[tp][1]:
                pending.discard(tp)
    return found


async def read_changelog(
    consumer: AIOKafkaConsumer,
    bounds: dict[TopicPartition, tuple[int, int]],
    bar: Progress,
    label: str,
) -> dict[tuple[int, bytes], bytes]:
    """The live value of each key of a changelog (tombstoned keys left out), by partition."""
    from microgrid.logread import read_ranges

    table: dict[tuple[int, bytes], bytes] = {}
    task = bar.add_task(label, total=sum(b - a for a, b in bounds.values()))
    async for records, advanced in read_ranges(consumer, bounds, 10_000):
        for rec in records:
            if rec.value is None:
                table.pop((rec.partition, rec.key or b""), None)
            else:
                table[(rec.partition, rec.key or b"")] = rec.value
        bar.update(task, advance=advanced)
    bar.remove_task(task)
    return table


async def _committed(
    admin: AIOKafkaAdminClient, group: str, topics: Iterable[str]
) -> dict[str, dict[int, int]]:
    wanted = set(topics)
    out: dict[str, dict[int, int]] = {t: {} for t in wanted}
    for tp, meta in (await admin.list_consumer_group_offsets(group)).items():
        if tp.topic in wanted and meta.offset >= 0:
            out[tp.topic][tp.partition] = meta.offset
    return out


async def _positions(
    conn: psycopg.AsyncConnection, s: Settings
) -> dict[tuple[str, str], dict[int, int]]:
    import psycopg

    wanted = [(r.projection, s.topic(t)) for r in READERS if r.projection for t in r.topics]
    try:
        cur = await conn.execute(
            "SELECT projection, topic, partition, next_offset FROM projection_offsets"
        )
    except psycopg.errors.UndefinedTable:
        raise GrowError("table projection_offsets is missing: run `microgrid migrate`") from None
    out: dict[tuple[str, str], dict[int, int]] = {(p, t): {} for p, t in wanted if p}
    for projection, topic, partition, offset in await cur.fetchall():
        if (projection, topic) in out:
            out[(projection, topic)][partition] = offset
    return out


async def survey(
    s: Settings,
    n: int,
    admin: AIOKafkaAdminClient,
    conn: psycopg.AsyncConnection,
    bar: Progress,
) -> Survey:
    """Read what a grow to `n` partitions needs to know; change nothing."""
    from microgrid.logread import missing_topic
    from runtime.kafka import device_topic_specs, partition_counts

    names = [spec.name for spec in device_topic_specs(s)]
    counts = await partition_counts(admin, names)
    for name in names:
        if name not in counts:
            raise GrowError(missing_topic(s, Plain(s)(name)))
    groups = [s.group(r.group) for r in READERS]
    simulators = s.group(SIMULATOR_GROUPS)
    groups += sorted(g for g, _ in await admin.list_consumer_groups() if g.startswith(simulators))
    active = await describe_members(admin, groups)

    committed: dict[tuple[str, str], dict[int, int]] = {}
    for r in READERS:
        for topic, offsets in (
            await _committed(admin, s.group(r.group), [s.topic(t) for t in r.topics])
        ).items():
            committed[(s.group(r.group), topic)] = offsets
    positions = await _positions(conn, s)

    tps = [TopicPartition(t, p) for t in names for p in range(counts[t])]
    stable = _consumer(s, committed=True)
    raw = _consumer(s, committed=False)
    await _start(s, stable)
    try:
        await _start(s, raw)
        try:
            ends = await raw.end_offsets(tps)
        finally:
            await raw.stop()
        lso = await stable.end_offsets(tps)
        begins = await stable.beginning_offsets(tps)
        open_transactions = [tp for tp in tps if lso[tp] < ends[tp]]

        candidates: dict[TopicPartition, tuple[int, int]] = {}
        who: dict[TopicPartition, list[tuple[str, int]]] = {}
        skipped = []
        for r in READERS:
            for t in r.topics:
                topic = s.topic(t)
                if r.projection is not None:
                    stored = positions[(r.projection, topic)]
                    label = f"projection {r.projection}"
                else:
                    stored = committed[(s.group(r.group), topic)]
                    label = s.group(r.group)
                if not stored and r.reset == "latest":
                    skipped.append(label)  # it would start every partition at its end
                for p in range(counts[topic]):
                    tp = TopicPartition(topic, p)
                    at = resume_at(stored.get(p), begins[tp], lso[tp], r.reset)
                    if at < lso[tp]:
                        a, b = candidates.get(tp, (at, lso[tp]))
                        candidates[tp] = (min(a, at), b)
                        who.setdefault(tp, []).append((label, at))
        found = await with_records(stable, candidates)
        behind = []
        for tp in sorted(found):
            for label, at in who[tp]:
                # a reader further on than the first record found may have none left: look
                if at == candidates[tp][0] or await with_records(stable, {tp: (at, lso[tp])}):
                    behind.append(Behind(label, tp.topic, tp.partition, at, lso[tp]))

        live: dict[str, int] = {}
        moves: dict[str, list[Move]] = {}
        for t in CHANGELOGS:
            topic = s.topic(t)
            parts = [TopicPartition(topic, p) for p in range(counts[topic])]
            bounds = {tp: (begins[tp], lso[tp]) for tp in parts}
            table = await read_changelog(stable, bounds, bar, f"reading {t}")
            live[topic] = len(table)
            moves[topic] = plan_moves(table, PLACES[t], n, t)
    finally:
        await stable.stop()
    return Survey(
        counts=counts,
        active=active,
        behind=behind,
        open_transactions=open_transactions,
        committed=committed,
        positions=positions,
        ends=ends,
        live=live,
        moves=moves,
        groups_skipped=sorted(set(skipped)),
    )


async def _start(s: Settings, client: Any) -> None:
    from microgrid.logread import KafkaUnreachable, start

    try:
        await start(s, client)
    except KafkaUnreachable as exc:
        raise GrowError(str(exc)) from None


# --- the change ---------------------------------------------------------------------------------


@dataclass
class Report:
    """What a grow did (or, planned, would do)."""

    partitions: int
    before: dict[str, int]  # topic (without namespace): partitions before
    raised: list[str] = field(default_factory=list)
    state: dict[str, dict[str, int]] = field(default_factory=dict)  # changelog: counts
    offsets_pinned: dict[str, int] = field(default_factory=dict)  # group: partitions
    offsets_zero: dict[str, int] = field(default_factory=dict)  # group: new partitions at 0
    positions_zero: dict[str, int] = field(default_factory=dict)  # projection: rows at 0
    written_meanwhile: list[str] = field(default_factory=list)  # TOPIC:PARTITION
    seconds: float = 0.0
    done: bool = False
    pending: bool = True  # there was something to do

    def to_dict(self) -> dict[str, Any]:
        return {
            "partitions": self.partitions,
            "before": self.before,
            "raised": self.raised,
            "state": self.state,
            "offsets_pinned": self.offsets_pinned,
            "offsets_zero": self.offsets_zero,
            "positions_zero": self.positions_zero,
            "written_meanwhile": self.written_meanwhile,
            "elapsed_s": round(self.seconds, 3),
            "dry_run": not self.done,
            "changed": self.done and self.pending,
            "setting": f"DEVICE_TOPIC_PARTITIONS={self.partitions}",
        }


def state_counts(sv: Survey, plain: Plain) -> dict[str, dict[str, int]]:
    return {
        plain(topic): {
            "live": sv.live[topic],
            "moved": sum(1 for m in moves if m.value is not None),
            "tombstoned": len(moves),
        }
        for topic, moves in sv.moves.items()
    }


def plan_lines(s: Settings, sv: Survey, n: int) -> list[str]:
    """What a grow to `n` would do, for the operator to confirm."""
    plain = Plain(s)
    lines = []
    below = sv.below(n)
    by_count: dict[int, list[str]] = {}
    for topic, count in sorted(below.items()):
        by_count.setdefault(count, []).append(plain(topic))
    for count, topics in sorted(by_count.items()):
        lines.append(
            f"raise {len(topics)} topics from {count} to {n} partitions: {', '.join(topics)}"
        )
    for topic, counts in state_counts(sv, plain).items():
        what = "devices" if topic == Topics.ALERTER_STATE else "commands"
        again = counts["tombstoned"] - counts["moved"]
        lines.append(
            f"{topic}: move the state of {counts['moved']} of {counts['live']} {what} to the"
            f" partition their device maps to" + (f" ({again} copied already)" if again else "")
        )
    groups, projections = sv.unset(s, n)
    for (group, topic), parts in sorted(groups.items()):
        old = [p for p in parts if p < sv.counts[topic]] if topic in below else []
        new = [p for p in parts if p not in old]
        if old:  # never committed there: nothing is left to read, it goes on from the end
            lines.append(
                f"{plain(group)}: commit the end of {plain(topic)} partitions {_span(old)}"
            )
        if new:
            lines.append(
                f"{plain(group)}: start {plain(topic)} partitions {_span(new)} at offset 0"
            )
    for (projection, topic), parts in sorted(projections.items()):
        lines.append(
            f"projection {projection}: start {plain(topic)} partitions {_span(parts)} at offset 0"
        )
    for label in sv.groups_skipped:
        lines.append(f"{plain(label)} has never committed an offset: it starts at the end anyway")
    return lines


def _span(parts: list[int]) -> str:
    if parts == list(range(parts[0], parts[-1] + 1)) and len(parts) > 2:
        return f"{parts[0]}-{parts[-1]}"
    return ", ".join(map(str, parts))


async def _commit(s: Settings, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit offsets for a group that has no member, as a consumer outside it (generation
    -1); the broker refuses while the group has members."""
    if not offsets:
        return
    consumer = AIOKafkaConsumer(
        **s.kafka_client, group_id=group, enable_auto_commit=False, client_id="microgrid-grow"
    )
    await _start(s, consumer)
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


async def _raise_partitions(admin: AIOKafkaAdminClient, topics: list[str], n: int) -> None:
    from aiokafka.admin import NewPartitions

    from runtime.kafka import partition_counts

    if not topics:
        return
    await admin.create_partitions({t: NewPartitions(total_count=n) for t in topics})
    deadline = time.monotonic() + SETTLE_S
    while True:  # until the metadata shows them, with leaders
        described = await admin.describe_topics(topics)
        counts = await partition_counts(admin, topics)
        led = all(p["leader"] >= 0 for d in described for p in d["partitions"])
        if led and all(counts.get(t) == n for t in topics):
            return
        if time.monotonic() > deadline:
            raise GrowError(
                f"the broker did not show {n} partitions with leaders within {SETTLE_S:.0f} s;"
                " run the command again to finish"
            )
        await asyncio.sleep(0.2)


async def _move_state(s: Settings, sv: Survey, bar: Progress) -> None:
    """Copies first, every one acknowledged; then the tombstones. Stopped in between, the next
    run finds the copies in place and writes only the tombstones."""
    from aiokafka.errors import KafkaError

    from runtime.kafka import reliable_producer

    work = [(topic, m) for topic, moves in sv.moves.items() for m in moves]
    if not work:
        return
    producer = reliable_producer(s, client_id="microgrid-grow")
    await _start(s, producer)
    # a new partition's leader may refuse the first writes a moment (NotLeaderForPartition):
    # aiokafka retries them, and would say so once a batch; a failure still raises
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for phase in ("copies", "tombstones"):
            todo = [(t, m) for t, m in work if phase == "tombstones" or m.value is not None]
            task = bar.add_task(f"writing state {phase}", total=len(todo))
            for i in range(0, len(todo), CHUNK):
                chunk = todo[i : i + CHUNK]
                try:
                    sent = [
                        await producer.send(
                            topic,
                            m.value if phase == "copies" else None,
                            key=m.key,
                            partition=m.target if phase == "copies" else m.source,
                        )
                        for topic, m in chunk
                    ]
                    await asyncio.wait_for(asyncio.gather(*sent), ACK_TIMEOUT_S)
                except (KafkaError, TimeoutError) as exc:
                    raise GrowError(
                        f"writing state {phase} failed ({exc!r}); the partitions are raised:"
                        " run the command again to finish"
                    ) from None
                bar.update(task, advance=len(chunk))
            bar.remove_task(task)
    finally:
        quiet.setLevel(level)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(producer.stop(), 15)


async def grow(
    s: Settings,
    n: int,
    console: Console,
    *,
    dry_run: bool = False,
    on_plan: Callable[[list[str]], None] = lambda lines: None,
) -> tuple[Report, list[str]]:
    """Raise every topic keyed by device to `n` partitions and move state to follow its keys,
    or (dry run) say what it would do. Raises Refused when that is not safe, GrowError when it
    cannot be done; returns the report and the plan (also given to `on_plan` before anything
    changes)."""
    import psycopg
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    started = time.monotonic()
    plain = Plain(s)
    admin = AIOKafkaAdminClient(**s.kafka_client, client_id="microgrid-grow")
    try:
        await admin.start()
    except KafkaError as exc:
        await admin.close()
        raise GrowError(
            f"cannot reach Kafka at {s.kafka_bootstrap_servers} ({exc});"
            " is the stack up (`microgrid stack up`)?"
        ) from None
    try:
        conn = await psycopg.AsyncConnection.connect(
            s.database_url, autocommit=True, connect_timeout=10
        )
    except psycopg.OperationalError as exc:
        await admin.close()
        raise GrowError(f"cannot reach PostgreSQL: {exc}") from None
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    )
    try:
        with bar:
            sv = await survey(s, n, admin, conn, bar)
            report = Report(n, {plain(t): c for t, c in sorted(sv.counts.items())})
            report.state = state_counts(sv, plain)
            plan = plan_lines(s, sv, n)
            if reasons := refusals(s, sv, n):
                raise Refused(reasons)
            report.pending = not nothing_to_do(s, sv, n)
            if dry_run or not report.pending:
                report.done = not dry_run
                report.seconds = time.monotonic() - started
                return report, plan
            on_plan(plan)
            await _change(s, n, sv, admin, conn, bar, report, console)
    except KafkaError as exc:
        raise GrowError(f"Kafka failed: {exc!r}; run the command again to finish") from None
    except psycopg.OperationalError as exc:
        raise GrowError(f"PostgreSQL failed: {exc}; run the command again to finish") from None
    finally:
        await conn.close()
        await admin.close()
    report.done = True
    report.seconds = time.monotonic() - started
    return report, plan


async def _change(
    s: Settings,
    n: int,
    sv: Survey,
    admin: AIOKafkaAdminClient,
    conn: psycopg.AsyncConnection,
    bar: Progress,
    report: Report,
    console: Console,
) -> None:
    plain = Plain(s)
    below = sv.below(n)
    # 1. a partition a group has not committed gets its end (nothing is left to read there)
    for r in READERS:
        group = s.group(r.group)
        pins: dict[TopicPartition, int] = {}
        for t in r.topics:
            topic = s.topic(t)
            committed = sv.committed.get((group, topic), {})
            if committed and topic in below:
                for p in range(sv.counts[topic]):
                    if p not in committed:
                        tp = TopicPartition(topic, p)
                        pins[tp] = sv.ends[tp]
        await _commit(s, group, pins)
        if pins:
            report.offsets_pinned[plain(group)] = len(pins)
    # 2. the changelogs first, and state to the partitions its keys map to now: stopped in
    # this (the long part), the changelogs disagree with their inputs, so the stateful
    # processors and `microgrid run` refuse to start until a run of this command finishes
    changelogs = sorted(t for t in below if t in {s.topic(c) for c in CHANGELOGS})
    inputs = sorted(t for t in below if t not in changelogs)
    if below:
        console.print(f"raising {len(below)} topics to {n} partitions")
    await _raise_partitions(admin, changelogs, n)
    await _move_state(s, sv, bar)
    # 3. the other topics, in one request
    await _raise_partitions(admin, inputs, n)
    report.raised = [plain(t) for t in sorted(below)]
    # 4. new partitions start at 0, for every group and projection that stores positions
    for r in READERS:
        group = s.group(r.group)
        topics = [s.topic(t) for t in r.topics]
        offsets = {
            TopicPartition(topic, p): 0
            for topic, committed in (await _committed(admin, group, topics)).items()
            if committed
            for p in range(n)
            if p not in committed
        }
        await _commit(s, group, offsets)
        if offsets:
            report.offsets_zero[plain(group)] = len(offsets)
        if r.projection is None:
            continue
        for topic in topics:
            cur = await conn.execute(
                "INSERT INTO projection_offsets (projection, topic, partition, next_offset)"
                " SELECT %s, %s, p, 0 FROM generate_series(0, %s - 1) AS p"
                " WHERE EXISTS (SELECT 1 FROM projection_offsets"
                "  WHERE projection = %s AND topic = %s)"
                " ON CONFLICT DO NOTHING",
                (r.projection, topic, n, r.projection, topic),
            )
            if cur.rowcount > 0:
                report.positions_zero[r.projection] = (
                    report.positions_zero.get(r.projection, 0) + cur.rowcount
                )
    # 5. nothing may have been written to the old partitions meanwhile but the state moved
    written = {s.topic(t) for t in CHANGELOGS}  # by this command
    watched = [tp for tp in sv.ends if tp.topic not in written]
    raw = _consumer(s, committed=False)
    await _start(s, raw)
    try:
        now = await raw.end_offsets(watched)
    finally:
        await raw.stop()
    report.written_meanwhile = [
        f"{plain(tp.topic)}:{tp.partition}" for tp in sorted(watched) if now[tp] != sv.ends[tp]
    ]


def summary_lines(report: Report, plan: list[str]) -> list[str]:
    """What the command prints: a dry run's plan, or what was done and what to do next."""
    n = report.partitions
    if not report.done and not report.pending:
        return [f"dry run: nothing to do; the topics keyed by device have {n} partitions"]
    if not report.done:
        head = f"dry run: nothing changed; --partitions {n} is safe now, and would:"
        return [head] + [f"  {line}" for line in plan]
    lines = []
    if report.raised:
        before = sorted(set(report.before[t] for t in report.raised))
        lines.append(
            f"raised {len(report.raised)} topics from {', '.join(map(str, before))} to {n}"
            f" partitions in {report.seconds:.1f} s"
        )
    else:
        lines.append(f"the topics keyed by device have {n} partitions already")
    for topic, c in report.state.items():
        what = "devices" if topic == Topics.ALERTER_STATE else "commands"
        lines.append(
            f"{topic}: state of {c['moved']} of {c['live']} {what} moved to the partition"
            " their device maps to"
        )
    if report.offsets_zero or report.positions_zero:
        groups = ", ".join(f"{g} {k}" for g, k in sorted(report.offsets_zero.items()))
        rows = ", ".join(f"{p} {k}" for p, k in sorted(report.positions_zero.items()))
        lines.append(
            "new partitions start at offset 0:"
            + (f" groups {groups}" if groups else "")
            + (";" if groups and rows else "")
            + (f" projections {rows}" if rows else "")
        )
    lines.append(
        f"next: set DEVICE_TOPIC_PARTITIONS={n} (.env, or the environment of every process)"
        " and start the platform; its components refuse to start while the setting and the"
        f" topics disagree. Consumer groups can now have up to {n} members."
    )
    return lines


def warning_lines(report: Report) -> list[str]:
    if not report.written_meanwhile:
        return []
    return [
        f"records were written to {', '.join(report.written_meanwhile)} while the partitions"
        " were raised: something still produces (the gateway, the query API, a component?)."
        " Their devices' records from before and after the change may be read out of order"
    ]


# --- the command line ---------------------------------------------------------------------------


def command(s: Settings, n: int, *, yes: bool, dry_run: bool, as_json: bool) -> int:
    """`microgrid kafka grow`: the exit code. 0: done (or nothing to do; a dry run that finds
    it safe), 1: refused, failed or not confirmed, 2: done, but records reached the old
    partitions meanwhile (something still produced)."""
    import typer
    from rich.console import Console

    console = Console(stderr=True)

    def fail(message: str) -> int:
        typer.secho(message, fg=typer.colors.RED, err=True)
        return 1

    def show_plan(lines: list[str]) -> None:
        for line in lines:
            console.print(f"  {line}", soft_wrap=True, highlight=False)

    try:
        if not yes and not dry_run:
            _, plan = asyncio.run(grow(s, n, console, dry_run=True))
            console.print(f"to raise the topics keyed by device to {n} partitions:")
            show_plan(plan)
            try:
                go = typer.confirm(
                    "Kafka cannot remove partitions again: go on?", default=False, err=True
                )
            except typer.Abort:
                go = False
            if not go:
                return fail("not confirmed: nothing changed")
        report, plan = asyncio.run(
            grow(s, n, console, dry_run=dry_run, on_plan=show_plan if yes else lambda _: None)
        )
    except Refused as exc:
        typer.secho(
            f"refusing to raise the topics keyed by device to {n} partitions:",
            fg=typer.colors.RED,
            err=True,
        )
        for reason in exc.reasons:
            typer.secho(f"- {reason}", fg=typer.colors.RED, err=True)
        return 1
    except GrowError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return fail(
            "interrupted: if the partitions were raised already, run the same command again"
            " to finish"
        )
    if as_json:
        typer.echo(msgspec.json.encode({**report.to_dict(), "plan": plan}).decode())
    else:
        for line in summary_lines(report, plan):
            typer.echo(line)
    for line in warning_lines(report):
        typer.secho(line, fg=typer.colors.YELLOW, err=True)
    return 2 if report.written_meanwhile else 0
