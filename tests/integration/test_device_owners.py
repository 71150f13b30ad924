"""The owner cache of the gateway and the validator against a real PostgreSQL: unknown devices
asked about together go to PostgreSQL in one query and are registered by their first reading;
a move made anywhere drops the cached owner as it commits; the admin policy registers nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import psycopg
from psycopg_pool import AsyncConnectionPool

from runtime.devices import DeviceOwners, Policy, move_device
from runtime.settings import Settings


def devices(n: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"owned-{run}-{i}" for i in range(n)]


async def owners_for(stack: Settings, policy: Policy) -> tuple[AsyncConnectionPool, DeviceOwners]:
    pool = AsyncConnectionPool(stack.database_url, min_size=1, max_size=2, open=False)
    await pool.open()
    owners = DeviceOwners(pool, stack.database_url, policy)
    await owners.start()
    return pool, owners


async def until(predicate: Callable[[], object], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_first_readings_register_together_and_a_move_drops_the_cached_owner(
    stack: Settings, db: psycopg.Connection
) -> None:
    pool, owners = await owners_for(stack, "first-reading")
    try:
        await until(lambda: owners._listening, 10, "the listener")
        ids = devices(50)
        # 50 concurrent requests, each for its own new device: a handful of queries at most
        answers = await asyncio.gather(*(owners.resolve([d], "site-a", "test") for d in ids))
        assert all(a == {d: "site-a"} for a, d in zip(answers, ids, strict=True))
        assert owners.queries <= 3, owners.queries
        rows = db.execute(
            "SELECT count(*) FROM device_registry WHERE device_id = ANY(%s) AND site_id = 'site-a'",
            (ids,),
        ).fetchone()
        assert rows == (50,)
        # Another site's claim of a registered device gets the owner, and changes nothing.
        assert await owners.resolve(ids[:1], "site-b") == {ids[0]: "site-a"}
        before = owners.queries
        assert await owners.resolve(ids) == dict.fromkeys(ids, "site-a")
        assert owners.queries == before  # all cached
        move_device(db, ids[0], "site-b", "test", "moved by the test")
        await until(lambda: ids[0] not in owners.owners, 10, "the move to drop the entry")
        assert await owners.resolve(ids[:1]) == {ids[0]: "site-b"}
        assert ids[1] in owners.owners  # the others stay cached
    finally:
        await owners.stop()
        await pool.close()


async def test_admin_policy_registers_nothing(stack: Settings, db: psycopg.Connection) -> None:
    pool, owners = await owners_for(stack, "admin")
    try:
        [device] = devices(1)
        assert await owners.resolve([device], "site-a") == {device: None}
        assert (
            db.execute("SELECT 1 FROM device_registry WHERE device_id = %s", (device,)).fetchone()
            is None
        )
    finally:
        await owners.stop()
        await pool.close()
