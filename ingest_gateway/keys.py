"""The gateway's check of device ingest keys (made by `runtime.keys`).

A verified key is trusted for `INGEST_KEY_CACHE_S` after PostgreSQL last confirmed it, so a
request usually costs no database round trip. That time is also the bound on everything else:

- a key revoked in PostgreSQL is refused at most that long after (sooner when its revocation
  time, e.g. the end of a rotation's grace period, falls inside the cache time);
- while PostgreSQL is unreachable, a key confirmed within that time keeps working; one
  confirmed longer ago cannot be checked and is refused (`KeyStoreUnavailable`, a 503), never
  trusted on an old answer.

Unknown keys are remembered apart, by their SHA-256 (not the presented string), in a small
LRU with a short time to live: a flood of bogus keys fills that one alone and can never evict
a good key from the positive cache. Concurrent lookups of one key share one query.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import NamedTuple

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from runtime.keys import ACTIVE_SQL, hash_key

LOOKUP_TIMEOUT_S = 1.0
KEY_SQL = (
    "SELECT id, site_id, EXTRACT(EPOCH FROM revoked_at - now())::float8"
    f" FROM device_keys WHERE key_hash = %s AND {ACTIVE_SQL}"
)
NEGATIVE_TTL_S = 5.0  # an unknown key is asked about again after this (at most)
NEGATIVE_MAX = 10_000  # unknown keys remembered (32-byte hashes: about 1.5 MB)


class KeyStoreUnavailable(RuntimeError):
    """The key could not be checked now (PostgreSQL unreachable)."""


class Key(NamedTuple):
    id: int  # device_keys.id: names the key (in rate limits) without revealing it
    site: str


class KeyStore:
    """Resolves a presented key to its site: a bounded positive cache of verified keys (by the
    presented key, valid for `ttl_s`) and a bounded negative cache of unknown ones (by hash)."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        ttl_s: float,
        max_entries: int = 100_000,
        negative_max: int = NEGATIVE_MAX,
        negative_ttl_s: float = NEGATIVE_TTL_S,
    ):
        self.pool = pool
        self._ttl = ttl_s
        self._max = max_entries
        self._neg_max = negative_max
        self._neg_ttl = min(negative_ttl_s, ttl_s)
        self._known: OrderedDict[str, tuple[float, Key]] = OrderedDict()  # key -> (until, Key)
        self._unknown: OrderedDict[bytes, float] = OrderedDict()  # sha256 -> until
        self._pending: dict[str, asyncio.Future[Key | None]] = {}
        self.queries = 0  # lookups that went to PostgreSQL (for tests and metrics)

    async def lookup(self, key: str) -> Key | None:
        """The key's id and site, None for an unknown or revoked key; KeyStoreUnavailable
        when PostgreSQL is unreachable and the key was not confirmed within the cache time."""
        hit = self._known.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Key | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            found = await self._resolve(key)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            future.set_result(found)
            return found
        finally:
            del self._pending[key]

    async def _resolve(self, key: str) -> Key | None:
        digest = hash_key(key)
        now = time.monotonic()
        until = self._unknown.get(digest)
        if until is not None:
            if until > now:
                return None
            del self._unknown[digest]
        self.queries += 1
        try:
            async with self.pool.connection(timeout=LOOKUP_TIMEOUT_S) as conn:
                cur = await conn.execute(KEY_SQL, (digest,))
                row = await cur.fetchone()
        except (PoolTimeout, psycopg.OperationalError) as exc:
            self._known.pop(key, None)  # confirmed too long ago to be trusted: refused
            raise KeyStoreUnavailable(str(exc)) from exc
        if row is None:
            self._known.pop(key, None)
            self._unknown[digest] = now + self._neg_ttl
            while len(self._unknown) > self._neg_max:
                self._unknown.popitem(last=False)
            return None
        found = Key(row[0], row[1])
        ttl = self._ttl if row[2] is None else min(self._ttl, max(row[2], 0.0))
        self._known[key] = (now + ttl, found)
        self._known.move_to_end(key)
        while len(self._known) > self._max:
            self._known.popitem(last=False)
        return found
