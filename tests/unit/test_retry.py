"""The retry loop the simulator and the benchmark's load generators share (`runtime.retry`)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest

from runtime.retry import Retry, RetryPolicy, call_with_retries, parse_retry_after

T = TypeVar("T")


def test_retry_after_parsing() -> None:
    assert parse_retry_after("2", 60.0) == 2.0
    assert parse_retry_after("0.5", 60.0) == 0.5
    assert parse_retry_after(None, 60.0) is None
    assert parse_retry_after("", 60.0) is None
    assert parse_retry_after("soon", 60.0) is None
    assert parse_retry_after("nan", 60.0) is None
    assert parse_retry_after("-3", 60.0) == 0.0
    assert parse_retry_after("100000", 60.0) == 60.0
    later = (datetime.now(UTC) + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    seconds = parse_retry_after(later, 60.0)
    assert seconds is not None and 25.0 <= seconds <= 31.0
    earlier = (datetime.now(UTC) - timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(earlier, 60.0) == 0.0


def test_backoff_doubles_up_to_its_cap_with_bounded_jitter() -> None:
    policy = RetryPolicy(initial_s=0.5, max_s=10.0, jitter=0.2)
    rng = random.Random(1)
    for retry, base in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (500, 10.0)]:
        waits = [policy.wait_s(retry, None, rng) for _ in range(200)]
        assert all(0.8 * base <= w <= 1.2 * base for w in waits)
        assert max(waits) - min(waits) > 0.2 * base  # jittered, not constant


def test_retry_after_is_honoured_never_earlier_capped_and_jittered_upwards() -> None:
    policy = RetryPolicy(jitter=0.2, max_retry_after_s=10.0)
    rng = random.Random(2)
    waits = [policy.wait_s(0, "3", rng) for _ in range(200)]
    assert all(3.0 <= w <= 3.6 for w in waits)
    assert max(waits) > min(waits)
    assert all(10.0 <= policy.wait_s(7, "600", rng) <= 12.0 for _ in range(50))
    assert policy.wait_s(3, "0", rng) == 0.0
    # an unreadable Retry-After falls back to the backoff
    assert 0.08 <= policy.wait_s(0, "later", rng) <= 0.12


class FakeTime:
    """A clock that moves only when the loop sleeps (or an attempt takes time)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


Attempt = Callable[[float], Awaitable[T | Retry[T]]]


def scripted(
    answers: list[T | Retry[T]], t: FakeTime, cost_s: float = 0.0
) -> tuple[Attempt[T], list[float]]:
    """An attempt answering `answers` in turn (the last one again and again); the time left
    it was given, per call."""
    calls: list[float] = []

    async def attempt(left_s: float) -> T | Retry[T]:
        calls.append(left_s)
        t.now += cost_s
        return answers[min(len(calls), len(answers)) - 1]

    return attempt, calls


async def test_a_first_answer_that_needs_no_retry_is_returned_at_once() -> None:
    t = FakeTime()
    attempt, calls = scripted(["ok"], t)
    got = await call_with_retries(attempt, RetryPolicy(), sleep=t.sleep, clock=t.clock)
    assert got == ("ok", 0)
    assert calls == [30.0] and t.slept == []


async def test_retries_until_an_answer_that_needs_none() -> None:
    t = FakeTime()
    attempt, calls = scripted([Retry("5xx", "1"), Retry("network"), "ok"], t)
    policy = RetryPolicy(initial_s=0.1, jitter=0.0, deadline_s=30.0)
    got = await call_with_retries(attempt, policy, sleep=t.sleep, clock=t.clock)
    assert got == ("ok", 2)
    # 1 s as Retry-After said (jitter 0), then the second backoff step
    assert t.slept == [1.0, 0.2]
    assert calls == [30.0, 29.0, pytest.approx(28.8)]


async def test_gives_up_at_the_deadline_with_the_last_answer() -> None:
    t = FakeTime()
    refused: list[str | Retry[str]] = [Retry("5xx", "4")]
    attempt, calls = scripted(refused, t, cost_s=1.0)
    policy = RetryPolicy(jitter=0.0, deadline_s=12.0)
    value, retries = await call_with_retries(attempt, policy, sleep=t.sleep, clock=t.clock)
    # attempts at 0, 5 s and 10 s (each 1 s, then 4 s of Retry-After): a fourth would start at 15
    assert (value, retries) == ("5xx", 2)
    assert len(calls) == 3
    assert t.now - 100.0 <= 12.0


async def test_gives_up_after_max_retries_without_a_deadline() -> None:
    t = FakeTime()
    refused: list[bool | Retry[bool]] = [Retry(False, "0")]
    attempt, calls = scripted(refused, t)
    policy = RetryPolicy(deadline_s=None, max_retries=5)
    value, retries = await call_with_retries(attempt, policy, sleep=t.sleep, clock=t.clock)
    assert (value, retries) == (False, 5)
    assert len(calls) == 6
    assert calls[0] == float("inf")


async def test_real_sleep_with_zero_retry_after() -> None:
    answers: list[str | Retry[str]] = [Retry("5xx", "0"), "ok"]

    async def attempt(left_s: float) -> str | Retry[str]:
        return answers.pop(0)

    assert await call_with_retries(attempt, RetryPolicy()) == ("ok", 1)
