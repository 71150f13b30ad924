"""Who a request's user is now: role and sites, read from the `users` table and cached in the
process for `USER_CACHE_S` (5 s).

A token names its user; the role and sites it acts with come from here, so a change of role or
sites (`microgrid users set`), or a deleted user, takes effect within 5 s of its commit on
every request (a deleted user gets 401). A cache hit is one dict lookup; concurrent misses for
one user share one query. Each entry expires `USER_CACHE_S` after its query began, so nothing
committed before that query is kept longer than that.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

from psycopg_pool import AsyncConnectionPool

from contracts.api import Role

USER_CACHE_S: Final = 5.0
MAX_CACHED: Final = 10_000  # users remembered at once (tokens are signed: a bounded set)
USER_SQL: Final = "SELECT role, sites FROM users WHERE username = %s"


@dataclass(frozen=True)
class User:
    username: str
    role: Role
    # the sites this user sees and acts on; None: every site (always for admins)
    sites: frozenset[str] | None = None

    @property
    def scope(self) -> list[str] | None:
        """The user's sites as a query parameter (sorted), None for every site."""
        return None if self.sites is None else sorted(self.sites)

    def sees(self, site: str | None) -> bool:
        return self.sites is None or (site is not None and site in self.sites)


class UserDirectory:
    """Role and sites of each user, re-read from PostgreSQL at most every `ttl_s`."""

    def __init__(self, pool: AsyncConnectionPool, ttl_s: float = USER_CACHE_S) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, User | None]] = {}  # name -> (expires, user)
        self._pending: dict[str, asyncio.Future[User | None]] = {}
        self.queries = 0

    async def get(self, username: str, wait_s: float | None = None) -> User | None:
        """The user now (None: no such user). Raises what the pool raises when PostgreSQL
        cannot be asked (PoolTimeout, OperationalError: a 503 on a request)."""
        hit = self._cache.get(username)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        future = self._pending.get(username)
        if future is None:
            future = asyncio.ensure_future(self._load(username, wait_s))
            self._pending[username] = future
            future.add_done_callback(lambda f: self._done(username, f))
        return await asyncio.shield(future)

    def _done(self, username: str, future: asyncio.Future[User | None]) -> None:
        self._pending.pop(username, None)
        if not future.cancelled():
            future.exception()  # retrieved: no warning when every waiter was cancelled

    async def _load(self, username: str, wait_s: float | None) -> User | None:
        began = time.monotonic()
        self.queries += 1
        async with self.pool.connection(timeout=wait_s) as conn:
            cur = await conn.execute(USER_SQL, (username,))
            row = await cur.fetchone()
        user = None
        if row is not None:
            role, sites = row
            scoped = role != "admin" and sites is not None  # admins see every site
            user = User(username, role, frozenset(sites) if scoped else None)
        if len(self._cache) >= MAX_CACHED:
            now = time.monotonic()
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
        self._cache[username] = (began + self.ttl_s, user)
        return user
