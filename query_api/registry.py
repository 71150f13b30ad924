"""The device registry for admins: which site owns each device, registrations and moves.

The registry (`device_registry`, `device_moves`) is the authority the gateway, the validator
and this API check ownership against. Its writes are the admin functions of
`runtime.devices` (the ones `microgrid devices` uses), run in a thread on a connection of their
own, so both paths apply the same rules: registering a device again to its site changes
nothing (200), to another site is refused (409: move it instead), and a move is recorded with
who made it and why. Every process that caches owners drops the device's entry when a move
commits (a NOTIFY from the table's trigger).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import psycopg
from litestar import Controller, Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from psycopg.rows import dict_row

from contracts.api import (
    DeviceMove,
    MoveDevice,
    RegisterDevice,
    RegisteredDevice,
    Registration,
    RegistrationPage,
)
from query_api.auth import ADMINS
from query_api.pagination import MAX_LIMIT, Cursor, decode_cursor, page_of
from query_api.services import Services
from runtime import devices
from runtime.http import problem
from runtime.openapi import problems

T = TypeVar("T")
CONNECT_TIMEOUT_S = 5

LIST_SQL = """
SELECT device_id, site_id, registered_at, registered_by FROM device_registry
WHERE (%(site_id)s::text IS NULL OR site_id = %(site_id)s)
  AND (%(after)s::text IS NULL OR device_id > %(after)s)
ORDER BY device_id
LIMIT %(limit)s
"""


async def _run(services: Services, action: Callable[[psycopg.Connection], T]) -> T:
    """Run a synchronous registry function on a connection of its own, in a thread."""

    def run() -> T:
        with psycopg.connect(
            services.settings.database_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
        ) as conn:
            return action(conn)

    return await asyncio.to_thread(run)


def _unregistered(device_id: str) -> Exception:
    return problem(404, "Unregistered device", f"device {device_id!r} is not registered")


class RegistryController(Controller):
    path = "/api/v1/registry/devices"
    tags = ["device registry"]
    guards = [ADMINS]

    @get()
    async def list_registrations(
        self,
        services: Services,
        site_id: str | None = None,
        cursor: Cursor = None,
        limit: Annotated[int, Parameter(ge=1, le=MAX_LIMIT)] = 100,
    ) -> RegistrationPage:
        """Registered devices in id order, with their site (`site_id`: of that site only)."""
        after = decode_cursor(cursor, str)
        params = {"site_id": site_id, "after": after[0] if after else None, "limit": limit + 1}
        async with services.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(LIST_SQL, params)
            rows = await cur.fetchall()
        rows, next_cursor = page_of(rows, limit, lambda r: (r["device_id"],))
        return RegistrationPage(items=[Registration(**r) for r in rows], next_cursor=next_cursor)

    @post(
        status_code=201,
        opt=problems(409),
        responses={
            200: ResponseSpec(
                Registration, description="Already registered to that site", generate_examples=False
            )
        },
    )
    async def register_device(
        self, services: Services, request: Request[Any, Any, Any], data: RegisterDevice
    ) -> Response[Registration]:
        """Give a device to a site: 201 when new, 200 when it already belongs to that site,
        409 when it belongs to another (move it instead)."""
        by = request.user.username
        try:
            found, new = await _run(
                services, lambda c: devices.register_device(c, data.device_id, data.site_id, by)
            )
        except devices.RegistryError as exc:
            raise problem(409, "Registered to another site", str(exc)) from exc
        return Response(found, status_code=201 if new else 200)

    @get("/{device_id:str}", opt=problems(404))
    async def get_registration(self, services: Services, device_id: str) -> RegisteredDevice:
        """A device's registration and its moves between sites, oldest first."""

        def read(conn: psycopg.Connection) -> tuple[Any, list[devices.Move]]:
            return devices.registration(conn, device_id), devices.moves_of(conn, device_id)

        found, moves = await _run(services, read)
        if found is None:
            raise _unregistered(device_id)
        return RegisteredDevice(
            device_id=found.device_id,
            site_id=found.site_id,
            registered_at=found.registered_at,
            registered_by=found.registered_by,
            moves=moves,
        )

    @post("/{device_id:str}/move", status_code=200, opt=problems(404, 409))
    async def move_device(
        self,
        services: Services,
        request: Request[Any, Any, Any],
        device_id: str,
        data: MoveDevice,
    ) -> DeviceMove:
        """Give a registered device to another site, recording who (this admin) and why:
        404 when the device is not registered, 409 when it already belongs to that site."""
        by = request.user.username

        def move(conn: psycopg.Connection) -> devices.Move | None:
            try:
                return devices.move_device(conn, device_id, data.site_id, by, data.reason)
            except devices.RegistryError:
                if devices.registration(conn, device_id) is None:
                    return None
                raise

        try:
            moved = await _run(services, move)
        except devices.RegistryError as exc:
            raise problem(409, "Already there", str(exc)) from exc
        if moved is None:
            raise _unregistered(device_id)
        return moved
