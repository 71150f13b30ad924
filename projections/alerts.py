"""Alerts projection: `alerts` events -> alerts and notifications, their only writer; each
change is announced on the live stream.

An alert opens as `active_unacknowledged`; when it clears it becomes `cleared` if someone
acknowledged it, `cleared_unacknowledged` if not. Each edge creates a notification. Operators'
acknowledgements of alerts (`acknowledged`) and notifications (`read`) come on the same topic,
from the query API's outbox; the first one wins.
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

ACK_SQL = f"""
UPDATE alerts SET acknowledged_at = %(at)s, acknowledged_by = %(by)s,
    status = CASE status WHEN 'active_unacknowledged' THEN 'active_acknowledged'
                         WHEN 'cleared_unacknowledged' THEN 'cleared' ELSE status END
WHERE id = %(id)s AND acknowledged_at IS NULL
RETURNING {ALERT_COLUMNS}
"""
READ_SQL = f"""
UPDATE notifications SET acked_at = %(at)s, acked_by = %(by)s
WHERE id = %(id)s AND acked_at IS NULL
RETURNING {NOTIFICATION_COLUMNS}
"""


class AlertsProjection(Projection[AlertEvent]):
    name = "alerts"

    def __init__(self, s: Settings, events: EventStream, group: str | None = None) -> None:
        super().__init__(
            s,
            s.topic(Topics.ALERTS),
            group or s.group(Groups.ALERTS_PROJECTOR),
            500,
            s.topic(Topics.ALERTS_DLQ),
        )
        self.decoder = msgspec.json.Decoder(AlertEvent)
        self.events = events

    def decode(self, rec: ConsumerRecord[bytes, bytes]) -> AlertEvent:
        return self.decoder.decode(rec.value or b"")

    async def apply(self, conn: psycopg.AsyncConnection, items: list[AlertEvent]) -> AfterCommit:
        announcements: list[tuple[str, Any]] = []
        async with conn.cursor(row_factory=dict_row) as cur:
            for e in items:
                if e.kind in ("acknowledged", "read"):
                    ack = e.kind == "acknowledged"
                    await cur.execute(
                        ACK_SQL if ack else READ_SQL,
                        {"id": e.alert_id if ack else e.notification_id, "at": e.at, "by": e.by},
                    )
                    row = await cur.fetchone()
                    if row is not None:
                        name = Events.ALERT_ACKNOWLEDGED if ack else Events.NOTIFICATION_ACKED
                        announcements.append((name, row))
                    continue
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
