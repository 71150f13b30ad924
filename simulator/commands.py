"""Executing control commands as devices with a Kafka client do: dispatches from
`control.dispatch`, replies on `control.results`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, TypeVar

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaConnectionError, KafkaError

from contracts.control import CommandDispatch, CommandResult
from contracts.topics import Groups, Topics
from runtime.kafka import reliable_producer
from runtime.settings import Settings
from simulator.fleet import Site

log = logging.getLogger("microgrid.simulator")

COMMAND_DELAY_S: Final = (0.1, 0.8)  # from receipt to execution and reply
SEEN_COMMANDS: Final = 10_000  # command ids remembered, so that a redelivery is not re-executed
_dispatch_decoder = msgspec.json.Decoder(CommandDispatch)


KafkaClient = TypeVar("KafkaClient", AIOKafkaConsumer, AIOKafkaProducer)


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


class CommandServer:
    """Executes the dispatched commands of the devices it owns, one task per command."""

    def __init__(self, sites: list[Site], producer: AIOKafkaProducer, results_topic: str) -> None:
        self.devices = {d.device_id: d for site in sites for d in site.devices}
        self.producer = producer
        self.results_topic = results_topic
        self.rng = random.Random()  # delays only; outcomes come from the devices' rngs
        self.tasks: set[asyncio.Task[None]] = set()
        self._seen: set[str] = set()
        self._seen_order: deque[str] = deque()

    def accept(self, record: ConsumerRecord[bytes, bytes]) -> CommandDispatch | None:
        """The dispatch in `record`, if it is new, for one of our devices and not yet overdue."""
        if record.value is None:
            return None
        try:
            dispatch = _dispatch_decoder.decode(record.value)
        except msgspec.DecodeError as exc:
            log.warning(
                "undecodable dispatch at %s/%d@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            return None
        if dispatch.device_id not in self.devices or dispatch.id in self._seen:
            return None
        if _aware(dispatch.deadline) <= datetime.now(UTC):
            log.info("ignored command %s for %s: deadline passed", dispatch.id, dispatch.device_id)
            return None
        self._seen.add(dispatch.id)
        self._seen_order.append(dispatch.id)
        if len(self._seen_order) > SEEN_COMMANDS:
            self._seen.discard(self._seen_order.popleft())
        return dispatch

    def submit(self, dispatch: CommandDispatch) -> None:
        task = asyncio.create_task(self.run(dispatch, self.rng.uniform(*COMMAND_DELAY_S)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, dispatch: CommandDispatch, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        now = datetime.now(UTC)
        if _aware(dispatch.deadline) <= now:
            log.info("ignored command %s for %s: deadline passed", dispatch.id, dispatch.device_id)
            return
        device = self.devices[dispatch.device_id]
        reason = device.execute(dispatch.command, dispatch.params, device.rng, now=now)
        result = CommandResult(
            id=dispatch.id,
            device_id=dispatch.device_id,
            status="succeeded" if reason is None else "failed",
            reason=reason or "",
        )
        log.info(
            "executed %s %s on %s: %s%s",
            dispatch.command,
            dispatch.params,
            dispatch.device_id,
            result.status,
            f" ({reason})" if reason else "",
            extra={"command_id": dispatch.id},
        )
        try:
            await self.producer.send_and_wait(
                self.results_topic,
                msgspec.json.encode(result),
                key=dispatch.device_id.encode(),
            )
        except KafkaError as exc:  # the platform times the command out
            log.warning("could not send the result of command %s: %r", dispatch.id, exc)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _start_when_reachable(
    make: Callable[[], KafkaClient], stop: asyncio.Event
) -> KafkaClient | None:
    """A started client from `make`, retrying while the broker is unreachable; None if `stop`
    is set first."""
    for attempt in itertools.count():
        client = make()
        try:
            await client.start()
            return client
        except KafkaConnectionError as exc:
            with contextlib.suppress(Exception):
                await client.stop()
            if attempt == 0:
                log.warning("cannot reach Kafka for control commands, retrying: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=min(30.0, 2.0 * 2**attempt))
        if stop.is_set():
            return None
    raise AssertionError("unreachable")


async def _resolve_positions(consumer: AIOKafkaConsumer) -> bool:
    """Once partitions are assigned, fix their positions (so that "latest" means now)."""
    assignment = consumer.assignment()
    for tp in assignment:
        await consumer.position(tp)
    return bool(assignment)


async def serve_commands(
    s: Settings,
    sites: list[Site],
    stop: asyncio.Event | None = None,
    *,
    ready: asyncio.Event | None = None,
) -> None:
    """Execute the commands dispatched to the devices of `sites` until `stop` is set (or the task
    is cancelled), as devices with a Kafka client do: each after a short delay, each reported on
    `control.results` keyed by device id. Dispatches to other devices, or past their deadline,
    are ignored. A new consumer group starts at the log's end, so old commands are not executed.
    `ready` is set once the consumer has partitions and their positions."""
    stop = stop or asyncio.Event()
    # a group of its own: each simulator sees every dispatch and keeps those for its fleet
    group = f"{s.group(Groups.SIMULATOR)}.{uuid.uuid4().hex[:8]}"

    def make_consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            s.topic(Topics.CONTROL_DISPATCH),
            **s.kafka_client,
            group_id=group,
            client_id="microgrid-simulator",
            auto_offset_reset="latest",
            enable_auto_commit=True,
            isolation_level="read_committed",  # the controller writes in transactions
            metadata_max_age_ms=30_000,  # soon notice a dispatch topic created after the start
        )

    producer = await _start_when_reachable(
        lambda: reliable_producer(s, client_id="microgrid-simulator-results"), stop
    )
    if producer is None:
        return
    server = CommandServer(sites, producer, s.topic(Topics.CONTROL_RESULTS))
    consumer: AIOKafkaConsumer | None = None
    try:
        consumer = await _start_when_reachable(make_consumer, stop)
        if consumer is None:
            return
        log.info(
            "executing control commands for %d devices from %s",
            len(server.devices),
            s.topic(Topics.CONTROL_DISPATCH),
        )
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    dispatch = server.accept(record)
                    if dispatch is not None:
                        server.submit(dispatch)
            if ready is not None and not ready.is_set() and await _resolve_positions(consumer):
                ready.set()
    finally:
        await server.close()
        for client in (consumer, producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
