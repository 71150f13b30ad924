"""The Redis streams that feed live clients (SSE) with read-model changes.

Projections and the query API append once their changes are committed. Events go to two
streams, so telemetry volume never pushes an alert out:

- alert.*, notification.* and control.updated go to the events stream (`Streams.EVENTS`),
  trimmed by time: each XADD drops entries older than `EVENT_RETENTION_S` (MINID, approximate,
  so Redis may keep a little more, never less). SSE clients resume it from their
  `Last-Event-ID` (an entry id of this stream);
- device.latest goes to the latest stream (`Streams.LATEST`), capped by count
  (`LATEST_STREAM_MAXLEN`, approximate): lossy by design, never resumed (clients reload latest
  values from the read model).

A Redis outage stays local to the live feed: `append` encodes the events and hands them to a
background publisher; it never waits for Redis and never raises for it, so a projection keeps
writing PostgreSQL while Redis is away. The publisher writes the events in the order they were
appended, each to its stream (one MULTI/EXEC of XADDs to both streams per batch, so a batch
lands whole or not at all) and, while Redis cannot be reached, holds them and retries (backoff
up to 1 s), then publishes the backlog in order: the streams catch up and clients resuming
with `Last-Event-ID` get the events of the outage.

The backlog is bounded: `device.latest` events are coalesced to the newest per device (a
device's latest values supersede the older ones), other events are kept in order; each kind
holds at most `EVENT_BACKLOG_MAX`, the oldest going first. What is dropped is logged and
counted in `microgrid_live_events_dropped_total`; the read models in PostgreSQL hold
everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict, deque
from typing import Any, NamedTuple

import msgspec
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from contracts import Events, Streams
from runtime.settings import Settings

log = logging.getLogger("microgrid.events")

BATCH = 500  # events per MULTI/EXEC
RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0
CLOSE_FLUSH_S = 2.0

BACKLOG = Gauge(
    "microgrid_live_events_backlog",
    "Live events appended but not yet in the Redis stream (held while Redis is away)",
)
DROPPED = Counter(
    "microgrid_live_events_dropped_total",
    "Live events never published to the Redis stream, by reason",
    ["reason"],
)


class _Event(NamedTuple):
    seq: int
    name: str
    data: bytes
    device: str | None  # set for device.latest: coalesced per device


def _device_of(payload: Any) -> str | None:
    device = payload.get("device_id") if isinstance(payload, dict) else None
    if device is None:
        device = getattr(payload, "device_id", None)
    return device if isinstance(device, str) else None


class EventStream:
    def __init__(self, s: Settings) -> None:
        self.redis: Redis = Redis.from_url(s.redis_url, socket_connect_timeout=2, socket_timeout=5)
        self.key = s.topic(Streams.EVENTS)
        self.latest_key = s.topic(Streams.LATEST)
        self.retention_ms = s.event_retention_s * 1000
        self.latest_maxlen = s.latest_stream_maxlen
        self.backlog_max = s.event_backlog_max
        self._seq = itertools.count()
        self._others: deque[_Event] = deque()
        self._latest: OrderedDict[str, _Event] = OrderedDict()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._inflight = 0
        self._down_since: float | None = None  # the first failure of an outage
        self._back_since: float | None = None  # the first success after it
        self._dropping = False

    @property
    def pending(self) -> int:
        """Events appended and not yet published (held, or in flight)."""
        return len(self._others) + len(self._latest) + self._inflight

    async def append(self, events: list[tuple[str, Any]]) -> None:
        """Hand (event name, JSON-able payload) pairs over for publication, in this order;
        returns at once, whether Redis is up or not."""
        if not events:
            return
        for name, payload in events:
            data = msgspec.json.encode(payload)
            device = _device_of(payload) if name == Events.DEVICE_LATEST else None
            event = _Event(next(self._seq), name, data, device)
            if device is None:
                self._others.append(event)
            else:
                self._latest.pop(device, None)  # superseded: the newest goes last
                self._latest[device] = event
        self._drained.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._publish_forever(), name="live-events")
        if self._down_since is None and self._over():
            await self.flush(RETRY_MAX_S)  # Redis up but behind: wait for it, do not drop
        self._trim()

    def _over(self) -> bool:
        return max(len(self._others), len(self._latest)) > self.backlog_max

    async def flush(self, within_s: float) -> bool:
        """Wait until everything appended is in the stream; False if not within `within_s`."""
        try:
            await asyncio.wait_for(self._drained.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Publish what is held (for up to 2 s), then stop; what is left is counted dropped."""
        if self._task is not None:
            if not await self.flush(CLOSE_FLUSH_S):
                left = self.pending
                DROPPED.labels("shutdown").inc(left)
                log.error("%d live events not published: Redis unavailable at shutdown", left)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.redis.aclose()

    def _trim(self) -> None:
        for held, drop in (
            (self._others, self._others.popleft),
            (self._latest, lambda: self._latest.popitem(last=False)),
        ):
            over = len(held) - self.backlog_max
            if over <= 0:
                continue
            for _ in range(over):
                drop()
            DROPPED.labels("backlog full").inc(over)
            if not self._dropping:
                self._dropping = True
                log.error(
                    "live event backlog full (%d per kind, EVENT_BACKLOG_MAX): dropping the"
                    " oldest until Redis returns",
                    self.backlog_max,
                )

    def _take(self, n: int) -> list[_Event]:
        """The oldest `n` held events, in append order, out of the backlog."""
        batch: list[_Event] = []
        others, latest = self._others, self._latest
        while len(batch) < n and (others or latest):
            if latest and (not others or next(iter(latest.values())).seq < others[0].seq):
                batch.append(latest.popitem(last=False)[1])
            else:
                batch.append(others.popleft())
        return batch

    def _restore(self, batch: list[_Event]) -> None:
        """Put an unpublished batch back in front (unless superseded meanwhile)."""
        for event in reversed(batch):
            if event.device is None:
                self._others.appendleft(event)
            elif event.device not in self._latest:
                self._latest[event.device] = event
                self._latest.move_to_end(event.device, last=False)
        self._trim()

    async def _publish(self, batch: list[_Event]) -> None:
        # older than this goes (entry ids are Redis's milliseconds; Redis's clock and this
        # process's are taken to agree within seconds)
        horizon = int(time.time() * 1000) - self.retention_ms
        async with self.redis.pipeline(transaction=True) as pipe:
            for event in batch:
                fields: dict[FieldT, EncodableT] = {"event": event.name, "data": event.data}
                if event.name == Events.DEVICE_LATEST:
                    pipe.xadd(self.latest_key, fields, maxlen=self.latest_maxlen, approximate=True)
                else:
                    pipe.xadd(self.key, fields, minid=horizon, approximate=True)
            await pipe.execute()

    async def _publish_forever(self) -> None:
        delay = RETRY_MIN_S
        caught_up = 0
        while True:
            if not self._others and not self._latest:
                BACKLOG.set(0)
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take(BATCH)
            self._inflight = len(batch)
            try:
                await self._publish(batch)
            except (RedisError, OSError) as exc:
                self._inflight = 0
                self._restore(batch)
                BACKLOG.set(self.pending)
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("Redis unavailable (%r): holding live events until it returns", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            except Exception:  # a bug, not an outage: lose this batch, not the publisher
                self._inflight = 0
                DROPPED.labels("error").inc(len(batch))
                log.exception("%d live events could not be published", len(batch))
                continue
            self._inflight = 0
            delay = RETRY_MIN_S
            if self._down_since is not None:
                now = time.monotonic()
                if self._back_since is None:
                    self._back_since = now
                caught_up += len(batch)
                if not self._others and not self._latest:
                    log.warning(
                        "Redis back: %d held live events published in %.2f s (failing for"
                        " %.1f s before)",
                        caught_up,
                        now - self._back_since,
                        self._back_since - self._down_since,
                    )
                    self._down_since = self._back_since = None
                    self._dropping, caught_up = False, 0
