"""Alerts projection: `alerts` events -> alerts and notifications, announced on the live stream.

An alert opens as `active_unacknowledged`; when it clears it becomes `cleared` if someone
acknowledged it, `cleared_unacknowledged` if not. Each edge creates a notification.
"""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg
from aiokafka import ConsumerRecord
from psycopg.rows import dict_row

from contracts import Events, Groups, Topics
from contracts.alerting import AlertEvent
from projections.base import AfterCommit, Projection
from runtime.events import EventStream
from runtime.settings import Settings

ALERT_COLUMNS = (
    "id, rule_id::text, device_id, site_id, severity, status, message, value, opened_at,"
    " cleared_at, acknowledged_at, acknowledged_by"
)
NOTIFICATION_COLUMNS = (
    "id, alert_id, device_id, site_id, kind, severity, title, created_at,"
    " acked_at IS NOT NULL AS read, acked_at, acked_by"
)
OPEN_SQL = f"""
INSERT INTO alerts (id, rule_id, device_id, site_id, severity, status, message, value, opened_at)
VALUES (%s, %s, %s, %s, %s, 'active_unacknowledged', %s, %s, %s)
ON CONFLICT (id) DO NOTHING
RETURNING {ALERT_COLUMNS}
"""
CLEAR_SQL = f"""
UPDATE alerts SET cleared_at = %s,
    status = CASE WHEN acknowledged_at IS NULL THEN 'cleared_unacknowledged' ELSE 'cleared' END
WHERE id = %s AND cleared_at IS NULL
RETURNING {ALERT_COLUMNS}
"""
NOTIFY_SQL = f"""
INSERT INTO notifications (id, alert_id, device_id, site_id, kind, severity, title, created_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO NOTHING
RETURNING {NOTIFICATION_COLUMNS}
"""


class AlertsProjection(Projection[AlertEvent]):
    name = "alerts"

    def __init__(self, s: Settings, events: EventStream) -> None:
        super().__init__(s, s.topic(Topics.ALERTS), s.group(Groups.ALERTS_PROJECTOR), 500)
        self.decoder = msgspec.json.Decoder(AlertEvent)
        self.events = events

    def decode(self, rec: ConsumerRecord[bytes, bytes]) -> AlertEvent:
        return self.decoder.decode(rec.value or b"")

    async def apply(self, conn: psycopg.AsyncConnection, items: list[AlertEvent]) -> AfterCommit:
        announcements: list[tuple[str, Any]] = []
        async with conn.cursor(row_factory=dict_row) as cur:
            for e in items:
                if e.kind == "opened":
                    await cur.execute(
                        OPEN_SQL,
                        (
                            e.alert_id,
                            e.rule_id,
                            e.device_id,
                            e.site_id,
                            e.severity,
                            e.message,
                            e.value,
                            e.at,
                        ),
                    )
                    name, title = Events.ALERT_OPENED, f"{e.rule_name}: {e.message}"
                else:
                    await cur.execute(CLEAR_SQL, (e.at, e.alert_id))
                    name, title = Events.ALERT_CLEARED, f"{e.rule_name} cleared: {e.message}"
                alert = await cur.fetchone()
                if alert is None:
                    continue  # already projected (a replay)
                announcements.append((name, alert))
                await cur.execute(
                    NOTIFY_SQL,
                    (
                        f"{e.alert_id}:{e.kind}",
                        e.alert_id,
                        e.device_id,
                        e.site_id,
                        name,
                        e.severity,
                        title,
                        e.at,
                    ),
                )
                notification = await cur.fetchone()
                if notification is not None:
                    announcements.append((Events.NOTIFICATION_CREATED, notification))

        async def announce() -> None:
            await self.events.append(announcements)

        return announce
