"""Control commands: validated per device type, recorded in the API's ledger and queued in the
outbox for `control.commands` in one transaction (the controller takes it from there), listed
with their history from the control read model, which only the control projection writes.

A command's id is derived from the user and the `Idempotency-Key` header, and the ledger keeps
one command per key: a retried request returns the command it created first, which executes
once.

A user scoped to sites lists, reads and sends commands for their sites' devices only (the
registry's owners, `query_api.scope`): another site's device or command answers 404, and a
refused command is neither recorded nor queued.

The catalogue (`GET /api/v1/control/catalogue`) says what a command request may hold, from the
very tables the request is checked against (`contracts.control`): a client that builds its
form from it sends nothing the API refuses for its type or ranges.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import Parameter
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from contracts.api import (
    CommandAccepted,
    CommandCatalogue,
    CommandPage,
    CommandRequest,
    ControlCommand,
    ParamRange,
    Transition,
)
from contracts.control import (
    COMMANDS,
    DEFAULT_TTL_S,
    MAX_TTL_S,
    MIN_TTL_S,
    CommandRequested,
    command_errors,
    commands_for,
)
from query_api.auth import OPERATORS
from query_api.pagination import MAX_LIMIT, Cursor, decode_cursor, page_of, ts_key
from query_api.publishing import published
from query_api.scope import in_scope, owns
from query_api.services import Services
from runtime import outbox
from runtime.http import problem
from runtime.openapi import problems

COLUMNS = (
    "id::text, device_id, command, params, status, reason, ttl_s, deadline, requested_by,"
    " created_at, updated_at, history, delivered_at"
)
# Ids of commands sent with an Idempotency-Key: uuid5(this, user + key).
ID_NAMESPACE: Final = uuid.UUID("9b7e4f1c-52a4-4d0e-8d0c-6a1f3f1b7c21")
# The device's type, its owner, and whether that site has topics of its own (a Kafka
# principal was made for it): then its commands are dispatched on `site.<site>.dispatch`.
DEVICE_SQL = """
SELECT d.device_type, r.site_id,
       EXISTS (SELECT 1 FROM kafka_principals k WHERE k.site_id = r.site_id)
FROM devices d LEFT JOIN device_registry r USING (device_id)
WHERE d.device_id = %s
"""
LEDGER_SQL = """
INSERT INTO command_requests
    (id, requested_by, idempotency_key, device_id, command, params, ttl_s, deadline, created_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
RETURNING id
"""
# A command the controller has not taken yet (or the projection not shown): queued, as asked.
REQUESTED_SQL = f"""
SELECT id::text, device_id, command, params, 'queued' AS status, NULL AS reason, ttl_s, deadline,
       requested_by, created_at, created_at AS updated_at,
       jsonb_build_array(jsonb_build_object('status', 'queued', 'at', created_at)) AS history,
       NULL::timestamptz AS delivered_at
FROM command_requests WHERE id = %(id)s AND {in_scope()}
"""
COMMAND_SQL = f"SELECT {COLUMNS} FROM control_commands WHERE id = %(id)s AND {in_scope()}"
BY_KEY_SQL = """
SELECT r.id::text, coalesce(c.status, 'queued') FROM command_requests r
LEFT JOIN control_commands c USING (id)
WHERE r.requested_by = %s AND r.idempotency_key = %s
"""
LIST_SQL = f"""
SELECT {COLUMNS} FROM control_commands
WHERE {in_scope()}
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(before_ts)s::timestamptz IS NULL
       OR (created_at, id::text) < (%(before_ts)s, %(before_id)s))
ORDER BY created_at DESC, id::text DESC
LIMIT %(limit)s
"""


def command_id(user: str, idempotency_key: str | None) -> uuid.UUID:
    if idempotency_key is None:
        return uuid.uuid4()
    return uuid.uuid5(ID_NAMESPACE, f"{user}\n{idempotency_key}")


async def _by_key(conn: AsyncConnection[Any], user: str, key: str) -> CommandAccepted | None:
    cur = await conn.execute(BY_KEY_SQL, (user, key))
    row = await cur.fetchone()
    return CommandAccepted(id=row[0], status=row[1]) if row else None


def _command(row: dict[str, Any]) -> ControlCommand:
    history = [Transition(**h) for h in row.pop("history")]
    return ControlCommand(**row, history=history)


class ControlCommandController(Controller):
    path = "/api/v1/control/commands"
    tags = ["control"]

    @post(guards=[OPERATORS], status_code=202, opt=problems(404, 422))
    async def send_command(
        self,
        services: Services,
        request: Request[Any, Any, Any],
        data: CommandRequest,
        idempotency_key: Annotated[
            str | None, Parameter(header="Idempotency-Key", max_length=128)
        ] = None,
    ) -> CommandAccepted:
        """Queue a command for a device; follow it with GET .../{id}. The answer comes once the
        command is stored and (usually) on its way to the controller."""
        user = request.user.username
        async with services.pool.connection() as conn:
            # another site's device is answered as an unknown one, before anything is looked up
            if not await owns(conn, request.user.scope, data.device_id):
                raise problem(404, "Unknown device", f"no device {data.device_id!r} has reported")
            if idempotency_key and (seen := await _by_key(conn, user, idempotency_key)):
                return seen
            cur = await conn.execute(DEVICE_SQL, (data.device_id,))
            device = await cur.fetchone()
            if device is None:
                raise problem(404, "Unknown device", f"no device {data.device_id!r} has reported")
            errors = command_errors(device[0], data.command, data.params)
            if errors:
                raise problem(422, "Invalid command", errors[0]["message"], errors=errors)
            ttl = data.ttl_s or DEFAULT_TTL_S
            now = datetime.now(UTC)
            ident = command_id(user, idempotency_key)
            async with conn.transaction():
                deadline = now + timedelta(seconds=ttl)
                cur = await conn.execute(
                    LEDGER_SQL,
                    (
                        ident,
                        user,
                        idempotency_key,
                        data.device_id,
                        data.command,
                        Jsonb(data.params),
                        ttl,
                        deadline,
                        now,
                    ),
                )
                if await cur.fetchone() is None:  # a concurrent retry with this key won
                    seen = await _by_key(conn, user, idempotency_key or "")
                else:
                    seen = None
                    requested = CommandRequested(
                        id=str(ident),
                        device_id=data.device_id,
                        command=data.command,
                        params=data.params,
                        requested_at=now,
                        deadline=deadline,
                        requested_by=user,
                        site_id=device[1] or "",
                        site_topics=device[2],
                    )
                    queued = await outbox.add(
                        conn,
                        services.commands_topic,
                        data.device_id,
                        msgspec.json.encode(requested),
                    )
        if seen is not None:
            return seen
        await published(services, queued)  # usually on its way to the controller by now
        return CommandAccepted(id=str(ident), status="queued")

    @get()
    async def list_commands(
        self,
        services: Services,
        request: Request[Any, Any, Any],
        device_id: str | None = None,
        status: str | None = None,
        cursor: Cursor = None,
        limit: Annotated[int, Parameter(ge=1, le=MAX_LIMIT)] = 50,
    ) -> CommandPage:
        """Commands for the devices of the user's sites, newest first."""
        key = decode_cursor(cursor, datetime, str)
        params = {
            "sites": request.user.scope,
            "device_id": device_id,
            "status": status,
            "limit": limit + 1,
            "before_ts": key[0] if key else None,
            "before_id": key[1] if key else None,
        }
        async with services.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(LIST_SQL, params)
            rows = await cur.fetchall()
        rows, next_cursor = page_of(rows, limit, lambda r: ts_key(r["created_at"], r["id"]))
        return CommandPage(items=[_command(r) for r in rows], next_cursor=next_cursor)

    @get("/{command_id:uuid}", opt=problems(404))
    async def get_command(
        self, services: Services, request: Request[Any, Any, Any], command_id: uuid.UUID
    ) -> ControlCommand:
        params = {"id": command_id, "sites": request.user.scope}
        async with services.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(COMMAND_SQL, params)
            row = await cur.fetchone()
            if row is None:
                await cur.execute(REQUESTED_SQL, params)
                row = await cur.fetchone()
        if row is None:
            raise problem(404, "Unknown command", f"no command {command_id}")
        return _command(row)


CATALOGUE: Final = CommandCatalogue(
    device_types={
        device_type: {
            command: {
                name: ParamRange(min=float(low), max=float(high))
                for name, (low, high) in spec.items()
            }
            for command, spec in sorted(commands_for(device_type).items())
        }
        for device_type in sorted(COMMANDS)
    },
    default_ttl_s=DEFAULT_TTL_S,
    min_ttl_s=MIN_TTL_S,
    max_ttl_s=MAX_TTL_S,
)


@get("/api/v1/control/catalogue", tags=["control"])
async def get_catalogue() -> CommandCatalogue:
    """The commands `POST /api/v1/control/commands` accepts, per device type: each command with
    its parameters and the inclusive range of each (an empty object: the command takes none),
    and `ttl_s`'s default and bounds. Any role."""
    return CATALOGUE
