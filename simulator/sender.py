"""Sending readings to the ingest gateway: one batch request per site, retried while a retry
may succeed (503/429 after `Retry-After`, network errors and 5xx with backoff)."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import httpx
import msgspec

from contracts.readings import (
    Reading,
    ReadingBatch,
)

log = logging.getLogger("microgrid.simulator")

MAX_RETRIES: Final = 5
MAX_RETRY_AFTER_S: Final = 60.0


@dataclass
class SimulationStats:
    attempted: int = 0  # readings put into a request (each counted once, however often resent)
    accepted: int = 0
    failed: int = 0
    retried: int = 0  # requests resent
    skipped: int = 0  # readings not sampled because the site was still sending its last batch


def retry_after_s(value: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return default
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def backoff_s(attempt: int, rng: random.Random) -> float:
    return min(10.0, 0.5 * 2.0**attempt) * rng.uniform(0.8, 1.2)


def _chunks(items: list[Reading], size: int) -> Iterator[list[Reading]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Sender:
    """Posts batches for every site over one client, retrying what may succeed later."""

    def __init__(
        self, client: httpx.AsyncClient, url: str, stats: SimulationStats, max_batch: int
    ) -> None:
        self.client = client
        self.url = url
        self.stats = stats
        self.max_batch = max_batch
        self.rng = random.Random()
        self._logged: set[str] = set()

    async def send(self, key: str, readings: list[Reading]) -> None:
        for chunk in _chunks(readings, self.max_batch):
            await self._send_batch(key, chunk)

    async def _send_batch(self, key: str, readings: list[Reading]) -> None:
        body = msgspec.json.encode(ReadingBatch(readings=readings))
        n = len(readings)
        self.stats.attempted += n
        for attempt in range(MAX_RETRIES + 1):
            if attempt:
                self.stats.retried += 1
            delay = await self._attempt(key, body, n, attempt)
            if delay is None:
                return
            if attempt < MAX_RETRIES:
                await asyncio.sleep(delay)
        self.stats.failed += n
        log.warning("gave up on a batch of %d readings after %d retries", n, MAX_RETRIES)

    async def _attempt(self, key: str, body: bytes, n: int, attempt: int) -> float | None:
        """One request; None when done (accepted or refused for good), else seconds to wait."""
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        try:
            resp = await self.client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            self._log_once(type(exc).__name__, "cannot reach the gateway at %s: %r", self.url, exc)
            return backoff_s(attempt, self.rng)
        return self._outcome(resp, n, attempt)

    def _outcome(self, resp: httpx.Response, n: int, attempt: int) -> float | None:
        status = resp.status_code
        if resp.is_success:
            self.stats.accepted += _accepted_count(resp, n)
            return None
        if status in (429, 503):
            return retry_after_s(resp.headers.get("retry-after"), backoff_s(attempt, self.rng))
        detail = _problem_detail(resp)
        self._log_once(f"status {status}", "gateway answered %d: %s", status, detail)
        if status >= 500:
            return backoff_s(attempt, self.rng)
        self.stats.failed += n
        return None

    def _log_once(self, what: str, message: str, *args: object) -> None:
        if what not in self._logged:
            self._logged.add(what)
            log.warning(message + " (logged once)", *args)


def _accepted_count(resp: httpx.Response, n: int) -> int:
    try:
        return int(resp.json()["accepted"])
    except (ValueError, KeyError, TypeError):
        return n


def _problem_detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    if not isinstance(body, dict):
        return str(body)[:200]
    return f"{body.get('title', '')}: {body.get('detail', '')}"


def make_client(n_sites: int) -> httpx.AsyncClient:
    # Each site has at most one request in flight.
    limits = httpx.Limits(max_connections=n_sites + 2, max_keepalive_connections=n_sites + 2)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0, connect=5.0))
