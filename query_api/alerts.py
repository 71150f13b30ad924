"""Alerts and notifications: filtered, cursor-paginated lists, and notification acks."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.params import Parameter
from psycopg.rows import dict_row

from contracts.alerting import SEVERITIES
from contracts.api import Alert, AlertPage, Notification, NotificationPage
from microgrid.http import problem
from query_api.auth import OPERATORS
from query_api.pagination import MAX_LIMIT, decode_cursor, page_of, ts_key

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
UPDATE notifications SET acked_at = coalesce(acked_at, now()), acked_by = coalesce(acked_by, %s)
WHERE id = %s
RETURNING id, alert_id, device_id, site_id, kind, severity, title, created_at, true AS read,
          acked_at, acked_by
"""

Severity = Annotated[str | None, Parameter(description=", ".join(SEVERITIES))]
Limit = Annotated[int, Parameter(ge=1, le=MAX_LIMIT)]


async def _rows(state: State, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    async with state.pool.connection() as conn:
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
        state: State,
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
        rows = await _rows(state, ALERTS_SQL, params)
        rows, next_cursor = page_of(rows, limit, lambda r: ts_key(r["opened_at"], r["id"]))
        return AlertPage(items=[Alert(**r) for r in rows], next_cursor=next_cursor)


class NotificationController(Controller):
    path = "/api/v1/notifications"
    tags = ["notifications"]

    @get()
    async def list_notifications(
        self,
        state: State,
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
        rows = await _rows(state, NOTIFICATIONS_SQL, params)
        rows, next_cursor = page_of(rows, limit, lambda r: ts_key(r["created_at"], r["id"]))
        return NotificationPage(items=[Notification(**r) for r in rows], next_cursor=next_cursor)

    @post("/{notification_id:str}/ack", guards=[OPERATORS], status_code=200)
    async def ack_notification(
        self, state: State, request: Request[Any, Any, Any], notification_id: str
    ) -> Notification:
        """Mark a notification read. Acking twice keeps the first ack."""
        async with state.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(ACK_SQL, (request.user.username, notification_id))
            row = await cur.fetchone()
        if row is None:
            raise problem(404, "Unknown notification", f"no notification {notification_id!r}")
        return Notification(**row)
