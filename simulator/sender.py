"""Sending readings to the ingest gateway: one batch request per site, retried while a retry
may succeed (503/429 after `Retry-After`, network errors and 5xx with backoff), with the
retry loop of `runtime.retry` that the benchmark's load generators use too."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Final

import httpx
import msgspec

from contracts.readings import (
    Reading,
    ReadingBatch,
)
from runtime.retry import RETRY_STATUSES, Retry, RetryPolicy, call_with_retries

log = logging.getLogger("microgrid.simulator")

MAX_RETRIES: Final = 5
MAX_RETRY_AFTER_S: Final = 60.0
# 0.5 s doubling up to 10 s (+-20 %), or what `Retry-After` says (at most 60 s), 5 resends
RETRY_POLICY: Final = RetryPolicy(
    initial_s=0.5,
    max_s=10.0,
    max_retry_after_s=MAX_RETRY_AFTER_S,
    deadline_s=None,
    max_retries=MAX_RETRIES,
)


@dataclass
class SimulationStats:
    attempted: int = 0  # readings put into a request (each counted once, however often resent)
    accepted: int = 0
    failed: int = 0
    retried: int = 0  # requests resent
    skipped: int = 0  # readings not sampled because the site was still sending its last batch


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
        done, retries = await call_with_retries(
            partial(self._attempt, key, body, n), RETRY_POLICY, self.rng
        )
        self.stats.retried += retries
        if not done:
            self.stats.failed += n
            log.warning("gave up on a batch of %d readings after %d retries", n, retries)

    async def _attempt(self, key: str, body: bytes, n: int, _left_s: float) -> bool | Retry[bool]:
        """One request; True when done (accepted or refused for good), else a `Retry`."""
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        try:
            resp = await self.client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            self._log_once(type(exc).__name__, "cannot reach the gateway at %s: %r", self.url, exc)
            return Retry(False)
        return self._outcome(resp, n)

    def _outcome(self, resp: httpx.Response, n: int) -> bool | Retry[bool]:
        status = resp.status_code
        if resp.is_success:
            self.stats.accepted += _accepted_count(resp, n)
            return True
        if status in RETRY_STATUSES:
            return Retry(False, resp.headers.get("retry-after"))
        detail = _problem_detail(resp)
        self._log_once(f"status {status}", "gateway answered %d: %s", status, detail)
        if status >= 500:
            return Retry(False)
        self.stats.failed += n
        return True

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
