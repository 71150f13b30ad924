"""Reading timestamps for the load generators: every reading a distinct `ts`.

A reading's identity is `(device_id, ts)`: a second reading of a device with the same `ts`
is dropped as a duplicate, or dead-lettered as a conflicting one. So each reading a load
generator makes gets a microsecond of its own: the first of a request's readings is the
current time, or the microsecond after the last one given out if that is later, and the
others follow it one microsecond apart. Timestamps are thus distinct across all devices of
the process, increase per device, and run ahead of the clock only while more than a million
readings a second are made (the gateway accepts `MAX_FUTURE_SKEW_S`, 300 s, ahead).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

US_PER_S = 1_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)


class Stamps:
    """Hands out consecutive unused microseconds since the epoch, never before the clock."""

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.clock_ns = clock_ns
        self.last_us = 0
        self._second = -1
        self._prefix = ""

    def take(self, n: int) -> int:
        """The first of `n` consecutive microseconds no reading got yet, not before now."""
        now = self.clock_ns() // 1000
        first = now if now > self.last_us else self.last_us + 1
        self.last_us = first + n - 1
        return first

    def ahead_s(self) -> float:
        """How far the last microsecond given out is ahead of the clock (0 when behind)."""
        return max(0, self.last_us - self.clock_ns() // 1000) / US_PER_S

    def iso(self, us: int) -> str:
        """RFC 3339 text of microsecond `us` (UTC)."""
        return self.isos(us, 1)[0]

    def isos(self, first: int, n: int) -> list[str]:
        """RFC 3339 texts (UTC) of `n` consecutive microseconds from `first`.

        The load generator's cost per reading matters (it shares the machine with what it
        measures): the text up to the millisecond is made once per millisecond, and each
        reading's adds one concatenation of a prepared tail, about four times cheaper than
        formatting each in full."""
        out: list[str] = []
        us, end = first, first + n
        while us < end:
            ms, sub = divmod(us, 1000)
            stop = min(end, (ms + 1) * 1000)
            head = self._head(ms)
            out += [head + tail for tail in _TAILS[sub : sub + stop - us]]
            us = stop
        return out

    def _head(self, ms: int) -> str:
        second, milli = divmod(ms, 1000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        return self._prefix + _DIGITS[milli]


_DIGITS = [f"{i:03d}" for i in range(1000)]
_TAILS = [f"{i:03d}+00:00" for i in range(1000)]


def datetime_us(dt: datetime) -> int:
    """Microseconds since the epoch of an aware datetime, exactly (no float rounding)."""
    return (dt - EPOCH) // ONE_US
