"""Alerts and notifications: filtered, cursor-paginated lists, alerts grouped by rule and
site, and acknowledgements, one at a time or in bulk.

An acknowledgement is an event: queued in the outbox for the `alerts` topic, applied by the
alerts projection (the tables' only writer). The handler answers with the acknowledged row once
the projection applied it (200), or 202 if that takes longer than a few seconds. A bulk
acknowledgement queues one such event per alert, all in one transaction, and answers 202 with
what it queued (once the relay published it, or after a few seconds).

A user scoped to sites sees and acks only the alerts and notifications of their sites' devices
(the registry's owners, `query_api.scope`); another site's answers 404 and changes nothing (in
a bulk acknowledgement, its ids come back as `unknown`)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter
from psycopg.rows import dict_row

from contracts.alerting import SEVERITIES, AlertEvent
from contracts.alerting import Severity as SeverityName
from contracts.api import (
    Accepted,
    Alert,
    AlertAckRequest,
    AlertAckResult,
    AlertGroup,
    AlertGroups,
    AlertPage,
    AlertStatusFilter,
    Notification,
    NotificationPage,
)
from query_api.auth import OPERATORS, User
from query_api.pagination import MAX_LIMIT, Cursor, decode_cursor, page_of, ts_key
from query_api.publishing import once_projected, published
from query_api.scope import in_scope
from query_api.services import Services
from runtime import outbox
from runtime.http import problem
from runtime.openapi import problems

MAX_GROUPS: Final = 1000
MAX_BULK_ACK: Final = 10_000  # alerts one bulk acknowledgement by filter takes at most

# `status`: one status, `open` (every status but cleared: the open alerts' index of migration 011
# has this very predicate, which is what the condition folds to once the value is known) or
# NULL (every status).
STATUS_SQL = """(CASE WHEN %(status)s::text IS NULL THEN true
      WHEN %(status)s = 'open' THEN status <> 'cleared'
      ELSE status = %(status)s END)"""
FILTERS_SQL = f"""{in_scope()}
  AND {STATUS_SQL}
  AND (%(rule_id)s::uuid IS NULL OR rule_id = %(rule_id)s)
  AND (%(severity)s::text IS NULL OR severity = %(severity)s)
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
  AND (%(site_id)s::text IS NULL OR site_id = %(site_id)s)"""

ALERTS_SQL = f"""
SELECT id, rule_id::text, device_id, site_id, severity, status, message, value, opened_at,
       cleared_at, acknowledged_at, acknowledged_by
FROM alerts
WHERE {FILTERS_SQL}
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

# Grouped first (on the open alerts' covering index), named after: a deleted rule by its id.
GROUPS_SQL = f"""
WITH g AS (
    SELECT rule_id, site_id, severity, count(*) AS count,
           count(*) FILTER (WHERE acknowledged_at IS NULL) AS unacknowledged,
           count(DISTINCT device_id) AS devices,
           min(opened_at) AS first_opened_at, max(opened_at) AS last_opened_at
    FROM alerts
    WHERE {FILTERS_SQL}
    GROUP BY site_id, rule_id, severity
    ORDER BY array_position(%(ranks)s::text[], severity), count(*) DESC, rule_id, site_id
    LIMIT %(limit)s
)
SELECT g.rule_id::text, coalesce(r.name, g.rule_id::text) AS rule_name, g.site_id, g.severity,
       g.count, g.unacknowledged, g.devices, g.first_opened_at, g.last_opened_at
FROM g LEFT JOIN alert_rules r ON r.id = g.rule_id
ORDER BY array_position(%(ranks)s::text[], g.severity), g.count DESC, g.rule_id, g.site_id
"""

# A bulk acknowledgement: the request's ids (of the user's sites), or the unacknowledged alerts
# a filter matches, oldest first (`status <> 'cleared'` holds for every unacknowledged alert and
# lets the open alerts' index serve).
ACK_IDS_SQL = f"""
SELECT id, rule_id::text, device_id, site_id, severity,
       acknowledged_at IS NOT NULL AS acknowledged
FROM alerts WHERE id = ANY(%(ids)s::text[]) AND {in_scope()}
"""
ACK_FILTER_SQL = f"""
SELECT id, rule_id::text, device_id, site_id, severity, false AS acknowledged
FROM alerts
WHERE acknowledged_at IS NULL AND status <> 'cleared' AND {FILTERS_SQL}
ORDER BY opened_at, id
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


def _acknowledged(
    row: dict[str, Any], by: str, at: datetime, *, notification: bool = False
) -> bytes:
    """The event that acknowledges an alert (a row of the alert queries), or marks a
    notification read (`notification`, a row of the notification queries), by `by`."""
    event = AlertEvent(
        alert_id=(row["alert_id"] or "") if notification else row["id"],
        kind="read" if notification else "acknowledged",
        rule_id="" if notification else row["rule_id"],
        rule_name="",
        device_id=row["device_id"],
        site_id=row["site_id"],
        severity=row["severity"],
        at=at,
        by=by,
        notification_id=row["id"] if notification else None,
    )
    return msgspec.json.encode(event)


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
        event = _acknowledged(row, user.username, datetime.now(UTC), notification=not alert)
        await outbox.add(conn, services.alerts_topic, row["device_id"], event)
    done = f"{sql} AND {'acknowledged_at' if alert else 'acked_at'} IS NOT NULL"
    shown = await once_projected(services, done, params)
    return (shown, True) if shown is not None else (row, False)


SeverityFilter = Annotated[SeverityName | None, Parameter(description="only this severity")]
StatusFilter = Annotated[
    AlertStatusFilter | None,
    Parameter(description="only this status; `open`: every status but cleared"),
]
RuleFilter = Annotated[uuid.UUID | None, Parameter(description="only this rule's alerts")]
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
        status: StatusFilter = None,
        severity: SeverityFilter = None,
        rule_id: RuleFilter = None,
        device_id: str | None = None,
        site_id: str | None = None,
        cursor: Cursor = None,
        limit: Limit = 50,
    ) -> AlertPage:
        """Alerts of the user's sites, newest first."""
        params = {
            "sites": request.user.scope,
            "status": status,
            "rule_id": rule_id,
            "severity": severity,
            "device_id": device_id,
            "site_id": site_id,
            "limit": limit + 1,
            **_before(cursor),
        }
        rows = await _rows(services, ALERTS_SQL, params)
        rows, next_cursor = page_of(rows, limit, lambda r: ts_key(r["opened_at"], r["id"]))
        return AlertPage(items=[Alert(**r) for r in rows], next_cursor=next_cursor)

    @get("/groups")
    async def list_alert_groups(
        self,
        services: Services,
        request: Request[Any, Any, Any],
        status: Annotated[
            AlertStatusFilter, Parameter(description="only this status; `open`: every but cleared")
        ] = "open",
        severity: SeverityFilter = None,
        rule_id: RuleFilter = None,
        device_id: str | None = None,
        site_id: str | None = None,
    ) -> AlertGroups:
        """Alerts of the user's sites grouped by rule, site and severity (default: the open
        ones, every status but cleared), most severe first (critical, major, minor, warning),
        then the largest groups. At most 1,000 groups: `truncated` says there were more (filter
        by site or rule)."""
        params = {
            "sites": request.user.scope,
            "status": status,
            "rule_id": rule_id,
            "severity": severity,
            "device_id": device_id,
            "site_id": site_id,
            "ranks": list(SEVERITIES),
            "limit": MAX_GROUPS + 1,
        }
        rows = await _rows(services, GROUPS_SQL, params)
        return AlertGroups(
            items=[AlertGroup(**r) for r in rows[:MAX_GROUPS]], truncated=len(rows) > MAX_GROUPS
        )

    @post("/ack", guards=[OPERATORS], status_code=202, opt=problems(422))
    async def ack_alerts(
        self, services: Services, request: Request[Any, Any, Any], data: AlertAckRequest
    ) -> AlertAckResult:
        """Acknowledge alerts in bulk: the alerts of the request's `ids`, or the unacknowledged
        alerts (of the user's sites) that a filter matches, at most 10,000 a call (`more`: call
        again for the rest). Each acknowledgement is queued as `POST /api/v1/alerts/{id}/ack`
        queues one, all in one transaction; the projection applies them (acking twice keeps
        the first). 202 with the alerts queued (`acknowledged`) and, of the request's ids,
        those acknowledged before (`already`) and those not found or of another site
        (`unknown`). 422 for a body with both ids and a filter, or neither."""
        errors = data.problems()
        if errors:
            raise problem(422, "Invalid acknowledgement", errors[0]["message"], errors=errors)
        user = request.user
        params: dict[str, Any] = {"sites": user.scope}
        if data.ids is not None:
            wanted = list(dict.fromkeys(data.ids))  # each once, in the request's order
            # PostgreSQL's text holds no NUL: such an id is no alert's
            sql, params["ids"] = ACK_IDS_SQL, [i for i in wanted if "\x00" not in i]
        else:
            wanted = []
            sql = ACK_FILTER_SQL
            params |= {f: getattr(data, f) for f in AlertAckRequest.FILTERS}
            params["limit"] = MAX_BULK_ACK + 1
        now = datetime.now(UTC)
        async with services.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, params)
            rows = await cur.fetchall()
            more = len(rows) > MAX_BULK_ACK
            found = {r["id"]: r for r in rows[:MAX_BULK_ACK]}
            if data.ids is not None:  # in the request's order
                rows = [found[i] for i in wanted if i in found]
            else:
                rows = list(found.values())
            todo = [r for r in rows if not r["acknowledged"]]
            queued = await outbox.add_many(
                conn,
                services.alerts_topic,
                [(r["device_id"], _acknowledged(r, user.username, now)) for r in todo],
            )
        if queued:  # usually on its way to the projection by now
            await published(services, queued[-1])
        return AlertAckResult(
            acknowledged=[r["id"] for r in todo],
            already=[r["id"] for r in rows if r["acknowledged"]],
            unknown=[i for i in wanted if i not in found],
            more=more,
        )

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
