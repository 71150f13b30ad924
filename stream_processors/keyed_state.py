"""The one shell of the stateful processors (the alerter and the controller).

A processor is a pure step per record, `step(record, state, now) -> outputs`, and timers,
`timer(state, now) -> outputs`, in the spirit of Quix Streams' `Callable[[value, State],
result]`. The shell owns everything around them:

- state per key for the input partitions this member owns, mirrored in a compacted changelog
  whose partition is the input partition, restored on assignment (`assign`, in the
  background, retried with backoff while the changelog cannot be read) and dropped on
  revocation (`forget`); records of a partition wait until its state is restored, and
  `not_ready` (the gauge `microgrid_state_partitions_not_ready`, `/readyz`) names the
  partitions still waiting;
- fencing: a record of a partition this member no longer owns is neither processed nor lets
  anything be written, so a member that lost a partition cannot write after its successor;
- state after acknowledgement: steps and timers work on staged copies (`KeyedState.get`
  copies, `set`/`delete` stage); a batch's outputs and dead letters are sent first, the staged
  states are written to the changelog once the broker acknowledged every output, and become
  the state in memory once that is acknowledged too. When anything fails (a step raises, a
  send fails) everything staged is discarded, so the batch FastStream redelivers is worked
  again from the same state and emits the same events;
- per-record rejection: a step raises `Unprocessable` for a record it cannot use; the shell
  sends it unchanged, with the reason, to the stage's dead-letter topic (acknowledged before
  the batch commits), and processing goes on with the next record;
- timers, run under the same lock as the records and committed the same way.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeAlias, TypeVar

import msgspec
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge

from runtime.dlq import DeadLetters
from runtime.kafka import RenewableProducer, read_table
from runtime.metrics import RECORDS, MetricsServer, report_lag, serve_metrics
from runtime.retry import Retry, RetryPolicy, call_with_retries
from runtime.settings import Settings

S = TypeVar("S")
Record: TypeAlias = ConsumerRecord[bytes, bytes]

log = logging.getLogger("microgrid.state")

READY_TIMEOUT_S = 30.0  # a batch waiting longer for its state fails and is redelivered
RESTORE_YIELD_EVERY = 10_000  # records restored between two yields to the event loop
RESTORE_ATTEMPT_S = 60.0  # a changelog read taking longer is abandoned and tried again
RESTORE_RETRY = RetryPolicy(initial_s=0.5, max_s=30.0, deadline_s=None)  # until it succeeds
RestoredTable: TypeAlias = dict[tuple[int, bytes], ConsumerRecord[bytes, bytes]]

RESTORE_FAILURES = Counter(
    "microgrid_state_restore_failures_total",
    "Failed attempts to restore a stateful processor's state from its changelog",
    ["group"],
)
NOT_READY = Gauge(
    "microgrid_state_partitions_not_ready",
    "Partitions assigned to a stateful processor whose state is not restored yet",
    ["group"],
)


@dataclass(frozen=True, slots=True)
class Output:
    """A record a step asks to send."""

    topic: str
    key: bytes
    value: bytes


class Unprocessable(Exception):
    """A record a step cannot use (undecodable, an impossible transition, a stale request):
    it goes unchanged to the stage's dead-letter topic, with the message as its reason. A step
    raises it before staging anything for the record."""


def _shallow(value: S) -> S:
    return copy.copy(value)


class KeyedState(Generic[S]):
    """State by key for the owned partitions, as of the last acknowledged commit, and the
    changes a batch (or a timer) stages on top of it.

    `get` gives a key's staged value if any, else a copy of its committed value, which the
    step may change in place; `set` and `delete` stage. The shell merges what is staged into
    the committed values once every output of the batch is acknowledged, and discards it when
    anything fails, so a redelivered batch finds the state as it was before."""

    def __init__(self, copy: Callable[[S], S] = _shallow) -> None:
        self._values: dict[str, S] = {}
        self._partition: dict[str, int] = {}
        self._staged: dict[str, S | None] = {}  # None: deleted (a tombstone on the changelog)
        self._staged_partition: dict[str, int] = {}
        self._copy = copy

    def get(self, key: str) -> S | None:
        """The key's state for this batch: a value the caller may change, then `set`."""
        staged = self._staged
        if key in staged:
            return staged[key]
        value = self._values.get(key)
        return None if value is None else self._copy(value)

    def peek(self, key: str) -> S | None:
        """The key's state for this batch, read-only (no copy): never change it."""
        if key in self._staged:
            return self._staged[key]
        return self._values.get(key)

    def set(self, key: str, value: S, partition: int | None = None) -> None:
        """Stage a new state for `key` (in `partition`, or the one it is already in)."""
        if partition is not None:
            self._staged_partition[key] = partition
        elif key not in self._partition and key not in self._staged_partition:
            raise KeyError(f"no partition known for new key {key!r}")
        self._staged[key] = value

    def delete(self, key: str) -> None:
        """Stage the removal of `key`: it leaves memory, and its changelog gets a tombstone."""
        if key not in self._partition and key not in self._staged_partition:
            raise KeyError(f"no partition known for key {key!r}")
        self._staged[key] = None

    def partition_of(self, key: str) -> int:
        partition = self._staged_partition.get(key)
        return self._partition[key] if partition is None else partition

    def items(self) -> Iterator[tuple[str, S]]:
        """The committed states, read-only: a step or timer that changes one `get`s it."""
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
        return gone

    def _merge(self) -> None:
        """The staged changes become the committed state."""
        for key, value in self._staged.items():
            if value is None:
                self._values.pop(key, None)
                self._partition.pop(key, None)
                continue
            self._values[key] = value
            partition = self._staged_partition.get(key)
            if partition is not None:
                self._partition[key] = partition
        self._discard()

    def _discard(self) -> None:
        if self._staged:
            self._staged = {}
        if self._staged_partition:
            self._staged_partition = {}


Step = Callable[[Record, KeyedState[S], datetime], list[Output]]
Timer = Callable[[KeyedState[S], datetime], list[Output]]


class StatefulShell(Generic[S]):
    """The Kafka side of a stateful processor: changelog, readiness, fencing, commit, timers,
    dead letters."""

    def __init__(
        self,
        s: Settings,
        *,
        name: str,
        group: str,
        changelog: str,
        state_type: type[S],
        dead_letters: str,
        lag_topic: str,
        metrics_port: int,
        copy: Callable[[S], S] = _shallow,
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
        self.state: KeyedState[S] = KeyedState(copy)
        self.producer = RenewableProducer(s, f"microgrid-{name}-out")
        self.dead_letters = DeadLetters(s, dead_letters, group)
        self.lock = asyncio.Lock()
        self.assigned: set[int] = set()  # partitions given to this member, restored or not
        self.owned: set[int] = set()  # partitions whose state is restored
        self.ready: dict[int, asyncio.Event] = {}
        self.restore_attempt_s = RESTORE_ATTEMPT_S
        self.restore_policy = RESTORE_RETRY
        self._decoder = msgspec.json.Decoder(state_type)
        self._timers: list[tuple[float, Timer[S]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._restoring: dict[int, asyncio.Task[None]] = {}
        self._server: MetricsServer | None = None
        self._not_ready: list[int] = []
        NOT_READY.labels(group).set(0)

    def every(self, interval_s: float, timer: Timer[S]) -> None:
        """Run `timer` every `interval_s` once started; its outputs are committed like a step's."""
        self._timers.append((interval_s, timer))

    async def start(self, *tasks: Awaitable[None]) -> None:
        await self.producer.start()
        self._server = serve_metrics(self.s, self.metrics_port, self.not_ready)
        self._tasks = [
            asyncio.create_task(report_lag(self.s, self.group, self.lag_topic)),
            *(asyncio.create_task(self._run_timer(i, t)) for i, t in self._timers),
            *(asyncio.ensure_future(t) for t in tasks),
        ]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._restoring.values()]:
            task.cancel()
        await self.producer.stop()
        await self.dead_letters.close()
        if self._server is not None:
            await asyncio.to_thread(self._server.close)

    # --- partitions come and go (called by the consumer's rebalance listener) ----------------

    def not_ready(self) -> list[int]:
        """Partitions assigned to this member whose state is not restored yet (callable from
        any thread: the metrics server's)."""
        return self._not_ready

    def _report_readiness(self) -> None:
        self._not_ready = sorted(self.assigned - self.owned)
        NOT_READY.labels(self.group).set(len(self._not_ready))

    def assign(self, partitions: list[int]) -> None:
        """Restore the partitions' state in the background (retried until it succeeds or the
        partitions are revoked); their records wait until it is done."""
        self.assigned.update(partitions)
        self._report_readiness()
        task = asyncio.create_task(self.restore(partitions))
        for p in partitions:
            self._restoring[p] = task
        task.add_done_callback(lambda t: self._restore_done(t, partitions))

    def _restore_done(self, task: asyncio.Task[None], partitions: list[int]) -> None:
        for p in partitions:
            if self._restoring.get(p) is task:
                del self._restoring[p]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: restoring %s failed: %r", self.name, partitions, task.exception())

    async def restore(self, partitions: list[int]) -> None:
        """Read the partitions' state from the changelog, then let their records through. A
        failed read (the broker away, say) is counted and retried with backoff until it
        succeeds; the partitions are not ready (`not_ready`, /readyz) meanwhile."""
        self.assigned.update(partitions)
        self._report_readiness()
        tps = [TopicPartition(self.changelog, p) for p in partitions]

        async def attempt(_left: float) -> RestoredTable | Retry[RestoredTable]:
            try:
                return await asyncio.wait_for(read_table(self.s, tps), self.restore_attempt_s)
            except (KafkaError, OSError, TimeoutError) as exc:
                RESTORE_FAILURES.labels(self.group).inc()
                log.warning(
                    "%s: restoring the state of partitions %s failed, retrying: %r",
                    self.name,
                    partitions,
                    exc,
                )
                return Retry({})

        table, retries = await call_with_retries(attempt, self.restore_policy)
        restored = []
        for i, ((partition, raw_key), rec) in enumerate(table.items()):
            restored.append((raw_key.decode(), self._decoder.decode(rec.value or b""), partition))
            if i % RESTORE_YIELD_EVERY == RESTORE_YIELD_EVERY - 1:
                await asyncio.sleep(0)  # keep heartbeats going through a large restore
        async with self.lock:
            partitions = [p for p in partitions if p in self.assigned]  # not revoked since
            for key, value, partition in restored:
                if partition in self.assigned:
                    self.state._load(key, value, partition)
            self.owned.update(partitions)
            for p in partitions:
                self.ready.setdefault(p, asyncio.Event()).set()
            self._report_readiness()
        log.info(
            "%s restored state of %d keys for partitions %s%s",
            self.name,
            len(table),
            partitions,
            f" after {retries} failed attempts" if retries else "",
        )

    async def forget(self, partitions: list[int]) -> None:
        gone_set = set(partitions)
        cancelled = {self._restoring[p] for p in partitions if p in self._restoring}
        for task in cancelled:
            task.cancel()
        self._restoring = {p: t for p, t in self._restoring.items() if t not in cancelled}
        async with self.lock:  # let the batch in flight finish first
            self.owned.difference_update(partitions)
            self.assigned.difference_update(partitions)
            for p in partitions:
                old, self.ready[p] = self.ready.get(p), asyncio.Event()
                if old is not None:
                    old.set()  # a batch waiting on it looks again, at the new event
            gone = self.state._drop(gone_set)
            self._report_readiness()
        # a cancelled restore may also have covered partitions that stay: restore them anew
        pending = sorted(p for p in self.assigned - self.owned if p not in self._restoring)
        if pending:
            self.assign(pending)
        if self.on_forget is not None:
            self.on_forget(gone)

    # --- records and timers ------------------------------------------------------------------

    async def process(self, records: tuple[Record, ...], step: Step[S]) -> None:
        """Apply `step` to each record and commit; return once everything is acknowledged.
        A record the step refuses (`Unprocessable`) goes to the dead-letter topic. A failure
        raises, nothing of the batch is kept, and FastStream redelivers the batch."""
        await self._wait_ready({rec.partition for rec in records})
        async with self.lock:
            try:
                now = datetime.now(UTC)
                outputs: list[Output] = []
                refused: list[tuple[Record, str]] = []
                for rec in records:
                    if rec.partition not in self.owned:  # revoked while this batch waited
                        RECORDS.labels(self.group, "fenced").inc()
                        continue
                    try:
                        outputs.extend(step(rec, self.state, now))
                    except Unprocessable as exc:
                        refused.append((rec, str(exc) or type(exc).__name__))
                await self._commit(outputs, refused)
            finally:
                self.state._discard()  # what a failed batch staged (a committed one merged)

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
                    await self._commit(timer(self.state, datetime.now(UTC)))
                except KafkaError as exc:
                    log.warning("%s: a timer's outputs could not be sent: %r", self.name, exc)
                except Exception:
                    log.exception(
                        "%s: a timer failed; it runs again in %g s", self.name, interval_s
                    )
                finally:
                    self.state._discard()

    async def _commit(
        self, outputs: list[Output], refused: list[tuple[Record, str]] | None = None
    ) -> None:
        """Send the outputs and dead letters; once all are acknowledged, write the staged
        states to the changelog; once that is acknowledged too, make them the state."""
        changed = self.state._staged
        refused = refused or []
        if not outputs and not changed and not refused:
            return
        producer = self.producer.producer
        assert producer is not None, "start() first"
        try:
            sent = [await producer.send(o.topic, o.value, key=o.key) for o in outputs]
            await self.dead_letters.send(refused)
            await asyncio.gather(*sent)
            logged = [
                await producer.send(
                    self.changelog,
                    None if value is None else msgspec.json.encode(value),
                    key=key.encode(),
                    partition=self.state.partition_of(key),
                )
                for key, value in changed.items()
            ]
            await asyncio.gather(*logged)
        except KafkaError:
            await self.producer.renew_if_broken()
            raise
        self.state._merge()
        if self.on_sent is not None:
            self.on_sent(outputs)
