"""The one shell of the stateful processors (the alerter and the controller).

A processor is a pure step per record, `step(record, state, now) -> outputs`, and timers,
`timer(state, now) -> outputs`, in the spirit of Quix Streams' `Callable[[value, State],
result]`. The shell owns everything around them:

- state per key for the input partitions this member owns, mirrored in a compacted changelog
  whose partition is the input partition, restored on assignment (`restore`) and dropped on
  revocation (`forget`); records of a partition wait until its state is restored;
- fencing: a record of a partition this member no longer owns is neither processed nor lets
  anything be written, so a member that lost a partition cannot write after its successor;
- commit: a step's outputs are sent first, and the states they imply are written to the
  changelog only once the broker acknowledged every output; when sending fails, or a step
  raises, the batch's changed states are not written (FastStream redelivers the batch);
- per-record rejection: a step raises `Unprocessable` for a record it cannot use; the shell
  logs and counts it, and processing goes on with the next record;
- timers, run under the same lock as the records and committed the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeAlias, TypeVar

import msgspec
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from runtime.kafka import RenewableProducer, read_table
from runtime.metrics import RECORDS, report_lag, serve_metrics
from runtime.settings import Settings

S = TypeVar("S")
Record: TypeAlias = ConsumerRecord[bytes, bytes]

log = logging.getLogger("microgrid.state")

READY_TIMEOUT_S = 30.0  # a batch waiting longer for its state fails and is redelivered
RESTORE_YIELD_EVERY = 10_000  # records restored between two yields to the event loop


@dataclass(frozen=True, slots=True)
class Output:
    """A record a step asks to send."""

    topic: str
    key: bytes
    value: bytes


class Unprocessable(Exception):
    """A record a step cannot use (undecodable, say): skipped, with the reason logged."""


class KeyedState(Generic[S]):
    """State by key for the owned partitions; `set` stages a change for the changelog."""

    def __init__(self) -> None:
        self._values: dict[str, S] = {}
        self._partition: dict[str, int] = {}
        self._changed: dict[str, S] = {}

    def get(self, key: str) -> S | None:
        return self._values.get(key)

    def set(self, key: str, value: S, partition: int | None = None) -> None:
        """Record a new state for `key` (in `partition`, or the one it is already in)."""
        if partition is not None:
            self._partition[key] = partition
        elif key not in self._partition:
            raise KeyError(f"no partition known for new key {key!r}")
        self._values[key] = value
        self._changed[key] = value

    def partition_of(self, key: str) -> int:
        return self._partition[key]

    def items(self) -> Iterator[tuple[str, S]]:
        return iter(self._values.items())

    def __len__(self) -> int:
        return len(self._values)

    def _load(self, key: str, value: S, partition: int) -> None:
        self._values[key] = value
        self._partition[key] = partition

    def _drop(self, partitions: Collection[int]) -> list[str]:
        gone = [k for k, p in self._partition.items() if p in partitions]
        for key in gone:
            self._values.pop(key, None)
            self._partition.pop(key, None)
            self._changed.pop(key, None)
        return gone

    def _take_changes(self) -> dict[str, S]:
        changed, self._changed = self._changed, {}
        return changed


Step = Callable[[Record, KeyedState[S], datetime], list[Output]]
Timer = Callable[[KeyedState[S], datetime], list[Output]]


class StatefulShell(Generic[S]):
    """The Kafka side of a stateful processor: changelog, readiness, fencing, commit, timers."""

    def __init__(
        self,
        s: Settings,
        *,
        name: str,
        group: str,
        changelog: str,
        state_type: type[S],
        lag_topic: str,
        metrics_port: int,
        on_forget: Callable[[list[str]], None] | None = None,
        on_sent: Callable[[list[Output]], None] | None = None,
    ) -> None:
        self.s = s
        self.name = name
        self.group = group
        self.changelog = changelog
        self.lag_topic = lag_topic
        self.metrics_port = metrics_port
        self.on_forget = on_forget
        self.on_sent = on_sent
        self.state: KeyedState[S] = KeyedState()
        self.producer = RenewableProducer(s, f"microgrid-{name}-out")
        self.lock = asyncio.Lock()
        self.owned: set[int] = set()
        self.ready: dict[int, asyncio.Event] = {}
        self._decoder = msgspec.json.Decoder(state_type)
        self._timers: list[tuple[float, Timer[S]]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def every(self, interval_s: float, timer: Timer[S]) -> None:
        """Run `timer` every `interval_s` once started; its outputs are committed like a step's."""
        self._timers.append((interval_s, timer))

    async def start(self, *tasks: Awaitable[None]) -> None:
        await self.producer.start()
        serve_metrics(self.s, self.metrics_port)
        self._tasks = [
            asyncio.create_task(report_lag(self.s, self.group, self.lag_topic)),
            *(asyncio.create_task(self._run_timer(i, t)) for i, t in self._timers),
            *(asyncio.ensure_future(t) for t in tasks),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.producer.stop()

    # --- partitions come and go (called by the consumer's rebalance listener) ----------------

    async def restore(self, partitions: list[int]) -> None:
        tps = [TopicPartition(self.changelog, p) for p in partitions]
        table = await read_table(self.s, tps)
        restored = []
        for i, ((partition, raw_key), rec) in enumerate(table.items()):
            restored.append((raw_key.decode(), self._decoder.decode(rec.value or b""), partition))
            if i % RESTORE_YIELD_EVERY == RESTORE_YIELD_EVERY - 1:
                await asyncio.sleep(0)  # keep heartbeats going through a large restore
        async with self.lock:
            for key, value, partition in restored:
                self.state._load(key, value, partition)
            self.owned.update(partitions)
            for p in partitions:
                self.ready.setdefault(p, asyncio.Event()).set()
        log.info(
            "%s restored state of %d keys for partitions %s", self.name, len(table), partitions
        )

    async def forget(self, partitions: list[int]) -> None:
        async with self.lock:  # let the batch in flight finish first
            self.owned.difference_update(partitions)
            for p in partitions:
                old, self.ready[p] = self.ready.get(p), asyncio.Event()
                if old is not None:
                    old.set()  # a batch waiting on it looks again, at the new event
            gone = self.state._drop(set(partitions))
        if self.on_forget is not None:
            self.on_forget(gone)

    # --- records and timers ------------------------------------------------------------------

    async def process(self, records: tuple[Record, ...], step: Step[S]) -> None:
        """Apply `step` to each record and commit; return once everything is acknowledged.
        A failure raises, and FastStream redelivers the batch."""
        await self._wait_ready({rec.partition for rec in records})
        async with self.lock:
            now = datetime.now(UTC)
            outputs: list[Output] = []
            try:
                for rec in records:
                    if rec.partition not in self.owned:  # revoked while this batch waited
                        RECORDS.labels(self.group, "fenced").inc()
                        continue
                    try:
                        outputs.extend(step(rec, self.state, now))
                    except Unprocessable as exc:
                        log.error(
                            "%s skipped %s[%d]@%d: %s",
                            self.name,
                            rec.topic,
                            rec.partition,
                            rec.offset,
                            exc,
                        )
                        RECORDS.labels(self.group, "undecodable").inc()
            except BaseException:
                self.state._take_changes()  # nothing of a failed batch reaches the changelog
                raise
            await self._commit(outputs)

    async def _wait_ready(self, partitions: set[int]) -> None:
        """Until each partition's state is restored; records can arrive before. A timeout
        fails the batch, which FastStream then redelivers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        for p in partitions:
            while not (event := self.ready.setdefault(p, asyncio.Event())).is_set():
                await asyncio.wait_for(event.wait(), timeout=max(0.0, deadline - loop.time()))

    async def _run_timer(self, interval_s: float, timer: Timer[S]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            async with self.lock:
                try:
                    outputs = timer(self.state, datetime.now(UTC))
                except Exception:
                    self.state._take_changes()
                    log.exception(
                        "%s: a timer failed; it runs again in %g s", self.name, interval_s
                    )
                    continue
                try:
                    await self._commit(outputs)
                except KafkaError as exc:
                    log.warning("%s: a timer's outputs could not be sent: %r", self.name, exc)

    async def _commit(self, outputs: list[Output]) -> None:
        """Send the outputs; once all are acknowledged, write the changed states."""
        changed = self.state._take_changes()
        if not outputs and not changed:
            return
        producer = self.producer.producer
        assert producer is not None, "start() first"
        try:
            sent = [await producer.send(o.topic, o.value, key=o.key) for o in outputs]
            await asyncio.gather(*sent)
            logged = [
                await producer.send(
                    self.changelog,
                    msgspec.json.encode(value),
                    key=key.encode(),
                    partition=self.state.partition_of(key),
                )
                for key, value in changed.items()
            ]
            await asyncio.gather(*logged)
        except KafkaError:
            await self.producer.renew_if_broken()
            raise
        if self.on_sent is not None:
            self.on_sent(outputs)
