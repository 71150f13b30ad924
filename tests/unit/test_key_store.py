"""The gateway's key cache and body deadline, without a database: a fake pool answers lookups
and counts them, or fails like an unreachable PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from ingest_gateway.gateway import BodyDeadlines
from ingest_gateway.keys import Key, KeyStore, KeyStoreUnavailable
from runtime.keys import hash_key

GOOD = "mgk_" + "g" * 43


class FakePool:
    def __init__(self) -> None:
        self.keys: dict[bytes, tuple[int, str, float | None]] = {hash_key(GOOD): (1, "s1", None)}
        self.down = False
        self.queries = 0

    @asynccontextmanager
    async def connection(self, **_: float) -> Any:
        if self.down:
            raise psycopg.OperationalError("connection refused")
        yield self

    async def execute(self, sql: str, args: tuple[bytes]) -> Any:
        self.queries += 1
        row = self.keys.get(args[0])

        class Cursor:
            async def fetchone(self) -> tuple[int, str, float | None] | None:
                return row

        return Cursor()


def store(pool: FakePool, ttl: float = 30.0, **kw: Any) -> KeyStore:
    return KeyStore(pool, ttl, **kw)  # type: ignore[arg-type]


def test_a_flood_of_bogus_keys_evicts_no_good_key_and_is_remembered_by_hash() -> None:
    async def run() -> None:
        pool = FakePool()
        keys = store(pool, negative_max=1000)
        assert await keys.lookup(GOOD) == Key(1, "s1")
        for i in range(10_000):
            assert await keys.lookup(f"mgk_bogus{i}") is None
        assert pool.queries == 10_001
        assert len(keys._unknown) == 1000  # bounded
        assert all(isinstance(k, bytes) and len(k) == 32 for k in keys._unknown)
        pool.down = True
        assert await keys.lookup(GOOD) == Key(1, "s1")  # still cached, no query
        assert await keys.lookup("mgk_bogus9999") is None  # remembered: no query either
        assert pool.queries == 10_001

    asyncio.run(run())


def test_an_entry_older_than_the_cache_time_is_refused_while_postgres_is_away() -> None:
    async def run() -> None:
        pool = FakePool()
        keys = store(pool, ttl=0.2)
        assert await keys.lookup(GOOD) == Key(1, "s1")
        pool.down = True
        assert await keys.lookup(GOOD) == Key(1, "s1")  # within the cache time
        await asyncio.sleep(0.25)
        with pytest.raises(KeyStoreUnavailable):
            await keys.lookup(GOOD)
        with pytest.raises(KeyStoreUnavailable):
            await keys.lookup("mgk_never_seen_before_xxxxxxxxxxxxxxxxxxxxxxxxxxx")
        pool.down = False
        assert await keys.lookup(GOOD) == Key(1, "s1")

    asyncio.run(run())


def test_a_revocation_takes_effect_within_the_cache_time_or_at_its_time() -> None:
    async def run() -> None:
        pool = FakePool()
        keys = store(pool, ttl=0.2)
        assert await keys.lookup(GOOD) == Key(1, "s1")
        del pool.keys[hash_key(GOOD)]  # revoked
        assert await keys.lookup(GOOD) == Key(1, "s1")  # cached
        await asyncio.sleep(0.25)
        assert await keys.lookup(GOOD) is None
        # revoked in 0.05 s (a grace period ending): cached no longer than that
        other = store(FakePool(), ttl=30.0)
        other.pool.keys[hash_key(GOOD)] = (1, "s1", 0.05)  # type: ignore[attr-defined]
        assert await other.lookup(GOOD) == Key(1, "s1")
        assert other._known[GOOD][0] - time.monotonic() <= 0.05

    asyncio.run(run())


def test_concurrent_lookups_of_one_key_share_one_query() -> None:
    async def run() -> None:
        pool = FakePool()
        keys = store(pool)
        found = await asyncio.gather(*(keys.lookup(GOOD) for _ in range(50)))
        assert set(found) == {Key(1, "s1")} and pool.queries == 1

    asyncio.run(run())


def test_a_body_read_past_its_deadline_raises_timeout_and_others_are_untouched() -> None:
    async def run() -> None:
        deadlines = BodyDeadlines(0.3)
        never = asyncio.get_running_loop().create_future()
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await deadlines.bound(never)
        took = time.monotonic() - began
        assert 0.3 <= took < 0.3 + BodyDeadlines.SWEEP_S + 0.2
        assert await deadlines.bound(asyncio.sleep(0.01, result=b"body")) == b"body"
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        deadlines.stop()

    asyncio.run(run())
