"""Resending a request that may succeed later, as the README tells clients to: after a 503 or
429 wait what `Retry-After` says (capped, with a little jitter added so that clients refused
together do not come back together), after a timeout or a connection error back off
exponentially with jitter, until a deadline or a number of resends.

A resend is harmless for readings: a reading's identity is `(device_id, ts)`, so a reading
the log already holds is dropped as a duplicate. One loop serves the simulator's sender and
the benchmark's load generators (neither may import the other).

Hand-written rather than tenacity or stamina: the load generator calls it for every request
it sends, and a request that succeeds at once costs a bare coroutine call here, where either
library costs several times that (see `benchmarks/README.md` for the figures).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Generic, TypeVar

T = TypeVar("T")

# Answers after which the same request may succeed: nothing was stored (429, and 503 refused
# before production), or the outcome is unknown (503 after a broker failure mid-production).
RETRY_STATUSES: Final = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class Retry(Generic[T]):
    """What an attempt returns when the request should be sent again: `value` is the answer
    to give back if no resend follows, `retry_after` the response's `Retry-After`, if any."""

    value: T
    retry_after: str | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to wait between attempts, and when to give up.

    Backoff before resend `n` (0-based) is `min(max_s, initial_s * 2**n)`, times a uniform
    factor in `[1 - jitter, 1 + jitter]`. A `Retry-After` replaces it: that many seconds
    (at most `max_retry_after_s`), times a factor in `[1, 1 + jitter]`, never earlier.
    No resend starts past `deadline_s` after the first attempt, nor after `max_retries`."""

    initial_s: float = 0.1
    max_s: float = 5.0
    jitter: float = 0.2
    max_retry_after_s: float = 10.0
    deadline_s: float | None = 30.0
    max_retries: int | None = None

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        base = self.max_s if retry >= 64 else min(self.max_s, self.initial_s * 2.0**retry)
        return base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def wait_s(self, retry: int, retry_after: str | None, rng: random.Random) -> float:
        """Seconds to wait before resend `retry` (0-based)."""
        asked = parse_retry_after(retry_after, self.max_retry_after_s)
        if asked is None:
            return self.backoff_s(retry, rng)
        return asked * rng.uniform(1.0, 1.0 + self.jitter)


def parse_retry_after(value: str | None, cap_s: float) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP date) within `[0, cap_s]`;
    None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if math.isnan(seconds):
        return None
    return min(cap_s, max(0.0, seconds))


_RNG = random.Random()


async def call_with_retries(
    attempt: Callable[[float], Awaitable[T | Retry[T]]],
    policy: RetryPolicy,
    rng: random.Random = _RNG,
    *,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[T, int]:
    """Call `attempt(seconds_left)` until it returns something other than a `Retry`, or the
    policy gives up; returns the last answer and how many resends it took.

    `seconds_left` is the time until the deadline (infinite without one), for the attempt's
    own timeout. A first attempt that succeeds costs one coroutine call and an isinstance."""
    left = math.inf if policy.deadline_s is None else policy.deadline_s
    deadline = clock() + left
    outcome = await attempt(left)
    retries = 0
    while isinstance(outcome, Retry):
        if policy.max_retries is not None and retries >= policy.max_retries:
            return outcome.value, retries
        delay = policy.wait_s(retries, outcome.retry_after, rng)
        if clock() + delay >= deadline:
            return outcome.value, retries
        await sleep(delay)
        retries += 1
        outcome = await attempt(deadline - clock())
    return outcome, retries
