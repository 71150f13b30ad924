"""The capped Redis stream that feeds live clients (SSE) with read-model changes.

Projections and the query API append; each SSE client reads from it at its own pace and resumes
from its `Last-Event-ID` (a stream entry id) as long as the entry is still in the stream.
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from contracts import Streams
from runtime.settings import Settings


class EventStream:
    def __init__(self, s: Settings) -> None:
        self.redis: Redis = Redis.from_url(s.redis_url)
        self.key = s.topic(Streams.EVENTS)
        self.maxlen = s.event_stream_maxlen

    async def append(self, events: list[tuple[str, Any]]) -> None:
        """Append (event name, JSON-able payload) pairs; the stream keeps about `maxlen`."""
        if not events:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, payload in events:
                pipe.xadd(
                    self.key,
                    {"event": name, "data": msgspec.json.encode(payload)},
                    maxlen=self.maxlen,
                    approximate=True,
                )
            await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()
