"""The gateway's check of device ingest keys (made by `runtime.keys`): verified keys are cached
for a short time so a request costs no database round trip."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import NamedTuple

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from runtime.keys import hash_key

LOOKUP_TIMEOUT_S = 1.0
KEY_SQL = "SELECT id, site_id FROM device_keys WHERE key_hash = %s AND revoked_at IS NULL"


class KeyStoreUnavailable(RuntimeError):
    """The key could not be checked now (PostgreSQL unreachable)."""


class Key(NamedTuple):
    id: int  # device_keys.id: names the key (in rate limits) without revealing it
    site: str


class KeyStore:
    """Resolves a presented key to its site, with a bounded time-limited cache (hits and misses)."""

    def __init__(self, pool: AsyncConnectionPool, ttl_s: float, max_entries: int = 100_000):
        self.pool = pool
        self._ttl = ttl_s
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[float, Key | None]] = OrderedDict()

    async def lookup(self, key: str) -> Key | None:
        """The key's id and site, None for an unknown or revoked key; KeyStoreUnavailable
        when PostgreSQL is unreachable and the key was never seen (a known key keeps working
        meanwhile)."""
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            async with self.pool.connection(timeout=LOOKUP_TIMEOUT_S) as conn:
                cur = await conn.execute(KEY_SQL, (hash_key(key),))
                row = await cur.fetchone()
        except (PoolTimeout, psycopg.OperationalError) as exc:
            if hit is not None:
                return hit[1]
            raise KeyStoreUnavailable(str(exc)) from exc
        found = Key(row[0], row[1]) if row else None
        self._cache[key] = (now + self._ttl, found)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return found
