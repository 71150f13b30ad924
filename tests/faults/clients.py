"""The fault suite's clients: devices sending readings as the README tells a client to (retry
429, 503, timeouts and connection errors with backoff, after `Retry-After`, the same body each
time), an operator sending commands, devices answering them over Kafka, and a browser following
the live stream (resuming with `Last-Event-ID`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import httpx
import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from contracts import Topics
from contracts.control import CommandDispatch, CommandResult
from runtime.kafka import reliable_producer
from runtime.retry import RETRY_STATUSES, Retry, RetryPolicy, call_with_retries
from runtime.settings import Settings

log = logging.getLogger("tests.faults")
T = TypeVar("T")

# Backoff 0.1 s doubling to 2 s (+-20 %), or what Retry-After says; a request is given up after
# two minutes (a scenario's outage is seconds long).
POLICY = RetryPolicy(initial_s=0.1, max_s=2.0, deadline_s=120.0)


class Db:
    """A connection to the platform's PostgreSQL that reconnects after PostgreSQL went away;
    `rows` raises psycopg.OperationalError while it cannot reach it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.Connection | None = None

    def rows(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(self.url, autocommit=True, connect_timeout=3)
            return self.conn.execute(sql, params).fetchall()
        except psycopg.OperationalError:
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = None


def unless_away(check: Callable[[], T]) -> Callable[[], T | None]:
    """`check`, answering None while PostgreSQL cannot be reached (for wait_for)."""

    def guarded() -> T | None:
        try:
            return check()
        except psycopg.OperationalError:
            return None

    return guarded


class Worker:
    """Something running in a thread of its own, on an event loop of its own, until stopped."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self.run())
        except BaseException as exc:  # reported by stop()
            self.error = exc

    async def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 150) -> None:
        self.stopping.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{type(self).__name__} did not stop"
        if self.error is not None:
            raise AssertionError(f"{type(self).__name__} failed: {self.error!r}") from self.error

    async def pause(self, seconds: float) -> None:
        """Sleep, waking early when told to stop."""
        await asyncio.get_running_loop().run_in_executor(None, self.stopping.wait, seconds)


@dataclass
class Batch:
    readings: list[dict[str, Any]]
    tried_at: float  # monotonic time of its first attempt
    accepted_at: float | None = None
    attempts: int = 0


def identity(r: dict[str, Any]) -> tuple[str, datetime]:
    return r["device_id"], datetime.fromisoformat(r["ts"])


class Load(Worker):
    """Readings of `devices` battery devices, `lanes` clients each sending a batch for its
    devices `per_s` times a second. A lane sends its next batch only once the last is answered
    202 (so each device's readings reach the log in the order taken), retrying it as the
    README tells a client to. Temperatures alternate between 65 °C and 40 °C every 15 batches,
    so a rule over 60 °C opens and clears alerts all along."""

    def __init__(
        self, url: str, key: str, site: str, devices: list[str], lanes: int = 6, per_s: float = 10
    ) -> None:
        super().__init__()
        self.url, self.site, self.devices, self.per_s = url, site, devices, per_s
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.lanes = [devices[i::lanes] for i in range(lanes)]
        self.batches: list[Batch] = []
        self.answers: Counter[str] = Counter()  # status codes and transport errors, per attempt
        self.unexpected: list[str] = []  # answers the README does not list for a valid batch

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=len(self.lanes) * 2)
        async with httpx.AsyncClient(timeout=15, limits=limits) as client:
            await asyncio.gather(*(self._lane(client, i) for i in range(len(self.lanes))))

    async def _lane(self, client: httpx.AsyncClient, lane: int) -> None:
        period, due, k = 1 / self.per_s, time.monotonic(), 0
        last = datetime.now(UTC) - timedelta(seconds=1)
        while not self.stopping.is_set():
            ts = max(datetime.now(UTC), last + timedelta(microseconds=1))
            last = ts
            hot = ((k + 4 * lane) // 15) % 2 == 1
            readings = [
                {
                    "device_id": device,
                    "site_id": self.site,
                    "device_type": "battery",
                    "ts": ts.isoformat(),
                    "seq": k,
                    "temperature_c": 65.0 if hot else 40.0,
                }
                for device in self.lanes[lane]
            ]
            batch = Batch(readings, time.monotonic())
            self.batches.append(batch)
            body = msgspec.json.encode({"readings": readings})
            done, _ = await call_with_retries(partial(self._attempt, client, body, batch), POLICY)
            if done:
                batch.accepted_at = time.monotonic()
            k += 1
            due = max(due + period, time.monotonic())  # steady: no burst to catch up
            await asyncio.sleep(due - time.monotonic())

    async def _attempt(
        self, client: httpx.AsyncClient, body: bytes, batch: Batch, _left: float
    ) -> bool | Retry[bool]:
        batch.attempts += 1
        try:
            r = await client.post(self.url, content=body, headers=self.headers)
        except httpx.TransportError as exc:  # timeouts and connection errors
            self.answers[type(exc).__name__] += 1
            return Retry(False)
        self.answers[answer(r)] += 1
        if r.status_code == 202:
            return True
        if r.status_code in RETRY_STATUSES:
            return Retry(False, r.headers.get("retry-after"))
        self.unexpected.append(f"{r.status_code} {r.text[:300]}")
        return Retry(False) if r.status_code >= 500 else False  # never resend a 4xx unchanged

    def readings(self, accepted_only: bool = False) -> list[dict[str, Any]]:
        return [
            r
            for b in list(self.batches)
            if not accepted_only or b.accepted_at is not None
            for r in b.readings
        ]

    def accepted_count(self, since: float = 0.0) -> int:
        return sum(
            len(b.readings)
            for b in list(self.batches)
            if b.accepted_at is not None and b.tried_at >= since
        )

    def first_after(self, moment: float) -> Batch | None:
        return next((b for b in list(self.batches) if b.tried_at >= moment), None)

    @property
    def retries(self) -> int:
        return sum(b.attempts - 1 for b in list(self.batches) if b.attempts)


def answer(r: httpx.Response) -> str:
    """The status, with the problem's `outcome` member ("not stored", "unknown") if any."""
    outcome = ""
    if r.status_code >= 400:
        with contextlib.suppress(ValueError, AttributeError):
            outcome = str(r.json().get("outcome") or "")
    return f"{r.status_code} {outcome}".strip()


class Commands(Worker):
    """An operator sending a command every `every_s` to the load's devices in turn, each with an
    Idempotency-Key and resent with it (after 429/5xx, timeouts, connection errors) until the
    API answers 202."""

    def __init__(self, api: str, token: str, devices: list[str], every_s: float = 0.5) -> None:
        super().__init__()
        self.url = f"{api}/api/v1/control/commands"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.devices, self.every_s = devices, every_s
        self.ids: list[str] = []
        self.sent: list[tuple[float, str]] = []  # (first attempt, monotonic; id) of each accepted
        self.answers: Counter[str] = Counter()
        self.unexpected: list[str] = []

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=15) as client:
            i = 0
            while not self.stopping.is_set():
                device = self.devices[i % len(self.devices)]
                body: dict[str, Any] = {
                    "device_id": device,
                    "command": "charge",
                    "params": {"power_kw": 5},
                    "ttl_s": 10,
                }
                headers = {**self.headers, "Idempotency-Key": uuid.uuid4().hex}
                tried_at = time.monotonic()
                answer, _ = await call_with_retries(
                    partial(self._attempt, client, body, headers), POLICY
                )
                if answer:
                    self.ids.append(answer)
                    self.sent.append((tried_at, answer))
                i += 1
                await self.pause(self.every_s)

    async def _attempt(
        self, client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str], _l: float
    ) -> str | Retry[str]:
        try:
            r = await client.post(self.url, json=body, headers=headers)
        except httpx.TransportError as exc:
            self.answers[type(exc).__name__] += 1
            return Retry("")
        self.answers[str(r.status_code)] += 1
        if r.status_code == 202:
            return str(r.json()["id"])
        if r.status_code in RETRY_STATUSES or r.status_code >= 500:
            if r.status_code not in RETRY_STATUSES:
                self.unexpected.append(f"{r.status_code} {r.text[:300]}")
            return Retry("", r.headers.get("retry-after"))
        self.unexpected.append(f"{r.status_code} {r.text[:300]}")
        return ""


class Responder(Worker):
    """Devices with a Kafka client, as the simulator plays them: each dispatch on
    `control.dispatch` for one of `devices` is answered `succeeded` on `control.results`. A
    consumer group of its own, committing as it goes, so a dispatch read again after a broker
    restart is answered again (a repeated reply changes nothing)."""

    def __init__(self, s: Settings) -> None:
        super().__init__()
        self.s = s
        self.devices: set[str] = set()
        self.answered: Counter[str] = Counter()
        self.ready = threading.Event()

    async def run(self) -> None:
        decode = msgspec.json.Decoder(CommandDispatch).decode
        results = self.s.topic(Topics.CONTROL_RESULTS)
        while not self.stopping.is_set():
            consumer = AIOKafkaConsumer(
                self.s.topic(Topics.CONTROL_DISPATCH),
                **self.s.kafka_client,
                group_id=self.s.group("faults.devices"),
                auto_offset_reset="earliest",
                isolation_level="read_committed",
            )
            producer = reliable_producer(self.s)
            try:
                await consumer.start()
                await producer.start()
                while not self.stopping.is_set():
                    polled = await consumer.getmany(timeout_ms=200)
                    if consumer.assignment():
                        self.ready.set()
                    for records in polled.values():
                        for rec in records:
                            d = decode(rec.value or b"")
                            if d.device_id not in self.devices:
                                continue
                            reply = CommandResult(
                                id=d.id, device_id=d.device_id, status="succeeded"
                            )
                            await producer.send_and_wait(
                                results, msgspec.json.encode(reply), key=d.device_id.encode()
                            )
                            self.answered[d.id] += 1
            except (KafkaError, OSError) as exc:
                log.warning("responder: %r; starting again", exc)
                await self.pause(0.5)
            finally:
                for client in (consumer, producer):
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.stop(), 10)


@dataclass
class LiveEvent:
    id: str
    event: str
    data: Any
    received: float  # monotonic


@dataclass
class LiveClient:
    """Follows `GET /api/v1/stream` as a browser's EventSource does: whenever the stream ends or
    is refused it connects again, after `Retry-After` (at most 1 s here) or 0.2 s, sending the
    last `id:` it read as Last-Event-ID (ids come with events, with the opening position and
    with keep-alive comments)."""

    url: str
    token: str
    params: dict[str, str]
    events: list[LiveEvent] = field(default_factory=list)
    opened_at: str | None = None  # the position of the first connection
    last_id: str | None = None
    connections: int = 0
    refusals: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while self.opened_at is None:
            assert time.monotonic() < deadline, f"the live stream did not open: {self.refusals}"
            time.sleep(0.05)

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = 0.2
            try:
                delay = self._follow()
            except Exception as exc:  # the stream cut off (or closed by `close`)
                if self._stop.is_set():
                    return
                if not isinstance(exc, httpx.HTTPError):
                    raise
                self.refusals[type(exc).__name__] += 1
            self._stop.wait(delay)

    def _follow(self) -> float:
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        with (
            httpx.Client(timeout=httpx.Timeout(5, read=40)) as client,
            client.stream("GET", self.url, params=self.params, headers=headers) as resp,
        ):
            self._socket = resp.extensions["network_stream"].get_extra_info("socket")
            if resp.status_code != 200:
                self.refusals[str(resp.status_code)] += 1
                return min(1.0, float(resp.headers.get("retry-after", "0.2")))
            self.connections += 1
            block: dict[str, str] = {}
            for line in resp.iter_lines():
                if self._stop.is_set():
                    break
                if line:
                    if not line.startswith(":"):
                        name, _, value = line.partition(":")
                        block[name] = value.removeprefix(" ")
                    continue
                if "id" in block:  # an EventSource keeps the id even without an event
                    self.last_id = block["id"]
                    if self.opened_at is None:
                        self.opened_at = block["id"]
                if "event" in block:
                    data = msgspec.json.decode(block.get("data", "null").encode())
                    event = LiveEvent(block.get("id", ""), block["event"], data, time.monotonic())
                    self.events.append(event)
                block = {}
        return 0.2

    def close(self) -> None:
        self._stop.set()
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)  # ends the read it is blocked in
        self._thread.join(10)
        assert not self._thread.is_alive(), "the live client did not stop"
