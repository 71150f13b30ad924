"""The device side of control commands over HTTP: long-poll the next command, post the result.

A device may fetch and answer only commands of devices its key's site owns (the registry,
`runtime.devices`). Each command is
handed out once: the gateway's ledger (`command_deliveries`) records the hand-over, and a
`delivered` control event is queued in the outbox in the same transaction, for the control read
model. Results go to `control.results` like Kafka devices' replies.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from aiokafka.errors import KafkaError
from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from contracts import Topics
from contracts.control import CommandDispatch, CommandReply, CommandResult, ControlEvent
from ingest_gateway.gateway import Gateway
from runtime import outbox
from runtime.devices import RegistryUnavailable
from runtime.http import problem
from runtime.openapi import problems

POLL_INTERVAL_S = 0.25
MAX_WAIT_S = 30

NEXT_SQL = """
WITH next AS (
    SELECT c.id, c.device_id, c.command, c.params, c.deadline FROM control_commands c
    WHERE c.device_id = %(device_id)s AND c.status = 'processing' AND c.deadline > now()
      AND NOT EXISTS (SELECT 1 FROM command_deliveries d WHERE d.command_id = c.id)
    ORDER BY c.created_at LIMIT 1
), taken AS (
    INSERT INTO command_deliveries (command_id, device_id, delivered_at)
    SELECT id, device_id, %(at)s FROM next
    ON CONFLICT DO NOTHING
    RETURNING command_id
)
SELECT next.id::text, next.device_id, next.command, next.params, next.deadline
FROM next JOIN taken ON taken.command_id = next.id
"""
COMMAND_DEVICE_SQL = "SELECT device_id FROM control_commands WHERE id = %s"


class DeviceCommands:
    """Commands as devices see them: which site a device or a command belongs to, the next
    command to hand out, and results sent on to the controller."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.results_topic = gateway.s.topic(Topics.CONTROL_RESULTS)
        self.events_topic = gateway.s.topic(Topics.CONTROL_EVENTS)
        self.ack_timeout_s = gateway.s.ingest_ack_timeout_ms / 1000

    async def site_of_key(self, request: Request[Any, Any, Any]) -> str:
        key = await self.gateway.authenticate(request.headers.get("authorization", ""))
        return key.site

    async def site_of_device(self, device_id: str) -> str | None:
        """The site the registry says the device belongs to (None: not registered). Asking
        registers nothing: a device is registered by its readings or by an admin."""
        try:
            return (await self.gateway.devices.resolve([device_id]))[device_id]
        except RegistryUnavailable as exc:
            raise problem(
                503,
                "Device registry unavailable",
                "cannot check which site the device belongs to: PostgreSQL is unreachable",
                headers={"Retry-After": "1"},
            ) from exc

    async def device_of(self, command_id: Any) -> str | None:
        """The device a command is for, None if there is no such command."""
        async with self.gateway.pool.connection() as conn:
            cur = await conn.execute(COMMAND_DEVICE_SQL, (command_id,))
            row = await cur.fetchone()
        return row[0] if row else None

    async def take_next(self, device_id: str) -> CommandDispatch | None:
        """Hand out the device's oldest undelivered command, once (a concurrent poll that lost
        the race finds none and looks again)."""
        now = datetime.now(UTC)
        async with self.gateway.pool.connection() as conn:
            cur = await conn.execute(NEXT_SQL, {"device_id": device_id, "at": now})
            row = await cur.fetchone()
            if row is None:
                return None
            delivered = ControlEvent(
                command_id=row[0], device_id=row[1], status="processing", at=now, delivered=True
            )
            await outbox.add(conn, self.events_topic, row[1], msgspec.json.encode(delivered))
        return CommandDispatch(
            id=row[0], device_id=row[1], command=row[2], params=row[3], deadline=row[4]
        )

    async def send_result(self, result: CommandResult) -> None:
        producer = self.gateway.producer.producer
        assert producer is not None, "the app's lifespan starts the producer"
        try:
            await asyncio.wait_for(
                producer.send_and_wait(
                    self.results_topic,
                    msgspec.json.encode(result),
                    key=result.device_id.encode(),
                ),
                timeout=self.ack_timeout_s,
            )
        except (KafkaError, TimeoutError) as exc:
            raise problem(
                503, "Command log unavailable", "retry the result", headers={"Retry-After": "1"}
            ) from exc


@get(
    "/api/v1/devices/{device_id:str}/commands/next",
    tags=["control"],
    responses={204: ResponseSpec(None, description="No command came within `wait` seconds")},
)
async def next_command(
    request: Request[Any, Any, Any],
    commands: DeviceCommands,
    device_id: str,
    wait: Annotated[float, Parameter(ge=0, le=MAX_WAIT_S, description="seconds")] = 0,
) -> Response[Any]:
    """The device's next command (200), or 204 when none came within `wait` seconds."""
    site = await commands.site_of_key(request)
    if await commands.site_of_device(device_id) != site:
        raise problem(403, "Not your device", f"{device_id!r} is not a device of this key's site")
    deadline = time.monotonic() + wait
    while True:
        command = await commands.take_next(device_id)
        if command is not None:
            return Response(msgspec.to_builtins(command), status_code=200)
        if time.monotonic() >= deadline:
            return Response(None, status_code=204)
        await asyncio.sleep(POLL_INTERVAL_S)


@post(
    "/api/v1/control/commands/{command_id:uuid}/result",
    status_code=202,
    tags=["control"],
    opt={"body": CommandReply, **problems(404)},
)
async def command_result(
    request: Request[Any, Any, Any], commands: DeviceCommands, command_id: Any
) -> dict[str, str]:
    """A device's answer to one of its commands: `{"status": "succeeded"|"failed", "reason"}`."""
    site = await commands.site_of_key(request)
    try:
        reply = msgspec.json.decode(await request.body(), type=CommandReply)
    except msgspec.ValidationError as exc:
        raise problem(422, "Invalid result", str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise problem(400, "Malformed JSON", str(exc)) from exc
    device_id = await commands.device_of(command_id)
    if device_id is None:
        raise problem(404, "Unknown command", f"no command {command_id}")
    if await commands.site_of_device(device_id) != site:
        raise problem(403, "Not your command", "this key may not answer for that device")
    await commands.send_result(
        CommandResult(
            id=str(command_id), device_id=device_id, status=reply.status, reason=reply.reason
        )
    )
    return {"id": str(command_id), "status": "received"}
