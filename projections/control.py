"""Control projection: `control.events` -> control_commands, its only writer.

The `queued` event carries the request and creates the row; later transitions set status,
reason and history, and only move forward (queued < processing < succeeded | failed), so a
replayed or late event never rewinds a command; a `delivered` event records when a device
fetched the command over HTTP. Each change is announced as `control.updated` on the live stream.
"""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg
from aiokafka import ConsumerRecord
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from contracts import Events, Groups, Topics
from contracts.control import ControlEvent
from projections.base import AfterCommit, Projection
from runtime.events import EventStream
from runtime.settings import Settings

COLUMNS = (
    "id::text, device_id, command, params, status, reason, ttl_s, deadline, requested_by,"
    " created_at, updated_at, history, delivered_at"
)
TRANSITION_SQL = f"""
UPDATE control_commands
SET status = %(status)s, reason = coalesce(%(reason)s, reason),
    history = history || %(entry)s, updated_at = %(at)s
WHERE id = %(id)s
  AND (CASE status WHEN 'queued' THEN 0 WHEN 'processing' THEN 1 ELSE 2 END)
    < (CASE %(status)s WHEN 'queued' THEN 0 WHEN 'processing' THEN 1 ELSE 2 END)
RETURNING {COLUMNS}
"""
INSERT_SQL = f"""
INSERT INTO control_commands
    (id, device_id, command, params, status, ttl_s, deadline, requested_by, history, created_at,
     updated_at)
VALUES (%(id)s, %(device_id)s, %(command)s, %(params)s, 'queued', %(ttl_s)s, %(deadline)s,
        %(requested_by)s, %(entry)s, %(at)s, %(at)s)
ON CONFLICT (id) DO NOTHING
RETURNING {COLUMNS}
"""
DELIVERED_SQL = f"""
UPDATE control_commands SET delivered_at = %(at)s
WHERE id = %(id)s AND delivered_at IS NULL
RETURNING {COLUMNS}
"""


class ControlProjection(Projection[ControlEvent]):
    name = "control"

    def __init__(self, s: Settings, events: EventStream, group: str | None = None) -> None:
        super().__init__(
            s,
            s.topic(Topics.CONTROL_EVENTS),
            group or s.group(Groups.CONTROL_PROJECTOR),
            500,
            s.topic(Topics.CONTROL_DLQ),
        )
        self.decoder = msgspec.json.Decoder(ControlEvent)
        self.events = events

    def decode(self, rec: ConsumerRecord[bytes, bytes]) -> ControlEvent:
        return self.decoder.decode(rec.value or b"")

    async def apply(self, conn: psycopg.AsyncConnection, items: list[ControlEvent]) -> AfterCommit:
        updated: list[tuple[str, Any]] = []
        async with conn.cursor(row_factory=dict_row) as cur:
            for e in items:
                entry = msgspec.to_builtins(
                    {"status": e.status, "at": e.at, **({"reason": e.reason} if e.reason else {})}
                )
                if e.request is not None:
                    req = e.request
                    ttl = round((req.deadline - req.requested_at).total_seconds())
                    await cur.execute(
                        INSERT_SQL,
                        {
                            "id": e.command_id,
                            "device_id": e.device_id,
                            "command": req.command,
                            "params": Jsonb(req.params),
                            "ttl_s": ttl,
                            "deadline": req.deadline,
                            "requested_by": req.requested_by,
                            "entry": Jsonb([entry]),
                            "at": req.requested_at,
                        },
                    )
                elif e.delivered:
                    await cur.execute(DELIVERED_SQL, {"id": e.command_id, "at": e.at})
                else:
                    await cur.execute(
                        TRANSITION_SQL,
                        {
                            "id": e.command_id,
                            "status": e.status,
                            "reason": e.reason,
                            "entry": Jsonb([entry]),
                            "at": e.at,
                        },
                    )
                row = await cur.fetchone()
                if row is not None:
                    updated.append((Events.CONTROL_UPDATED, row))

        async def announce() -> None:
            await self.events.append(updated)

        return announce
