"""Control commands: validated per device type, stored as `queued` and published to
`control.commands` in one step (the controller takes it from there), listed with their history.

An `Idempotency-Key` header makes a retried request return the command it created first.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import Parameter
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from contracts import Events
from contracts.api import (
    CommandAccepted,
    CommandPage,
    CommandRequest,
    ControlCommand,
    Transition,
)
from contracts.control import DEFAULT_TTL_S, CommandRequested, command_errors
from query_api.auth import OPERATORS
from query_api.pagination import MAX_LIMIT, decode_cursor, page_of, ts_key
from query_api.publishing import append_or_503
from query_api.services import Services
from runtime.http import problem

COLUMNS = (
    "id::text, device_id, command, params, status, reason, ttl_s, deadline, requested_by,"
    " created_at, updated_at, history"
)
INSERT_SQL = f"""
INSERT INTO control_commands
    (id, device_id, command, params, status, ttl_s, deadline, requested_by, idempotency_key,
     history)
VALUES (%s, %s, %s, %s, 'queued', %s, %s, %s, %s, %s)
ON CONFLICT (requested_by, idempotency_key) DO NOTHING
RETURNING {COLUMNS}
"""
LIST_SQL = f"""
SELECT {COLUMNS} FROM control_commands
WHERE (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(before_ts)s::timestamptz IS NULL
       OR (created_at, id::text) < (%(before_ts)s, %(before_id)s))
ORDER BY created_at DESC, id::text DESC
LIMIT %(limit)s
"""


async def _by_key(conn: AsyncConnection[Any], user: str, key: str) -> CommandAccepted | None:
    cur = await conn.execute(
        "SELECT id::text, status FROM control_commands"
        " WHERE requested_by = %s AND idempotency_key = %s",
        (user, key),
    )
    row = await cur.fetchone()
    return CommandAccepted(id=row[0], status=row[1]) if row else None


async def _publish(services: Services, row: dict[str, Any]) -> None:
    request = CommandRequested(
        id=row["id"],
        device_id=row["device_id"],
        command=row["command"],
        params=row["params"],
        requested_at=row["created_at"],
        deadline=row["deadline"],
    )
    await append_or_503(
        services,
        services.commands_topic,
        request.device_id,
        msgspec.json.encode(request),
        "Command",
    )


def _command(row: dict[str, Any]) -> ControlCommand:
    history = [Transition(**h) for h in row.pop("history")]
    return ControlCommand(**row, history=history)


class ControlCommandController(Controller):
    path = "/api/v1/control/commands"
    tags = ["control"]

    @post(guards=[OPERATORS], status_code=202)
    async def send_command(
        self,
        services: Services,
        request: Request[Any, Any, Any],
        data: CommandRequest,
        idempotency_key: Annotated[
            str | None, Parameter(header="Idempotency-Key", max_length=128)
        ] = None,
    ) -> CommandAccepted:
        """Queue a command for a device; follow it with GET .../{id}."""
        user = request.user.username
        seen: CommandAccepted | None = None
        async with services.pool.connection() as conn:
            if idempotency_key and (seen := await _by_key(conn, user, idempotency_key)):
                return seen
            cur = await conn.execute(
                "SELECT device_type FROM devices WHERE device_id = %s", (data.device_id,)
            )
            device = await cur.fetchone()
            if device is None:
                raise problem(404, "Unknown device", f"no device {data.device_id!r} has reported")
            errors = command_errors(device[0], data.command, data.params)
            if errors:
                raise problem(422, "Invalid command", errors[0]["message"], errors=errors)
            ttl = data.ttl_s or DEFAULT_TTL_S
            now = datetime.now(UTC)
            history = [{"status": "queued", "at": now.isoformat()}]
            command_id = uuid.uuid4()
            inserted = conn.cursor(row_factory=dict_row)
            await inserted.execute(
                INSERT_SQL,
                (
                    command_id,
                    data.device_id,
                    data.command,
                    Jsonb(data.params),
                    ttl,
                    now + timedelta(seconds=ttl),
                    user,
                    idempotency_key,
                    Jsonb(history),
                ),
            )
            row = await inserted.fetchone()
            if row is None and idempotency_key:  # a concurrent retry with this key won
                seen = await _by_key(conn, user, idempotency_key)
            elif row is not None:
                await _publish(services, row)
                await conn.commit()  # stored only once the controller's topic has it
        if row is None and seen is not None:
            return seen
        assert row is not None
        await services.events.append([(Events.CONTROL_UPDATED, row)])
        return CommandAccepted(id=row["id"], status="queued")

    @get()
    async def list_commands(
        self,
        services: Services,
        device_id: str | None = None,
        status: str | None = None,
        cursor: str | None = None,
        limit: Annotated[int, Parameter(ge=1, le=MAX_LIMIT)] = 50,
    ) -> CommandPage:
        """Commands, newest first."""
        key = decode_cursor(cursor, datetime, str)
        params = {
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

    @get("/{command_id:uuid}")
    async def get_command(self, services: Services, command_id: uuid.UUID) -> ControlCommand:
        async with services.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"SELECT {COLUMNS} FROM control_commands WHERE id = %s", (command_id,)
            )
            row = await cur.fetchone()
        if row is None:
            raise problem(404, "Unknown command", f"no command {command_id}")
        return _command(row)
