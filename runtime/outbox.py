"""The transactional outbox: what the query API and the gateway publish to Kafka is written to
the `outbox` table in the transaction of the change it announces, and the relay publishes it.

A request is answered once its transaction committed, so what it changed and what it announces
are stored together or not at all, whatever the broker does; there is no publish that times out
after the row was rolled back and still reaches the log later. The relay publishes rows in id
order through an idempotent producer and deletes them only once the broker acknowledged them;
after a crash between the two it publishes them again, which every consumer of these topics
absorbs (commands by id, rules by key, acknowledgements and deliveries keep the first).

One relay works at a time (a PostgreSQL advisory lock held by its connection): every query API
process runs one, the others wait to take over. `NOTIFY` wakes it when a row is added.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Final

import psycopg
from aiokafka.errors import KafkaError
from prometheus_client import Counter

from runtime.kafka import RenewableProducer
from runtime.retry import RetryPolicy
from runtime.settings import Settings

log = logging.getLogger("microgrid.outbox")

CHANNEL: Final = "microgrid_outbox"
RELAY_LOCK: Final = 0x6F7574626F78  # advisory lock id: one relay at a time
BATCH: Final = 500
ACK_TIMEOUT_S: Final = 10.0
IDLE_POLL_S: Final = 1.0  # a lost notification delays a row by at most this
BACKOFF = RetryPolicy(initial_s=0.2, max_s=5.0, deadline_s=None)

PUBLISHED = Counter("microgrid_outbox_published_total", "Outbox records the relay published")
FAILURES = Counter(
    "microgrid_outbox_failures_total", "Relay passes that failed (broker or database away)"
)


async def add(conn: psycopg.AsyncConnection, topic: str, key: str, value: bytes | None) -> int:
    """Queue a record inside the caller's transaction; it is published once that commits.
    Returns its outbox id."""
    [outbox_id] = await add_many(conn, topic, [(key, value)])
    return outbox_id


async def add_many(
    conn: psycopg.AsyncConnection, topic: str, records: Sequence[tuple[str, bytes | None]]
) -> list[int]:
    """Queue records (key, value) for one topic inside the caller's transaction, in one
    statement, as `add` queues one; they are published in this order once it commits. Returns
    their outbox ids, in order."""
    if not records:
        return []
    cur = await conn.execute(
        "INSERT INTO outbox (topic, key, value)"
        " SELECT %s, r.key, r.value FROM unnest(%s::bytea[], %s::bytea[])"
        " WITH ORDINALITY AS r(key, value, n) ORDER BY r.n RETURNING id",
        (topic, [key.encode() for key, _ in records], [value for _, value in records]),
    )
    ids = sorted(int(row[0]) for row in await cur.fetchall())
    await conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
    return ids


class Relay:
    """Publishes the outbox until cancelled, taking turns with the relays of other processes."""

    def __init__(self, s: Settings, producer: RenewableProducer) -> None:
        self.s = s
        self.producer = producer
        self.rng = random.Random()
        self.failures = 0  # in a row, for the backoff

    async def run(self) -> None:
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.s.database_url, autocommit=True)
                async with conn:
                    await self._lead(conn)
            except (psycopg.Error, KafkaError, TimeoutError, OSError) as exc:
                FAILURES.inc()
                wait = BACKOFF.backoff_s(self.failures, self.rng)
                self.failures += 1
                log.warning("outbox relay: %r; again in %.1f s", exc, wait)
                await asyncio.sleep(wait)

    async def _lead(self, conn: psycopg.AsyncConnection) -> None:
        await conn.execute(f"LISTEN {CHANNEL}")
        while not await self._take_turn(conn):
            await self._wait(conn, 5 * IDLE_POLL_S)  # another process relays
        log.info("relaying the outbox")
        while True:
            if await self.drain(conn) < BATCH:
                self.failures = 0
                await self._wait(conn, IDLE_POLL_S)

    @staticmethod
    async def _take_turn(conn: psycopg.AsyncConnection) -> bool:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LOCK,))
        row = await cur.fetchone()
        return bool(row and row[0])

    @staticmethod
    async def _wait(conn: psycopg.AsyncConnection, timeout_s: float) -> None:
        async for _ in conn.notifies(timeout=timeout_s, stop_after=1):
            pass

    async def drain(self, conn: psycopg.AsyncConnection) -> int:
        """Publish one batch of the oldest rows, delete them once acknowledged; how many."""
        cur = await conn.execute(
            "SELECT id, topic, key, value FROM outbox ORDER BY id LIMIT %s", (BATCH,)
        )
        rows = await cur.fetchall()
        if not rows:
            return 0
        if self.producer.producer is None:
            await self.producer.start()
        producer = self.producer.producer
        assert producer is not None

        async def publish() -> None:
            sent = [await producer.send(topic, value, key=key) for _, topic, key, value in rows]
            await asyncio.gather(*sent)

        try:
            await asyncio.wait_for(publish(), timeout=ACK_TIMEOUT_S)
        except (KafkaError, TimeoutError):
            await self.producer.renew_if_broken()
            raise
        await conn.execute("DELETE FROM outbox WHERE id = ANY(%s)", ([r[0] for r in rows],))
        PUBLISHED.inc(len(rows))
        return len(rows)
