"""Control projection: `control.events` -> control_commands (status, reason, history).

Transitions only move forward (queued < processing < succeeded | failed), so a replayed or
late event never rewinds a command; each applied transition is announced as
`control.updated` on the live stream.
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
    " created_at, updated_at, history"
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


class ControlProjection(Projection[ControlEvent]):
    name = "control"

    def __init__(self, s: Settings, events: EventStream) -> None:
        super().__init__(s, s.topic(Topics.CONTROL_EVENTS), s.group(Groups.CONTROL_PROJECTOR), 500)
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
