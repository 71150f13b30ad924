"""Alerts and notifications: filtered, cursor-paginated lists, and notification acks."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.params import Parameter
from psycopg.rows import dict_row

from contracts import Events
from contracts.alerting import SEVERITIES
from contracts.api import Alert, AlertPage, Notification, NotificationPage
from query_api.auth import OPERATORS
from query_api.pagination import MAX_LIMIT, decode_cursor, page_of, ts_key
from query_api.services import Services
from runtime.http import problem

ALERTS_SQL = """
SELECT id, rule_id::text, device_id, site_id, severity, status, message, value, opened_at,
       cleared_at, acknowledged_at, acknowledged_by
FROM alerts
WHERE (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(severity)s::text IS NULL OR severity = %(severity)s)
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
  AND (%(site_id)s::text IS NULL OR site_id = %(site_id)s)
  AND (%(before_ts)s::timestamptz IS NULL OR (opened_at, id) < (%(before_ts)s, %(before_id)s))
ORDER BY opened_at DESC, id DESC
LIMIT %(limit)s
"""

NOTIFICATIONS_SQL = """
SELECT id, alert_id, device_id, site_id, kind, severity, title, created_at,
       acked_at IS NOT NULL AS read, acked_at, acked_by
FROM notifications
WHERE (%(unread)s::bool IS NULL OR (acked_at IS NULL) = %(unread)s)
  AND (%(severity)s::text IS NULL OR severity = %(severity)s)
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
  AND (%(site_id)s::text IS NULL OR site_id = %(site_id)s)
  AND (%(before_ts)s::timestamptz IS NULL OR (created_at, id) < (%(before_ts)s, %(before_id)s))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""

ACK_SQL = """
WITH before AS (SELECT id, acked_at FROM notifications WHERE id = %(id)s FOR UPDATE)
UPDATE notifications n
SET acked_at = coalesce(n.acked_at, now()), acked_by = coalesce(n.acked_by, %(user)s)
FROM before WHERE n.id = before.id
RETURNING n.id, n.alert_id, n.device_id, n.site_id, n.kind, n.severity, n.title, n.created_at,
          true AS read, n.acked_at, n.acked_by, before.acked_at IS NULL AS first_ack
"""

ALERT_ACK_SQL = """
WITH before AS (SELECT id, acknowledged_at FROM alerts WHERE id = %(id)s FOR UPDATE)
UPDATE alerts a
SET acknowledged_at = coalesce(a.acknowledged_at, now()),
    acknowledged_by = coalesce(a.acknowledged_by, %(user)s),
    status = CASE a.status WHEN 'active_unacknowledged' THEN 'active_acknowledged'
                           WHEN 'cleared_unacknowledged' THEN 'cleared' ELSE a.status END
FROM before WHERE a.id = before.id
RETURNING a.id, a.rule_id::text, a.device_id, a.site_id, a.severity, a.status, a.message,
          a.value, a.opened_at, a.cleared_at, a.acknowledged_at, a.acknowledged_by,
          before.acknowledged_at IS NULL AS first_ack
"""


async def _acknowledge(
    services: Services, sql: str, ident: str, user: str, event: str, what: str
) -> dict[str, Any]:
    async with services.pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql, {"id": ident, "user": user})
        row = await cur.fetchone()
    if row is None:
        raise problem(404, f"Unknown {what}", f"no {what} {ident!r}")
    if row.pop("first_ack"):
        await services.events.append([(event, row)])
    return row


Severity = Annotated[str | None, Parameter(description=", ".join(SEVERITIES))]
Limit = Annotated[int, Parameter(ge=1, le=MAX_LIMIT)]


async def _rows(services: Services, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    async with services.pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql, params)
        return await cur.fetchall()


def _before(cursor: str | None) -> dict[str, Any]:
    key = decode_cursor(cursor, datetime, str)
    return {"before_ts": key[0] if key else None, "before_id": key[1] if key else None}


class AlertController(Controller):
    path = "/api/v1/alerts"
    tags = ["alerts"]

    @get()
    async def list_alerts(
        self,
        services: Services,
        status: str | None = None,
        severity: Severity = None,
        device_id: str | None = None,
        site_id: str | None = None,
        cursor: str | None = None,
        limit: Limit = 50,
    ) -> AlertPage:
        """Alerts, newest first."""
        params = {
            "status": status,
            "severity": severity,
            "device_id": device_id,
            "site_id": site_id,
            "limit": limit + 1,
            **_before(cursor),
        }
        rows = await _rows(services, ALERTS_SQL, params)
        rows, next_cursor = page_of(rows, limit, lambda r: ts_key(r["opened_at"], r["id"]))
        return AlertPage(items=[Alert(**r) for r in rows], next_cursor=next_cursor)

    @post("/{alert_id:str}/ack", guards=[OPERATORS], status_code=200)
    async def ack_alert(
        self, services: Services, request: Request[Any, Any, Any], alert_id: str
    ) -> Alert:
        """Acknowledge an alert: active -> active_acknowledged, cleared_unacknowledged ->
        cleared. Acking twice keeps the first acknowledgement."""
        row = await _acknowledge(
            services,
            ALERT_ACK_SQL,
            alert_id,
            request.user.username,
            Events.ALERT_ACKNOWLEDGED,
            "alert",
        )
        return Alert(**row)


class NotificationController(Controller):
    path = "/api/v1/notifications"
    tags = ["notifications"]

    @get()
    async def list_notifications(
        self,
        services: Services,
        unread: bool | None = None,
        severity: Severity = None,
        device_id: str | None = None,
        site_id: str | None = None,
        cursor: str | None = None,
        limit: Limit = 50,
    ) -> NotificationPage:
        """Notifications, newest first; `unread=true` for the ones nobody acked yet."""
        params = {
            "unread": unread,
            "severity": severity,
            "device_id": device_id,
            "site_id": site_id,
            "limit": limit + 1,
            **_before(cursor),
        }
        rows = await _rows(services, NOTIFICATIONS_SQL, params)
        rows, next_cursor = page_of(rows, limit, lambda r: ts_key(r["created_at"], r["id"]))
        return NotificationPage(items=[Notification(**r) for r in rows], next_cursor=next_cursor)

    @post("/{notification_id:str}/ack", guards=[OPERATORS], status_code=200)
    async def ack_notification(
        self, services: Services, request: Request[Any, Any, Any], notification_id: str
    ) -> Notification:
        """Mark a notification read. Acking twice keeps the first ack."""
        row = await _acknowledge(
            services,
            ACK_SQL,
            notification_id,
            request.user.username,
            Events.NOTIFICATION_ACKED,
            "notification",
        )
        return Notification(**row)
