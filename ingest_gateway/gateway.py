"""The gateway's core: what an ingest request does once its body is read.

A device key names a site; readings are decoded and checked (types and ranges by msgspec, the
time window and the site here), grouped by device and produced to `telemetry.raw`, and the
request is answered 202 only once the broker acknowledged every record (acks=all, idempotent
producer). Overload, rate limits and broker trouble are problems with status 503 or 429 and
`Retry-After`, whose member `outcome` says what was stored: "not stored" (refused before
production) or "unknown" (the broker failed or timed out during production).
`app.py` (Litestar) and `fastpath.py` (the ingest routes' hot path) only wire it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import msgspec
from aiokafka.errors import KafkaError
from psycopg_pool import AsyncConnectionPool

from contracts import Reading, ReadingBatch, TimeWindow, Topics, check_time_window
from ingest_gateway.keys import Key, KeyStore, KeyStoreUnavailable
from ingest_gateway.rate_limits import RateLimits
from runtime.devices import DeviceOwners, RegistryUnavailable
from runtime.http import postgres_check, problem
from runtime.kafka import KafkaProbe, RenewableProducer
from runtime.settings import Settings

log = logging.getLogger("microgrid.gateway")


_T = TypeVar("_T")


class Accepted(msgspec.Struct):
    accepted: int


class SendWindow:
    """Lets concurrent requests hand their records to the producer together.

    aiokafka lingers per partition batch and sends only the batches whose own linger is over,
    so single readings spread over many partitions went out nearly one produce request each
    (about 800 a second per gateway worker at 100,000 requests/min, each a write on both
    ends). A request instead waits for the window that is open, at most `linger_s`; when it
    closes, every waiting request sends to a producer that does not linger, and the producer
    drains them in one produce request.
    """

    def __init__(self, linger_s: float) -> None:
        self.linger_s = linger_s
        self._open: asyncio.Event | None = None

    async def wait(self) -> None:
        if self.linger_s <= 0:
            return
        window = self._open
        if window is None:
            window = self._open = asyncio.Event()
            asyncio.get_running_loop().call_later(self.linger_s, self._close, window)
        await window.wait()

    def _close(self, window: asyncio.Event) -> None:
        self._open = None
        window.set()


class BodyDeadlines:
    """Bounds the time a request takes to send its body, without a timer per request.

    `asyncio.timeout` schedules and cancels a timer handle per request: 3-25 us here (timeit,
    uvloop, idle to loaded machine), several percent of a single reading's CPU. Instead each
    read registers its deadline in a dict (well under a microsecond), and one task per worker
    looks every `SWEEP_S` and cancels the reads past theirs, which then raise TimeoutError. A
    read is so cut between `timeout_s` and `timeout_s + SWEEP_S` after it began.
    """

    SWEEP_S = 0.25

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._reading: dict[asyncio.Task[object], float] = {}  # task -> deadline
        self._expired: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def bound(self, read: Awaitable[_T]) -> _T:
        task = asyncio.current_task()
        if task is None:  # not in a task: nothing to cancel
            return await read
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self._reading[task] = time.monotonic() + self.timeout_s
        try:
            return await read
        except asyncio.CancelledError:
            # The sweeper cancels only tasks still registered, i.e. still inside `read`, so
            # its cancellation always lands here; any other one goes on.
            if task in self._expired:
                task.uncancel()
                raise TimeoutError from None
            raise
        finally:
            self._reading.pop(task, None)
            self._expired.discard(task)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.SWEEP_S)
            if not self._reading:
                continue
            now = time.monotonic()
            for task, deadline in list(self._reading.items()):
                if deadline <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()


class Gateway:
    """Per-process state: the producer, the key store and the in-flight bound."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.pool = AsyncConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=4,
            open=False,
            check=AsyncConnectionPool.check_connection,  # a connection a restart broke: replaced
        )
        self.keys = KeyStore(self.pool, settings.ingest_key_cache_s)
        self.devices = DeviceOwners(self.pool, settings.database_url, settings.device_registration)
        self.body_deadlines = BodyDeadlines(settings.ingest_body_timeout_s)
        self.producer = RenewableProducer(settings, "microgrid-gateway", linger_ms=0)
        self.window = SendWindow(settings.producer_linger_ms / 1000)
        self.probe = KafkaProbe(settings)  # for /readyz
        self.broker_down: str | None = None  # why the last look at the broker failed
        self._watch: asyncio.Task[None] | None = None
        self.topic = settings.topic(Topics.TELEMETRY_RAW)
        self.ts_window = TimeWindow(
            max_future=timedelta(seconds=settings.max_future_skew_s),
            max_age=timedelta(seconds=settings.max_reading_age_s),
        )
        self.inflight = 0
        self.inflight_bytes = 0
        self.retry_after = "1"
        self.limits = RateLimits(settings)

    async def start(self) -> None:
        await self.pool.open()
        await self.producer.start()
        await self.devices.start()
        self._watch = asyncio.create_task(self._watch_broker())
        log.info("gateway ready, producing to %s", self.topic)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self.body_deadlines.stop()
        await self.devices.stop()
        await self.producer.stop()  # flushes what is buffered
        await self.probe.close()
        await self.pool.close()

    async def _watch_broker(self) -> None:
        """Look at the broker every `BROKER_CHECK_S`: while it cannot be reached, requests
        are refused before production (503, not stored) instead of waiting for an
        acknowledgement that cannot come."""
        while True:
            try:
                reachable = await asyncio.wait_for(
                    self.producer.reachable(), BROKER_CHECK_TIMEOUT_S
                )
                why = None if reachable else "no broker accepts a connection"
            except Exception as exc:
                why = repr(exc)
            if why is not None and self.broker_down is None:
                log.warning("broker unreachable, refusing readings until it answers: %s", why)
            elif why is None and self.broker_down is not None:
                log.info("broker reachable again")
            self.broker_down = why
            await asyncio.sleep(BROKER_CHECK_S)

    def readiness_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The broker and PostgreSQL (device keys) answer, and this worker's producer is alive."""

        async def kafka() -> None:
            if self.producer.broken:
                raise KafkaError("this worker's producer has failed and is not replaced yet")
            await self.probe()

        return {"kafka": kafka, "postgres": postgres_check(self.pool)}

    async def read_body(self, read: Awaitable[bytes | None]) -> bytes | None:
        """The body `read` returns, within `INGEST_BODY_TIMEOUT_S` (408 after). Asked only once
        the key is accepted, so no body is read for an unknown key."""
        try:
            return await self.body_deadlines.bound(read)
        except TimeoutError:
            raise problem(
                408,
                "Request body too slow",
                f"the body did not arrive within {self.s.ingest_body_timeout_s:g} s"
                " (INGEST_BODY_TIMEOUT_S); nothing was stored",
                headers={"Connection": "close"},
                outcome=NOT_STORED,
            ) from None

    async def ingest(self, key: Key, body: bytes, *, batch: bool) -> int:
        """Everything a POST to an ingest route does once its key is accepted (`authenticate`)
        and its body read (`read_body`): the readings, their time window and site, and the
        broker's acknowledgement. Returns how many readings were accepted; raises a problem
        (`runtime.http.problem`) otherwise."""
        if batch:
            readings = decode_body(body, ReadingBatch).readings
            if len(readings) > self.s.ingest_max_batch:
                at_most = self.s.ingest_max_batch
                raise problem(
                    422,
                    "Batch too large",
                    f"{len(readings)} readings; at most {at_most} per request",
                    errors=[{"field": "readings", "message": f"at most {at_most} items"}],
                )
        else:
            readings = [decode_body(body, Reading)]
        self.check(readings, key.site)
        if self.limits.enabled:
            await self.limits.check(key.id, key.site, len(readings))
        by_device: dict[str, list[Reading]] = {}
        for r in readings:
            group = by_device.get(r.device_id)
            if group is None:
                by_device[r.device_id] = [r]
            else:
                group.append(r)
        await self.check_owners(by_device, key)
        await self.publish(by_device, len(readings), len(body))
        return len(readings)

    async def check_owners(self, devices: dict[str, list[Reading]], key: Key) -> None:
        """Every device belongs to the key's site (403 otherwise, nothing stored). With the
        first-reading policy an unregistered device is registered to it here."""
        owners = self.devices.owners
        site = key.site
        unknown = [d for d in devices if owners.get(d) != site]
        if not unknown:  # the usual case: every device cached as this site's
            return
        try:
            found = await self.devices.resolve(unknown, site, f"first reading, key {key.id}")
        except RegistryUnavailable as exc:
            raise problem(
                503,
                "Device registry unavailable",
                "cannot check which site the devices belong to: PostgreSQL is unreachable;"
                " nothing was stored",
                headers={"Retry-After": self.retry_after},
                outcome=NOT_STORED,
            ) from exc
        unregistered = sorted(d for d in unknown if found[d] is None)
        if unregistered:
            raise problem(
                403,
                "Device not registered",
                f"not registered: {_names(unregistered)} (DEVICE_REGISTRATION=admin: an admin"
                " registers devices with `microgrid devices add`); nothing was stored",
            )
        foreign = sorted(d for d in unknown if found[d] != site)
        if foreign:
            raise problem(
                403,
                "Device of another site",
                f"not devices of this key's site ({site!r}): {_names(foreign)}; nothing was stored",
            )

    async def authenticate(self, authorization: str) -> Key:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise problem(
                401,
                "Missing device key",
                "send `Authorization: Bearer <device key>`",
                headers={"WWW-Authenticate": 'Bearer realm="ingest"'},
            )
        try:
            found = await self.keys.lookup(key.strip())
        except KeyStoreUnavailable as exc:
            raise problem(
                503,
                "Key store unavailable",
                "cannot check the key: PostgreSQL is unreachable and this key was not"
                " confirmed within INGEST_KEY_CACHE_S; nothing was stored",
                headers={"Retry-After": self.retry_after},
                outcome=NOT_STORED,
            ) from exc
        if found is None:
            raise problem(
                401,
                "Invalid device key",
                "the key is unknown or revoked",
                headers={"WWW-Authenticate": 'Bearer realm="ingest", error="invalid_token"'},
            )
        return found

    def check(self, readings: list[Reading], site: str) -> None:
        now = datetime.now(UTC)
        errors = []
        for i, r in enumerate(readings):
            reason = check_time_window(r, now, self.ts_window)
            if reason:
                errors.append({"field": f"readings[{i}].ts", "message": reason})
        if errors:
            raise problem(422, "Invalid readings", errors[0]["message"], errors=errors)
        foreign = sorted({r.site_id for r in readings if r.site_id != site})
        if foreign:
            raise problem(
                403,
                "Site not allowed for this key",
                f"this key belongs to site {site!r}; refused readings for {', '.join(foreign)}",
            )

    def refuse_if_full(self, readings: int, size: int) -> None:
        """A 503 when a request this big does not fit in the worker's in-flight bounds. Also
        asked with the announced body size before the body is read (readings=0), so bodies
        are not even buffered past the bounds."""
        s = self.s
        if (
            self.inflight + readings > s.ingest_max_inflight_readings
            or self.inflight_bytes + size > s.ingest_max_inflight_bytes
        ) and self.inflight:  # an idle worker takes any request the size limits let in
            raise problem(
                503,
                "Gateway overloaded",
                "too many readings awaiting broker acknowledgement; nothing of this request "
                "was stored: retry later",
                headers={"Retry-After": self.retry_after},
                outcome=NOT_STORED,
            )

    def admit(self, readings: int, size: int) -> None:
        """Take room for a request in this worker's in-flight bounds, or refuse it (503)."""
        self.refuse_if_full(readings, size)
        self.inflight += readings
        self.inflight_bytes += size

    def release(self, readings: int, size: int) -> None:
        self.inflight -= readings
        self.inflight_bytes -= size

    async def publish(self, by_device: dict[str, list[Reading]], n: int, size: int) -> None:
        """Produce the readings, one record per device, and wait for the broker's
        acknowledgement of every record (202), at most `INGEST_ACK_TIMEOUT_MS` from here.

        Refused before anything is handed to the producer, nothing is stored (503, outcome
        "not stored"). Once records are handed over, only a broker failure or the timeout
        leaves the outcome open (503, outcome "unknown"); a retry is then harmless, since
        the projection stores each reading identity once. The request's room in the
        in-flight bounds is given back when the producer is done with its records, not
        before: those bounds also bound the producer's memory.
        """
        if self.broker_down is not None or self.producer.broken:
            raise problem(
                503,
                "Telemetry log unavailable",
                "the broker cannot be reached; nothing of this request was stored: retry later",
                headers={"Retry-After": self.retry_after},
                outcome=NOT_STORED,
            )
        self.admit(n, size)
        handed: list[asyncio.Future[object]] = []
        try:
            async with asyncio.timeout(self.s.ingest_ack_timeout_ms / 1000):
                await self.window.wait()
                producer = self.producer.producer
                assert producer is not None, "the app's lifespan starts the producer"
                for device_id, group in by_device.items():
                    value = msgspec.json.encode(
                        group[0] if len(group) == 1 else ReadingBatch(readings=group)
                    )
                    handed.append(await producer.send(self.topic, value, key=device_id.encode()))
                settled = asyncio.gather(*handed, return_exceptions=True)
                results = await asyncio.shield(settled)  # on timeout it goes on settling
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
        except (TimeoutError, KafkaError) as exc:
            log.warning("broker did not acknowledge %d readings: %r", n, exc)
            await self.producer.renew_if_broken()
            if not handed:
                raise problem(
                    503,
                    "Telemetry log unavailable",
                    "the broker could not take the readings; nothing of this request was "
                    "stored: retry later",
                    headers={"Retry-After": self.retry_after},
                    outcome=NOT_STORED,
                ) from exc
            raise problem(
                503,
                "Telemetry log unavailable",
                "the broker did not acknowledge every reading in time; some may be stored: "
                "retry the request (readings already stored are not stored twice)",
                headers={"Retry-After": self.retry_after},
                outcome=UNKNOWN,
            ) from exc
        finally:
            if all(f.done() for f in handed):
                self.release(n, size)
            else:
                rest = asyncio.gather(*handed, return_exceptions=True)
                rest.add_done_callback(lambda _: self.release(n, size))


def _names(devices: list[str]) -> str:
    shown = ", ".join(repr(d) for d in devices[:5])
    return shown + (f" and {len(devices) - 5} more" if len(devices) > 5 else "")


NOT_STORED = "not stored"
UNKNOWN = "unknown"
BROKER_CHECK_S = 0.5
BROKER_CHECK_TIMEOUT_S = 3.0


_Body = TypeVar("_Body", Reading, ReadingBatch)


def decode_body(body: bytes, kind: type[_Body]) -> _Body:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = message.rpartition(" - at `$")[2].rstrip("`").lstrip(".") or None
        raise problem(
            422, "Invalid reading", message, errors=[{"field": field, "message": message}]
        ) from exc
    except msgspec.DecodeError as exc:
        raise problem(400, "Malformed JSON", str(exc)) from exc
