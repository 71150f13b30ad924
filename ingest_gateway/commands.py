"""The device side of control commands over HTTP: long-poll the next command, post the result.

A device may fetch and answer only commands of devices in its key's site. Each command is
handed out once (`delivered_at`); results go to `control.results` like Kafka devices' replies.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from aiokafka.errors import KafkaError
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import Parameter

from contracts import Topics
from contracts.control import CommandDispatch, CommandResult
from microgrid.http import problem

if TYPE_CHECKING:
    from ingest_gateway.app import Gateway


def _gateway(state: State) -> Gateway:
    gw: Gateway = state.gateway
    return gw


async def _site_of_key(state: State, request: Request[Any, Any, State]) -> str:
    return await _gateway(state).authenticate(request.headers.get("authorization", ""))


POLL_INTERVAL_S = 0.25
MAX_WAIT_S = 30

NEXT_SQL = """
UPDATE control_commands SET delivered_at = now()
WHERE id = (
    SELECT id FROM control_commands
    WHERE device_id = %s AND status = 'processing' AND delivered_at IS NULL AND deadline > now()
    ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED
)
RETURNING id::text, device_id, command, params, deadline
"""
DEVICE_SITE_SQL = "SELECT site_id FROM devices WHERE device_id = %s"
COMMAND_SITE_SQL = """
SELECT c.device_id, d.site_id FROM control_commands c JOIN devices d USING (device_id)
WHERE c.id = %s
"""


async def _site_of_device(state: State, device_id: str) -> str | None:
    async with state.gateway.keys.pool.connection() as conn:
        cur = await conn.execute(DEVICE_SITE_SQL, (device_id,))
        row = await cur.fetchone()
    return row[0] if row else None


@get("/api/v1/devices/{device_id:str}/commands/next", tags=["control"])
async def next_command(
    request: Request[Any, Any, State],
    state: State,
    device_id: str,
    wait: Annotated[float, Parameter(ge=0, le=MAX_WAIT_S, description="seconds")] = 0,
) -> Response[Any]:
    """The device's next command (200), or 204 when none came within `wait` seconds."""
    site = await _site_of_key(state, request)
    if await _site_of_device(state, device_id) != site:
        raise problem(403, "Not your device", f"this key may not act for {device_id!r}")
    deadline = time.monotonic() + wait
    while True:
        async with state.gateway.keys.pool.connection() as conn:
            cur = await conn.execute(NEXT_SQL, (device_id,))
            row = await cur.fetchone()
        if row is not None:
            command = CommandDispatch(
                id=row[0], device_id=row[1], command=row[2], params=row[3], deadline=row[4]
            )
            return Response(msgspec.to_builtins(command), status_code=200)
        if time.monotonic() >= deadline:
            return Response(None, status_code=204)
        await asyncio.sleep(POLL_INTERVAL_S)


@post("/api/v1/control/commands/{command_id:uuid}/result", status_code=202, tags=["control"])
async def command_result(
    request: Request[Any, Any, State], state: State, command_id: Any
) -> dict[str, str]:
    """A device's answer to one of its commands: `{"status": "succeeded"|"failed", "reason"}`."""
    site = await _site_of_key(state, request)
    try:
        reply = msgspec.json.decode(await request.body(), type=CommandResult)
    except msgspec.ValidationError as exc:
        raise problem(422, "Invalid result", str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise problem(400, "Malformed JSON", str(exc)) from exc
    async with state.gateway.keys.pool.connection() as conn:
        cur = await conn.execute(COMMAND_SITE_SQL, (command_id,))
        row = await cur.fetchone()
    if row is None:
        raise problem(404, "Unknown command", f"no command {command_id}")
    if row[1] != site:
        raise problem(403, "Not your command", "this key may not answer for that device")
    result = CommandResult(
        id=str(command_id), device_id=row[0], status=reply.status, reason=reply.reason
    )
    producer = state.gateway.producer.producer
    try:
        await asyncio.wait_for(
            producer.send_and_wait(
                state.gateway.s.topic(Topics.CONTROL_RESULTS),
                msgspec.json.encode(result),
                key=row[0].encode(),
            ),
            timeout=state.gateway.s.ingest_ack_timeout_ms / 1000,
        )
    except (KafkaError, TimeoutError) as exc:
        raise problem(
            503, "Command log unavailable", "retry the result", headers={"Retry-After": "1"}
        ) from exc
    return {"id": str(command_id), "status": "received"}
