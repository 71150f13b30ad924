"""Optional readings-per-second limits per device key and per site, shared by every gateway
worker and instance through Redis (`limits`, sliding window counter: two counters per limit,
one round trip per check).

A request of n readings costs n. Over a limit it is answered 429 with `Retry-After` and a
problem naming the limit and its value, before anything is produced: nothing of it is
stored. When Redis cannot be reached the limits are not enforced (logged, and counted in
`microgrid_rate_limit_unavailable_total`): they protect capacity, they do not decide what
is stored.
"""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from prometheus_client import Counter

from runtime.http import problem
from runtime.settings import Settings

log = logging.getLogger("microgrid.gateway")

UNAVAILABLE = Counter(
    "microgrid_rate_limit_unavailable_total",
    "Ingest requests let through unchecked because Redis could not be reached",
)


class RateLimits:
    def __init__(self, s: Settings) -> None:
        self.limits: list[tuple[str, str, RateLimitItem, int]] = []  # scope, name, item, value
        if s.ingest_key_readings_per_s:
            value = s.ingest_key_readings_per_s
            item = RateLimitItemPerSecond(value)
            self.limits.append(("key", "INGEST_KEY_READINGS_PER_S", item, value))
        if s.ingest_site_readings_per_s:
            value = s.ingest_site_readings_per_s
            item = RateLimitItemPerSecond(value)
            self.limits.append(("site", "INGEST_SITE_READINGS_PER_S", item, value))
        self.limiter: SlidingWindowCounterRateLimiter | None = None
        if self.limits:
            storage = RedisStorage(
                s.redis_url,
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=f"{s.kafka_namespace}microgrid-ingest-limits",
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
            )
            self.limiter = SlidingWindowCounterRateLimiter(storage)

    @property
    def enabled(self) -> bool:
        return self.limiter is not None

    async def check(self, key_id: int, site: str, readings: int) -> None:
        """Count the readings against each limit; a 429 problem when one is exceeded."""
        assert self.limiter is not None
        for scope, name, item, value in self.limits:
            who = str(key_id) if scope == "key" else site
            try:
                if await self.limiter.hit(item, scope, who, cost=readings):
                    continue
                stats = await self.limiter.get_window_stats(item, scope, who)
            except Exception as exc:  # limits wraps every storage error (wrap_exceptions)
                UNAVAILABLE.inc()
                log.warning("rate limits not checked, Redis unavailable: %r", exc)
                return
            wait = max(1, math.ceil(stats.reset_time - time.time()))
            per = f"this device key ({key_id})" if scope == "key" else f"site {site!r}"
            raise problem(
                429,
                "Rate limit exceeded",
                f"{per} may send at most {value} readings per second ({name}); this request "
                f"of {readings} readings was not stored: retry after {wait} s",
                headers={"Retry-After": str(wait)},
                limit=name,
                limit_value=value,
                outcome="not stored",
            )
