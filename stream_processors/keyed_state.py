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
- fencing by Kafka transactions, with a transactional id per input partition
  (`<group>.<partition>`): what a batch does for partition p (its outputs, dead letters,
  changelog records and the group's offsets for p) is one transaction of p's producer. The
  member given p starts that producer before it restores p's state; the broker then aborts
  whatever transaction an earlier holder left open and refuses (ProducerFenced) anything that
  holder tries later, so a member that lost p and does not know it yet (paused past its
  session timeout, say) cannot write after its successor, and the successor restores exactly
  what was committed. A member fenced on p stops working p; if the group still gives it p once
  a session timeout has passed (no successor took it), it starts p's producer anew. Readers of
  the outputs and changelogs read committed records only;
- state after commit: steps and timers work on staged copies (`KeyedState.get` copies,
  `set`/`delete` stage); the staged states become the state in memory once their partition's
  transaction committed. When anything fails (a step raises, a transaction aborts) what is
  staged for the partitions that did not commit is discarded, so the batch FastStream
  redelivers is worked again from the same state and emits the same events;
- per-record rejection: a step raises `Unprocessable` for a record it cannot use; the shell
  sends it unchanged, with the reason, to the stage's dead-letter topic (acknowledged before
  the batch commits), and processing goes on with the next record;
- timers, run under the same lock as the records and committed the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeAlias, TypeVar

import msgspec
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced
from aiokafka.partitioner import murmur2
from aiokafka.producer.transaction_manager import TransactionState
from prometheus_client import Counter, Gauge

from runtime.dlq import DeadLetters
from runtime.kafka import read_table, reliable_producer
from runtime.metrics import RECORDS, MetricsServer, report_lag, serve_metrics
from runtime.retry import Retry, RetryPolicy, call_with_retries
from runtime.settings import Settings

S = TypeVar("S")
Record: TypeAlias = ConsumerRecord[bytes, bytes]

log = logging.getLogger("microgrid.state")

READY_TIMEOUT_S = 30.0  # a batch waiting longer for its state fails and is redelivered
RESTORE_YIELD_EVERY = 10_000  # records restored between two yields to the event loop
RESTORE_ATTEMPT_S = 60.0  # a changelog read taking longer is abandoned and tried again
RESTORE_RETRY = RetryPolicy(initial_s=0.5, max_s=5.0, deadline_s=None)  # until it succeeds
RestoredTable: TypeAlias = dict[tuple[int, bytes], ConsumerRecord[bytes, bytes]]
Opened: TypeAlias = tuple[dict[int, AIOKafkaProducer], RestoredTable]
# a transaction a member leaves open (it died, or is paused) holds back readers of committed
# records on its partitions until its successor fences it, or at most this long
TRANSACTION_TIMEOUT_MS = 15_000
# a member fenced on a partition the group still gives it waits this long (past any session
# timeout, so a member that lost the partition has heard by then) before taking it up again
REFENCE_AFTER_S = 15.0
FENCED = (ProducerFenced, InvalidProducerEpoch)
# aiokafka "aborts" a transaction in ABORTABLE_ERROR locally, without telling the broker (it
# forgot the partitions); such a producer is replaced instead: the new one's InitProducerId
# aborts the transaction on the broker
ABORTABLE = (TransactionState.IN_TRANSACTION,)

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


class NotReady(Exception):
    """A batch holds records of a partition whose state is being restored again: it fails,
    and FastStream redelivers it (never skipped: the group still gives this member the
    partition, so skipping would commit past its records)."""


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

    def _merge(self, partitions: Collection[int] | None = None) -> None:
        """The staged changes (of keys in `partitions`, or all) become the committed state;
        the rest is discarded."""
        for key, value in self._staged.items():
            if partitions is not None:
                partition = self._staged_partition.get(key, self._partition.get(key))
                if partition not in partitions:  # (None: its partition was dropped)
                    continue
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


@dataclass(slots=True)
class _Work:
    """What one input partition's transaction carries."""

    outputs: list[Output]
    refused: list[tuple[Record, str]]
    offsets: dict[TopicPartition, int]  # the group's next offsets, for the batch's records
    changes: dict[str, object]  # staged states by key (None: a tombstone)


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
        self.producers: dict[int, AIOKafkaProducer] = {}  # transactional, per owned partition
        self.dead_letters = DeadLetters(s, dead_letters, group)
        self.lock = asyncio.Lock()
        self.assigned: set[int] = set()  # partitions given to this member, restored or not
        self.owned: set[int] = set()  # partitions whose state is restored
        self.ready: dict[int, asyncio.Event] = {}
        self.restore_attempt_s = RESTORE_ATTEMPT_S
        self.restore_policy = RESTORE_RETRY
        self.refence_after_s = REFENCE_AFTER_S
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
        self._server = serve_metrics(self.s, self.metrics_port, self.not_ready)
        self._tasks = [
            asyncio.create_task(report_lag(self.s, self.group, self.lag_topic)),
            *(asyncio.create_task(self._run_timer(i, t)) for i, t in self._timers),
            *(asyncio.ensure_future(t) for t in tasks),
        ]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._restoring.values()]:
            task.cancel()
        await self._close_producers(list(self.producers))
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

    def transactional_id(self, partition: int) -> str:
        return f"{self.group}.{partition}"

    async def _open_producers(self, partitions: list[int]) -> dict[int, AIOKafkaProducer]:
        """Start the partitions' transactional producers. Once a producer has its id, the
        broker has fenced every earlier holder of the transactional id and aborted what it
        left open, so the changelog read next holds committed state only, and will not
        change behind this member's back."""

        async def open_one(p: int) -> AIOKafkaProducer:
            producer = reliable_producer(
                self.s,
                client_id=f"microgrid-{self.name}-{p}",
                transactional_id=self.transactional_id(p),
                transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            )
            try:
                await producer.start()
                await producer.begin_transaction()  # waits for the producer id: the fence
                await producer.commit_transaction()  # empty: nothing is sent
            except BaseException:
                await _stop_quietly(producer)
                raise
            return producer

        tasks = [asyncio.create_task(open_one(p)) for p in partitions]
        try:
            await asyncio.gather(*tasks)
        except BaseException:  # a failure, a timeout or a cancellation: none is kept
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks)
            opened = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
            await asyncio.gather(*(_stop_quietly(o) for o in opened))
            raise
        return {p: t.result() for p, t in zip(partitions, tasks, strict=True)}

    async def _close_producers(self, partitions: list[int]) -> None:
        closing = [self.producers.pop(p) for p in partitions if p in self.producers]
        await asyncio.gather(*(_stop_quietly(p) for p in closing))

    async def restore(self, partitions: list[int]) -> None:
        """Fence earlier holders of the partitions (their transactional producers), read the
        partitions' state from the changelog, then let their records through. A failed attempt
        (the broker away, say) is counted and retried with backoff until it succeeds; the
        partitions are not ready (`not_ready`, /readyz) meanwhile."""
        self.assigned.update(partitions)
        self._report_readiness()
        tps = [TopicPartition(self.changelog, p) for p in partitions]

        async def attempt(_left: float) -> Opened | Retry[Opened]:
            try:
                producers = await asyncio.wait_for(
                    self._open_producers(partitions), self.restore_attempt_s
                )
            except (KafkaError, OSError, TimeoutError) as exc:
                return self._restore_failed(partitions, exc)
            try:
                table = await asyncio.wait_for(read_table(self.s, tps), self.restore_attempt_s)
            except (KafkaError, OSError, TimeoutError) as exc:
                await asyncio.gather(*(_stop_quietly(p) for p in producers.values()))
                return self._restore_failed(partitions, exc)
            except BaseException:
                await asyncio.gather(*(_stop_quietly(p) for p in producers.values()))
                raise
            return producers, table

        (producers, table), retries = await call_with_retries(attempt, self.restore_policy)
        restored = []
        try:
            for i, ((partition, raw_key), rec) in enumerate(table.items()):
                restored.append(
                    (raw_key.decode(), self._decoder.decode(rec.value or b""), partition)
                )
                if i % RESTORE_YIELD_EVERY == RESTORE_YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # keep heartbeats going through a large restore
        except BaseException:
            await asyncio.gather(*(_stop_quietly(p) for p in producers.values()))
            raise
        try:
            await self.lock.acquire()
        except BaseException:  # revoked meanwhile (forget cancels a restore): none is used
            await asyncio.gather(*(_stop_quietly(p) for p in producers.values()))
            raise
        try:  # nothing awaited in here: a cancellation cannot leave a producer unowned
            kept = [p for p in partitions if p in self.assigned]  # not revoked since
            old = [self.producers.pop(p) for p in kept if p in self.producers]  # fenced ones
            unused = [prod for p, prod in producers.items() if p not in self.assigned]
            self.producers.update((p, prod) for p, prod in producers.items() if p in self.assigned)
            for key, value, partition in restored:
                if partition in self.assigned:
                    self.state._load(key, value, partition)
            self.owned.update(kept)
            for p in kept:
                self.ready.setdefault(p, asyncio.Event()).set()
            self._report_readiness()
        finally:
            self.lock.release()
        await asyncio.gather(*(_stop_quietly(p) for p in [*old, *unused]))
        log.info(
            "%s restored state of %d keys for partitions %s%s",
            self.name,
            len(table),
            kept,
            f" after {retries} failed attempts" if retries else "",
        )

    def _restore_failed(self, partitions: list[int], exc: BaseException) -> Retry[Opened]:
        RESTORE_FAILURES.labels(self.group).inc()
        log.warning(
            "%s: restoring the state of partitions %s failed, retrying: %r",
            self.name,
            partitions,
            exc,
        )
        return Retry(({}, {}))

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
            await self._close_producers(partitions)
            self._report_readiness()
        # a cancelled restore may also have covered partitions that stay: restore them anew
        pending = sorted(p for p in self.assigned - self.owned if p not in self._restoring)
        if pending:
            self.assign(pending)
        if self.on_forget is not None:
            self.on_forget(gone)

    def _fenced(self, partition: int) -> None:
        """Another member holds the partition's transactional id: stop working the partition.
        Called under the lock."""
        log.warning(
            "%s: fenced on partition %d (another member has it now); its records wait",
            self.name,
            partition,
        )
        RECORDS.labels(self.group, "fenced").inc()
        self._let_go(partition)
        self._tasks.append(asyncio.create_task(self._take_up_again(partition)))

    def _let_go(self, partition: int) -> None:
        """Stop working a partition the group still gives this member (its records wait)."""
        self.owned.discard(partition)
        self.ready[partition] = asyncio.Event()
        gone = self.state._drop({partition})
        self._report_readiness()
        if self.on_forget is not None:
            self.on_forget(gone)

    async def _take_up_again(self, partition: int) -> None:
        """If the group still gives this member the partition once any member that lost it
        must have heard (a session timeout), no successor took it: fence anew and restore."""
        await asyncio.sleep(self.refence_after_s)
        p = partition
        if p in self.assigned and p not in self.owned and p not in self._restoring:
            self.assign([p])

    # --- records and timers ------------------------------------------------------------------

    async def process(self, records: tuple[Record, ...], step: Step[S]) -> None:
        """Apply `step` to each record and commit; return once everything is committed.
        A record the step refuses (`Unprocessable`) goes to the dead-letter topic. A failure
        raises, nothing of the partitions that did not commit is kept, and FastStream
        redelivers the batch."""
        await self._wait_ready({rec.partition for rec in records})
        async with self.lock:
            try:
                now = datetime.now(UTC)
                work: dict[int, _Work] = {}
                for rec in records:
                    p = rec.partition
                    if p not in self.owned:
                        if p in self.assigned:  # fenced or being replaced: not yet, not skipped
                            raise NotReady(f"{self.name}: partition {p} is being taken up again")
                        RECORDS.labels(self.group, "fenced").inc()  # revoked while it waited
                        continue
                    w = work.get(p)
                    if w is None:
                        w = work[p] = _Work([], [], {}, {})
                    w.offsets[TopicPartition(rec.topic, p)] = rec.offset + 1
                    try:
                        w.outputs.extend(step(rec, self.state, now))
                    except Unprocessable as exc:
                        w.refused.append((rec, str(exc) or type(exc).__name__))
                await self._commit(work)
            finally:
                self.state._discard()  # what did not commit

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
                    work: dict[int, _Work] = {}
                    for out in timer(self.state, datetime.now(UTC)):
                        p = self._partition_of_output(out)
                        work.setdefault(p, _Work([], [], {}, {})).outputs.append(out)
                    await self._commit(work)
                except KafkaError as exc:
                    log.warning("%s: a timer's outputs could not be sent: %r", self.name, exc)
                except Exception:
                    log.exception(
                        "%s: a timer failed; it runs again in %g s", self.name, interval_s
                    )
                finally:
                    self.state._discard()

    def _partition_of_output(self, out: Output) -> int:
        """The input partition a timer's output belongs to: its key's, as the producers of the
        inputs place keys (murmur2, like Kafka's default partitioner)."""
        return (murmur2(out.key) & 0x7FFFFFFF) % self.s.device_topic_partitions

    async def _commit(self, work: dict[int, _Work]) -> None:
        """One transaction per partition: its outputs, dead letters, changelog records and the
        group's offsets. The partitions' staged states become the state once their own
        transaction committed; the first failure is raised once all have ended."""
        for key, value in self.state._staged.items():
            p = self.state.partition_of(key)
            if p not in work:
                work[p] = _Work([], [], {}, {})
            work[p].changes[key] = value
        work = {p: w for p, w in work.items() if w.outputs or w.refused or w.changes or w.offsets}
        if not work:
            return
        ended = await asyncio.gather(
            *(self._transact(p, w) for p, w in work.items()), return_exceptions=True
        )
        committed = [p for p, e in zip(work, ended, strict=True) if e is None]
        self.state._merge(set(committed))
        for p in committed:
            self.dead_letters.sent(len(work[p].refused))
        if self.on_sent is not None:
            self.on_sent([o for p in committed for o in work[p].outputs])
        failure = next((e for e in ended if isinstance(e, BaseException)), None)
        if failure is not None:
            raise failure

    async def _transact(self, partition: int, w: _Work) -> None:
        producer = self.producers.get(partition)
        if producer is None:  # a timer's output for a partition no longer held
            raise KafkaError(f"{self.name}: no producer for partition {partition}")
        try:
            await producer.begin_transaction()
            sent = [await producer.send(o.topic, o.value, key=o.key) for o in w.outputs]
            sent += await self.dead_letters.send_with(
                producer, self.dead_letters.letters(w.refused)
            )
            for key, value in w.changes.items():
                sent.append(
                    await producer.send(
                        self.changelog,
                        None if value is None else msgspec.json.encode(value),
                        key=key.encode(),
                        partition=partition,
                    )
                )
            acked = await asyncio.gather(*sent, return_exceptions=True)
            failed = next((a for a in acked if isinstance(a, BaseException)), None)
            if failed is not None:
                raise failed
            if w.offsets:
                await producer.send_offsets_to_transaction(w.offsets, self.group)
            await producer.commit_transaction()
        except FENCED:
            self._fenced(partition)
            await self._close_producers([partition])
            raise
        except Exception as exc:  # not on cancellation: the next holder aborts what is open
            await self._abort(partition, producer, exc)
            raise

    async def _abort(self, partition: int, producer: AIOKafkaProducer, exc: BaseException) -> None:
        """End a failed transaction; a producer that cannot go on (a fatal error) is replaced
        by a new one with the same transactional id."""
        txn = producer._txn_manager  # aiokafka says nothing public of a transaction's state
        try:
            if txn is not None and txn.state in ABORTABLE:
                await asyncio.wait_for(producer.abort_transaction(), TRANSACTION_TIMEOUT_MS / 1000)
                return
        except FENCED:
            self._fenced(partition)
            await self._close_producers([partition])
            return
        except Exception as again:
            log.warning(
                "%s: aborting partition %d's transaction failed: %r", self.name, partition, again
            )
        if partition in self.owned:
            log.warning("%s: replacing partition %d's producer after %r", self.name, partition, exc)
            await self._close_producers([partition])
            self._let_go(partition)
            if partition not in self._restoring:
                self.assign([partition])


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.stop(), timeout=10)
