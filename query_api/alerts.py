"""Alerts and notifications: filtered, cursor-paginated lists, and acknowledgements.

An acknowledgement is an event: queued in the outbox for the `alerts` topic, applied by the
alerts projection (the tables' only writer). The handler answers with the acknowledged row once
the projection applied it (200), or 202 if that takes longer than a few seconds.

A user scoped to sites sees and acks only the alerts and notifications of their sites' devices
(the registry's owners, `query_api.scope`); another site's answers 404 and changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter
from psycopg.rows import dict_row

from contracts.alerting import AlertEvent
from contracts.alerting import Severity as SeverityName
from contracts.api import Accepted, Alert, AlertPage, Notification, NotificationPage
from query_api.auth import OPERATORS, User
from query_api.pagination import MAX_LIMIT, Cursor, decode_cursor, page_of, ts_key
from query_api.publishing import once_projected
from query_api.scope import in_scope
from query_api.services import Services
from runtime import outbox
from runtime.http import problem
from runtime.openapi import problems

ALERTS_SQL = f"""
SELECT id, rule_id::text, device_id, site_id, severity, status, message, value, opened_at,
       cleared_at, acknowledged_at, acknowledged_by
FROM alerts
WHERE {in_scope()}
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(severity)s::text IS NULL OR severity = %(severity)s)
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
  AND (%(site_id)s::text IS NULL OR site_id = %(site_id)s)
  AND (%(before_ts)s::timestamptz IS NULL OR (opened_at, id) < (%(before_ts)s, %(before_id)s))
ORDER BY opened_at DESC, id DESC
LIMIT %(limit)s
"""

NOTIFICATIONS_SQL = f"""
SELECT id, alert_id, device_id, site_id, kind, severity, title, created_at,
       acked_at IS NOT NULL AS read, acked_at, acked_by
FROM notifications
WHERE {in_scope()}
  AND (%(unread)s::bool IS NULL OR (acked_at IS NULL) = %(unread)s)
  AND (%(severity)s::text IS NULL OR severity = %(severity)s)
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
  AND (%(site_id)s::text IS NULL OR site_id = %(site_id)s)
  AND (%(before_ts)s::timestamptz IS NULL OR (created_at, id) < (%(before_ts)s, %(before_id)s))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""

ALERT_SQL = f"""
SELECT id, rule_id::text, device_id, site_id, severity, status, message, value, opened_at,
       cleared_at, acknowledged_at, acknowledged_by
FROM alerts WHERE id = %(id)s AND {in_scope()}
"""
NOTIFICATION_SQL = f"""
SELECT id, alert_id, device_id, site_id, kind, severity, title, created_at,
       acked_at IS NOT NULL AS read, acked_at, acked_by
FROM notifications WHERE id = %(id)s AND {in_scope()}
"""


async def _acknowledge(
    services: Services, ident: str, user: User, what: str
) -> tuple[dict[str, Any], bool]:
    """Queue the acknowledgement of an alert or notification (unless it has one); return the
    row and whether it shows the acknowledgement yet. 404 for one of a site outside the
    user's sites, as for an unknown one."""
    alert = what == "alert"
    sql = ALERT_SQL if alert else NOTIFICATION_SQL
    params = {"id": ident, "sites": user.scope}
    async with services.pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql, params)
        row = await cur.fetchone()
        if row is None:
            raise problem(404, f"Unknown {what}", f"no {what} {ident!r}")
        if row["acknowledged_at" if alert else "acked_at"] is not None:
            return row, True  # the first acknowledgement stands
        event = AlertEvent(
            alert_id=ident if alert else (row["alert_id"] or ""),
            kind="acknowledged" if alert else "read",
            rule_id=row["rule_id"] if alert else "",
            rule_name="",
            device_id=row["device_id"],
            site_id=row["site_id"],
            severity=row["severity"],
            at=datetime.now(UTC),
            by=user.username,
            notification_id=None if alert else ident,
        )
        await outbox.add(conn, services.alerts_topic, row["device_id"], msgspec.json.encode(event))
    done = f"{sql} AND {'acknowledged_at' if alert else 'acked_at'} IS NOT NULL"
    shown = await once_projected(services, done, params)
    return (shown, True) if shown is not None else (row, False)


SeverityFilter = Annotated[SeverityName | None, Parameter(description="only this severity")]
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
        request: Request[Any, Any, Any],
        status: str | None = None,
        severity: SeverityFilter = None,
        device_id: str | None = None,
        site_id: str | None = None,
        cursor: Cursor = None,
        limit: Limit = 50,
    ) -> AlertPage:
        """Alerts of the user's sites, newest first."""
        params = {
            "sites": request.user.scope,
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

    @post("/{alert_id:str}/ack", guards=[OPERATORS], status_code=200, opt=problems(404))
    async def ack_alert(
        self, services: Services, request: Request[Any, Any, Any], alert_id: str
    ) -> Response[Alert | Accepted]:
        """Acknowledge an alert: active -> active_acknowledged, cleared_unacknowledged ->
        cleared. Acking twice keeps the first acknowledgement. 200 with the acknowledged alert;
        202 when it is stored but not shown yet."""
        row, shown = await _acknowledge(services, alert_id, request.user, "alert")
        if not shown:
            return Response(Accepted(id=alert_id), status_code=202)
        return Response(Alert(**row))


class NotificationController(Controller):
    path = "/api/v1/notifications"
    tags = ["notifications"]

    @get()
    async def list_notifications(
        self,
        services: Services,
        request: Request[Any, Any, Any],
        unread: bool | None = None,
        severity: SeverityFilter = None,
        device_id: str | None = None,
        site_id: str | None = None,
        cursor: Cursor = None,
        limit: Limit = 50,
    ) -> NotificationPage:
        """Notifications of the user's sites, newest first; `unread=true` for the ones nobody
        acked yet."""
        params = {
            "sites": request.user.scope,
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

    @post("/{notification_id:str}/ack", guards=[OPERATORS], status_code=200, opt=problems(404))
    async def ack_notification(
        self, services: Services, request: Request[Any, Any, Any], notification_id: str
    ) -> Response[Notification | Accepted]:
        """Mark a notification read. Acking twice keeps the first ack. 200 with the read
        notification; 202 when it is stored but not shown yet."""
        row, shown = await _acknowledge(services, notification_id, request.user, "notification")
        if not shown:
            return Response(Accepted(id=notification_id), status_code=202)
        return Response(Notification(**row))
