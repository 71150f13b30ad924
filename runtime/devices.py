"""The device registry: which site each device belongs to (table `device_registry`).

A device belongs to one site. With `DEVICE_REGISTRATION=first-reading` (the default) a device
nobody registered yet is registered to the site of the first reading that names it, which
arrives under a key of that site; with `admin`, only devices an admin registered
(`microgrid devices add`, `POST /api/v1/registry/devices`) are accepted. Either way, once a device
belongs to a site, readings, commands and results for it from any other site are refused, and
only an admin moves it (`move_device`, recorded in `device_moves`).

The admin functions here are synchronous (the CLI); the query API runs them in a thread.
`DeviceOwners` is the asynchronous cache the gateway and the validator ask on every request or
poll; see its docstring for why its entries need no time to live.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable
from typing import Literal

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from contracts.api import DeviceMove as Move
from contracts.api import Registration
from contracts.readings import Identifier

log = logging.getLogger("microgrid.devices")

Policy = Literal["first-reading", "admin"]
CHANNEL = "device_registry"
LOOKUP_TIMEOUT_S = 1.0
RELISTEN_S = 1.0
MAX_CACHED = 1_000_000  # devices whose owner a process remembers (about 150 MB at most)

CLAIM_SQL = """
WITH wanted AS (
    SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]) AS w(device_id, site_id, by)
), added AS (
    INSERT INTO device_registry (device_id, site_id, registered_by)
    SELECT device_id, site_id, by FROM wanted
    ON CONFLICT (device_id) DO NOTHING
    RETURNING device_id, site_id
)
SELECT device_id, site_id FROM added
UNION ALL
SELECT r.device_id, r.site_id FROM device_registry r JOIN wanted USING (device_id)
"""
OWNERS_SQL = "SELECT device_id, site_id FROM device_registry WHERE device_id = ANY(%s)"


class RegistryError(ValueError):
    """An admin action the registry refuses (unknown device, owned by another site...)."""


class RegistryUnavailable(RuntimeError):
    """The owner of a device could not be looked up now (PostgreSQL unreachable)."""


_REG = "device_id, site_id, registered_at, registered_by"
_MOVE = "device_id, from_site, to_site, moved_by, reason, moved_at"


def registration(conn: psycopg.Connection, device_id: str) -> Registration | None:
    row = conn.execute(
        f"SELECT {_REG} FROM device_registry WHERE device_id = %s", (device_id,)
    ).fetchone()
    return Registration(*row) if row else None


def register_device(
    conn: psycopg.Connection, device_id: str, site_id: str, by: str
) -> tuple[Registration, bool]:
    """Register `device_id` to `site_id`: (its registration, whether it is new). Registering it
    again to the same site changes nothing; to another site it is refused (move it instead)."""
    check_name("device id", device_id)
    check_name("site", site_id)
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO device_registry (device_id, site_id, registered_by) VALUES (%s, %s, %s)"
            f" ON CONFLICT (device_id) DO NOTHING RETURNING {_REG}",
            (device_id, site_id, by),
        ).fetchone()
        if row is not None:
            return Registration(*row), True
        found = registration(conn, device_id)
        assert found is not None, "a conflicting row exists"
        if found.site_id != site_id:
            raise RegistryError(
                f"device {device_id!r} belongs to site {found.site_id!r}: move it instead"
            )
        return found, False


def move_device(
    conn: psycopg.Connection, device_id: str, to_site: str, by: str, reason: str = ""
) -> Move:
    """Give a registered device to another site, and record who did it and why. Every process
    that caches owners drops the device's entry when this commits (a NOTIFY)."""
    check_name("site", to_site)
    with conn.transaction():
        row = conn.execute(
            "SELECT site_id FROM device_registry WHERE device_id = %s FOR UPDATE", (device_id,)
        ).fetchone()
        if row is None:
            raise RegistryError(f"device {device_id!r} is not registered")
        if row[0] == to_site:
            raise RegistryError(f"device {device_id!r} already belongs to site {to_site!r}")
        conn.execute(
            "UPDATE device_registry SET site_id = %s WHERE device_id = %s", (to_site, device_id)
        )
        moved = conn.execute(
            "INSERT INTO device_moves (device_id, from_site, to_site, moved_by, reason)"
            f" VALUES (%s, %s, %s, %s, %s) RETURNING {_MOVE}",
            (device_id, row[0], to_site, by, reason),
        ).fetchone()
        assert moved is not None
        return Move(*moved)


def list_registrations(conn: psycopg.Connection, site_id: str | None = None) -> list[Registration]:
    sql = f"SELECT {_REG} FROM device_registry"
    if site_id is None:
        rows = conn.execute(sql + " ORDER BY device_id").fetchall()
    else:
        rows = conn.execute(sql + " WHERE site_id = %s ORDER BY device_id", (site_id,)).fetchall()
    return [Registration(*r) for r in rows]


def moves_of(conn: psycopg.Connection, device_id: str) -> list[Move]:
    rows = conn.execute(
        f"SELECT {_MOVE} FROM device_moves WHERE device_id = %s ORDER BY moved_at, id",
        (device_id,),
    ).fetchall()
    return [Move(*r) for r in rows]


def check_name(what: str, value: str) -> None:
    """Device ids and sites are the identifiers readings carry."""
    try:
        msgspec.convert(value, Identifier)
    except msgspec.ValidationError:
        raise RegistryError(
            f"invalid {what} {value!r}: letters, digits and . _ : - (at most 64)"
        ) from None


class DeviceOwners:
    """The owner site of each device a process has seen, asked on every request or poll.

    Entries have no time to live, because an owner can only change in PostgreSQL and every
    change is announced: a trigger NOTIFYs `device_registry` with the device id when a row is
    updated or deleted, and this cache LISTENs on its own connection and drops that entry. When
    the listening connection is lost the whole cache is dropped as soon as it is back, since a
    change may have been missed meanwhile; while PostgreSQL is unreachable nothing can change,
    so the cached owners stay true and known devices keep working. A lookup that overlaps a
    change is answered but not cached (a generation counter tells).

    Unknown devices are looked up (and, with the first-reading policy, registered) together:
    the devices that concurrent callers ask about while a query runs go into the next one.
    """

    def __init__(
        self, pool: AsyncConnectionPool, database_url: str, policy: Policy, *, listen: bool = True
    ) -> None:
        self.pool = pool
        self.database_url = database_url
        self.policy = policy
        self.owners: dict[str, str] = {}  # device id -> site: read directly on the hot path
        self._generation = 0
        self._listening = not listen  # without a listener (tests): cache as if listening
        self._listener: asyncio.Task[None] | None = None
        self._listen = listen
        self._queue: dict[str, tuple[str | None, str]] = {}  # device -> (claiming site, by)
        self._pending: dict[str, asyncio.Future[str | None]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.queries = 0  # lookups that went to PostgreSQL (tests, metrics)

    async def start(self) -> None:
        if self._listen and self._listener is None:
            self._listener = asyncio.create_task(self._listen_loop())

    async def stop(self) -> None:
        for task in (self._listener, self._flusher):
            if task is not None:
                task.cancel()

    async def resolve(
        self, devices: Iterable[str], site: str | None = None, by: str = "first reading"
    ) -> dict[str, str | None]:
        """The owner of each device (None: not registered). With the first-reading policy
        and a `site`, an unregistered device is registered to it (`by` says how). Raises
        RegistryUnavailable when PostgreSQL cannot be asked about a device not cached."""
        found: dict[str, str | None] = {}
        waits: list[tuple[str, asyncio.Future[str | None]]] = []
        claim = site if self.policy == "first-reading" else None
        for device in devices:
            owner = self.owners.get(device)
            if owner is not None:
                found[device] = owner
                continue
            future = self._pending.get(device)
            if future is None:
                future = self._pending[device] = asyncio.get_running_loop().create_future()
                self._queue[device] = (claim, by)
            waits.append((device, future))
        if waits:
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush())
            for device, future in waits:
                found[device] = await asyncio.shield(future)
        return found

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, {}
            try:
                owners = await self._query(batch)
            except BaseException as exc:
                error = RegistryUnavailable(f"cannot look up device owners: {exc!r}")
                for device in batch:
                    future = self._pending.pop(device)
                    future.set_exception(error)
                    future.exception()  # retrieved: no warning when nobody waits any more
                if not isinstance(exc, Exception):
                    raise
                continue
            for device in batch:
                self._pending.pop(device).set_result(owners.get(device))

    async def _query(self, batch: dict[str, tuple[str | None, str]]) -> dict[str, str]:
        generation = self._generation
        claims = [(d, site, by) for d, (site, by) in batch.items() if site is not None]
        self.queries += 1
        try:
            async with self.pool.connection(timeout=LOOKUP_TIMEOUT_S) as conn:
                owners: dict[str, str] = {}
                if claims:
                    ids, sites, bys = (list(col) for col in zip(*claims, strict=True))
                    cur = await conn.execute(CLAIM_SQL, (ids, sites, bys))
                    owners.update(await cur.fetchall())
                # Not claimed, or inserted by a concurrent transaction this statement's
                # snapshot could not see: a plain look.
                missing = [d for d in batch if d not in owners]
                if missing:
                    cur = await conn.execute(OWNERS_SQL, (missing,))
                    owners.update(await cur.fetchall())
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise RegistryUnavailable(str(exc)) from exc
        if self._listening and generation == self._generation:
            if len(self.owners) + len(owners) > MAX_CACHED:
                for device in list(itertools.islice(self.owners, MAX_CACHED // 2)):
                    del self.owners[device]
            self.owners.update(owners)
        return owners

    def forget(self, device: str | None = None) -> None:
        """Drop one device's owner (or every one) from the cache."""
        self._generation += 1
        if device is None:
            self.owners.clear()
        else:
            self.owners.pop(device, None)

    async def _listen_loop(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.database_url, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.forget()  # whatever changed while nobody listened is dropped
                    self._listening = True
                    log.debug("listening for device registry changes")
                    async for note in conn.notifies():
                        self.forget(note.payload)
            except psycopg.OperationalError as exc:
                if self._listening:
                    log.warning("lost the device registry listener, reconnecting: %r", exc)
            finally:
                self._listening = False
            await asyncio.sleep(RELISTEN_S)
